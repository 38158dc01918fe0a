"""Training: the two stages of a run, each resumable after a kill (their callbacks: callbacks.py).

    source, image_size, splits = prepare_data(config, cache_dir)
    model, history, seconds = train_vqvae(config, splits, run_dir, shown, strategy)
    prior = prior_stage(config, model, source, run_dir, strategy, metrics, real)

`build_vqvae(config)` and `build_prior(config)` are the one way a model is made from a
`driver.Config` (the driver, the tests and the benchmarks all use them). `fit_resumably` is
`model.fit` with what lets a long run survive: a backup `--resume` continues from, a best
checkpoint written atomically, the history as CSV, a NaN that stops cleanly, and TensorBoard
logs in RUN/logs/<stage>.
"""

import contextlib
import csv
import functools
import os
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import cache
import callbacks
import cpu
import data
import evaluate
import files
import hierarchy
import pixelcnn
import plots
import vqvae


@contextlib.contextmanager
def dtype_policy(name):
    """Layers built inside take Keras' dtype policy `name`; float32 again after (every model
    this package keeps for sampling and scoring is float32)."""
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def averaging_adam(learning_rate, weights_ema):
    """Adam, keeping a moving average of the weights with momentum `weights_ema` (0 = none),
    which `swap_in_averages` puts in the model for validating and saving."""
    return keras.optimizers.Adam(learning_rate, use_ema=bool(weights_ema), ema_momentum=weights_ema or 0.99)


