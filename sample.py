"""Sampling: new slices from a trained run's prior, written as PNG and NIfTI files.

    python driver.py sample --run RUN_DIR --n 16 [--temperature 1.0] [--seed 0]

The prior draws code grids with the exact cached `pixelcnn.Sampler`, the VQ-VAE decodes
them, and every file is written atomically, so a killed command leaves no half-written
sample under its real name. Training calls `write_samples` too, for its final samples.
"""

import os
import time

import nibabel
import numpy as np
import tensorflow as tf

import data
import files
import hierarchy
import plots


def sample_batches(model, prior, grid_shape, n, temperature=1.0, seed=0, batch_size=16, progress=None,
                   position=None):
    """n new (H, W, 1) slices in [0, 1], yielded a batch at a time: code grids drawn from
    the prior (at `position` in [0, 1], for a prior conditioned on it), decoded.
    `progress(rows)` is called with the number of code rows drawn so far."""
    at = {} if position is None else {"position": position}
    height, width = grid_shape
    samplers = {}  # by batch size: a Sampler traces its tf.function once and is reused
    for batch, first in enumerate(range(0, n, batch_size)):
        count = min(batch_size, n - first)
        if count not in samplers:
            samplers[count] = hierarchy.sampler_for(prior, count, height, width)
        report = (lambda row, done=batch * height: progress(done + row)) if progress else None
        codes = samplers[count].sample(temperature, seed + first, progress=report, **at)
        yield model.decode_images(codes)


def write_samples(model, prior, grid_shape, n, out_dir, temperature=1.0, seed=0, batch_size=16, cmap="gray",
                  real=None, log_dir=None, position=None):
    """Sample n slices and write OUT/sample_NNN.png and .nii.gz and a grid, samples.png.

    `real` (optional, [0, 1] slices) are shown above the samples for comparison; with
    `log_dir`, the samples are also shown in TensorBoard."""
    os.makedirs(out_dir, exist_ok=True)
    files.remove_stale_temporaries(out_dir)  # an earlier, killed run's
    height, width = grid_shape
    print(f"sampling {n} slices ({height}x{width} codes each)", flush=True)
    progress = data.progress_bar(-(-n // batch_size) * height, "row")
    start, images = time.time(), []
    for batch in sample_batches(model, prior, grid_shape, n, temperature, seed, batch_size, progress.update, position):
        for image in batch:  # written as each batch is drawn: a killed run keeps what it finished
            path = os.path.join(out_dir, f"sample_{len(images):03d}")
            png = tf.io.encode_png(np.round(image * 255).astype(np.uint8))
            files.atomic_write(path + ".png", lambda temporary: tf.io.write_file(temporary, png))
            files.atomic_write(path + ".nii.gz", lambda temporary: nibabel.save(
                nibabel.Nifti1Image(image[..., 0].astype(np.float32), np.eye(4)), temporary))
            images.append(image)
    images, seconds = np.stack(images), time.time() - start
    columns = 8
    rows = [images[i: i + columns] for i in range(0, min(len(images), 4 * columns), columns)]
    titles = ["sample"] * len(rows)
    if real is not None:
        rows = [np.clip(real[:columns], 0, 1)] + rows
        titles = ["real"] + titles
    plots.image_grid(rows, os.path.join(out_dir, "samples.png"), titles, cmap=cmap,
                     title=f"{n} samples at temperature {temperature}"
                           + ("" if position is None else f", position {position:g}") + f" ({seconds:.1f} s)")
    if log_dir:
        with tf.summary.create_file_writer(log_dir).as_default():
            tf.summary.image(f"samples at temperature {temperature}", images, step=0, max_outputs=len(images))
    print(f"wrote {n} samples to {out_dir} in {seconds:.1f} s", flush=True)
    return images, seconds


def sample_run(run_dir, n=16, temperature=1.0, seed=0, batch_size=16, position=None, out=None):
    """`driver.py sample`: n slices from a run's saved models (at `position`, for a prior
    conditioned on it), written to `out` (default RUN/samples-seed<SEED>[-position<P>])."""
    import runs
    from data import DataError

    config = runs.load_config(run_dir)
    model, prior = (runs.load_model(run_dir, name) for name in ("vqvae.keras", "pixelcnn.keras"))
    if position is not None and not getattr(prior, "position_bins", 0):
        raise DataError(f"--position: the prior of {run_dir} was trained without slice positions (it needs "
                        f"--pcnn-variant hierarchical with --pcnn-position-bins > 0)")
    grid_shape = [size // model.downsampling for size in config["image_size"]]
    at = "" if position is None else f"-position{position:g}"
    out = out or os.path.join(run_dir, f"samples-seed{seed}{at}")
    images, _ = write_samples(model, prior, grid_shape, n, out, temperature, seed, batch_size,
                              config.get("cmap", "gray"), position=position)
    return images
