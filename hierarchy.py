"""A two-level prior over VQ-VAE code grids: global shape first, then detail.

A PixelCNN over a 64x64 grid of codes sees only a few rows and columns around each code,
so nothing ties the left of a head to its right: its samples fall apart into pieces. Here,
as in VQ-VAE-2 (Razavi et al. 2019), a coarse grid decides the shape and a fine one the
detail:

* the *top* grid summarises the VQ-VAE's (bottom) code grid: each `factor` x `factor`
  block of code vectors is averaged and replaced by the nearest of `top_embeddings`
  centres, found by k-means over the training split (`fit_top_codebook`). The VQ-VAE is
  unchanged, so reconstruction is exactly as good as before; the top codes are a function
  of the bottom ones;
* `top` is a gated PixelCNN over the top grid (16x16 for a 64x64 grid), deep enough that
  every code sees the whole grid above it and the row to its left: it learns the global
  anatomy;
* `bottom` is a gated PixelCNN over the bottom grid conditioned on the whole top grid
  (`PixelCNN(condition_classes=...)`): it draws the detail that fits the shape;
* with `position_bins` > 0 the top PixelCNN is also conditioned on the slice's level in
  its volume (`data.slice_positions`), as a global condition in every gated layer: one of
  `position_bins` equal bins of [0, 1], or "unknown" (class 0, trained on a share of the
  slices whose position is hidden). A sampler asked for no position draws one from the
  training slices' positions (`position_counts`), so unconditional samples cover the
  levels as the data does.

p(bottom) = p(top) p(bottom | top), since the top grid is determined by the bottom one;
`code_nll` spreads each top code's negative log-likelihood over its block, so a grid's
total is the whole model's. `HierarchicalSampler` draws the top grid, then the bottom
grid given it, each with the exact cached `pixelcnn.Sampler`.
"""

import keras
import numpy as np
import tensorflow as tf

import pixelcnn
import vqvae
from vqvae import PACKAGE

BOTTOM_SEED_OFFSET = 1_000_003
HIDDEN_POSITION_SHARE = 0.1  # of training slices shown to the top prior as of unknown position


