"""Train a VQ-VAE and a PixelCNN prior on a folder of 2D MRI slices; reconstruct and sample.

    python driver.py                                  # the built-in demo data
    python driver.py --data DIR --K 128 --D 64 --epochs 30
    python driver.py reconstruct --run RUN_DIR --data DIR
    python driver.py sample --run RUN_DIR --n 16
    python driver.py evaluate --run RUN_DIR           # metrics.json and report.html
    python driver.py -h                               # every option, with its default

One `Config` holds every setting; the command line fills it in and it is saved as
`config.json` beside the run's models, so a run can be reloaded and repeated exactly.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

COMMANDS = ("train", "reconstruct", "sample", "evaluate")


@dataclasses.dataclass
class Config:
    data: str = None
    out: str = None
    image_size: list = None
    K: int = 128
    D: int = 64
    beta: float = 0.25
    filters: list = (16, 32)
    res_blocks: int = 2
    ema_decay: float = 0.99
    codebook_init: str = "kmeans"
    dead_code_steps: int = 10
    epochs: int = 15
    batch_size: int = 8
    learning_rate: float = 2e-3
    shift: float = -0.5
    seed: int = 0
    max_minutes: float = 0.0
    slice_axis: int = -1
    volume_index: int = 0
    grid_every: int = 1
    cmap: str = "gray"
    demo_dir: str = "demo_data"
    pcnn_epochs: int = 5
    pcnn_learning_rate: float = 3e-3
    pcnn_variant: str = "gated"
    pcnn_filters: int = 35
    pcnn_layers: int = 3
    pcnn_res_blocks: int = 2
    pcnn_head_units: int = 140
    pcnn_batch_size: int = 32
    samples: int = 16
    temperature: float = 1.0
    cache: str = None
    strategy: str = "default"
    jit: bool = False
    mixed_precision: bool = False
    deterministic: bool = True
    resume: str = None


class UsageError(ValueError):
    """A flag with a value we cannot use; the message names the flag."""


HELP = {
    "data": "data folder: OASIS layout (keras_png_slices_*), HipMRI layout (keras_slices_*), or a flat "
            "folder of PNG/NIfTI slices or volumes (split by case). Default: the built-in demo data",
    "out": "run folder for models, plots and metrics (default: runs/<timestamp>)",
    "image_size": "target HEIGHT [WIDTH] in pixels; slices are resized to fit and zero-padded "
                  "(default: the largest training slice, rounded up to the downsampling factor)",
    "K": "number of codebook vectors (num_embeddings)",
    "D": "size of each codebook vector (latent_dim)",
    "beta": "weight of the commitment loss",
    "filters": "channels of each stride-2 encoder stage (mirrored in the decoder); the number of "
               "values sets the downsampling: 2 values = /4",
    "res_blocks": "residual blocks in the encoder and in the decoder",
    "ema_decay": "decay of the EMA codebook updates; 0 = loss-based codebook (keras.io recipe)",
    "codebook_init": "'kmeans' on the first batch of encoder outputs, or 'uniform' random",
    "dead_code_steps": "restart a code unused for this many training steps (0 = never)",
    "epochs": "VQ-VAE training epochs",
    "batch_size": "slices per batch",
    "learning_rate": "Adam learning rate at the start; it decays along a half cosine to 5% of this over "
                     "--epochs (or --max-minutes, if that comes first)",
    "shift": "added to the [0, 1] intensities before training ([-0.5, 0.5] by default)",
    "seed": "seed for the data split, shuffling, demo data and initialisation",
    "max_minutes": "stop training when another epoch would pass this many minutes (0 = no limit)",
    "slice_axis": "axis along which 3D NIfTI volumes are cut into slices",
    "volume_index": "which volume of a 4D NIfTI series to use",
    "grid_every": "write a reconstruction grid every N epochs (0 = only at the end)",
    "cmap": "matplotlib colormap for image grids",
    "demo_dir": "where the demo data is written when --data is not given",
    "pcnn_epochs": "PixelCNN prior training epochs (0 = train no prior)",
    "pcnn_learning_rate": "PixelCNN Adam learning rate at the start; it decays along a half cosine to 5% of this "
                          "over --pcnn-epochs",
    "pcnn_variant": "'gated' (vertical and horizontal stacks, no blind spot) or 'plain' (keras.io example)",
    "pcnn_filters": "PixelCNN channels",
    "pcnn_layers": "gated layers ('gated'), or 1x1 mask-B layers after the residual blocks ('plain')",
    "pcnn_res_blocks": "residual blocks with 3x3 mask-B convolutions ('plain' only)",
    "pcnn_head_units": "width of the PixelCNN's 1x1 layer before the logits (0 = --pcnn-filters)",
    "pcnn_batch_size": "code grids per PixelCNN batch",
    "samples": "new slices sampled at the end of the run",
    "temperature": "sampling temperature (< 1: more typical samples, > 1: more varied)",
    "cache": "folder for the decoded slices (TFRecord shards, 2 bytes per pixel), written on first use and reused "
             "by any run of the same files at the same size (default: RUN/cache)",
    "strategy": "tf.distribute strategy: 'default' (one device), 'mirrored' (all local GPUs) or 'multiworker' "
                "(several machines, described by TF_CONFIG); --batch-size is the global batch",
    "jit": "compile the training steps with XLA",
    "mixed_precision": "train the VQ-VAE with float16 compute and float32 weights (for GPUs; slow on CPU)",
    "deterministic": "repeatable runs for a given --seed (tf.config.experimental.enable_op_determinism); "
                     "--no-deterministic may be faster on GPU",
    "resume": "continue the killed run in this folder from its last completed epoch, with its config.json",
}


def add_config_arguments(parser):
    defaults = Config()
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        names = [flag, "--" + field.name] if "_" in field.name else [flag]
        default = getattr(defaults, field.name)
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        help_text = HELP[field.name] + ("" if default is None else f" (default: {shown})")
        kwargs = {"dest": field.name, "default": default, "help": help_text.replace("%", "%%")}
        if field.name in ("image_size", "filters"):
            kwargs.update(type=int, nargs="+")
        elif field.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif field.type in (int, float):
            kwargs["type"] = field.type
        parser.add_argument(*names, **kwargs)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="driver.py",
        description="Train a VQ-VAE on 2D MRI slices, then a PixelCNN prior over its code grids, and write "
                    "models, metrics, plots, grids and samples to a run folder. Other commands: "
                    "'driver.py reconstruct -h', 'driver.py sample -h', 'driver.py evaluate -h'.",
    )
    add_config_arguments(parser)
    return parser


def build_reconstruct_parser():
    parser = argparse.ArgumentParser(
        prog="driver.py reconstruct",
        description="Reconstruct a folder of slices with a trained run's VQ-VAE: image grids and per-slice "
                    "SSIM/PSNR (reconstruction.csv).",
    )
    parser.add_argument("--run", required=True, help="run folder holding vqvae.keras and config.json")
    parser.add_argument("--data", help="folder of slices, or a data root with split folders "
                                       "(default: the run's own data)")
    parser.add_argument("--split", default="test", choices=("train", "validate", "test"),
                        help="split to use when --data has split folders (default: %(default)s)")
    parser.add_argument("--out", help="output folder (default: RUN/reconstruct-<split or folder name>)")
    parser.add_argument("--grids", type=int, default=4, help="how many 16-slice grids to write (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per batch (default: %(default)s)")
    return parser


def require(checks):
    """Raise a UsageError with the message of the first (ok, message) check that fails."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def validate(config):
    """Check flag values before any work starts."""
    checks = [
        (config.K >= 2, f"--K must be >= 2, got {config.K}"),
        (config.D >= 1, f"--D must be >= 1, got {config.D}"),
        (config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}"),
        (config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}"),
        (config.learning_rate > 0, f"--learning-rate must be > 0, got {config.learning_rate}"),
        (config.beta >= 0, f"--beta must be >= 0, got {config.beta}"),
        (0 <= config.ema_decay < 1, f"--ema-decay must be in [0, 1), got {config.ema_decay}"),
        (config.codebook_init in ("kmeans", "uniform"),
         f"--codebook-init must be 'kmeans' or 'uniform', got {config.codebook_init!r}"),
        (config.dead_code_steps >= 0, f"--dead-code-steps must be >= 0, got {config.dead_code_steps}"),
        (len(config.filters) >= 1 and min(config.filters) >= 1,
         f"--filters must be positive channel counts, got {config.filters}"),
        (config.res_blocks >= 0, f"--res-blocks must be >= 0, got {config.res_blocks}"),
        (config.max_minutes >= 0, f"--max-minutes must be >= 0, got {config.max_minutes}"),
        (config.grid_every >= 0, f"--grid-every must be >= 0, got {config.grid_every}"),
        (config.volume_index >= 0, f"--volume-index must be >= 0, got {config.volume_index}"),
        (config.pcnn_epochs >= 0, f"--pcnn-epochs must be >= 0, got {config.pcnn_epochs}"),
        (config.pcnn_learning_rate > 0, f"--pcnn-learning-rate must be > 0, got {config.pcnn_learning_rate}"),
        (config.pcnn_variant in ("plain", "gated"),
         f"--pcnn-variant must be 'plain' or 'gated', got {config.pcnn_variant!r}"),
        (config.pcnn_filters >= 2, f"--pcnn-filters must be >= 2, got {config.pcnn_filters}"),
        (config.pcnn_layers >= (1 if config.pcnn_variant == "gated" else 0),
         f"--pcnn-layers must be >= 1 for the gated prior, >= 0 for the plain one, got {config.pcnn_layers}"),
        (config.pcnn_res_blocks >= 0, f"--pcnn-res-blocks must be >= 0, got {config.pcnn_res_blocks}"),
        (config.pcnn_head_units >= 0, f"--pcnn-head-units must be >= 0 (0 = --pcnn-filters), "
                                      f"got {config.pcnn_head_units}"),
        (config.pcnn_batch_size >= 1, f"--pcnn-batch-size must be >= 1, got {config.pcnn_batch_size}"),
        (config.samples >= 0, f"--samples must be >= 0, got {config.samples}"),
        (config.temperature > 0, f"--temperature must be > 0, got {config.temperature}"),
        (config.strategy in ("default", "mirrored", "multiworker"),
         f"--strategy must be 'default', 'mirrored' or 'multiworker', got {config.strategy!r}"),
        (config.slice_axis in (-3, -2, -1, 0, 1, 2), f"--slice-axis must be one of 0, 1, 2 (or -1..-3), "
                                                      f"got {config.slice_axis}"),
    ]
    require(checks)
    if config.image_size is not None:
        check_image_size(config.image_size, 2 ** len(config.filters))
    if config.data is not None and not os.path.isdir(config.data):
        raise UsageError(f"--data {config.data}: no such folder")
    if config.resume is not None:
        if not os.path.exists(os.path.join(config.resume, "config.json")):
            raise UsageError(f"--resume {config.resume}: no config.json there (not a run folder)")
    elif config.out and os.path.exists(os.path.join(config.out, "config.json")):
        raise UsageError(f"--out {config.out} already holds a run (config.json); choose another folder")
    import matplotlib

    if config.cmap not in matplotlib.colormaps:
        raise UsageError(f"--cmap {config.cmap!r} is not a matplotlib colormap")


