"""Train a VQ-VAE and a PixelCNN prior on a folder of 2D MRI slices; reconstruct and sample.

    python driver.py                                  # the built-in demo data
    python driver.py --data DIR --K 128 --D 64 --epochs 30
    python driver.py reconstruct --run RUN_DIR --data DIR
    python driver.py sample --run RUN_DIR --n 16
    python driver.py evaluate --run RUN_DIR           # metrics.json and report.html
    python driver.py anomaly --run RUN_DIR --data DIR # anomaly maps of new slices
    python driver.py -h                               # every option, with its default

Only the command line: one `Config` holds every setting (defaults and help text live there alone), is
filled in from the flags and saved as `config.json` beside the run's models, so a run can be reloaded and
repeated exactly. `train.py`, `evaluate.py`, `sample.py` and `anomaly.py` do the work.
"""

import argparse
import dataclasses
import errno
import os
import sys

import cpu
import runs

COMMANDS = ("train", "reconstruct", "sample", "evaluate", "anomaly")


def option(default, help_text):  # a Config field with its -h text
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class Config:
    data: str = option(None, "data folder: OASIS layout (keras_png_slices_*), HipMRI layout (keras_slices_*), or a "
                             "flat folder of PNG/NIfTI slices or volumes (split by case). Default: the demo data")
    out: str = option(None, "run folder for models, plots, metrics and logs (default: runs/<timestamp>)")
    image_size: list = option(None, "target HEIGHT [WIDTH] in pixels; slices are resized to fit and zero-padded "
                                    "(default: the largest training slice, rounded up to the downsampling factor)")
    K: int = option(128, "number of codebook vectors (num_embeddings)")
    D: int = option(64, "size of each codebook vector (latent_dim)")
    beta: float = option(0.25, "weight of the commitment loss")
    filters: list = option((16, 32), "channels of each stride-2 encoder stage (mirrored in the decoder): 2 values = /4")
    res_blocks: int = option(2, "residual blocks in the encoder and in the decoder")
    ssim_weight: float = option(0.5, "weight of an SSIM term in the reconstruction loss: MSE + W x (1 - SSIM)")
    norm: str = option("group", "normalisation after each convolution: 'group' (per slice), 'batch' or 'none'")
    ema_decay: float = option(0.99, "decay of the EMA codebook updates; 0 = loss-based codebook (keras.io recipe)")
    codebook_init: str = option("kmeans", "'kmeans' on the first batch of encoder outputs, or 'uniform' random")
    dead_code_steps: int = option(10, "restart a code unused for this many training steps (0 = never)")
    epochs: int = option(20, "VQ-VAE training epochs (with --max-minutes, whichever ends first)")
    batch_size: int = option(8, "slices per batch")
    weights_ema: float = option(0.99, "validate and save an exponential moving average of the weights with this "
                                      "momentum (0 = the weights as trained)")
    learning_rate: float = option(2e-3, "Adam learning rate at the start, decayed along a half cosine to 5% of it "
                                        "over --epochs (or --max-minutes, if that comes first)")
    shift: float = option(-0.5, "added to the [0, 1] intensities before training")
    seed: int = option(0, "seed for the data split, shuffling, demo data and initialisation")
    max_minutes: float = option(0.0, "stop training when another epoch would pass this many minutes (0 = no limit)")
    slice_axis: int = option(-1, "axis along which 3D NIfTI volumes are cut into slices")
    volume_index: int = option(0, "which volume of a 4D NIfTI series to use")
    grid_every: int = option(1, "reconstruction grid and TensorBoard images every N epochs (0 = only at the end)")
    cmap: str = option("gray", "matplotlib colormap for image grids")
    demo_dir: str = option("demo_data", "where the demo data is written when --data is not given")
    pcnn_epochs: int = option(12, "PixelCNN prior training epochs (0 = train no prior)")
    pcnn_learning_rate: float = option(3e-3, "PixelCNN Adam learning rate at the start, decayed like --learning-rate")
    pcnn_variant: str = option("hierarchical", "'hierarchical' (a gated prior over a coarse top grid, then a gated "
                                               "one over the codes given it), 'gated' (vertical and horizontal "
                                               "stacks, no blind spot) or 'plain' (keras.io)")
    pcnn_filters: int = option(35, "PixelCNN channels")
    pcnn_layers: int = option(3, "gated layers ('gated'), or 1x1 mask-B layers after the residual blocks ('plain')")
    pcnn_res_blocks: int = option(2, "residual blocks with 3x3 mask-B convolutions ('plain' only)")
    pcnn_head_units: int = option(140, "width of the PixelCNN's 1x1 layer before the logits (0 = --pcnn-filters)")
    pcnn_batch_size: int = option(32, "code grids per PixelCNN batch")
    pcnn_weights_ema: float = option(0.0, "validate and save each PixelCNN's weights as an exponential moving "
                                          "average with this momentum (0 = the weights as trained)")
    pcnn_top_codes: int = option(64, "hierarchical prior: codes of the top grid (k-means of blocks of code vectors)")
    pcnn_top_factor: int = option(4, "hierarchical prior: the side of those blocks, in codes (4: 64x64 -> 16x16)")
    pcnn_top_filters: int = option(48, "hierarchical prior: channels of the top PixelCNN (its head is 4x as wide)")
    pcnn_top_layers: int = option(16, "hierarchical prior: gated layers of the top PixelCNN (at most the top grid's "
                                           "rows: deeper stacks see no more of it)")
    pcnn_top_epochs: int = option(16, "hierarchical prior: training epochs of the top PixelCNN")
    pcnn_top_dropout: float = option(0.2, "hierarchical prior: share of each gated layer's output the top PixelCNN "
                                          "drops in training (a regulariser for its few grids)")
    pcnn_top_shift: int = option(0, "hierarchical prior: the top PixelCNN also trains on the grids moved <= N codes")
    pcnn_middle_codes: int = option(256, "hierarchical prior: codes of a middle grid between the top grid and the "
                                         "codes (0 = two levels); its PixelCNN has the top one's channels")
    pcnn_middle_factor: int = option(2, "hierarchical prior: the side of the middle grid's blocks, in codes")
    pcnn_middle_layers: int = option(6, "hierarchical prior: gated layers of the middle PixelCNN (0 = --pcnn-top-layers)")
    pcnn_middle_epochs: int = option(12, "hierarchical prior: training epochs of the middle PixelCNN")
    pcnn_condition_blocks: int = option(4, "hierarchical prior: residual 3x3 convolutions that read the grid above "
                                           "around each block for the finer PixelCNNs (0 = its own cell only)")
    pcnn_condition_slips: float = option(0.3, "hierarchical prior: share of the grid above's codes swapped, in "
                                              "training, for the level above's own teacher-forced draws, so a "
                                              "finer PixelCNN learns to follow drawn grids, not only real ones")
    pcnn_slip_levels: str = option("bottom", "hierarchical prior: the finer levels that train with those slips: "
                                             "'bottom', 'middle' or 'both'")
    pcnn_mirror: bool = option(True, "train the prior on the training slices mirrored left to right too (2x grids)")
    pcnn_position_bins: int = option(10, "hierarchical prior: condition the top grid on the slice's level in its "
                                         "volume, in this many bins (0 = no position; slices of unknown level "
                                         "train and sample as 'unknown')")
    pcnn_top_temperature: float = option(0.85, "hierarchical prior: the top grid (the head's outline) is sampled at "
                                              "this times the sampling temperature (< 1: more typical shapes)")
    pcnn_bottom_temperature: float = option(1.0, "hierarchical prior: the codes are sampled at this times --temperature")
    samples: int = option(16, "new slices sampled at the end of the run")
    temperature: float = option(1.0, "sampling temperature (< 1: more typical samples, > 1: more varied)")
    cache: str = option(None, "folder for the decoded slices, shared by runs of the same files (default: RUN/cache)")
    strategy: str = option("default", "tf.distribute strategy: 'default' (one device), 'mirrored' (local GPUs) or "
                                      "'multiworker' (machines in TF_CONFIG); --batch-size is the global batch")
    jit: bool = option(False, "compile the training steps with XLA")
    pcnn_precision: str = option("auto", "what the PixelCNNs compute in while training: 'bfloat16' (float32 weights; "
                                         "~20-27% faster on CPUs with AMX or AVX512-BF16), 'float32', or 'auto' "
                                         "(bfloat16 on such a CPU, float32 elsewhere)")
    cpu_math: str = option("float32", "what the training command's convolutions and matrix products multiply in on a "
                                      "CPU: 'float32', or 'bfloat16' (oneDNN's math mode: float32 values rounded to "
                                      "bfloat16 as they enter, sums in float32; ~9% faster VQ-VAE training on CPUs "
                                      "with AMX or AVX512-BF16, but the samples drawn at the run's end then differ from "
                                      "'driver.py sample' with the same seed)")
    mixed_precision: bool = option(False, "train the VQ-VAE in float16 with float32 weights (for GPUs; slow on CPU)")
    deterministic: bool = option(True, "repeatable runs for a given --seed (TensorFlow's op determinism)")
    resume: str = option(None, "continue the killed run in this folder after its last completed epoch")

    @classmethod
    def from_saved(cls, saved):
        """The Config of a run's config.json (which also holds keys that are not settings)."""
        return cls(**{field.name: saved[field.name] for field in dataclasses.fields(cls) if field.name in saved})


