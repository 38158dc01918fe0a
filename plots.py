"""Figures: training curves, reconstruction grids, code maps and sample grids.

Kept apart from the models so `vqvae.py` and `pixelcnn.py` know nothing about files.
Every figure is written atomically (to a temporary file, then renamed), so a person
watching a run, or a run killed mid-write, never sees a half-written image.
"""

import os
import textwrap

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from files import atomic_write  # noqa: E402


def save_figure(figure, path):
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, bbox_inches="tight"))
    plt.close(figure)


def plot_losses(history, path, keys=("loss", "reconstruction_loss", "vq_loss", "val_loss",
                                     "val_reconstruction_loss"), title="VQ-VAE losses"):
    figure, axis = plt.subplots(figsize=(6, 4))
    for key in keys:
        values = np.asarray(history.get(key, []), dtype=float)
        if values.size and np.all(values[np.isfinite(values)] > 0):
            axis.plot(np.arange(1, values.size + 1), values, marker="o", ms=3, label=key,
                      linestyle="--" if key.startswith("val_") else "-")
    axis.set_yscale("log")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss (log scale)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_ssim(history, path):
    figure, axis = plt.subplots(figsize=(6, 4))
    for key, style in (("ssim", "-"), ("val_ssim", "--")):
        values = history.get(key, [])
        if len(values):
            axis.plot(np.arange(1, len(values) + 1), values, style, marker="o", ms=3, label=key)
    if len(history.get("val_ssim", [])):
        best = int(np.nanargmax(history["val_ssim"]))
        axis.annotate(f"best {history['val_ssim'][best]:.3f}", (best + 1, history["val_ssim"][best]),
                      textcoords="offset points", xytext=(-30, -15), fontsize=8)
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("SSIM")
    axis.set_title("Reconstruction SSIM")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, path)