def check_image_size(image_size, downsampling):
    if len(image_size) not in (1, 2) or min(image_size) < 1:
        raise UsageError(f"--image-size takes HEIGHT [WIDTH] in pixels, got {image_size}")
    height, width = image_size[0], image_size[-1]
    if height % downsampling or width % downsampling:
        raise UsageError(f"--image-size {height}x{width} is not divisible by the downsampling factor "
                         f"{downsampling} (2 ** number of --filters)")


# ---------------------------------------------------------------------------
# The training pipeline


def prepare_data(config, cache_dir):
    """Find the data (writing the demo data if none was given), decode each split once into
    the cache in `cache_dir`, and build the three splits' datasets."""
    import data

    root = config.data
    if root is None:
        print(f"no --data given: using the built-in demo data in {config.demo_dir}/", flush=True)
        root = data.write_demo_dataset(config.demo_dir, seed=config.seed)
    source = data.find_source(root, seed=config.seed)
    downsampling = 2 ** len(config.filters)
    if config.image_size:
        image_size = [config.image_size[0], config.image_size[-1]]
    else:
        image_size = list(data.default_image_size(source, downsampling, config.slice_axis))
    check_image_size(image_size, downsampling)
    print(f"data: {root} ({source.layout} layout), files per split: "
          + ", ".join(f"{s} {len(f)}" for s, f in source.files.items())
          + f"; slices resized to {image_size[0]}x{image_size[1]}; cache: {cache_dir}", flush=True)
    if source.ignored:
        names = ", ".join(os.path.basename(path) for path in source.ignored[:5])
        print(f"ignored {len(source.ignored)} file(s) that are not {'PNG' if source.is_png else 'NIfTI'} slices: "
              f"{names}{', ...' if len(source.ignored) > 5 else ''}", flush=True)
    manifests = {split: data.cache_split(source, split, image_size, cache_dir, config.slice_axis,
                                         config.volume_index, verbose=True)
                 for split in data.SPLITS}
    report_skipped(manifests)
    splits = {split: data.cached_dataset(manifest, config.batch_size, config.shift, shuffle=(split == "train"),
                                         seed=config.seed)
              for split, manifest in manifests.items()}
    source.slices = {split: manifest["slices"] for split, manifest in manifests.items()}
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
    import numpy as np

    stride = max(1, (spread_over or count) // count)
    chosen = [image.numpy() for image in dataset.unbatch().shard(stride, 0).take(count)]
    if not chosen:
        raise UsageError("a split has no slices")
    return np.stack(chosen)


def make_strategy(name):
    """The tf.distribute strategy of --strategy. Created before any other TensorFlow work:
    MultiWorkerMirroredStrategy must configure the collective ops at start-up."""
    import tensorflow as tf

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


def read_history(path):
    """A CSVLogger file as {column: [float, ...]} (empty if there is none)."""
    import csv

    if not os.path.exists(path):
        return {}
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("epoch", "").strip().isdigit()]
    return {key: [float(row[key]) if row[key] not in ("", None) else float("nan") for row in rows]
            for key in (rows[0].keys() if rows else [])}