class UsageError(ValueError):
    """A flag with a value we cannot use; the message names the flag."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="driver.py",
        description="Train a VQ-VAE on 2D MRI slices, then a PixelCNN prior over its code grids, and write models, "
                    "metrics, plots, samples and TensorBoard logs to a run folder. Other commands: 'driver.py "
                    "reconstruct -h', 'driver.py sample -h', 'driver.py evaluate -h', 'driver.py anomaly -h'.")
    for field in dataclasses.fields(Config):
        names = [flag(field.name), "--" + field.name] if "_" in field.name else [flag(field.name)]
        shown = " ".join(map(str, field.default)) if isinstance(field.default, (list, tuple)) else field.default
        help_text = field.metadata["help"] + ("" if field.default is None else f" (default: {shown})")
        kind = {list: dict(type=int, nargs="+"), bool: dict(action=argparse.BooleanOptionalAction),
                int: dict(type=int), float: dict(type=float)}.get(field.type, {})
        parser.add_argument(*names, dest=field.name, default=field.default, help=help_text.replace("%", "%%"), **kind)
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's own log lines (hidden by default)")
    return parser


def command_parser(name, description, run_help, options):
    """The parser of a command on a trained run: --run, then `options` as
    (flag, type, default, help) with default None for no default."""
    parser = argparse.ArgumentParser(prog=f"driver.py {name}", description=description)
    parser.add_argument("--run", required=True, help=run_help)
    for flag, kind, default, help_text in options:
        shown = "" if default is None else " (default: %(default)s)"
        parser.add_argument(flag, type=kind, default=default, help=help_text + shown)
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's own log lines (hidden by default)")
    return parser


RECONSTRUCT = ("reconstruct", "Reconstruct a folder of slices with a trained run's VQ-VAE: image grids and "
               "per-slice SSIM/PSNR (reconstruction.csv).", "run folder holding vqvae.keras and config.json", [
                   ("--data", str, None, "folder of slices, or a root with split folders (default: the run's data)"),
                   ("--split", str, "test", "split to use when --data has split folders: train, validate or test"),
                   ("--out", str, None, "output folder (default: RUN/reconstruct-<split or folder name>)"),
                   ("--grids", int, 4, "how many 16-slice grids to write"),
                   ("--batch-size", int, 16, "slices per batch")])
SAMPLE = ("sample", "Sample new slices from a trained run: loads RUN/vqvae.keras and RUN/pixelcnn.keras with "
          "keras.models.load_model and writes PNG and NIfTI files and a grid.",
          "run folder holding vqvae.keras and pixelcnn.keras", [
              ("--n", int, 16, "how many slices"), ("--temperature", float, 1.0, "sampling temperature"),
              ("--seed", int, 0, "random seed"), ("--batch-size", int, 16, "slices sampled at once"),
              ("--position", float, None, "level to sample, 0 (a volume's first slice) to 1 (its last), for a prior "
                                          "with --pcnn-position-bins (default: as often as in the training slices)"),
              ("--out", str, None, "output folder (default: RUN/samples-seed<SEED>[-position<P>])")])
EVALUATE = ("evaluate", "Score a trained run on the whole test split (SSIM, PSNR, MS-SSIM, codebook use, prior bits "
            "per code, and samples against real slices) and write RUN/metrics.json and a self-contained "
            "RUN/report.html.", "run folder holding vqvae.keras (and pixelcnn.keras)", [
                ("--data", str, None, "data root whose test split is scored (default: the run's own data)"),
                ("--samples", int, 160, "slices to sample and compare with real ones (150+ for the C2ST); 0 = skip"),
                ("--temperature", float, 1.0, "sampling temperature"), ("--seed", int, 0, "sampling seed"),
                ("--batch-size", int, 16, "slices per batch")])
ANOMALY = ("anomaly", "Anomaly maps of every slice in a folder, from a run trained on healthy brains: how much less "
           "likely its prior finds each code than healthy codes at the same place, and the slice 'healed' (its unlikely "
           "codes redrawn).",
           "run folder holding vqvae.keras and pixelcnn.keras", [
               ("--data", str, None, "folder of PNG or NIfTI files, or a root with split folders (see --split)"),
               ("--split", str, "test", "split to use when --data has split folders"),
               ("--out", str, None, "output folder (default: RUN/anomaly-<folder name>)"),
               ("--draws", int, 4, "healed versions averaged per slice"),
               ("--map", str, "asymmetry", "asymmetry (where the slice differs from its mirror image and the healthy "
                                            "training heads most like it, on the side the prior finds less likely), "
                                            "likelihood (the top level's z-scores) or healing (|slice - healed slice| "
                                            "where healing changed codes)"),
               ("--quantile", float, 0.995, "redraw the codes whose z-score is above this quantile of the validation's"),
               ("--batch-size", int, 16, "slices mapped and healed at once (from one file or several)"),
               ("--seed", int, 0, "random seed")])


def require(checks):
    """Raise a UsageError with the message of the first (ok, message) check that fails."""
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


# Flag checks: the smallest value of each count, what must be positive, what has fixed choices.
MINIMUM = dict(K=2, D=1, epochs=1, batch_size=1, beta=0, ssim_weight=0, dead_code_steps=0, res_blocks=0,
               max_minutes=0, grid_every=0, volume_index=0, pcnn_epochs=0, pcnn_filters=2, pcnn_res_blocks=0,
               pcnn_batch_size=1, samples=0, pcnn_top_codes=2, pcnn_top_factor=2, pcnn_top_filters=2,
               pcnn_top_layers=1, pcnn_top_epochs=1, pcnn_position_bins=0, pcnn_condition_blocks=0,
               pcnn_middle_codes=0, pcnn_middle_factor=2, pcnn_middle_epochs=1, pcnn_top_shift=0,
               pcnn_middle_layers=0)
POSITIVE = ("learning_rate", "pcnn_learning_rate", "temperature", "pcnn_top_temperature", "pcnn_bottom_temperature")
CHOICES = dict(codebook_init=("kmeans", "uniform"), norm=("batch", "group", "none"),
               pcnn_variant=("plain", "gated", "hierarchical"), pcnn_precision=("auto", "float32", "bfloat16"),
               cpu_math=cpu.CPU_MATHS, pcnn_slip_levels=("bottom", "middle", "both"),
               strategy=("default", "mirrored", "multiworker"))


ANOMALY_MAPS = ("asymmetry", "likelihood", "healing")  # anomaly.MAPS, named here so that checking the flag needs no TensorFlow


def flag(name):
    return "--" + name.replace("_", "-")


def check(values, minimum, positive=(), choices=None):
    """Raise a UsageError naming the first flag of `values` below its minimum, not positive,
    or not one of its choices."""
    listed = lambda options: ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}"  # noqa: E731
    require([(getattr(values, name) >= low, f"{flag(name)} must be >= {low}, got {getattr(values, name)}")
             for name, low in minimum.items()]
            + [(getattr(values, name) > 0, f"{flag(name)} must be > 0, got {getattr(values, name)}")
               for name in positive]
            + [(getattr(values, name) in options, f"{flag(name)} must be {listed(options)}, "
                f"got {getattr(values, name)!r}") for name, options in (choices or {}).items()])


def validate(c):
    """Check the flag values of Config `c` before any work starts."""
    check(c, MINIMUM, POSITIVE, CHOICES)
    require([
        (0 <= c.ema_decay < 1, f"--ema-decay must be in [0, 1), got {c.ema_decay}"),
        (0 <= c.weights_ema < 1, f"--weights-ema must be in [0, 1), got {c.weights_ema}"),
        (0 <= c.pcnn_weights_ema < 1, f"--pcnn-weights-ema must be in [0, 1), got {c.pcnn_weights_ema}"),
        (len(c.filters) >= 1 and min(c.filters) >= 1, f"--filters must be positive channel counts, got {c.filters}"),
        (c.pcnn_layers >= (0 if c.pcnn_variant == "plain" else 1), f"--pcnn-layers must be >= 1 for a gated prior, "
                                                                    f">= 0 for the plain one, got {c.pcnn_layers}"),
        (c.pcnn_head_units >= 0, f"--pcnn-head-units must be >= 0 (0 = --pcnn-filters), got {c.pcnn_head_units}"),
        (c.slice_axis in (-3, -2, -1, 0, 1, 2), f"--slice-axis must be one of 0, 1, 2 (or -1..-3), got {c.slice_axis}"),
        (0 <= c.pcnn_top_dropout < 1, f"--pcnn-top-dropout must be in [0, 1), got {c.pcnn_top_dropout}"),
        (0 <= c.pcnn_condition_slips <= 1,
         f"--pcnn-condition-slips must be in [0, 1], got {c.pcnn_condition_slips}"),
        (c.pcnn_middle_codes != 1, "--pcnn-middle-codes must be 0 (no middle grid) or >= 2, got 1"),
        (not c.pcnn_middle_codes or (c.pcnn_middle_factor < c.pcnn_top_factor
                                     and c.pcnn_top_factor % c.pcnn_middle_factor == 0),
         f"--pcnn-middle-factor {c.pcnn_middle_factor} must be smaller than --pcnn-top-factor {c.pcnn_top_factor} "
         f"and divide it"),
    ])
    if c.image_size is not None:
        (height, width), downsampling = (c.image_size[0], c.image_size[-1]), 2 ** len(c.filters)
        require([(len(c.image_size) in (1, 2) and min(c.image_size) >= 1, f"--image-size takes HEIGHT [WIDTH] in "
                  f"pixels, got {c.image_size}"), (height % downsampling == 0 and width % downsampling == 0,
                 f"--image-size {height}x{width} is not divisible by the downsampling factor {downsampling} "
                 "(2 ** number of --filters)")])
    if c.data is not None:
        runs.require_folder(c.data)
    if c.resume is not None:
        runs.load_config(c.resume, "--resume")
    elif c.out and os.path.exists(os.path.join(c.out, "config.json")):
        raise UsageError(f"--out {c.out} already holds a run (config.json); choose another folder")
    import matplotlib
    require([(c.cmap in matplotlib.colormaps, f"--cmap {c.cmap!r} is not a matplotlib colormap")])


# The commands


def train(config, own_process=False):
    """The whole run: data, VQ-VAE, its test scores, the prior and samples. With --resume,
    the stages a killed run finished are loaded, and the one it was in continues from its
    last completed epoch. `own_process`: the process runs this command alone (the command
    line), so it may take the process-wide CPU math mode of --cpu-math (cpu.py); called from
    other code, the run computes in whatever that process computes in."""
    validate(config)
    math = cpu.use_cpu_math(config.cpu_math) if own_process else cpu.current_math()
    if own_process and math == "bfloat16":
        print(f"convolutions and matrix products multiply in bfloat16, summing in float32 (--cpu-math bfloat16; "
              f"this CPU has {cpu.native_bfloat16() or 'no native bfloat16: it is emulated, and slower'})", flush=True)
    import files
    import train as stages

    strategy = stages.make_strategy(config.strategy)  # before any other TensorFlow work
    run_dir = stages.start_run(config, strategy)
    source, image_size, splits = stages.prepare_data(config, config.cache or os.path.join(run_dir, "cache"))
    metrics_path = os.path.join(run_dir, "metrics.json")
    metrics = files.read_json(metrics_path) if config.resume and os.path.exists(metrics_path) else {}
    if not config.resume:
        files.write_json(os.path.join(run_dir, "config.json"), {**dataclasses.asdict(config), "out": run_dir,
                        "image_size": image_size, "data": source.root, "layout": source.layout,
                        "cpu_math_used": math})

    shown = {split: stages.take_slices(splits[split], spread_over=source.slices[split])
             for split in ("validate", "test")}
    if "test_ssim_mean" in metrics:
        print("the VQ-VAE finished before the run stopped: loading vqvae.keras", flush=True)
        model = runs.load_model(run_dir, "vqvae.keras")
    else:
        model, history, seconds = stages.train_vqvae(config, splits, run_dir, shown["validate"], strategy)
        metrics = stages.score_vqvae(model, splits, run_dir, history, config, shown["test"])
        metrics.update(vqvae_train_seconds=round(seconds, 1), epochs_run=len(history["loss"]))
        files.write_json(metrics_path, metrics)
    if config.pcnn_epochs:
        stages.prior_stage(config, model, source, run_dir, strategy, metrics, shown["test"] - config.shift)
    stages.print_summary(run_dir, metrics)
    return run_dir, metrics


def reconstruct(args):
    import data
    import evaluate

    require([(args.split in data.SPLITS, f"--split must be one of {', '.join(data.SPLITS)}, got {args.split!r}")])
    return evaluate.reconstruct_folder(args.run, args.data, args.split, args.out, args.grids, args.batch_size)


def sample(args):
    check(args, dict(n=1, batch_size=1), ("temperature",))
    require([(args.position is None or 0 <= args.position <= 1,
              f"--position must be between 0 and 1, got {args.position}")])
    import sample as sampling
    return sampling.sample_run(args.run, args.n, args.temperature, args.seed, args.batch_size, args.position, args.out)


def anomaly(args):
    check(args, dict(draws=1, batch_size=1), choices=dict(map=ANOMALY_MAPS))
    require([(args.data, "--data is required: the folder of slices to map"),
             (0 < args.quantile < 1, f"--quantile must be between 0 and 1, got {args.quantile}")])
    import anomaly as maps
    return maps.map_folder(args.run, args.data, args.split, args.out, args.draws, args.quantile, args.batch_size,
                           args.seed, args.map)


def evaluate_command(args):
    check(args, dict(samples=0, batch_size=1), ("temperature",))
    import evaluate
    import train as stages

    config = Config.from_saved(runs.load_config(args.run))
    model, prior = runs.load_model(args.run, "vqvae.keras"), runs.load_model(args.run, "pixelcnn.keras", required=False)
    config.data, config.batch_size = runs.require_folder(args.data or config.data), args.batch_size
    source, _, splits = stages.prepare_data(config, config.cache or os.path.join(args.run, "cache"))
    return evaluate.evaluate_run(args.run, model, splits, prior, args.samples, args.temperature, args.seed,
                                 config.cmap, config.data, source.positions["test"])


def main(argv=None, own_process=False):
    """Run the command in `argv` (default: this process's command line). `own_process`: this
    process runs nothing else, so process-wide settings are the command's to make."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    try:
        if command != "train":
            spec, run = {"reconstruct": (RECONSTRUCT, reconstruct), "sample": (SAMPLE, sample),
                         "evaluate": (EVALUATE, evaluate_command), "anomaly": (ANOMALY, anomaly)}[command]
            return run(command_parser(*spec).parse_args(argv))
        config = Config(**{key: value for key, value in vars(build_parser().parse_args(argv)).items()
                           if key != "verbose"})
        if config.resume:
            given = [arg for arg in argv if arg.startswith("-") and arg.split("=")[0] not in ("--resume", "--verbose")]
            if given:
                print(f"--resume: using the run's config.json; ignoring {' '.join(given)}", flush=True)
            config = dataclasses.replace(Config.from_saved(runs.load_config(config.resume, "--resume")),
                                         resume=config.resume)
        return train(config, own_process)
    except UsageError as error:
        sys.exit(f"driver.py: error: {error}")
    except OSError as error:  # a full disk or quota, a read-only or forbidden folder: one line
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        sys.exit(f"driver.py: error: cannot write {error.filename or 'a file'}: {error.strerror}; "
                 f"the files written before are intact")
    except Exception as error:
        import data

        if isinstance(error, data.DataError):
            sys.exit(f"driver.py: error: {error}")
        raise


if __name__ == "__main__":
    if "--verbose" not in sys.argv:
        import quiet

        quiet.hide_tensorflow_logs()
    main(own_process=True)
