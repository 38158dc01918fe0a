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
  (`PixelCNN(condition_classes=...)`): it draws the detail that fits the shape.

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


@keras.saving.register_keras_serializable(package=PACKAGE)
class HierarchicalPrior(keras.Model):
    """p(top) p(bottom | top) over (B, h, w) code grids of a VQ-VAE with `num_embeddings`
    codes of size `latent_dim`. `top` and `bottom` are PixelCNN settings (filters,
    num_layers, head_units, ...)."""

    def __init__(self, num_embeddings, latent_dim, top_embeddings=64, factor=4, top=None, bottom=None, **kwargs):
        super().__init__(**kwargs)
        if int(top_embeddings) < 2 or int(factor) < 2:
            raise ValueError(f"top_embeddings must be >= 2 and factor >= 2, got {top_embeddings} and {factor}")
        self.num_embeddings, self.latent_dim = int(num_embeddings), int(latent_dim)
        self.top_embeddings, self.factor = int(top_embeddings), int(factor)
        self.top_settings, self.bottom_settings = dict(top or {}), dict(bottom or {})
        self.top = pixelcnn.PixelCNN(self.top_embeddings, "gated", name="top", **self.top_settings)
        self.bottom = pixelcnn.PixelCNN(self.num_embeddings, "gated", condition_classes=self.top_embeddings,
                                        condition_factor=self.factor, name="bottom", **self.bottom_settings)
        # The VQ-VAE's code vectors (copied in by `fit_top_codebook`) and the top grid's centres.
        self.codebook = self.add_weight(shape=(self.num_embeddings, self.latent_dim), name="codebook",
                                        initializer="zeros", trainable=False)
        self.top_codebook = self.add_weight(shape=(self.top_embeddings, self.latent_dim), name="top_codebook",
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

    def call(self, codes):
        """(top logits, bottom logits) of (B, h, w) codes."""
        top = self.top_codes(codes)
        return self.top(top), self.bottom((codes, top))

    def code_nll(self, codes):
        """(B, h, w) negative log-likelihood in nats per bottom code: the bottom prior's, plus
        each top code's spread evenly over its block."""
        top = self.top_codes(codes)
        height, width = tf.shape(codes)[1], tf.shape(codes)[2]
        spread = self.top.code_nll(top) / self.block_sizes(height, width)
        spread = tf.repeat(tf.repeat(spread, self.factor, axis=1), self.factor, axis=2)
        return self.bottom.code_nll((codes, top)) + spread[:, :height, :width]

    def block_sizes(self, height, width):
        """(ceil(h / f), ceil(w / f)): how many codes each block of an (h, w) grid holds."""
        rows = tf.minimum(self.factor, height - tf.range(0, height, self.factor))
        columns = tf.minimum(self.factor, width - tf.range(0, width, self.factor))
        return tf.cast(rows[:, None] * columns[None, :], tf.float32)

    def get_config(self):
        return {"num_embeddings": self.num_embeddings, "latent_dim": self.latent_dim,
                "top_embeddings": self.top_embeddings, "factor": self.factor, "top": self.top_settings,
                "bottom": self.bottom_settings, "name": self.name}


class HierarchicalSampler:
    """Exact ancestral sampling from a `HierarchicalPrior`: the top grid with a cached
    `pixelcnn.Sampler`, then the bottom grid given it with another."""

    def __init__(self, prior, batch_size, height, width):
        top_height, top_width = -(-height // prior.factor), -(-width // prior.factor)
        self.top = pixelcnn.Sampler(prior.top, batch_size, top_height, top_width)
        self.bottom = pixelcnn.Sampler(prior.bottom, batch_size, height, width)
        self.top_grid = None

    def sample(self, temperature=1.0, seed=0, progress=None):
        """(batch_size, height, width) bottom codes; `progress(row)` after each bottom row."""
        self.top_grid = self.top.sample(temperature, seed)
        # Another seed for the bottom grid, so its draws are not the top grid's again.
        return self.bottom.sample(temperature, seed + BOTTOM_SEED_OFFSET, progress, condition=self.top_grid)

    def used_logits(self):
        return self.bottom.used_logits()


def sampler_for(prior, batch_size, height, width):
    """The exact sampler of a prior: `pixelcnn.Sampler`, or `HierarchicalSampler`."""
    if isinstance(prior, HierarchicalPrior):
        return HierarchicalSampler(prior, batch_size, height, width)
    return pixelcnn.Sampler(prior, batch_size, height, width)