def resume_point(run_dir, name, history_file):
    """How many epochs of stage `name` a killed run completed (from BackupAndRestore's
    backup), with the history file cut back to those epochs; 0 and no history file for a
    fresh start."""
    import plots

    metadata = os.path.join(run_dir, "backup", name, "training_metadata.json")
    history_path = os.path.join(run_dir, history_file)
    done = 0
    if os.path.exists(metadata):
        with open(metadata) as f:
            done = int(json.load(f)["epoch"])
    if not done:
        if os.path.exists(history_path):
            os.remove(history_path)
        return 0
    with open(history_path) as f:
        lines = f.read().splitlines()
    # An epoch logged after the last backup is trained again: drop its row (and any line a
    # kill cut short).
    kept = lines[:1] + [line for line in lines[1:] if line.split(",")[0].isdigit() and int(line.split(",")[0]) < done
                        and len(line.split(",")) == len(lines[0].split(","))]

    def write(path):
        with open(path, "w") as f:
            f.write("\n".join(kept) + "\n")

    plots.atomic_write(history_path, write)
    print(f"resuming {name} training after epoch {done} (backup in {os.path.dirname(metadata)})", flush=True)
    return done


def fit_resumably(model, dataset, run_dir, name, history_file, epochs, monitor, mode, callbacks,
                  validation_data=None):
    """`model.fit` with what lets a run survive a kill and a NaN loss:

    * BackupAndRestore in RUN/backup/<name> (the last callback, so a backed-up epoch has
      its checkpoint and history row written), which --resume picks up;
    * ModelCheckpoint of the best `monitor` to RUN/<name>.keras, written atomically and
      never beaten by a worse epoch after a resume (initial_value_threshold);
    * CSVLogger, appending when resuming;
    * TerminateOnNaN.

    Returns the whole history (earlier processes' epochs too) and whether NaN stopped it."""
    import keras
    import numpy as np

    final = os.path.join(run_dir, f"{name}.keras")
    partial = os.path.join(run_dir, f".{name}-partial.keras")
    history_path = os.path.join(run_dir, history_file)
    earlier = read_history(history_path)
    best = None
    if earlier.get(monitor):
        values = np.asarray(earlier[monitor], dtype=float)
        if np.isfinite(values).any():
            best = float(np.nanmax(values) if mode == "max" else np.nanmin(values))

    class Publish(keras.callbacks.Callback):
        """Move a checkpoint ModelCheckpoint has just written over the real file in one step,
        so a kill mid-save never leaves a half-written model."""

        def on_epoch_end(self, epoch, logs=None):
            if os.path.exists(partial):
                os.replace(partial, final)

    callbacks = list(callbacks) + [
        keras.callbacks.ModelCheckpoint(partial, monitor=monitor, mode=mode, save_best_only=True,
                                        initial_value_threshold=best),
        Publish(),
        keras.callbacks.CSVLogger(history_path, append=True),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup", name), double_checkpoint=True),
    ]
    fitted = model.fit(dataset, validation_data=validation_data, epochs=epochs, callbacks=callbacks, shuffle=False,
                       verbose=1 if sys.stdout.isatty() else 2)  # the datasets shuffle themselves
    losses = fitted.history.get("loss", [])
    stopped_on_nan = bool(losses) and not np.isfinite(losses[-1])
    history = read_history(history_path)
    if stopped_on_nan:
        scores = np.asarray(history.get(monitor, [np.nan]), dtype=float)
        kept = "no epoch finished with a finite score"
        if np.isfinite(scores).any():
            best_epoch = int(np.nanargmax(scores) if mode == "max" else np.nanargmin(scores)) + 1
            kept = f"keeping the best model ({name}.keras, epoch {best_epoch})"
        print(f"\n{name}: the training loss became NaN in epoch {len(scores)}; training stopped, {kept}. "
              f"A lower learning rate usually avoids this.", flush=True)
    return history, stopped_on_nan


