"""A prior over VQ-VAE code grids in levels: global shape first, then structure, then detail.

A PixelCNN over a 64x64 grid of codes sees only a few rows and columns around each code,
so nothing ties the left of a head to its right: its samples fall apart into pieces. Here,
as in VQ-VAE-2 (Razavi et al. 2019), coarse grids decide the shape and finer ones the
detail:

* each coarser *level* summarises the VQ-VAE's code grid: each `factor` x `factor` block
  of code vectors is averaged and replaced by the nearest of that level's centres, found
  by k-means over the training split (`fit_codebooks`). The VQ-VAE is unchanged, so
  reconstruction is exactly as good as before; every level is a function of the codes;
* `top` is a gated PixelCNN over the coarsest grid (factor 4: 16x16 for a 64x64 grid, 64
  codes), deep enough that every code sees the whole grid above it and the row to its
  left: it learns the global anatomy, the outline of the head;
* `middle` (optional, factor 2: 32x32, 256 codes) is a gated PixelCNN over a finer
  summary, conditioned on the top grid: where the skull, the ventricles and the folds go.
  Measured on real slices, the codes drawn given a real 16x16 top grid have the right
  outline but no anatomy inside; given a real 32x32 grid of 256 codes they have it;
* `bottom` is a gated PixelCNN over the codes themselves, conditioned on the finest grid
  above it: the texture that fits the structure.

Each conditioned PixelCNN reads its condition grid through a small CNN
(`PixelCNN(condition_classes=..., condition_blocks=...)`), so a code sees the coarser grid
around its block, not only its own cell. With `position_bins` > 0 the top PixelCNN is
also conditioned on the slice's level in its volume (`data.slice_positions`), as a global
condition in every gated layer: one of `position_bins` equal bins of [0, 1], or "unknown"
(class 0, trained on a share of the slices whose position is hidden). A sampler asked for
no position draws one from the training slices' positions (`position_counts`), so
unconditional samples cover the levels as the data does.

The likelihood of a code grid is p(top) p(middle | top) p(codes | middle) with each level
taken from the codes (the probability of drawing the codes by way of their own summaries,
a bound on the model's marginal); `code_nll` spreads each coarser code's negative
log-likelihood over its block, so a grid's total is that whole figure.
`HierarchicalSampler` draws the top grid, then each finer grid given the one above, each
with the exact cached `pixelcnn.Sampler`.
"""

import keras
import numpy as np
import tensorflow as tf

import pixelcnn
import vqvae
from vqvae import PACKAGE

BOTTOM_SEED_OFFSET = 1_000_003  # the bottom grid's seed is the top's + this; the middle's + twice this
HIDDEN_POSITION_SHARE = 0.1  # of training slices shown to the top prior as of unknown position