@keras.saving.register_keras_serializable(package=PACKAGE)
class HierarchicalPrior(keras.Model):
    """p(top) p(bottom | top) over (B, h, w) code grids of a VQ-VAE with `num_embeddings`
    codes of size `latent_dim`. `top` and `bottom` are PixelCNN settings (filters,
    num_layers, head_units, ...); `position_bins` > 0 conditions the top grid on the
    slice's position."""

    def __init__(self, num_embeddings, latent_dim, top_embeddings=64, factor=4, top=None, bottom=None,
                 position_bins=0, **kwargs):
        super().__init__(**kwargs)
        if int(top_embeddings) < 2 or int(factor) < 2:
            raise ValueError(f"top_embeddings must be >= 2 and factor >= 2, got {top_embeddings} and {factor}")
        self.num_embeddings, self.latent_dim = int(num_embeddings), int(latent_dim)
        self.top_embeddings, self.factor = int(top_embeddings), int(factor)
        self.top_settings, self.bottom_settings = dict(top or {}), dict(bottom or {})
        self.position_bins = int(position_bins)
        by_position = dict(condition_classes=self.position_bins + 1, condition_factor=0) if self.position_bins else {}
        self.top = pixelcnn.PixelCNN(self.top_embeddings, "gated", name="top", **self.top_settings, **by_position)
        self.bottom = pixelcnn.PixelCNN(self.num_embeddings, "gated", condition_classes=self.top_embeddings,
                                        condition_factor=self.factor, name="bottom", **self.bottom_settings)
        # The VQ-VAE's code vectors (copied in by `fit_top_codebook`) and the top grid's centres.
        self.codebook = self.add_weight(shape=(self.num_embeddings, self.latent_dim), name="codebook",
                                        initializer="zeros", trainable=False)
        self.top_codebook = self.add_weight(shape=(self.top_embeddings, self.latent_dim), name="top_codebook",
                                            initializer="zeros", trainable=False)
        if self.position_bins:  # how many training slices fell in each position class (0: unknown)
            self.position_counts = self.add_weight(shape=(self.position_bins + 1,), name="position_counts",
                                                   initializer="zeros", trainable=False)
        self(tf.zeros((1, self.factor, self.factor), tf.int32))  # built, so it saves and loads as is

    def block_vectors(self, codes):
        """(B, ceil(h / f), ceil(w / f), D): the mean code vector of each factor x factor
        block (blocks at the bottom and right edges may be partial: `SAME` pooling averages
        only the codes they hold)."""
        vectors = tf.gather(self.codebook, tf.cast(codes, tf.int32))
        return tf.nn.avg_pool2d(vectors, self.factor, self.factor, "SAME")

    def top_codes(self, codes):
        """(B, h, w) bottom codes -> (B, ceil(h / f), ceil(w / f)) top codes."""
        blocks = self.block_vectors(codes)
        nearest = vqvae.nearest_rows(tf.reshape(blocks, (-1, self.latent_dim)), self.top_codebook)
        return tf.reshape(nearest, tf.shape(blocks)[:3])

    def fit_top_codebook(self, codebook, grids, iterations=20, batch_size=256):
        """Take the VQ-VAE's `codebook` and fit the top centres by k-means to the block
        vectors of (N, h, w) training grids."""
        self.codebook.assign(np.asarray(codebook, np.float32))
        blocks = np.concatenate([self.block_vectors(grids[start: start + batch_size]).numpy()
                                 for start in range(0, len(grids), batch_size)])
        centers, _ = vqvae.kmeans(tf.constant(blocks.reshape(-1, self.latent_dim)), self.top_embeddings, iterations)
        self.top_codebook.assign(centers)

    def position_classes(self, positions):
        """(B,) positions in [0, 1] (negative: unknown) -> (B,) int32 classes: 0 for
        unknown, else 1 + the bin."""
        positions = np.asarray(positions, np.float32)
        bins = np.minimum(np.floor(np.clip(positions, 0, 1) * self.position_bins), self.position_bins - 1)
        return np.where(positions < 0, 0, 1 + bins).astype(np.int32)

    def top_inputs(self, top, positions=None):
        """The top PixelCNN's input for a (B, h', w') top grid: the grid, and with
        `position_bins` the (B, 1, 1) position classes (unknown where `positions` is None)."""
        if not self.position_bins:
            return top
        if positions is None:
            classes = tf.zeros(tf.shape(top)[:1], tf.int32)
        else:
            classes = tf.constant(self.position_classes(positions))
        return top, classes[:, None, None]

    def count_positions(self, positions):
        """Keep how many training slices fall in each position class, for sampling."""
        if self.position_bins:
            counts = np.bincount(self.position_classes(positions), minlength=self.position_bins + 1)
            self.position_counts.assign(counts.astype(np.float32))

    def draw_positions(self, count, seed=0):
        """(count,) positions drawn from the training slices' (bin centres; -1 if none was
        known)."""
        counts = self.position_counts.numpy()[1:] if self.position_bins else np.zeros(0)
        if counts.sum() == 0:
            return np.full(count, -1.0, np.float32)
        bins = np.random.default_rng(seed).choice(self.position_bins, size=count, p=counts / counts.sum())
        return ((bins + 0.5) / self.position_bins).astype(np.float32)

    def call(self, codes, positions=None):
        """(top logits, bottom logits) of (B, h, w) codes (at `positions`, if known)."""
        top = self.top_codes(codes)
        return self.top(self.top_inputs(top, positions)), self.bottom((codes, top))

    def level_nll(self, codes, positions=None):
        """The top grid of (B, h, w) codes and each level's negative log-likelihood in nats
        per code: (top codes, top NLL (B, h', w'), bottom NLL given the top grid (B, h, w))."""
        top = self.top_codes(codes)
        return top, self.top.code_nll(self.top_inputs(top, positions)), self.bottom.code_nll((codes, top))

    def code_nll(self, codes, positions=None):
        """(B, h, w) negative log-likelihood in nats per bottom code: the bottom prior's, plus
        each top code's spread evenly over its block (at `positions`, if known)."""
        _, top_nll, bottom_nll = self.level_nll(codes, positions)
        height, width = tf.shape(codes)[1], tf.shape(codes)[2]
        spread = self.upsample(top_nll / self.block_sizes(height, width), height, width)
        return bottom_nll + spread

    def upsample(self, grid, height, width):
        """A (B, h', w') top-grid array repeated over each block of an (h, w) grid."""
        return tf.repeat(tf.repeat(grid, self.factor, axis=1), self.factor, axis=2)[:, :height, :width]

    def block_sizes(self, height, width):
        """(ceil(h / f), ceil(w / f)): how many codes each block of an (h, w) grid holds."""
        rows = tf.minimum(self.factor, height - tf.range(0, height, self.factor))
        columns = tf.minimum(self.factor, width - tf.range(0, width, self.factor))
        return tf.cast(rows[:, None] * columns[None, :], tf.float32)

    def get_config(self):
        return {"num_embeddings": self.num_embeddings, "latent_dim": self.latent_dim,
                "top_embeddings": self.top_embeddings, "factor": self.factor, "top": self.top_settings,
                "bottom": self.bottom_settings, "position_bins": self.position_bins,
                "name": self.name}


class HierarchicalSampler:
    """Exact ancestral sampling from a `HierarchicalPrior`: the top grid with a cached
    `pixelcnn.Sampler`, then the bottom grid given it with another."""

    def __init__(self, prior, batch_size, height, width):
        self.prior, self.batch_size = prior, int(batch_size)
        top_height, top_width = -(-height // prior.factor), -(-width // prior.factor)
        self.top = pixelcnn.Sampler(prior.top, batch_size, top_height, top_width)
        self.bottom = pixelcnn.Sampler(prior.bottom, batch_size, height, width)
        self.top_grid = None

    def sample(self, temperature=1.0, seed=0, progress=None, position=None):
        """(batch_size, height, width) bottom codes; `progress(row)` after each bottom row.
        A prior with position bins draws slices at `position` (a number in [0, 1] or one
        per slice), or at positions drawn from the training slices' if None."""
        condition = None
        if self.prior.position_bins:
            if position is None:
                position = self.prior.draw_positions(self.batch_size, seed)
            positions = np.broadcast_to(np.asarray(position, np.float32), (self.batch_size,))
            condition = self.prior.position_classes(positions)[:, None, None]
        elif position is not None:
            raise ValueError("this prior was trained without slice positions")
        self.top_grid = self.top.sample(temperature, seed, condition=condition)
        # Another seed for the bottom grid, so its draws are not the top grid's again.
        return self.bottom.sample(temperature, seed + BOTTOM_SEED_OFFSET, progress, condition=self.top_grid)

    def used_logits(self):
        return self.bottom.used_logits()


def sampler_for(prior, batch_size, height, width):
    """The exact sampler of a prior: `pixelcnn.Sampler`, or `HierarchicalSampler`."""
    if isinstance(prior, HierarchicalPrior):
        return HierarchicalSampler(prior, batch_size, height, width)
    return pixelcnn.Sampler(prior, batch_size, height, width)