def train_vqvae(config, splits, run_dir, shown, strategy):
    """Train the VQ-VAE (resuming a killed run's backup, if there is one); `shown` are the
    validation slices drawn in the progress grids."""
    import keras
    import numpy as np

    import plots
    import vqvae

    resume_point(run_dir, "vqvae", "history.csv")
    # Layers take the dtype policy in force when they are built: mixed precision for the
    # VQ-VAE only (the prior and its sampler stay in float32).
    keras.mixed_precision.set_global_policy("mixed_float16" if config.mixed_precision else "float32")
    try:
        with strategy.scope():
            model = vqvae.VQVAE(
                num_embeddings=config.K, latent_dim=config.D, beta=config.beta, filters=config.filters,
                num_res_blocks=config.res_blocks, ema_decay=config.ema_decay, codebook_init=config.codebook_init,
                dead_code_steps=config.dead_code_steps, shift=config.shift,
            )
            model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=config.jit)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    callbacks = [
        vqvae.CosineLearningRate(config.learning_rate, config.epochs, config.max_minutes),
        vqvae.ValidationMetrics(splits["validate"]),
        vqvae.TimeLimit(config.max_minutes),
        plots.TrainingPlots(run_dir, read_history(os.path.join(run_dir, "history.csv"))),
        plots.ReconstructionGrids(shown, run_dir, config.shift, config.grid_every, config.cmap),
    ]
    start = time.time()
    history, stopped_on_nan = fit_resumably(model, splits["train"], run_dir, "vqvae", "history.csv", config.epochs,
                                            "val_ssim", "max", callbacks)
    seconds = time.time() - start
    best_path = os.path.join(run_dir, "vqvae.keras")
    if not stopped_on_nan:
        plots.atomic_write(os.path.join(run_dir, "vqvae_last.keras"), model.save)
    if not os.path.exists(best_path) or not np.isfinite(history.get("val_ssim", [np.nan])).any():
        raise RuntimeError("training produced no finite validation SSIM, so no best model was saved"
                           + (" (the loss became NaN: try a lower --learning-rate)" if stopped_on_nan else ""))
    return keras.models.load_model(best_path), history, seconds