@keras.saving.register_keras_serializable(package=PACKAGE)
class HierarchicalPrior(keras.Model):
    """p(top) [p(middle | top)] p(codes | the finest level above) over (B, h, w) code grids
    of a VQ-VAE with `num_embeddings` codes of size `latent_dim`. The top grid has
    `top_embeddings` codes, one per `factor` x `factor` block of codes; with
    `middle_embeddings` > 0 a middle grid has that many, one per `middle_factor` x
    `middle_factor` block. `top`, `middle` and `bottom` are PixelCNN settings (filters,
    num_layers, head_units, ...); `position_bins` > 0 conditions the top grid on the
    slice's position. Samplers draw the top grid at `top_temperature` times the
    temperature they are asked for, and the codes at `bottom_temperature` times it."""

    def __init__(self, num_embeddings, latent_dim, top_embeddings=64, factor=4, top=None, bottom=None,
                 position_bins=0, middle_embeddings=0, middle_factor=2, middle=None, top_temperature=1.0,
                 bottom_temperature=1.0, **kwargs):
        super().__init__(**kwargs)
        if int(top_embeddings) < 2 or int(factor) < 2:
            raise ValueError(f"top_embeddings must be >= 2 and factor >= 2, got {top_embeddings} and {factor}")
        if int(middle_embeddings) and not (int(middle_embeddings) >= 2 and 2 <= int(middle_factor) < int(factor)
                                           and int(factor) % int(middle_factor) == 0):
            raise ValueError(f"a middle level needs >= 2 codes and a factor >= 2 that divides the top factor "
                             f"{factor} and is smaller, got {middle_embeddings} codes and factor {middle_factor}")
        self.num_embeddings, self.latent_dim = int(num_embeddings), int(latent_dim)
        self.top_embeddings, self.factor = int(top_embeddings), int(factor)
        self.middle_embeddings, self.middle_factor = int(middle_embeddings), int(middle_factor)
        self.top_settings, self.bottom_settings = dict(top or {}), dict(bottom or {})
        self.middle_settings = dict(middle or {})
        self.position_bins, self.top_temperature = int(position_bins), float(top_temperature)
        self.bottom_temperature = float(bottom_temperature)
        for name, value in (("top_temperature", top_temperature), ("bottom_temperature", bottom_temperature)):
            if not float(value) > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        by_position = dict(condition_classes=self.position_bins + 1, condition_factor=0) if self.position_bins else {}
        self.top = pixelcnn.PixelCNN(self.top_embeddings, "gated", name="top", **self.top_settings, **by_position)
        # The VQ-VAE's code vectors (copied in by `fit_codebooks`) and each level's centres.
        self.codebook = self.add_weight(shape=(self.num_embeddings, self.latent_dim), name="codebook",
                                        initializer="zeros", trainable=False)
        self.top_codebook = self.add_weight(shape=(self.top_embeddings, self.latent_dim), name="top_codebook",
                                            initializer="zeros", trainable=False)
        self.middle = None
        above = (self.top_embeddings, self.factor)
        if self.middle_embeddings:
            self.middle = pixelcnn.PixelCNN(self.middle_embeddings, "gated", condition_classes=self.top_embeddings,
                                            condition_factor=self.factor // self.middle_factor, name="middle",
                                            **self.middle_settings)
            self.middle_codebook = self.add_weight(shape=(self.middle_embeddings, self.latent_dim),
                                                   name="middle_codebook", initializer="zeros", trainable=False)
            above = (self.middle_embeddings, self.middle_factor)
        self.bottom = pixelcnn.PixelCNN(self.num_embeddings, "gated", condition_classes=above[0],
                                        condition_factor=above[1], name="bottom", **self.bottom_settings)
        if self.position_bins:  # how many training slices fell in each position class (0: unknown)
            self.position_counts = self.add_weight(shape=(self.position_bins + 1,), name="position_counts",
                                                   initializer="zeros", trainable=False)
        self(tf.zeros((1, self.factor, self.factor), tf.int32))  # built, so it saves and loads as is

    @property
    def levels(self):
        """The coarser levels, coarsest first: (name, PixelCNN, centres, factor) each."""
        levels = [("top", self.top, self.top_codebook, self.factor)]
        if self.middle is not None:
            levels.append(("middle", self.middle, self.middle_codebook, self.middle_factor))
        return levels

    @property
    def names(self):
        """Every level's name, coarsest first, the codes' ("bottom") last."""
        return [name for name, *_ in self.levels] + ["bottom"]

    @property
    def networks(self):
        """Every level's PixelCNN, coarsest first, the bottom one last."""
        return [network for _, network, _, _ in self.levels] + [self.bottom]

    @property
    def factors(self):
        """How many codes along a side each level's code stands for, coarsest first (1 for the codes)."""
        return [factor for *_, factor in self.levels] + [1]

    def block_vectors(self, codes, factor):
        """(B, ceil(h / f), ceil(w / f), D): the mean code vector of each f x f block
        (blocks at the bottom and right edges may be partial: `SAME` pooling averages only
        the codes they hold)."""
        vectors = tf.gather(self.codebook, tf.cast(codes, tf.int32))
        return tf.nn.avg_pool2d(vectors, factor, factor, "SAME")

    def level_codes(self, codes):
        """(B, h, w) codes -> each coarser level's grid, coarsest first ((B, ceil(h / f),
        ceil(w / f)) for its factor f)."""
        grids = []
        for _, _, centres, factor in self.levels:
            blocks = self.block_vectors(codes, factor)
            nearest = vqvae.nearest_rows(tf.reshape(blocks, (-1, self.latent_dim)), centres)
            grids.append(tf.reshape(nearest, tf.shape(blocks)[:3]))
        return grids

    def top_codes(self, codes):
        """(B, h, w) codes -> (B, ceil(h / f), ceil(w / f)) top codes."""
        return self.level_codes(codes)[0]

    def fit_codebooks(self, codebook, grids, iterations=20, batch_size=256):
        """Take the VQ-VAE's `codebook` and fit each level's centres by k-means to the block
        vectors of (N, h, w) training grids."""
        self.codebook.assign(np.asarray(codebook, np.float32))
        for _, _, centres, factor in self.levels:
            blocks = np.concatenate([self.block_vectors(grids[start: start + batch_size], factor).numpy()
                                     for start in range(0, len(grids), batch_size)])
            found, _ = vqvae.kmeans(tf.constant(blocks.reshape(-1, self.latent_dim)), centres.shape[0], iterations)
            centres.assign(found)

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

    def network_inputs(self, grids, positions=None):
        """Each level's PixelCNN input for `grids` (every level's, coarsest first, the codes
        last): the top grid (with its positions), then each grid with the one above it."""
        return [self.top_inputs(grids[0], positions)] + [(grids[i], grids[i - 1]) for i in range(1, len(grids))]

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
        """Each level's logits for (B, h, w) codes (at `positions`, if known), coarsest first."""
        grids = self.level_codes(codes) + [codes]
        return tuple(network(inputs) for network, inputs in zip(self.networks, self.network_inputs(grids, positions)))

    def level_nll(self, codes, positions=None):
        """Every level's grid of (B, h, w) codes, coarsest first and the codes last, and each
        level's negative log-likelihood in nats per code given the level above: (grids, nlls)."""
        grids = self.level_codes(codes) + [codes]
        inputs = self.network_inputs(grids, positions)
        return grids, [network.code_nll(x) for network, x in zip(self.networks, inputs)]

    def code_nll(self, codes, positions=None):
        """(B, h, w) negative log-likelihood in nats per code: the bottom prior's, plus each
        coarser code's spread evenly over its block (at `positions`, if known)."""
        _, nlls = self.level_nll(codes, positions)
        return self.spread_nll(nlls)

    def spread_nll(self, nlls):
        """`code_nll` from `level_nll`'s per-level NLLs: the bottom level's, plus each coarser
        code's spread evenly over its block."""
        height, width = tf.shape(nlls[-1])[1], tf.shape(nlls[-1])[2]
        total = nlls[-1]
        for nll, factor in zip(nlls[:-1], self.factors):
            total += self.upsample(nll / self.block_sizes(height, width, factor), height, width, factor)
        return total

    @staticmethod
    def upsample(grid, height, width, factor):
        """A (B, h', w') array of a level repeated over each f x f block of an (h, w) grid."""
        return tf.repeat(tf.repeat(grid, factor, axis=1), factor, axis=2)[:, :height, :width]

    @staticmethod
    def block_sizes(height, width, factor):
        """(ceil(h / f), ceil(w / f)): how many codes each f x f block of an (h, w) grid holds."""
        rows = tf.minimum(factor, height - tf.range(0, height, factor))
        columns = tf.minimum(factor, width - tf.range(0, width, factor))
        return tf.cast(rows[:, None] * columns[None, :], tf.float32)

    def get_config(self):
        return {"num_embeddings": self.num_embeddings, "latent_dim": self.latent_dim,
                "top_embeddings": self.top_embeddings, "factor": self.factor, "top": self.top_settings,
                "bottom": self.bottom_settings, "position_bins": self.position_bins,
                "middle_embeddings": self.middle_embeddings, "middle_factor": self.middle_factor,
                "middle": self.middle_settings, "top_temperature": self.top_temperature,
                "bottom_temperature": self.bottom_temperature, "name": self.name}


