"""Train a VQ-VAE on a folder of 2D MRI slices, score it, and reconstruct with it.

    python driver.py                                  # the built-in demo data
    python driver.py --data DIR --K 128 --D 64 --epochs 30
    python driver.py reconstruct --run RUN_DIR --data DIR
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

COMMANDS = ("train", "reconstruct")


@dataclasses.dataclass
class Config:
    data: str = None
    out: str = None
    image_size: list = None
    K: int = 128
    D: int = 64
    beta: float = 0.25
    filters: list = (16, 64)
    res_blocks: int = 2
    ema_decay: float = 0.99
    codebook_init: str = "kmeans"
    dead_code_steps: int = 50
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    shift: float = -0.5
    seed: int = 0
    max_minutes: float = 0.0
    slice_axis: int = -1
    volume_index: int = 0
    grid_every: int = 1
    cmap: str = "gray"
    demo_dir: str = "demo_data"


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
    "learning_rate": "Adam learning rate",
    "shift": "added to the [0, 1] intensities before training ([-0.5, 0.5] by default)",
    "seed": "seed for the data split, shuffling, demo data and initialisation",
    "max_minutes": "stop training after the epoch that passes this many minutes (0 = no limit)",
    "slice_axis": "axis along which 3D NIfTI volumes are cut into slices",
    "volume_index": "which volume of a 4D NIfTI series to use",
    "grid_every": "write a reconstruction grid every N epochs (0 = only at the end)",
    "cmap": "matplotlib colormap for image grids",
    "demo_dir": "where the demo data is written when --data is not given",
}


def add_config_arguments(parser):
    defaults = Config()
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        names = [flag, "--" + field.name] if "_" in field.name else [flag]
        default = getattr(defaults, field.name)
        kwargs = {"dest": field.name, "default": default, "help": HELP[field.name] + " (default: %(default)s)"}
        if field.name in ("image_size", "filters"):
            kwargs.update(type=int, nargs="+")
        elif field.type in (int, float):
            kwargs["type"] = field.type
        parser.add_argument(*names, **kwargs)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="driver.py",
        description="Train a VQ-VAE on 2D MRI slices and write models, metrics, plots and grids to a run "
                    "folder. Other commands: 'driver.py reconstruct -h'.",
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
        (config.slice_axis in (-3, -2, -1, 0, 1, 2), f"--slice-axis must be one of 0, 1, 2 (or -1..-3), "
                                                      f"got {config.slice_axis}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if config.image_size is not None:
        check_image_size(config.image_size, 2 ** len(config.filters))
    if config.data is not None and not os.path.isdir(config.data):
        raise UsageError(f"--data {config.data}: no such folder")
    if config.out and os.path.exists(os.path.join(config.out, "config.json")):
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


def prepare_data(config):
    """Find the data (writing the demo data if none was given) and build the three splits."""
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
    splits = {
        split: data.split_dataset(source, split, image_size, config.batch_size, config.shift,
                                  shuffle=(split == "train"), seed=config.seed,
                                  slice_axis=config.slice_axis, volume_index=config.volume_index)
        for split in data.SPLITS
    }
    print(f"data: {root} ({source.layout} layout), files per split: "
          + ", ".join(f"{s} {len(f)}" for s, f in source.files.items())
          + f"; slices resized to {image_size[0]}x{image_size[1]}", flush=True)
    return source, image_size, splits


def first_batch(dataset):
    for images in dataset.take(1):
        return images.numpy()
    raise UsageError("a split has no slices")


def train_vqvae(config, splits, run_dir):
    import keras

    import plots
    import vqvae

    model = vqvae.VQVAE(
        num_embeddings=config.K, latent_dim=config.D, beta=config.beta, filters=config.filters,
        num_res_blocks=config.res_blocks, ema_decay=config.ema_decay, codebook_init=config.codebook_init,
        dead_code_steps=config.dead_code_steps, shift=config.shift,
    )
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    best_path = os.path.join(run_dir, "vqvae.keras")
    callbacks = [
        vqvae.ValidationMetrics(splits["validate"]),
        keras.callbacks.ModelCheckpoint(best_path, monitor="val_ssim", mode="max", save_best_only=True),
        keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv")),
        plots.TrainingPlots(run_dir),
        plots.ReconstructionGrids(first_batch(splits["validate"]), run_dir, config.shift, config.grid_every,
                                  config.cmap),
        keras.callbacks.TerminateOnNaN(),
        vqvae.TimeLimit(config.max_minutes),
    ]
    start = time.time()
    history = model.fit(splits["train"], epochs=config.epochs, callbacks=callbacks,
                        verbose=1 if sys.stdout.isatty() else 2)
    seconds = time.time() - start
    plots.atomic_write(os.path.join(run_dir, "vqvae_last.keras"), model.save)
    if not os.path.exists(best_path):
        raise RuntimeError("training produced no finite validation SSIM, so no best model was saved")
    return keras.models.load_model(best_path), history.history, seconds


def evaluate_vqvae(model, splits, run_dir, history, config):
    """Score the best model on the whole test split and write the final figures."""
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
    images = first_batch(splits["test"])
    reconstructions, indices = model.reconstruct(images)
    plots.reconstruction_grid(images - config.shift, reconstructions.numpy() - config.shift,
                              os.path.join(run_dir, "reconstructions.png"), cmap=config.cmap,
                              title=f"test slices: mean SSIM over the whole test split {metrics['test_ssim_mean']:.3f}")
    plots.code_map_figure(images[:4] - config.shift, indices.numpy()[:4], config.K,
                          os.path.join(run_dir, "code_maps.png"))
    return metrics


def train(config):
    validate(config)
    import keras

    keras.utils.set_random_seed(config.seed)
    import plots

    run_dir = config.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(run_dir, exist_ok=True)
    source, image_size, splits = prepare_data(config)
    check_image_size(image_size, 2 ** len(config.filters))
    saved = dataclasses.asdict(config)
    saved.update(out=run_dir, image_size=image_size, data=source.root, layout=source.layout)
    plots.write_json(os.path.join(run_dir, "config.json"), saved)

    model, history, seconds = train_vqvae(config, splits, run_dir)
    metrics = evaluate_vqvae(model, splits, run_dir, history, config)
    metrics["vqvae_train_seconds"] = round(seconds, 1)
    metrics["epochs_run"] = len(history["loss"])
    plots.write_json(os.path.join(run_dir, "metrics.json"), metrics)
    print(f"\nrun folder: {run_dir}\n" + "\n".join(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}"
                                                 for k, v in sorted(metrics.items())), flush=True)
    return run_dir, metrics


# ---------------------------------------------------------------------------
# Reconstructing a folder with a trained model


def load_run_config(run_dir):
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise UsageError(f"--run {run_dir}: no config.json (not a run folder)")
    with open(path) as f:
        return json.load(f)


def named_slices(files, config):
    """(name, [0, 1] slice) for every slice in the files, resized to the run's image size."""
    import numpy as np

    import data

    for path in files:
        if data.is_png(path):
            slices = [data.decode_png(path).numpy()[..., 0]]
        else:
            slices = data.nifti_slices(path, config["slice_axis"], config["volume_index"])
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
    model_path = os.path.join(args.run, "vqvae.keras")
    if not os.path.exists(model_path):
        raise UsageError(f"--run {args.run}: no vqvae.keras")
    model = keras.models.load_model(model_path)
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


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    try:
        if command == "reconstruct":
            return reconstruct(build_reconstruct_parser().parse_args(argv))
        config = Config(**vars(build_parser().parse_args(argv)))
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