def evaluate_vqvae(model, splits, run_dir, history, config, shown):
    """Score the best model on the whole test split and write the final figures of the
    test slices `shown`."""
    import numpy as np

    import plots
    import vqvae

    ssims, psnrs, codebook = vqvae.score_split(model, splits["test"])
    metrics = {
        "val_ssim_best": float(np.nanmax(history["val_ssim"])),
        "best_epoch": int(np.nanargmax(history["val_ssim"])) + 1,
        "test_ssim_mean": float(ssims.mean()),
        "test_ssim_std": float(ssims.std()),
        "test_ssim_min": float(ssims.min()),
        "test_psnr_mean": float(psnrs[np.isfinite(psnrs)].mean()),
        "test_slices": int(ssims.size),
        "codebook_usage": codebook["codebook_usage"],
        "perplexity": codebook["perplexity"],
    }
    reconstructions, indices = model.reconstruct(shown)
    plots.reconstruction_grid(shown - config.shift, reconstructions.numpy() - config.shift,
                              os.path.join(run_dir, "reconstructions.png"), cmap=config.cmap,
                              title=f"test slices: mean SSIM over the whole test split {metrics['test_ssim_mean']:.3f}")
    plots.code_map_figure(shown[:4] - config.shift, indices.numpy()[:4], config.K,
                          os.path.join(run_dir, "code_maps.png"))
    return metrics


def encode_split(model, dataset):
    """The (N, h, w) int32 code grids of every slice in a split."""
    import numpy as np

    return np.concatenate([model.encode(images).numpy() for images in dataset])