def seed_offset(index, levels):
    """The seed offset of level `index` of `levels`: 0 for the top grid, BOTTOM_SEED_OFFSET
    for the codes (as with two levels), twice it for a middle grid."""
    return 0 if index == 0 else BOTTOM_SEED_OFFSET if index == levels - 1 else 2 * BOTTOM_SEED_OFFSET


class HierarchicalSampler:
    """Exact ancestral sampling from a `HierarchicalPrior`: the top grid with a cached
    `pixelcnn.Sampler`, then each finer grid given the one above with another."""

    def __init__(self, prior, batch_size, height, width):
        self.prior, self.batch_size = prior, int(batch_size)
        self.samplers = [pixelcnn.Sampler(network, batch_size, -(-height // factor), -(-width // factor))
                         for network, factor in zip(prior.networks, prior.factors)]
        self.top, self.bottom = self.samplers[0], self.samplers[-1]
        self.grids = []

    @property
    def top_grid(self):
        return self.grids[0] if self.grids else None

    def position_condition(self, position, seed=0):
        """The top grid's (B, 1, 1) position classes for `position` (drawn from the training
        slices' if None), or None for a prior without position bins."""
        if not self.prior.position_bins:
            if position is not None:
                raise ValueError("this prior was trained without slice positions")
            return None
        if position is None:
            position = self.prior.draw_positions(self.batch_size, seed)
        positions = np.broadcast_to(np.asarray(position, np.float32), (self.batch_size,))
        return self.prior.position_classes(positions)[:, None, None]

    def sample(self, temperature=1.0, seed=0, progress=None, position=None, above=()):
        """(batch_size, height, width) codes; `progress(row)` after each row of codes; the
        top grid at the prior's `top_temperature` times `temperature`, the codes at its
        `bottom_temperature` times it (a middle grid at `temperature`). A
        prior with position bins draws slices at `position` (a number in [0, 1] or one per
        slice), or at positions drawn from the training slices' if None. `above` gives the
        grids of the coarsest levels (coarsest first) instead of drawing them: only the
        finer levels are drawn, given the last of them."""
        self.grids = [tf.constant(np.asarray(grid, np.int32)) for grid in above]
        if len(self.grids) >= len(self.samplers):
            raise ValueError(f"`above` holds {len(self.grids)} grids; this prior has {len(self.samplers) - 1} "
                             "levels above the codes")
        condition = self.grids[-1] if self.grids else self.position_condition(position, seed)
        for index, sampler in enumerate(self.samplers[len(self.grids):], len(self.grids)):
            last = index == len(self.samplers) - 1
            at = temperature * (self.prior.top_temperature if index == 0 else
                                self.prior.bottom_temperature if last else 1.0)
            # Each level its own seed, so its draws are not the level above's again.
            self.grids.append(sampler.sample(at, seed + seed_offset(index, len(self.samplers)),
                                             progress if last else None, condition=condition))
            condition = self.grids[-1]
        return self.grids[-1]

    def used_logits(self):
        return self.bottom.used_logits()


def sampler_for(prior, batch_size, height, width):
    """The exact sampler of a prior: `pixelcnn.Sampler`, or `HierarchicalSampler`."""
    if isinstance(prior, HierarchicalPrior):
        return HierarchicalSampler(prior, batch_size, height, width)
    return pixelcnn.Sampler(prior, batch_size, height, width)