def swap_in_averages(weights_ema):
    """The callbacks that validate, draw and save each epoch with the averaged weights (and
    swap them out again when the next epoch starts): none without a moving average."""
    return [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if weights_ema else []


def build_vqvae(config):
    """The compiled VQ-VAE of a config (build it inside a tf.distribute scope to distribute it)."""
    # Mixed precision for the VQ-VAE only (the prior and its sampler stay in float32).
    with dtype_policy("mixed_float16" if config.mixed_precision else "float32"):
        model = vqvae.VQVAE(
            num_embeddings=config.K, latent_dim=config.D, beta=config.beta, filters=config.filters,
            num_res_blocks=config.res_blocks, ema_decay=config.ema_decay, codebook_init=config.codebook_init,
            dead_code_steps=config.dead_code_steps, shift=config.shift, norm=config.norm,
            ssim_weight=config.ssim_weight,
        )
        model.compile(optimizer=averaging_adam(config.learning_rate, config.weights_ema), jit_compile=config.jit)
    return model


def top_layers(config, grid_rows=None):
    """The top PixelCNN's gated layers: --pcnn-top-layers, but no more than the top grid of
    code grids of `grid_rows` rows has rows. Its first 7x7 layer sees 3 rows above a code
    and each gated layer one more (checked: on a 16x16 grid 16 layers carry the first row
    to the last, 12 do not), so a stack as deep as the grid has rows sees all of it and a
    deeper one adds no view. On the demo data's 8x8 top grid 8 layers fit as well as 16
    (validation 1.446 bits per top code against 1.448) in half the time."""
    if grid_rows is None:
        return config.pcnn_top_layers
    top_rows = -(-grid_rows // config.pcnn_top_factor)  # a partial block at the edge is a row too
    return max(1, min(config.pcnn_top_layers, top_rows))


def build_prior(config, grid_rows=None):
    """The prior of a config (for code grids of `grid_rows` rows, if known): a compiled
    PixelCNN, or a HierarchicalPrior whose PixelCNNs are compiled (the middle one with the
    top one's channels)."""
    settings = dict(filters=config.pcnn_filters, num_layers=config.pcnn_layers, head_units=config.pcnn_head_units or None)
    if config.pcnn_variant == "hierarchical":
        top = dict(filters=config.pcnn_top_filters, num_layers=top_layers(config, grid_rows),
                   head_units=4 * config.pcnn_top_filters)
        middle = dict(top, num_layers=config.pcnn_middle_layers or config.pcnn_top_layers,
                      condition_blocks=config.pcnn_condition_blocks)
        below = dict(settings, condition_blocks=config.pcnn_condition_blocks)
        prior = hierarchy.HierarchicalPrior(config.K, config.D, config.pcnn_top_codes, config.pcnn_top_factor,
                                            top=dict(top, dropout=config.pcnn_top_dropout), bottom=below,
                                            position_bins=config.pcnn_position_bins,
                                            middle_embeddings=config.pcnn_middle_codes,
                                            middle_factor=config.pcnn_middle_factor,
                                            middle=middle,
                                            top_temperature=config.pcnn_top_temperature,
                                            bottom_temperature=config.pcnn_bottom_temperature)
        networks = prior.networks
    else:
        prior = pixelcnn.PixelCNN(config.K, config.pcnn_variant, num_res_blocks=config.pcnn_res_blocks, **settings)
        networks = [prior]
    for network in networks:
        compile_prior(network, config)
    return prior


def compile_prior(network, config):
    network.compile(optimizer=averaging_adam(config.pcnn_learning_rate, config.pcnn_weights_ema),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=config.jit)


def prior_precision(config):
    """'bfloat16' or 'float32': what the PixelCNNs compute in while they train
    (--pcnn-precision; 'auto' is bfloat16 on a CPU that multiplies it natively, without a GPU)."""
    if config.pcnn_precision != "auto":
        return config.pcnn_precision
    return "bfloat16" if cpu.native_bfloat16() and not tf.config.list_physical_devices("GPU") else "float32"


def prior_twin(network, config):
    """A compiled copy of a PixelCNN, with its weights, that computes in bfloat16 (its
    weights, optimizer and logits stay float32), to train in its place: on a CPU with AMX a
    training step takes 21-27% less time (benchmarks/prior_step.py). Its checkpoints reload
    as float32 PixelCNNs (the config does not hold the precision), which sampling and
    scoring use."""
    with dtype_policy("mixed_bfloat16"), network.distribute_strategy.scope():
        twin = type(network).from_config(network.get_config())
        compile_prior(twin, config)
    twin.set_weights(network.get_weights())
    return twin


# ---------------------------------------------------------------------------
# Data and devices


def prepare_data(config, cache_dir):
    """Find the data (writing the demo data if none was given), decode each split once
    into the cache in `cache_dir`, and build the three splits' datasets."""
    root = config.data
    if root is None:
        import demo

        print(f"no --data given: using the built-in demo data in {config.demo_dir}/", flush=True)
        root = demo.write_demo_dataset(config.demo_dir, seed=config.seed)
    source = data.find_source(root, seed=config.seed)
    downsampling = 2 ** len(config.filters)
    if config.image_size:
        image_size = [config.image_size[0], config.image_size[-1]]
    else:
        image_size = list(data.default_image_size(source, downsampling, config.slice_axis))
    print(f"data: {root} ({source.layout} layout), files per split: "
          + ", ".join(f"{s} {len(f)}" for s, f in source.files.items())
          + f"; slices resized to {image_size[0]}x{image_size[1]}; cache: {cache_dir}", flush=True)
    if source.ignored:
        names = ", ".join(os.path.basename(path) for path in source.ignored[:5])
        print(f"ignored {len(source.ignored)} file(s) that are not {'PNG' if source.is_png else 'NIfTI'} slices: "
              f"{names}{', ...' if len(source.ignored) > 5 else ''}", flush=True)
    manifests = {split: cache.cache_split(source, split, image_size, cache_dir, config.slice_axis,
                                         config.volume_index, verbose=True)
                 for split in data.SPLITS}
    report_skipped(manifests)
    splits = {split: cache.cached_dataset(manifest, config.batch_size, config.shift, shuffle=(split == "train"),
                                         seed=config.seed)
              for split, manifest in manifests.items()}
    source.manifests, source.image_size = manifests, image_size
    source.slices = {split: manifest["slices"] for split, manifest in manifests.items()}
    source.positions = {split: np.asarray(manifest["positions"], np.float32) for split, manifest in manifests.items()}
    print("slices per split: " + ", ".join(f"{s} {n}" for s, n in source.slices.items()), flush=True)
    return source, image_size, splits


def report_skipped(manifests, shown=10):
    """Print the files each split skipped, with the reason, and how many."""
    for split, manifest in manifests.items():
        skipped = manifest["skipped"]
        if skipped:
            print(f"skipped {len(skipped)} of {manifest['files']} files in the {split} split "
                  f"(listed in {os.path.dirname(manifest['shards'][0])}/manifest.json):", flush=True)
            for path, reason in skipped[:shown]:
                print(f"  {path}: {reason}", flush=True)
            if len(skipped) > shown:
                print(f"  ... and {len(skipped) - shown} more", flush=True)


def take_slices(dataset, count=16, spread_over=None):
    """`count` slices of a batched dataset as numpy: every (spread_over // count)-th slice,
    so figures show the whole split rather than its first case (fewer if the split is smaller)."""
    stride = max(1, (spread_over or count) // count)
    return np.stack([image.numpy() for image in dataset.unbatch().shard(stride, 0).take(count)])


def start_run(config, strategy):
    """Seed everything, make the run folder and return it (a scratch folder on a non-chief
    worker of a cluster, which does the same work and throws its outputs away)."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    run_dir = config.resume or config.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if not is_chief(strategy):
        import tempfile

        run_dir = tempfile.mkdtemp(prefix="worker-")
    os.makedirs(run_dir, exist_ok=True)
    if config.resume:
        files.remove_stale_temporaries(run_dir)
    return run_dir


def print_summary(run_dir, metrics):
    print(f"\nrun folder: {run_dir}  (TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'logs')})\n"
          + "\n".join(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in sorted(metrics.items())),
          flush=True)


def make_strategy(name):
    """The tf.distribute strategy of --strategy. Created before any other TensorFlow work:
    MultiWorkerMirroredStrategy must configure the collective ops at start-up."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """Whether this process writes the run folder: always, except on the non-chief workers of
    a multi-worker cluster (TF_CONFIG), which write to a scratch folder instead."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if not task_type or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and resolver.task_id == 0 and not has_chief


# ---------------------------------------------------------------------------
# Resumable training


def read_history(path):
    """A CSVLogger file as {column: [float, ...]} (empty if there is none)."""
    rows = read_history_rows(path)
    return {key: [float(row[key]) if row[key] not in ("", None) else float("nan") for row in rows]
            for key in (rows[0].keys() if rows else [])}


def read_history_rows(path):
    """The complete rows of a CSVLogger file as dicts (a row a kill cut short is left out)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("epoch", "").strip().isdigit()
                and None not in row.values() and None not in row]


def resume_point(run_dir, name, history_file):
    """How many epochs of stage `name` a killed run completed (from BackupAndRestore's
    backup), with the history file cut back to those epochs; 0 and no history file for a
    fresh start."""
    backup = os.path.join(run_dir, "backup", name, "training_metadata.json")
    history_path = os.path.join(run_dir, history_file)
    done = 0
    if os.path.exists(backup):
        done = int(files.read_json(backup)["epoch"])
    if not done:
        if os.path.exists(history_path):
            os.remove(history_path)
        return 0
    # An epoch logged after the last backup is trained again: drop its row.
    kept = [row for row in read_history_rows(history_path) if int(row["epoch"]) < done]
    files.write_csv(history_path, list(kept[0]) if kept else ["epoch"], [list(row.values()) for row in kept])
    print(f"resuming {name} training after epoch {done} (backup in {os.path.dirname(backup)})", flush=True)
    return done


def fit_resumably(model, dataset, run_dir, name, history_file, epochs, monitor, mode, stage_callbacks,
                  validation_data=None, log_dir=None):
    """`model.fit` with what lets a run survive a kill and a NaN loss:

    * BackupAndRestore in RUN/backup/<name> (the last callback, so a backed-up epoch has
      its checkpoint and history row written), which --resume picks up; removed once the
      stage ends;
    * ModelCheckpoint of the best `monitor` to RUN/<name>.keras, written atomically and
      never beaten by a worse epoch after a resume (initial_value_threshold);
    * CSVLogger, appending when resuming; TensorBoard in `log_dir` (default RUN/logs/<name>);
    * TerminateOnNaN.

    Returns the whole history (earlier processes' epochs too) and whether NaN stopped it."""
    partial = os.path.join(run_dir, f".{name}-partial.keras")
    history_path = os.path.join(run_dir, history_file)
    best = best_score(read_history(history_path).get(monitor), mode)
    backup = os.path.join(run_dir, "backup")
    every_callback = list(stage_callbacks) + [
        # After the callbacks that add val_* scores and the learning rate to the logs.
        keras.callbacks.TensorBoard(log_dir or os.path.join(run_dir, "logs", name), write_graph=False,
                                    profile_batch=0),
        keras.callbacks.ModelCheckpoint(partial, monitor=monitor, mode=mode, save_best_only=True,
                                        initial_value_threshold=best),
        callbacks.PublishCheckpoint(partial, os.path.join(run_dir, f"{name}.keras")),
        keras.callbacks.CSVLogger(history_path, append=True),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.BackupAndRestore(os.path.join(backup, name), double_checkpoint=True),
    ]
    # One iterator for the whole fit. Given a dataset that ends, Keras makes a new iterator for
    # each epoch, and deleting the last one waits for tf.data's autotuning thread to wake from
    # its sleep: 8-16 s of idle CPU after every third or fourth epoch on 2 cores (README,
    # "Idle between epochs"). Repeated, with each epoch's batches counted, one iterator lives
    # through the whole fit; each epoch still reads every slice once, in a new order.
    steps = int(dataset.cardinality())
    if steps > 0:
        dataset = dataset.repeat()
    else:  # unknown or infinite: Keras counts the steps itself
        steps = None
    if not model.optimizer.built:
        # Its variables made now, not lazily inside the first traced training step: a
        # tf.function that creates variables is traced twice, which took half of each
        # PixelCNN's first epoch (9 s of the 16-layer top one's 18 s).
        with model.distribute_strategy.scope():
            model.optimizer.build(model.trainable_variables)
    try:
        fitted = model.fit(dataset, validation_data=validation_data, epochs=epochs, callbacks=every_callback,
                           steps_per_epoch=steps, shuffle=False,  # the datasets shuffle themselves
                           verbose=1 if sys.stdout.isatty() else 2)
    finally:
        if os.path.exists(partial):  # a save that failed (a full disk): the last good model stays
            os.remove(partial)
    shutil.rmtree(os.path.join(backup, name), ignore_errors=True)
    if os.path.isdir(backup) and not os.listdir(backup):
        os.rmdir(backup)
    losses = fitted.history.get("loss", [])
    stopped_on_nan = bool(losses) and not np.isfinite(losses[-1])
    history = read_history(history_path)
    if stopped_on_nan:
        scores = np.asarray(history.get(monitor, [np.nan]), dtype=float)
        kept = "no epoch finished with a finite score"
        if np.isfinite(scores).any():
            kept = f"keeping the best model ({name}.keras, epoch {int(best_epoch(scores, mode)) + 1})"
        print(f"\n{name}: the training loss became NaN in epoch {len(scores)}; training stopped, {kept}. "
              f"A lower learning rate usually avoids this.", flush=True)
    return history, stopped_on_nan


def best_epoch(scores, mode):
    return np.nanargmax(scores) if mode == "max" else np.nanargmin(scores)


def best_score(scores, mode):
    """The best finite score of a history column (None if there is none)."""
    scores = np.asarray(scores if scores else [np.nan], dtype=float)
    return float(scores[best_epoch(scores, mode)]) if np.isfinite(scores).any() else None


# ---------------------------------------------------------------------------
# The two stages


def train_vqvae(config, splits, run_dir, shown, strategy):
    """Train the VQ-VAE (resuming a killed run's backup, if there is one); `shown` are the
    validation slices drawn in the progress grids."""
    resume_point(run_dir, "vqvae", "history.csv")
    with strategy.scope():
        model = build_vqvae(config)
    stage_callbacks = swap_in_averages(config.weights_ema) + [
        callbacks.CosineLearningRate(config.learning_rate, config.epochs, config.max_minutes),
        callbacks.ValidationMetrics(splits["validate"]),
        callbacks.TimeLimit(config.max_minutes),
        plots.TrainingPlots(run_dir, read_history(os.path.join(run_dir, "history.csv"))),
        plots.ReconstructionGrids(shown, run_dir, config.shift, config.grid_every, config.cmap),
        callbacks.ReconstructionImages(shown, os.path.join(run_dir, "logs", "vqvae", "reconstructions"), config.shift,
                             config.grid_every),
    ]
    start = time.time()
    history, stopped_on_nan = fit_resumably(model, splits["train"], run_dir, "vqvae", "history.csv", config.epochs,
                                            "val_ssim", "max", stage_callbacks)
    seconds = time.time() - start
    best_path = os.path.join(run_dir, "vqvae.keras")
    if not stopped_on_nan:
        files.atomic_write(os.path.join(run_dir, "vqvae_last.keras"), model.save)
    if not os.path.exists(best_path) or not np.isfinite(history.get("val_ssim", [np.nan])).any():
        raise RuntimeError("training produced no finite validation SSIM, so no best model was saved"
                           + (" (the loss became NaN: try a lower --learning-rate)" if stopped_on_nan else ""))
    return keras.models.load_model(best_path), history, seconds


def score_vqvae(model, splits, run_dir, history, config, shown):
    """Score the best model on the whole test split and write the final figures of the
    test slices `shown`."""
    scores = evaluate.score_split(model, splits["test"])
    ssims = scores["ssim"]
    metrics = {
        "val_ssim_best": float(np.nanmax(history["val_ssim"])),
        "best_epoch": int(np.nanargmax(history["val_ssim"])) + 1,
        "test_ssim_mean": float(ssims.mean()),
        "test_ssim_std": float(ssims.std()),
        "test_ssim_min": float(ssims.min()),
        "test_psnr_mean": float(scores["psnr"][np.isfinite(scores["psnr"])].mean()),
        "test_slices": int(ssims.size),
        "codebook_usage": scores["codebook"]["codebook_usage"],
        "perplexity": scores["codebook"]["perplexity"],
    }
    reconstructions, indices = model.reconstruct(shown)
    plots.reconstruction_grid(shown - config.shift, reconstructions.numpy() - config.shift,
                              os.path.join(run_dir, "reconstructions.png"), cmap=config.cmap,
                              title=f"test slices: mean SSIM over the whole test split {metrics['test_ssim_mean']:.3f}")
    plots.code_map_figure(shown[:4] - config.shift, indices.numpy()[:4], config.K,
                          os.path.join(run_dir, "code_maps.png"))
    return metrics


def prior_stage(config, model, source, run_dir, strategy, metrics, real):
    """Train the prior (or load it, if a killed run finished it) and draw the run's final
    samples, shown below the `real` test slices; their figures go into `metrics` and
    RUN/metrics.json."""
    import sample

    metrics_path = os.path.join(run_dir, "metrics.json")
    if "prior_test_bits_per_code" in metrics:
        print("the prior finished before the run stopped: loading pixelcnn.keras", flush=True)
        prior = keras.models.load_model(os.path.join(run_dir, "pixelcnn.keras"))
    else:
        prior, prior_metrics, _ = train_prior(config, model, ordered_splits(config, source), run_dir, strategy,
                                              source.positions)
        metrics.update(prior_metrics)
        files.write_json(metrics_path, metrics)
    if config.samples:
        grid_shape = [size // model.downsampling for size in source.image_size]
        _, seconds = sample.write_samples(model, prior, grid_shape, config.samples, os.path.join(run_dir, "samples"),
                                          config.temperature, config.seed, cmap=config.cmap, real=real,
                                          log_dir=os.path.join(run_dir, "logs", "prior", "samples"))
        metrics["sampling_seconds"] = round(seconds, 1)
        files.write_json(metrics_path, metrics)
    return prior


def ordered_splits(config, source):
    """Each split's slices in cache order (the training split unshuffled), so that code
    grids line up with `source.positions`."""
    return {split: cache.cached_dataset(manifest, config.batch_size, config.shift)
            for split, manifest in source.manifests.items()}


def encode_split(model, dataset):
    """The (N, h, w) int32 code grids of every slice in a split."""
    return np.concatenate([model.encode(images).numpy() for images in dataset])


def encode_codes(model, ordered, mirror):
    """{split: (N, h, w) code grids} of each split in order; with `mirror`, also
    "train_mirrored": the training slices flipped left to right (a brain mirrored is still a
    brain), which double the prior's training grids."""
    codes = {split: encode_split(model, dataset) for split, dataset in ordered.items()}
    if mirror:
        codes["train_mirrored"] = encode_split(model, ordered["train"].map(tf.image.flip_left_right))
    codes["file_order"] = np.array(True)  # grids in cache (file) order, matching the slices' positions
    return codes


def encoded_again(codes, model, ordered, mirror):
    """`encode_codes` anew, keeping the hierarchical prior's level codebooks of the earlier
    {name: array} `codes` (runs made before the cache was read back in file order hold their
    training grids in another order than their slices' positions, "in_order" rather than
    "file_order": their grids are encoded again, but the PixelCNNs they trained still expect
    their level codebooks)."""
    kept = {key: value for key, value in codes.items() if key.endswith("_codebook")}
    return {**encode_codes(model, ordered, mirror), **kept}


def training_grids(codes, positions, mirror):
    """The prior's {split: grids} and {split: positions}: the training split with its
    mirrored slices, if `mirror`."""
    grids = {split: codes[split] for split in data.SPLITS}
    positions = dict(positions)
    if mirror:
        grids["train"] = np.concatenate([codes["train"], codes["train_mirrored"]])
        if positions["train"] is not None:
            positions["train"] = np.concatenate([positions["train"]] * 2)
    return grids, positions


def code_dataset(grids, batch_size, shuffle=False, seed=0, condition=None, hidden_share=0.0, epoch_size=None,
                 slips=None, slip_share=0.0):
    """(codes, codes) batches of (N, h, w) code grids: a PixelCNN predicts its own input
    (((codes, condition), codes) for a conditional one, whose condition is replaced by class
    0, "unknown", for a random `hidden_share` of the grids, anew each epoch). With
    `epoch_size`, each pass (epoch) is that many grids drawn anew from the shuffled N. With
    `slips` ((N, R, h', w') alternatives to each condition grid, e.g. `teacher_forced_draws`),
    a random `slip_share` of each condition grid's codes is taken from one of its R
    alternatives, anew each time a grid is used."""
    if slips is not None and condition is None:
        raise ValueError("slips replace codes of the condition grids, and there is no condition")
    inputs = grids if condition is None else (grids, condition) if slips is None else (grids, condition, slips)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, grids))
    if shuffle:
        dataset = dataset.shuffle(len(grids), seed=seed)
    if epoch_size:
        dataset = dataset.take(epoch_size)
    if slips is not None:
        def slip(inputs, target, draw):
            codes, real, alternatives = inputs
            pick = tf.random.stateless_uniform(tf.shape(real), tf.stack([draw, 1])) < slip_share
            which = tf.random.stateless_uniform((), tf.stack([draw, 2]), maxval=tf.shape(alternatives)[0],
                                                dtype=tf.int32)
            return (codes, tf.where(pick, alternatives[which], real)), target

        draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip(dataset, draws).map(
            lambda pair, draw: slip(*pair, draw))
    if hidden_share and condition is not None:
        def hide(inputs, target, draw):
            hidden = tf.cast(draw % 1000, tf.float32) < 1000 * hidden_share
            return (inputs[0], tf.where(hidden, tf.zeros_like(inputs[1]), inputs[1])), target

        dataset = tf.data.Dataset.zip(dataset, tf.data.Dataset.random(seed=seed)).map(
            lambda pair, draw: hide(*pair, draw))
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def teacher_forced_draws(network, grids, condition=None, draws=4, seed=0, batch_size=64):
    """(N, draws, h, w) alternatives to (N, h, w) code grids: each code drawn from the
    PixelCNN's distribution given the real codes before it (one parallel pass per batch, as
    in training), i.e. the slips its sampler makes where it has drawn the codes before right.
    A finer level trained on its condition grids with some codes swapped for these
    (`code_dataset(slips=...)`) learns to follow the grids the coarser level draws, not only
    real ones: the "conditioning augmentation" of cascaded generative models."""
    out = []
    for start in range(0, len(grids), batch_size):
        chunk = tf.constant(grids[start: start + batch_size])
        inputs = chunk if condition is None else (chunk, tf.constant(condition[start: start + batch_size]))
        logits = network(inputs)
        flat = tf.reshape(logits, (-1, logits.shape[-1]))
        picks = [tf.reshape(pixelcnn.draw(flat, 1.0, seed + 1000 * start + index), tf.shape(chunk))
                 for index in range(draws)]
        out.append(tf.stack(picks, axis=1).numpy().astype(np.int32))
    return np.concatenate(out)


def train_prior(config, model, ordered, run_dir, strategy, positions=None):
    """Fit the prior to the code grids of the train split (`ordered`: each split's slices
    in cache order), validated on the validate split (resuming a killed run's backup, if
    there is one): one PixelCNN, or the top and bottom PixelCNNs of a hierarchical prior,
    one after the other (given the slices' {split: positions}, if it is conditioned on
    them)."""
    positions = positions or {split: None for split in data.SPLITS}
    codes_path = os.path.join(run_dir, "codes.npz")
    codes = dict(np.load(codes_path)) if os.path.exists(codes_path) and config.resume else {}
    if "file_order" not in codes or (config.pcnn_mirror and "train_mirrored" not in codes):
        print(f"\nencoding the splits into code grids for the {config.pcnn_variant} PixelCNN prior"
              + (" (and the training slices mirrored)" if config.pcnn_mirror else ""), flush=True)
        codes = encoded_again(codes, model, ordered, config.pcnn_mirror)
        files.atomic_write(codes_path, lambda path: np.savez_compressed(path, **codes))
    grids, positions = training_grids(codes, positions, config.pcnn_mirror)
    with strategy.scope():
        prior = build_prior(config, grids["train"].shape[1])
    depth = prior.networks[0].num_layers if isinstance(prior, hierarchy.HierarchicalPrior) else None
    if depth is not None and depth < config.pcnn_top_layers:
        print(f"top PixelCNN: {depth} gated layers, not --pcnn-top-layers {config.pcnn_top_layers}: its grid has "
              f"{depth} rows, and a deeper stack sees no more of it", flush=True)
    if prior_precision(config) == "bfloat16":
        print(f"the PixelCNNs train in bfloat16 with float32 weights (--pcnn-precision {config.pcnn_precision}; "
              f"this CPU has {cpu.native_bfloat16() or 'no native bfloat16'})", flush=True)
    start = time.time()
    if isinstance(prior, hierarchy.HierarchicalPrior):
        prior = fit_hierarchy(prior, config, model, codes, grids, run_dir, positions)
    else:
        prior = fit_prior(prior, config, grids, run_dir, "pixelcnn", config.pcnn_epochs, "prior")
    return prior, {
        "prior_variant": config.pcnn_variant,
        "prior_parameters": int(prior.count_params()),
        "prior_val_bits_per_code": evaluate.prior_bits_per_code(prior, grids["validate"], positions["validate"]),
        "prior_test_bits_per_code": evaluate.prior_bits_per_code(prior, grids["test"], positions["test"]),
        "log2_K": float(np.log2(config.K)),
        "prior_train_seconds": round(time.time() - start, 1),
    }, codes


def fit_prior(network, config, grids, run_dir, name, epochs, log_name, condition=None, hidden_share=0.0,
              epoch_size=None, slips=None):
    """Fit one PixelCNN to {split: grids} (given {split: condition grids}, if conditional,
    hidden for `hidden_share` of the training grids, or with `config.pcnn_condition_slips`
    of their codes swapped for one of the training grids' alternatives, which `slips()`
    gives when the fit starts; each epoch `epoch_size` of the training grids, if given) and
    return its best checkpoint, RUN/<name>.keras (float32, whatever `prior_precision` trained
    it in). A fit a killed run finished is loaded."""
    path, history_file = os.path.join(run_dir, f"{name}.keras"), f"{name}_history.csv"
    finished = len(read_history_rows(os.path.join(run_dir, history_file))) == epochs
    if finished and os.path.exists(path) and not os.path.exists(os.path.join(run_dir, "backup", name)):
        print(f"{name} finished before the run stopped: loading {name}.keras", flush=True)
        return keras.models.load_model(path)
    resume_point(run_dir, name, history_file)
    alternatives = slips() if slips else None

    def dataset(split, shuffle=False):
        return code_dataset(grids[split], config.pcnn_batch_size, shuffle, config.seed,
                            None if condition is None else condition[split], hidden_share if shuffle else 0.0,
                            epoch_size if shuffle else None, alternatives if shuffle else None,
                            config.pcnn_condition_slips)

    stage_callbacks = swap_in_averages(config.pcnn_weights_ema) + [
        callbacks.CosineLearningRate(config.pcnn_learning_rate, epochs),
        callbacks.BitsPerCode(read_history(os.path.join(run_dir, history_file)),
                              os.path.join(run_dir, f"{name}_loss.png"), f"{name}: bits per code",
                              np.log2(network.num_embeddings))]
    trainee = prior_twin(network, config) if prior_precision(config) == "bfloat16" else network
    fit_resumably(trainee, dataset("train", True), run_dir, name, history_file, epochs, "val_loss", "min", stage_callbacks,
                  validation_data=dataset("validate"), log_dir=os.path.join(run_dir, "logs", log_name))
    if not os.path.exists(path):
        raise RuntimeError(f"{name}: the validation loss was never finite, so no prior was saved")
    return keras.models.load_model(path)


def fit_hierarchy(prior, config, model, codes, grids, run_dir, positions):
    """Fit a HierarchicalPrior to {split: grids}: each coarser level's codebook (k-means,
    kept in codes.npz so a resumed run uses the same ones), the top PixelCNN (given the
    slices' {split: positions}, if it has position bins), then each finer one given the grids
    of the level above; saved whole as RUN/pixelcnn.keras."""
    names = [name for name, *_ in prior.levels]
    if all(f"{name}_codebook" in codes for name in names):
        prior.codebook.assign(model.quantizer.codebook)
        for name, _, centres, _ in prior.levels:
            centres.assign(codes[f"{name}_codebook"])
    else:
        print("coarser grids: k-means of " + ", ".join(
            f"{factor}x{factor} blocks into {centres.shape[0]} {name} codes" for name, _, centres, factor in prior.levels),
            flush=True)
        prior.fit_codebooks(model.quantizer.codebook.numpy(), grids["train"])
        codes.update({f"{name}_codebook": centres.numpy() for name, _, centres, _ in prior.levels})
        files.atomic_write(os.path.join(run_dir, "codes.npz"), lambda path: np.savez_compressed(path, **codes))
    levels = {split: coarser_grids(prior, grids[split]) for split in data.SPLITS}
    by_position = None
    if prior.position_bins:
        prior.count_positions(positions["train"])
        known = np.mean(positions["train"] >= 0)
        print(f"top grid conditioned on the slice position ({prior.position_bins} bins): known for "
              f"{known:.0%} of the training slices", flush=True)
        by_position = {split: prior.position_classes(positions[split])[:, None, None] for split in data.SPLITS}
    epochs = {"top": config.pcnn_top_epochs, "middle": config.pcnn_middle_epochs, "bottom": config.pcnn_epochs}
    condition, above_condition = by_position, None
    for index, (name, network) in enumerate(zip(prior.names, prior.networks)):
        level_grids = grids if name == "bottom" else {split: levels[split][index] for split in data.SPLITS}
        hidden = hierarchy.HIDDEN_POSITION_SHARE if index == 0 and by_position else 0.0
        fit_grids, fit_condition, epoch_size = level_grids, condition, None
        if index == 0 and config.pcnn_top_shift:
            fit_grids, fit_condition = shifted_top_grids(prior, grids, level_grids, condition, config.pcnn_top_shift)
            epoch_size = len(grids["train"])
        slips = None
        if index and config.pcnn_condition_slips and config.pcnn_slip_levels in (name, "both"):
            # A partial: the slips are drawn only if this level is (still) to be trained.
            slips = functools.partial(condition_slips, prior, index, condition["train"], above_condition, config)
        network.set_weights(fit_prior(network, config, fit_grids, run_dir, f"prior_{name}", epochs[name],
                                      f"prior_{name}", fit_condition, hidden, epoch_size, slips).get_weights())
        above_condition = None if condition is None else condition["train"]
        condition = level_grids
    files.atomic_write(os.path.join(run_dir, "pixelcnn.keras"), prior.save)
    return prior


def condition_slips(prior, index, condition, above_condition, config):
    """The slips of level `index`'s training condition grids (the level above's grids, which
    that level's PixelCNN saw with `above_condition`): its `teacher_forced_draws`."""
    print(f"{prior.names[index]} PixelCNN: {config.pcnn_condition_slips:.0%} of its condition codes swapped in "
          f"training for the {prior.names[index - 1]} PixelCNN's teacher-forced draws", flush=True)
    return teacher_forced_draws(prior.networks[index - 1], condition, above_condition, seed=config.seed)


def shifted_top_grids(prior, grids, top_grids, condition, shift):
    """The top PixelCNN's training data with the training code grids also moved by every
    (dy, dx) of up to `shift` codes (the top grid of each moved grid, taken as every level
    is; the codes are rolled, so a head needs `shift` codes of background at its edges):
    (2 shift + 1)^2 times the top grids, each with its slice's condition, for a top prior
    that sees each head at several places in its coarse blocks. Validation and test grids
    stay as they are."""
    moves = range(-shift, shift + 1)
    moved = [coarser_grids(prior, np.roll(grids["train"], (dy, dx), axis=(1, 2)))[0] for dy in moves for dx in moves]
    copies = len(moved)
    top_grids = dict(top_grids, train=np.concatenate(moved))
    if condition is not None:
        condition = dict(condition, train=np.concatenate([condition["train"]] * copies))
    return top_grids, condition


def coarser_grids(prior, codes, batch_size=256):
    """(N, h, w) codes -> each coarser level's (N, h', w') grids as arrays, coarsest first
    (`HierarchicalPrior.level_codes` in batches)."""
    batches = [prior.level_codes(codes[start: start + batch_size]) for start in range(0, len(codes), batch_size)]
    return [np.concatenate([grid.numpy() for grid in level]) for level in zip(*batches)]