def code_dataset(grids, batch_size, shuffle=False, seed=0):
    """(codes, codes) batches of (N, h, w) code grids: a PixelCNN predicts its own input."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((grids, grids))
    if shuffle:
        dataset = dataset.shuffle(len(grids), seed=seed)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def train_prior(config, model, splits, run_dir, strategy):
    """Fit a PixelCNN to the code grids of the train split, validated on the validate split
    (resuming a killed run's backup, if there is one)."""
    import keras
    import numpy as np

    import pixelcnn
    import plots
    import vqvae

    codes_path = os.path.join(run_dir, "codes.npz")
    if resume_point(run_dir, "pixelcnn", "pixelcnn_history.csv") and os.path.exists(codes_path):
        codes = dict(np.load(codes_path))
    else:
        print(f"\nencoding the splits into code grids for the {config.pcnn_variant} PixelCNN prior", flush=True)
        codes = {split: encode_split(model, dataset) for split, dataset in splits.items()}
        plots.atomic_write(codes_path, lambda path: np.savez_compressed(path, **codes))
    as_dataset = lambda grids, shuffle: code_dataset(grids, config.pcnn_batch_size, shuffle, config.seed)  # noqa: E731
    with strategy.scope():
        prior = pixelcnn.PixelCNN(config.K, config.pcnn_variant, filters=config.pcnn_filters,
                                  num_layers=config.pcnn_layers, num_res_blocks=config.pcnn_res_blocks,
                                  head_units=config.pcnn_head_units or None)
        prior.compile(optimizer=keras.optimizers.Adam(config.pcnn_learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=config.jit)

    class PriorProgress(keras.callbacks.Callback):
        """Add bits per code to the logs, print them and plot the whole history."""

        def __init__(self, history):
            super().__init__()
            self.history = history

        def on_epoch_end(self, epoch, logs=None):
            logs["bits_per_code"] = pixelcnn.bits_per_code(logs["loss"])
            logs["val_bits_per_code"] = pixelcnn.bits_per_code(logs["val_loss"])
            for key, value in logs.items():
                self.history.setdefault(key, []).append(float(value))
            print(f"prior epoch {epoch + 1}: val bits per code {logs['val_bits_per_code']:.3f} "
                  f"(log2 K = {np.log2(config.K):.2f})", flush=True)
            plots.plot_losses(self.history, os.path.join(run_dir, "pixelcnn_loss.png"),
                              keys=("bits_per_code", "val_bits_per_code"),
                              title=f"{config.pcnn_variant} PixelCNN: bits per code")

    start = time.time()
    history, _ = fit_resumably(prior, as_dataset(codes["train"], True), run_dir, "pixelcnn", "pixelcnn_history.csv",
                               config.pcnn_epochs, "val_loss", "min",
                               [vqvae.CosineLearningRate(config.pcnn_learning_rate, config.pcnn_epochs),
                                PriorProgress(read_history(os.path.join(run_dir, "pixelcnn_history.csv")))],
                               validation_data=as_dataset(codes["validate"], False))
    seconds = time.time() - start
    path = os.path.join(run_dir, "pixelcnn.keras")
    if not os.path.exists(path):
        raise RuntimeError("the prior's validation loss was never finite, so no prior was saved")
    prior = keras.models.load_model(path)
    test_loss = prior.evaluate(as_dataset(codes["test"], False), verbose=0)
    return prior, {
        "prior_variant": config.pcnn_variant,
        "prior_parameters": int(prior.count_params()),
        "prior_val_bits_per_code": float(np.nanmin(history["val_bits_per_code"])),
        "prior_test_bits_per_code": float(pixelcnn.bits_per_code(test_loss)),
        "log2_K": float(np.log2(config.K)),
        "prior_train_seconds": round(seconds, 1),
    }, codes


def write_samples(model, prior, grid_shape, n, out_dir, temperature=1.0, seed=0, batch_size=16, cmap="gray",
                  real=None):
    """Sample n code grids from the prior, decode them, and write PNG and NIfTI files and a grid.

    `real` (optional, [0, 1] slices) are shown above the samples for comparison."""
    import keras
    import nibabel
    import numpy as np
    import tensorflow as tf

    import pixelcnn
    import plots

    os.makedirs(out_dir, exist_ok=True)
    height, width = grid_shape
    print(f"sampling {n} slices ({height}x{width} codes each)", flush=True)
    progress = keras.utils.Progbar(-(-n // batch_size) * height, unit_name="row")
    images, start = [], time.time()
    samplers = {}  # by batch size: a Sampler traces its tf.function once and is reused
    for batch, first in enumerate(range(0, n, batch_size)):
        count = min(batch_size, n - first)
        if count not in samplers:
            samplers[count] = pixelcnn.Sampler(prior, count, height, width)
        sampler = samplers[count]
        codes = sampler.sample(temperature, seed + first,
                               progress=lambda row: progress.update(batch * height + row))
        images.append(np.clip(model.decode(codes).numpy() - model.shift, 0, 1))
    images = np.concatenate(images)
    seconds = time.time() - start
    for index, image in enumerate(images):
        png = tf.io.encode_png(np.round(image * 255).astype(np.uint8))
        plots.atomic_write(os.path.join(out_dir, f"sample_{index:03d}.png"),
                           lambda path: tf.io.write_file(path, png))
        plots.atomic_write(os.path.join(out_dir, f"sample_{index:03d}.nii.gz"), lambda path: nibabel.save(
            nibabel.Nifti1Image(image[..., 0].astype(np.float32), np.eye(4)), path))
    columns = 8
    rows = [images[i: i + columns] for i in range(0, min(len(images), 4 * columns), columns)]
    titles = ["sample"] * len(rows)
    if real is not None:
        rows = [np.clip(real[:columns], 0, 1)] + rows
        titles = ["real"] + titles
    plots.image_grid(rows, os.path.join(out_dir, "samples.png"), titles, cmap=cmap,
                     title=f"{n} samples at temperature {temperature} ({seconds:.1f} s)")
    print(f"wrote {n} samples to {out_dir} in {seconds:.1f} s", flush=True)
    return images, seconds


def train(config):
    """The whole run: data, VQ-VAE, its test scores, the prior and samples. With --resume,
    the stages a killed run finished are loaded, and the one it was in continues from its
    last completed epoch."""
    validate(config)
    strategy = make_strategy(config.strategy)
    import keras
    import tensorflow as tf

    import plots

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    run_dir = config.resume or config.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if not is_chief(strategy):  # a non-chief worker: same work, outputs thrown away
        import tempfile

        run_dir = tempfile.mkdtemp(prefix="worker-")
    os.makedirs(run_dir, exist_ok=True)
    source, image_size, splits = prepare_data(config, config.cache or os.path.join(run_dir, "cache"))
    metrics_path = os.path.join(run_dir, "metrics.json")
    metrics = {}
    if config.resume:
        print(f"resuming {run_dir} with its config.json", flush=True)
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                metrics = json.load(f)
    else:
        saved = dataclasses.asdict(config)
        saved.update(out=run_dir, image_size=image_size, data=source.root, layout=source.layout)
        plots.write_json(os.path.join(run_dir, "config.json"), saved)

    shown = {split: take_slices(splits[split], spread_over=source.slices[split]) for split in ("validate", "test")}
    if "test_ssim_mean" in metrics:
        print("the VQ-VAE finished before the run stopped: loading vqvae.keras", flush=True)
        model = load_run_model(run_dir, "vqvae.keras")
    else:
        model, history, seconds = train_vqvae(config, splits, run_dir, shown["validate"], strategy)
        metrics = evaluate_vqvae(model, splits, run_dir, history, config, shown["test"])
        metrics["vqvae_train_seconds"] = round(seconds, 1)
        metrics["epochs_run"] = len(history["loss"])
        plots.write_json(metrics_path, metrics)
    if config.pcnn_epochs:
        if "prior_test_bits_per_code" in metrics:
            print("the prior finished before the run stopped: loading pixelcnn.keras", flush=True)
            prior = load_run_model(run_dir, "pixelcnn.keras")
            grid_shape = [size // model.downsampling for size in image_size]
        else:
            prior, prior_metrics, codes = train_prior(config, model, splits, run_dir, strategy)
            grid_shape = codes["test"].shape[1:]
            metrics.update(prior_metrics)
            plots.write_json(metrics_path, metrics)
        if config.samples:
            real = shown["test"] - config.shift
            _, seconds = write_samples(model, prior, grid_shape, config.samples, os.path.join(run_dir, "samples"),
                                       config.temperature, config.seed, cmap=config.cmap, real=real)
            metrics["sampling_seconds"] = round(seconds, 1)
            plots.write_json(metrics_path, metrics)
    print(f"\nrun folder: {run_dir}\n" + "\n".join(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}"
                                                 for k, v in sorted(metrics.items())), flush=True)
    return run_dir, metrics


def resumed_config(run_dir):
    """The Config of a run folder to resume, from its config.json."""
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        raise UsageError(f"--resume {run_dir}: no config.json there (not a run folder)")
    saved = load_run_config(run_dir)
    config = Config(**{key: value for key, value in saved.items() if key in Config.__annotations__})
    config.resume = run_dir
    return config


# ---------------------------------------------------------------------------
# Reconstructing a folder with a trained model


def load_run_config(run_dir):
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise UsageError(f"--run {run_dir}: no config.json (not a run folder)")
    with open(path) as f:
        return json.load(f)


def load_run_model(run_dir, name, required=True):
    """Load RUN/<name> with plain keras.models.load_model. A missing file is a UsageError,
    or None if not `required`."""
    import keras

    import pixelcnn  # noqa: F401  (importing registers the saved classes with Keras)
    import vqvae  # noqa: F401

    path = os.path.join(run_dir, name)
    if os.path.exists(path):
        return keras.models.load_model(path)
    if required:
        hint = " (was the run trained with --pcnn-epochs 0?)" if name == "pixelcnn.keras" else ""
        raise UsageError(f"--run {run_dir}: no {name}{hint}")
    return None


def named_slices(files, config):
    """(name, [0, 1] slice) for every slice in the files, resized to the run's image size."""
    import numpy as np

    import data

    import tensorflow as tf

    for path in files:
        try:
            if data.is_png(path):
                slices = [data.decode_png(path).numpy()[..., 0]]
            else:
                slices = data.nifti_slices(path, config["slice_axis"], config["volume_index"])
        except (data.DataError, tf.errors.OpError) as error:
            reason = data.error_reason(error) if isinstance(error, tf.errors.OpError) else str(error)
            print(f"skipped {path}: {reason}", flush=True)
            continue
        for index, image in enumerate(slices):
            name = os.path.basename(path) + (f"[{index}]" if len(slices) > 1 else "")
            yield name, data.fit_to_size(np.asarray(image)[..., None], config["image_size"]).numpy()


def reconstruct(args):
    import csv

    import keras
    import numpy as np

    import data
    import plots
    import vqvae

    config = load_run_config(args.run)
    model = load_run_model(args.run, "vqvae.keras")
    root = args.data or config["data"]
    if not os.path.isdir(root):
        raise UsageError(f"--data {root}: no such folder")
    layouts = [dirs[args.split] for dirs in (data.OASIS_DIRS, data.HIPMRI_DIRS)
               if os.path.isdir(os.path.join(root, dirs[args.split]))]
    folder = os.path.join(root, layouts[0]) if layouts else root
    files = data.list_images(folder)
    if not files:
        raise UsageError(f"--data {folder}: no PNG or NIfTI files")
    out = args.out or os.path.join(args.run, f"reconstruct-{os.path.basename(os.path.normpath(folder))}")
    os.makedirs(out, exist_ok=True)

    rows, batch, grids = [], [], 0
    progress = keras.utils.Progbar(len(files), unit_name="file")

    def flush(batch):
        nonlocal grids
        names, images = zip(*batch)
        images = np.stack(images) + model.shift
        reconstructions, _ = model.reconstruct(images)
        ssims = vqvae.image_ssim(images, reconstructions, model.shift).numpy()
        psnrs = vqvae.image_psnr(images, reconstructions, model.shift).numpy()
        rows.extend(zip(names, ssims, psnrs))
        if grids < args.grids:
            plots.reconstruction_grid(images - model.shift, reconstructions.numpy() - model.shift,
                                      os.path.join(out, f"grid_{grids:02d}.png"), ssims=ssims,
                                      cmap=config.get("cmap", "gray"))
            grids += 1

    seen = set()
    for name, image in named_slices(files, config):
        batch.append((name, image))
        seen.add(name.split("[")[0])
        if len(batch) == args.batch_size:
            flush(batch)
            batch = []
            progress.update(len(seen))
    if batch:
        flush(batch)
    progress.update(len(files), finalize=True)

    def write_csv(path):
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["slice", "ssim", "psnr"])
            writer.writerows((name, f"{s:.5f}", f"{p:.3f}") for name, s, p in rows)

    plots.atomic_write(os.path.join(out, "reconstruction.csv"), write_csv)
    ssims = np.array([r[1] for r in rows])
    summary = {"slices": len(rows), "ssim_mean": float(ssims.mean()), "ssim_min": float(ssims.min()),
               "ssim_std": float(ssims.std()), "folder": folder}
    plots.write_json(os.path.join(out, "summary.json"), summary)
    print(f"{len(rows)} slices from {folder}: mean SSIM {summary['ssim_mean']:.4f} "
          f"(min {summary['ssim_min']:.4f}); wrote {out}/reconstruction.csv and {grids} grid(s)")
    return summary


# ---------------------------------------------------------------------------
# Sampling new slices from a trained run


def build_sample_parser():
    parser = argparse.ArgumentParser(
        prog="driver.py sample",
        description="Sample new slices from a trained run: loads RUN/vqvae.keras and RUN/pixelcnn.keras with "
                    "keras.models.load_model and writes PNG and NIfTI files and a grid.",
    )
    parser.add_argument("--run", required=True, help="run folder holding vqvae.keras and pixelcnn.keras")
    parser.add_argument("--n", type=int, default=16, help="how many slices (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices sampled at once (default: %(default)s)")
    parser.add_argument("--out", help="output folder (default: RUN/samples-seed<SEED>)")
    return parser


def sample(args):
    require([(args.n >= 1, f"--n must be >= 1, got {args.n}"),
             (args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
             (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")])
    config = load_run_config(args.run)
    model, prior = (load_run_model(args.run, name) for name in ("vqvae.keras", "pixelcnn.keras"))
    grid_shape = [size // model.downsampling for size in config["image_size"]]
    out = args.out or os.path.join(args.run, f"samples-seed{args.seed}")
    images, _ = write_samples(model, prior, grid_shape, args.n, out, args.temperature, args.seed, args.batch_size,
                              config.get("cmap", "gray"))
    return images


# ---------------------------------------------------------------------------
# Evaluating a trained run


def build_evaluate_parser():
    parser = argparse.ArgumentParser(
        prog="driver.py evaluate",
        description="Score a trained run on the whole test split (SSIM, PSNR, MS-SSIM, codebook use, prior bits "
                    "per code, and samples against real slices) and write RUN/metrics.json and a self-contained "
                    "RUN/report.html.",
    )
    parser.add_argument("--run", required=True, help="run folder holding vqvae.keras (and pixelcnn.keras)")
    parser.add_argument("--data", help="data root whose test split is scored (default: the run's own data)")
    parser.add_argument("--samples", type=int, default=16,
                        help="slices to sample and compare with real ones; 0 = skip (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per batch (default: %(default)s)")
    return parser


def evaluate_command(args):
    import evaluate

    require([(args.samples >= 0, f"--samples must be >= 0, got {args.samples}"),
             (args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
             (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")])
    saved = load_run_config(args.run)
    model = load_run_model(args.run, "vqvae.keras")
    prior = load_run_model(args.run, "pixelcnn.keras", required=False)
    config = Config(**{key: value for key, value in saved.items() if key in Config.__annotations__})
    config.data, config.batch_size = args.data or saved["data"], args.batch_size
    if not os.path.isdir(config.data):
        raise UsageError(f"--data {config.data}: no such folder")
    # At the run's image size (config.json has it), through the run's slice cache.
    _, _, splits = prepare_data(config, config.cache or os.path.join(args.run, "cache"))
    if prior is None:
        print(f"{args.run} has no pixelcnn.keras: scoring the VQ-VAE only", flush=True)
    return evaluate.evaluate_run(args.run, model, splits, prior, args.samples, args.temperature, args.seed,
                                 config.cmap, config.data)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    try:
        if command == "reconstruct":
            return reconstruct(build_reconstruct_parser().parse_args(argv))
        if command == "sample":
            return sample(build_sample_parser().parse_args(argv))
        if command == "evaluate":
            return evaluate_command(build_evaluate_parser().parse_args(argv))
        config = Config(**vars(build_parser().parse_args(argv)))
        if config.resume:
            given = [arg for arg in argv if arg.startswith("-") and arg.split("=")[0] != "--resume"]
            if given:
                print(f"--resume: using the run's config.json; ignoring {' '.join(given)}", flush=True)
            config = resumed_config(config.resume)
        return train(config)
    except UsageError as error:
        sys.exit(f"driver.py: error: {error}")
    except Exception as error:
        import data

        if isinstance(error, data.DataError):
            sys.exit(f"driver.py: error: {error}")
        raise


if __name__ == "__main__":
    main()