def image_grid(rows, path, row_titles=None, cmap="gray", title=None, vmin=0.0, vmax=1.0):
    """Draw a list of rows of (H, W) or (H, W, 1) images as one grid."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    height, width = np.squeeze(rows[0][0]).shape
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * 1.6 * width / height + 0.3, n_rows * 1.6),
                                squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(row):
                axis.imshow(np.squeeze(row[c]), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            else:
                axis.axis("off")
        if row_titles:
            # Wrapped to the row's height: a long title on one line runs into its neighbours'.
            axes[r][0].set_ylabel("\n".join(textwrap.fill(line, 22) for line in row_titles[r].split("\n")),
                                  fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    # The title gets half an inch whatever the figure's height (matplotlib's default top
    # margin is a share of it: two inches of blank above ten rows).
    figure.subplots_adjust(wspace=0.03, hspace=0.03, top=1 - 0.5 / (n_rows * 1.6))
    save_figure(figure, path)


def reconstruction_grid(originals, reconstructions, path, ssims=None, cmap="gray", title=None, columns=8):
    """Two rows of originals over two rows of their reconstructions (an 8x4 grid of 16).

    Images are in [0, 1]."""
    originals = np.clip(np.asarray(originals)[: 2 * columns], 0, 1)
    reconstructions = np.clip(np.asarray(reconstructions)[: 2 * columns], 0, 1)
    halves = [slice(0, columns), slice(columns, 2 * columns)]
    rows = [originals[h] for h in halves] + [reconstructions[h] for h in halves]
    rows = [r for r in rows if len(r)]
    n = len(rows) // 2
    titles = ["original"] * n + ["reconstruction"] * n
    if ssims is not None and title is None:
        title = f"mean SSIM of these {len(originals)}: {np.mean(ssims[: 2 * columns]):.3f}"
    image_grid(rows, path, titles, cmap=cmap, title=title)


def code_map_figure(images, indices, num_embeddings, path):
    """Each slice next to its grid of code indices."""
    n = len(images)
    figure, axes = plt.subplots(2, n, figsize=(n * 2.2, 4.6), squeeze=False)
    for i in range(n):
        axes[0][i].imshow(np.squeeze(np.clip(images[i], 0, 1)), cmap="gray", vmin=0, vmax=1)
        shown = axes[1][i].imshow(indices[i], cmap="nipy_spectral", vmin=0, vmax=num_embeddings - 1,
                                  interpolation="nearest")
        for axis in (axes[0][i], axes[1][i]):
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0][0].set_ylabel("slice")
    axes[1][0].set_ylabel(f"codes {indices.shape[1]}x{indices.shape[2]}")
    figure.colorbar(shown, ax=list(axes[1]), fraction=0.02, label="code index")
    save_figure(figure, path)


def histogram(values, path, xlabel, title, bins=30):
    """A histogram of per-slice scores, with the mean marked. Returns `path`."""
    values = np.asarray(values, dtype=float)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist(values[np.isfinite(values)], bins=bins, color="tab:blue", alpha=0.8)
    axis.axvline(np.nanmean(values), color="black", linestyle="--", label=f"mean {np.nanmean(values):.3f}")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("slices")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    save_figure(figure, path)
    return path


def codebook_usage(counts, path, title):
    """How often each code is used, most used first (log scale); unused codes are marked."""
    counts = np.sort(np.asarray(counts, dtype=float))[::-1]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    used = counts > 0
    axis.bar(np.arange(counts.size)[used], counts[used], width=1.0, color="tab:blue")
    if not used.all():
        axis.axvspan(used.sum() - 0.5, counts.size - 0.5, color="tab:red", alpha=0.15,
                     label=f"{(~used).sum()} dead codes")
        axis.legend(fontsize=8)
    axis.set_yscale("log")
    axis.set_xlim(-0.5, counts.size - 0.5)
    axis.set_xlabel("code rank (most used first)")
    axis.set_ylabel("uses (log scale)")
    axis.set_title(title, fontsize=10)
    save_figure(figure, path)
    return path


# ---------------------------------------------------------------------------
# Callbacks that keep the run folder's figures current


class TrainingPlots(keras.callbacks.Callback):
    """Rewrite the loss plot (log scale) and the SSIM plot after every epoch."""

    def __init__(self, run_dir, history=None):
        super().__init__()
        self.run_dir = run_dir
        self.history = {key: list(values) for key, values in (history or {}).items()}  # a resumed run's epochs

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        plot_losses(self.history, os.path.join(self.run_dir, "loss.png"))
        plot_ssim(self.history, os.path.join(self.run_dir, "ssim.png"))


class ReconstructionGrids(keras.callbacks.Callback):
    """Every `every` epochs, write the reconstruction grid of a fixed batch of slices."""

    def __init__(self, images, run_dir, shift, every=1, cmap="gray"):
        super().__init__()
        self.images = images
        self.run_dir = run_dir
        self.shift = shift
        self.every = every
        self.cmap = cmap

    def on_epoch_end(self, epoch, logs=None):
        if self.every and (epoch + 1) % self.every == 0:
            reconstructions = self.model(self.images, training=False).numpy()
            reconstruction_grid(self.images - self.shift, reconstructions - self.shift,
                                os.path.join(self.run_dir, "reconstructions_latest.png"), cmap=self.cmap,
                                title=f"validation slices after epoch {epoch + 1}")


def anomaly_figure(rows, path, titles=("slice", "healed", "anomaly map"), cmap="gray"):
    """Rows of (slice, healed slice, anomaly map[, more maps or masks]): the slices in
    `cmap`, every further panel in `hot` over the slice, each map scaled to its own range."""
    columns = len(rows[0])
    height, width = np.shape(rows[0][0])
    figure, axes = plt.subplots(len(rows), columns, figsize=(columns * 2.2 * width / height, len(rows) * 2.2),
                                squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            axis.imshow(np.clip(row[0] if c >= 2 else image, 0, 1), cmap=cmap, vmin=0, vmax=1)
            if c >= 2:
                top = float(np.max(image)) or 1.0
                axis.imshow(np.ma.masked_less(image, 0.05 * top), cmap="hot", vmin=0, vmax=top, alpha=0.75)
            if r == 0:
                axis.set_title(titles[c] if c < len(titles) else "", fontsize=9)
    figure.subplots_adjust(wspace=0.03, hspace=0.03)
    save_figure(figure, path)
