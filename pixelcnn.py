"""PixelCNN prior over VQ-VAE code grids, and an exact sampler that is fast.

A VQ-VAE turns a slice into an (h, w) grid of code indices. A PixelCNN models that grid
autoregressively in raster order, p(c) = prod_ij p(c_ij | codes before ij), with masked
convolutions (van den Oord et al. 2016, "Pixel Recurrent Neural Networks"):

* `MaskedConv2D`: a k x k convolution whose kernel is multiplied by a fixed mask so that an
  output never sees the inputs it must predict.
* `PixelCNN(variant="plain")`: the keras.io example's network (7x7 mask-A conv, residual
  blocks with 3x3 mask-B convs, 1x1 layers). Its receptive field has a blind spot above
  and to the right.
* `PixelCNN(variant="gated")`: the gated PixelCNN of van den Oord et al. 2016 ("Conditional
  Image Generation with PixelCNN Decoders"): a vertical stack that sees every row above, a
  horizontal stack that sees the current row to the left and the vertical stack, and
  tanh x sigmoid gates. It has no blind spot.

Sampling draws one code at a time with `tfp.distributions.Categorical`. Running the whole
network for every position (the keras.io way) costs h*w full passes. `Sampler` is exact but
computes, at each position, only that position's output of every layer: each masked
convolution caches its input in a buffer, and reads back the k x k patch it needs. The
gated vertical stack needs the whole current row of the stack below it, so it is computed
one row at a time, at the start of each row. Because the network is causal, the logits the
sampler used at every position equal those of one full pass over the finished grid, which
is how the tests check it.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from vqvae import PACKAGE

MASK_TYPES = ("A", "B", "VA", "VB", "HA", "HB")


def make_mask(kernel_size, mask_type):
    """A (k, k) 0/1 mask. With c the centre:
    A / B: rows above c, and row c left of c (B: and c itself) - the raster-order masks;
    VA / VB: rows above c (VB: and all of row c) - the vertical stack;
    HA / HB: row c left of c (HB: and c itself) - the horizontal stack."""
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    k, c = kernel_size, kernel_size // 2
    mask = np.zeros((k, k), np.float32)
    if mask_type in ("A", "B", "VA", "VB"):
        mask[:c] = 1
    if mask_type == "VB":
        mask[c] = 1
    if mask_type in ("A", "B", "HA", "HB"):
        mask[c, :c] = 1
    if mask_type in ("B", "HB"):
        mask[c, c] = 1
    return mask


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedConv2D(layers.Layer):
    """A 'same'-padded 2D convolution with a causal mask on its (odd) k x k kernel."""

    def __init__(self, filters, kernel_size, mask_type, **kwargs):
        super().__init__(**kwargs)
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if int(filters) < 1:
            raise ValueError(f"filters must be >= 1, got {filters}")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.mask_type = mask_type
        self.mask = make_mask(self.kernel_size, mask_type)
        if not self.mask.any():
            raise ValueError(f"a {kernel_size}x{kernel_size} mask of type {mask_type} sees nothing")

    @property
    def radius(self):
        return self.kernel_size // 2

    @property
    def first_row(self):
        """The first kernel row the mask lets through (rows below the centre never are)."""
        return int(np.flatnonzero(self.mask.any(axis=1))[0])

    @property
    def last_row(self):
        """The last kernel row the mask lets through (the centre row, or the one above it)."""
        return int(np.flatnonzero(self.mask.any(axis=1))[-1])

    @property
    def columns(self):
        """The first and last kernel columns the mask lets through."""
        used = np.flatnonzero(self.mask.any(axis=0))
        return int(used[0]), int(used[-1])

    @property
    def box_mask(self):
        """The mask cut to its bounding box (a 7x7 mask of type HA keeps a 1x3 strip)."""
        left, right = self.columns
        return self.mask[self.first_row: self.last_row + 1, left: right + 1]

    def build(self, input_shape):
        # Only the mask's bounding box is a weight, so that the parameter count (and the
        # initialiser's fan-in) is not inflated by weights the mask always zeroes.
        self.kernel = self.add_weight(shape=self.box_mask.shape + (input_shape[-1], self.filters),
                                      name="kernel", initializer="glorot_uniform")
        self.bias = self.add_weight(shape=(self.filters,), name="bias", initializer="zeros")

    def box_kernel(self):
        return tf.cast(self.kernel, self.compute_dtype) * self.box_mask[:, :, None, None]

    def masked_kernel(self):
        """The full (k, k, in, out) kernel, zero wherever the mask is."""
        k, left, right = self.kernel_size, *self.columns
        rows = [self.first_row, k - 1 - self.last_row]
        return tf.pad(self.box_kernel(), [rows, [left, k - 1 - right], [0, 0], [0, 0]])

    def call(self, inputs):
        # Convolve with the bounding box only, padded so each output sits where a 'same'
        # convolution of the full kernel puts it.
        r, top = self.radius, self.first_row
        left, right = self.columns
        padded = tf.pad(inputs, [[0, 0], [r - top, 0], [r - left, max(0, right - r)], [0, 0]])
        outputs = tf.nn.conv2d(padded, self.box_kernel(), strides=1, padding="VALID")
        # Boxes that end above the centre row (VA) or left of the centre (A, HA) give extra
        # rows or columns at the end.
        return outputs[:, : tf.shape(inputs)[1], : tf.shape(inputs)[2]] + tf.cast(self.bias, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, mask_type=self.mask_type)
        return config


def gate(x):
    """tanh(a) * sigmoid(b) for x = [a, b] split along channels."""
    a, b = tf.split(x, 2, axis=-1)
    return tf.tanh(a) * tf.sigmoid(b)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelCNN(keras.Model):
    """An autoregressive prior over (B, h, w) int code grids; returns (B, h, w, K) logits.

    The network is written once, as `vertical(x, conv)` and `horizontal(x, v, conv)`, where
    `conv(layer, tensor)` applies a masked convolution and `x` is the embedded code grid.
    Training passes a `conv` that runs the layer on the whole grid; `Sampler` passes ones
    that run it on one row or one position from its caches.

    With `condition_classes` > 0 (gated only) the prior is conditional (van den Oord et al.
    2016, section 2.3): it takes `(codes, condition)`, where `condition` is a coarser
    (B, ceil(h / condition_factor), ceil(w / condition_factor)) int grid; its embedding, repeated up to
    the code grid, is added through its own 1x1 layers into both stacks of every gated layer.
    The condition is given whole (it is not predicted), so it may look anywhere. With
    `condition_factor` 0 the condition is global, one class per grid (B, 1, 1), like the
    paper's class label: added alike at every position.

    With `condition_blocks` > 0 the condition grid is first read by a small CNN, as the
    bottom prior of VQ-VAE-2 reads its top codes: that many residual 3x3 convolutions at
    the condition's own resolution (so a code sees the condition grid around its block, not
    only its own cell) and a learnt stride-`condition_factor` transposed convolution up to
    the code grid (so a code knows where in its block it sits). Without them, each cell's
    embedding is repeated over its block.

    With `position_grid` (h, w) (gated only) the prior also learns an embedding of every
    position of an (h, w) grid, added like a condition into every gated layer, so that a
    code knows where in the grid it is (where the midline is, how far the edges are), which
    a convolution alone can only guess from the zero padding. Grids up to (h, w) take it.

    `dropout` drops that share of each gated layer's output in training (PixelCNN++'s
    regulariser, for small data); sampling and scoring never drop anything."""

    def __init__(self, num_embeddings, variant="gated", filters=128, num_layers=8, num_res_blocks=2,
                 kernel_size=3, first_kernel_size=7, head_units=None, condition_classes=0, condition_factor=1,
                 condition_units=32, condition_blocks=0, dropout=0.0, position_grid=None, **kwargs):
        super().__init__(**kwargs)
        if variant not in ("plain", "gated"):
            raise ValueError(f"variant must be 'plain' or 'gated', got {variant!r}")
        if (int(condition_classes) or position_grid) and variant != "gated":
            raise ValueError("only the gated PixelCNN takes a condition or a position grid")
        if int(num_embeddings) < 2:
            raise ValueError(f"num_embeddings must be >= 2, got {num_embeddings}")
        if int(condition_blocks) < 0 or (int(condition_blocks) and not int(condition_factor)):
            raise ValueError(f"condition_blocks must be >= 0, and 0 for a global condition (condition_factor 0), "
                             f"got {condition_blocks}")
        if int(num_layers) < (1 if variant == "gated" else 0) or int(num_res_blocks) < 0:
            raise ValueError(f"num_layers ({num_layers}) and num_res_blocks ({num_res_blocks}) are too small")
        self.num_embeddings = int(num_embeddings)
        self.variant = variant
        self.filters = int(filters)
        self.num_layers = int(num_layers)
        self.num_res_blocks = int(num_res_blocks)
        self.kernel_size = int(kernel_size)
        self.first_kernel_size = int(first_kernel_size)
        # Width of the 1x1 layer before the logits (default: `filters`).
        self.head_units = int(head_units or filters)
        self.condition_classes, self.condition_factor = int(condition_classes), int(condition_factor)
        self.condition_units = int(condition_units)
        self.condition_blocks = int(condition_blocks)
        if not 0 <= float(dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout_rate = float(dropout)
        self.position_grid = None if position_grid is None else [int(size) for size in position_grid]

        self.embedding = layers.Embedding(self.num_embeddings, self.filters, name="embedding")
        if variant == "plain":
            self._build_plain()
        else:
            self._build_gated()
        self.dropout = layers.Dropout(self.dropout_rate, name="dropout")
        self.head = layers.Dense(self.head_units, activation="relu", name="head")
        # Logits in float32 even when the rest computes in bfloat16 (`train.prior_twin`): the
        # softmax over K codes needs more than bfloat16's 8 bits of precision.
        self.logits = layers.Dense(self.num_embeddings, name="logits", dtype="float32")
        # Create every weight now, so the model saves and loads as is.
        side = max(1, self.condition_factor)
        codes = tf.zeros((1, side, side), tf.int32)
        self((codes, tf.zeros((1, 1, 1), tf.int32)) if self.condition_classes else codes)

    def _build_plain(self):
        f = self.filters
        self.first = MaskedConv2D(f, self.first_kernel_size, "A", name="first")
        self.res_blocks = [
            (layers.Dense(f // 2, activation="relu", name=f"res{i}_in"),
             MaskedConv2D(f // 2, self.kernel_size, "B", name=f"res{i}_conv"),
             layers.Dense(f, activation="relu", name=f"res{i}_out"))
            for i in range(self.num_res_blocks)
        ]
        self.pixel_layers = [MaskedConv2D(f, 1, "B", name=f"pixel{i}") for i in range(self.num_layers)]

    def _build_gated(self):
        f = self.filters
        size = lambda i: self.first_kernel_size if i == 0 else self.kernel_size  # noqa: E731
        self.gated_layers = [
            (MaskedConv2D(2 * f, size(i), "VA" if i == 0 else "VB", name=f"gated{i}_vertical"),
             MaskedConv2D(2 * f, size(i), "HA" if i == 0 else "HB", name=f"gated{i}_horizontal"),
             layers.Dense(2 * f, name=f"gated{i}_vertical_to_horizontal"),
             layers.Dense(f, name=f"gated{i}_out"))
            for i in range(self.num_layers)
        ]
        if self.position_grid:
            self.position_embedding = self.add_weight(shape=(*self.position_grid, self.condition_units),
                                                      name="position_embedding", initializer="zeros")
        if self.condition_classes:
            self.condition_embedding = layers.Embedding(self.condition_classes, self.condition_units,
                                                        name="condition_embedding")
            u = self.condition_units
            self.condition_convs = [layers.Conv2D(u, 3, padding="same", name=f"condition_conv{i}")
                                    for i in range(self.condition_blocks)]
            self.condition_upsample = None
            if self.condition_blocks and self.condition_factor > 1:
                self.condition_upsample = layers.Conv2DTranspose(u, self.condition_factor, self.condition_factor,
                                                                 name="condition_upsample")
        if self.has_terms:
            self.condition_layers = [(layers.Dense(2 * f, use_bias=False, name=f"gated{i}_condition_vertical"),
                                      layers.Dense(2 * f, use_bias=False, name=f"gated{i}_condition_horizontal"))
                                     for i in range(self.num_layers)]

    @property
    def has_terms(self):
        """Whether gated layers get terms added from outside the codes (a condition, positions)."""
        return bool(self.condition_classes or self.position_grid)

    @property
    def masked_convs(self):
        if self.variant == "plain":
            return [self.first] + [block[1] for block in self.res_blocks] + self.pixel_layers
        return [layer for block in self.gated_layers for layer in block[:2]]

    def condition_terms(self, condition, height, width, batch):
        """What a (B, ceil(h / f), ceil(w / f)) condition grid (None without one) and the
        position embedding add to each gated layer of `batch` (h, w) code grids: a list of
        (vertical, horizontal) (B, h, w, 2 * filters) terms."""
        c = tf.zeros((batch, height, width, self.condition_units), self.compute_dtype)
        if self.condition_classes:
            c = c + self.grid_condition(condition, height, width)
        if self.position_grid:
            c = c + tf.cast(self.position_embedding[None, :height, :width], c.dtype)
        return [(to_vertical(c), to_horizontal(c)) for to_vertical, to_horizontal in self.condition_layers]

    def grid_condition(self, condition, height, width):
        """The (B, h, w, condition_units) features of a condition grid at each code."""
        c = self.condition_embedding(condition)
        if self.condition_factor:
            # The condition is given whole: these need no mask. tf.maximum, not tf.nn.relu, for
            # the reason given in `horizontal` (grappler's remapper fuses add + relu and fails).
            for conv in self.condition_convs:
                c = c + conv(tf.maximum(c, 0.0))
            if self.condition_upsample is not None:
                c = self.condition_upsample(tf.maximum(c, 0.0))
            else:
                c = tf.repeat(tf.repeat(c, self.condition_factor, axis=1), self.condition_factor, axis=2)
            c = c[:, :height, :width]  # the last block row and column may overhang the grid
        else:  # a global condition: the same at every position
            c = c[:, :1, :1] * tf.ones((1, height, width, 1), c.dtype)
        return c

    def vertical(self, x, conv, condition=None):
        """The vertical stack's pre-gate activations, one per gated layer (none for plain).
        `condition(layer_index, stack)` gives the condition's term (stack 0: vertical), if any.

        Row i of these depends on rows < i of the codes only."""
        if self.variant == "plain":
            return []
        pre_activations, v = [], x
        for index, (vertical_conv, *_) in enumerate(self.gated_layers):
            v_pre = conv(vertical_conv, v)
            if condition:
                v_pre = v_pre + condition(index, 0)
            pre_activations.append(v_pre)
            v = gate(v_pre)
        return pre_activations

    def horizontal(self, x, v_pre_activations, conv, condition=None, training=False):
        """Logits from the embedded codes `x` and the vertical stack's activations
        (`condition` as in `vertical`, stack 1)."""
        if self.variant == "plain":
            h = tf.nn.relu(conv(self.first, x))
            for into, masked, out in self.res_blocks:
                h = h + out(tf.nn.relu(conv(masked, into(h))))
            for layer in self.pixel_layers:
                h = tf.nn.relu(conv(layer, h))
        else:
            h = x
            for index, ((_, horizontal_conv, v_to_h, out), v_pre) in enumerate(
                    zip(self.gated_layers, v_pre_activations)):
                h_pre = conv(horizontal_conv, h) + v_to_h(v_pre)
                h_new = out(gate(h_pre + condition(index, 1) if condition else h_pre))
                if self.dropout_rate:
                    h_new = self.dropout(h_new, training=training)
                # No residual on the first layer: its input holds the very code being predicted.
                h = h_new if index == 0 else h + h_new
            # tf.maximum, not tf.nn.relu: grappler's oneDNN remapper fuses Dense + add + relu
            # into a node it then cannot import inside the sampler's loop, and logs errors.
            h = tf.maximum(h, 0.0)
        return self.logits(self.head(h))

    def call(self, inputs, training=False):
        """(B, h, w) codes, or (codes, condition) for a conditional prior -> (B, h, w, K) logits."""
        codes, condition = inputs if self.condition_classes else (inputs, None)
        x = self.embedding(codes)
        whole_grid = lambda layer, tensor: layer(tensor)  # noqa: E731
        shape = tf.shape(codes)
        terms = self.condition_terms(condition, shape[1], shape[2], shape[0]) if self.has_terms else None
        add = (lambda index, stack: terms[index][stack]) if terms else None  # noqa: E731
        return self.horizontal(x, self.vertical(x, whole_grid, add), whole_grid, add, training)

    def code_nll(self, inputs):
        """(B, h, w) negative log-likelihood, in nats, of each code given the codes before it."""
        codes = inputs[0] if self.condition_classes else inputs
        return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(codes, tf.int32), self(inputs))

    def get_config(self):
        return {
            "num_embeddings": self.num_embeddings, "variant": self.variant, "filters": self.filters,
            "num_layers": self.num_layers, "num_res_blocks": self.num_res_blocks,
            "kernel_size": self.kernel_size, "first_kernel_size": self.first_kernel_size,
            "head_units": self.head_units, "condition_classes": self.condition_classes,
            "condition_factor": self.condition_factor, "condition_units": self.condition_units,
            "condition_blocks": self.condition_blocks, "dropout": self.dropout_rate,
            "position_grid": self.position_grid, "name": self.name,
        }


def bits_per_code(cross_entropy_nats):
    return cross_entropy_nats / math.log(2)


# ---------------------------------------------------------------------------
# Sampling


def draw(logits, temperature, seed):
    """One code per row of (B, K) logits, from Categorical(logits / temperature)."""
    import tensorflow_probability as tfp

    return tfp.distributions.Categorical(logits=logits / temperature).sample(seed=seed)


class Sampler(tf.Module):
    """Exact ancestral sampling of (batch_size, height, width) code grids from a PixelCNN,
    computing each layer only where it is needed.

    Every masked convolution keeps a buffer of its input over the zero-padded grid,
    laid out (row, column, batch, channel). At position (i, j) each layer's input there is
    written into its buffer and the layer's output at (i, j) is the masked kernel applied to
    the k x k patch read back: patch positions the mask lets through are all at or before
    (i, j), so they are already filled in, and positions outside the grid stay zero, as the
    'same' padding of the full network has them. The gated vertical stack sees all of the
    current row of the stack below, so it is run one row at a time (a 'valid' convolution
    of an (r + 1)-row band) when a row starts.

    Sampling is deterministic for a given seed, and draws the same codes as running the
    whole network at every position would with the same seeds (`naive_sample`). Given
    `fixed` codes and a `keep` mask, it keeps those codes where `keep` is set and draws the
    rest, each given every code before it: the "healing" of anomaly maps."""

    def __init__(self, model, batch_size, height, width):
        super().__init__()
        self.model = model
        self.batch_size, self.height, self.width = int(batch_size), int(height), int(width)
        self.pad = max(layer.radius for layer in model.masked_convs)
        padded = (self.height + self.pad, self.width + 2 * self.pad, self.batch_size)
        self.inputs = tf.Variable(tf.zeros(padded + (model.filters,)), trainable=False, name="embedded_codes")
        self.buffers = {
            layer.name: tf.Variable(tf.zeros(padded + (layer.kernel.shape[2],)), trainable=False,
                                    name=f"{layer.name}_input")
            for layer in model.masked_convs if layer.kernel_size > 1
        }
        self.vertical_rows = [tf.Variable(tf.zeros((self.width, self.batch_size, 2 * model.filters)),
                                          trainable=False)
                              for _ in range(model.num_layers if model.variant == "gated" else 0)]
        # A conditional prior's condition terms, laid out (row, column, batch, channel) like the caches.
        self.condition = [[tf.Variable(tf.zeros((self.height, self.width, self.batch_size, 2 * model.filters)),
                                       trainable=False) for _ in range(2)]
                          for _ in range(model.num_layers if model.has_terms else 0)]
        self.codes = tf.Variable(tf.zeros((self.height, self.width, self.batch_size), tf.int32), trainable=False)
        # Codes kept as given (keep = 1) instead of drawn, laid out like `codes`.
        self.fixed = tf.Variable(tf.zeros((self.height, self.width, self.batch_size), tf.int32), trainable=False)
        self.keep = tf.Variable(tf.zeros((self.height, self.width, self.batch_size), tf.int32), trainable=False)
        self.logits = tf.Variable(tf.zeros((self.height, self.width, self.batch_size, model.num_embeddings)),
                                  trainable=False)

    def reset(self, condition=None, fixed=None, keep=None):
        for variable in [self.inputs, self.codes, self.logits, *self.buffers.values(), *self.vertical_rows]:
            variable.assign(tf.zeros_like(variable))
        if (fixed is None) != (keep is None):
            raise ValueError("give both `fixed` codes and the `keep` mask, or neither")
        # NumPy transposes: TensorFlow's oneDNN int32 transpose logs an error on some CPUs.
        self.fixed.assign(np.zeros(self.fixed.shape, np.int32) if fixed is None
                          else np.transpose(np.asarray(fixed, np.int32), (1, 2, 0)))
        self.keep.assign(np.zeros(self.keep.shape, np.int32) if keep is None
                         else np.transpose(np.asarray(keep).astype(np.int32), (1, 2, 0)))
        if self.condition:
            if self.model.condition_classes and condition is None:
                raise ValueError("this prior is conditional: give sample() its condition grid")
            terms_per_layer = self.model.condition_terms(None if condition is None else tf.constant(condition),
                                                         self.height, self.width, self.batch_size)
            for variables, terms in zip(self.condition, terms_per_layer):
                for variable, term in zip(variables, terms):
                    variable.assign(tf.transpose(term, (1, 2, 0, 3)))

    def _row_condition(self, i):
        """A conditional prior's terms for all of row i, as (B, 1, W, 2 * filters)."""
        if not self.condition:
            return None
        return lambda index, stack: tf.transpose(tf.gather(self.condition[index][stack], i), (1, 0, 2))[:, None]

    def _position_condition(self, i, j):
        """A conditional prior's terms at position (i, j), as (B, 2 * filters)."""
        if not self.condition:
            return None
        return lambda index, stack: self.condition[index][stack][i, j]

    def _source(self, layer, tensor):
        """The buffer a layer reads from: the embedded codes, or its own input buffer."""
        return self.inputs if tensor is None else self.buffers[layer.name]

    def _row_conv(self, i):
        """Apply a masked conv to all of row i, reading rows i - r .. i of its buffer."""
        p, w = self.pad, self.width

        def conv(layer, tensor):
            r = layer.radius
            buffer = self._source(layer, tensor)
            if tensor is not None:  # (B, 1, W, C): write this row of the layer's input
                columns = tf.range(p, p + w)
                indices = tf.stack([tf.fill([w], i + p), columns], axis=1)
                buffer.scatter_nd_update(indices, tf.transpose(tensor[:, 0], (1, 0, 2)))
            band = tf.gather(buffer, tf.range(i + p - r, i + p + 1))[:, p - r: p + w + r]
            band = tf.transpose(band, (2, 0, 1, 3))  # (B, r + 1, W + 2r, C)
            kernel = layer.masked_kernel()[: r + 1]
            return tf.nn.conv2d(band, kernel, strides=1, padding="VALID") + layer.bias

        return conv

    def _position_conv(self, i, j):
        """Apply a masked conv at position (i, j) only, reading its patch from the buffer."""
        p = self.pad

        def conv(layer, tensor):
            if layer.kernel_size == 1:  # a 1x1 conv is pointwise: no patch needed
                return tf.matmul(tensor, layer.masked_kernel()[0, 0]) + layer.bias
            r, first = layer.radius, layer.first_row
            buffer = self._source(layer, tensor)
            if tensor is not None:  # (B, C): write this position of the layer's input
                buffer.scatter_nd_update([[i + p, j + p]], tensor[None])
            rows = tf.range(i + p - r + first, i + p + 1)
            columns = tf.range(j + p - r, j + p + r + 1)
            grid = tf.stack(tf.meshgrid(rows, columns, indexing="ij"), axis=-1)
            patch = tf.gather_nd(buffer, grid)  # (rows, 2r + 1, B, C)
            kernel = layer.masked_kernel()[first: r + 1]
            return tf.einsum("xybc,xyco->bo", patch, kernel) + layer.bias

        return conv

    @tf.function
    def sample_row(self, i, temperature, seed):
        """Draw row i of the codes (every earlier row must have been drawn)."""
        p, model = self.pad, self.model
        for variable, v_pre in zip(self.vertical_rows, model.vertical(None, self._row_conv(i), self._row_condition(i))):
            variable.assign(tf.transpose(v_pre[:, 0], (1, 0, 2)))
        for j in tf.range(self.width):
            v_pre = [tf.gather(variable, j) for variable in self.vertical_rows]
            logits = model.horizontal(None, v_pre, self._position_conv(i, j), self._position_condition(i, j))
            codes = draw(logits, temperature, tf.random.experimental.stateless_fold_in(seed, i * self.width + j))
            codes = tf.where(self.keep[i, j] > 0, self.fixed[i, j], codes)
            self.logits.scatter_nd_update([[i, j]], logits[None])
            self.codes.scatter_nd_update([[i, j]], codes[None])
            self.inputs.scatter_nd_update([[i + p, j + p]], model.embedding(codes)[None])
        return self.codes[i]

    def sample(self, temperature=1.0, seed=0, progress=None, condition=None, fixed=None, keep=None):
        """(batch_size, height, width) int32 codes; `progress(row)` is called after each row.
        A conditional prior needs its (batch_size, height / f, width / f) `condition` grid.
        Where the (batch_size, height, width) `keep` mask is set, the `fixed` codes are kept."""
        self.reset(condition, fixed, keep)
        seed = tf.constant([seed, 0], tf.int64)
        temperature = tf.constant(temperature, tf.float32)
        for i in range(self.height):
            self.sample_row(tf.constant(i), temperature, seed)
            if progress:
                progress(i + 1)
        # Transposed in NumPy: TensorFlow's oneDNN int32 transpose logs an error on some CPUs.
        return tf.constant(np.transpose(self.codes.numpy(), (2, 0, 1)))

    def used_logits(self):
        """(batch_size, height, width, K): the logits each code of the last sample was drawn from."""
        return tf.transpose(self.logits, (2, 0, 1, 3))


def naive_sample(model, batch_size, height, width, temperature=1.0, seed=0, positions=None, condition=None):
    """The reference sampler: run the whole network over the grid for every position.

    Draws the same codes as `Sampler` for the same seed. `positions` stops after that many
    positions (for timing); returns the codes and the logits used at each position drawn."""
    seed = tf.constant([seed, 0], tf.int64)

    @tf.function
    def step(codes, index):
        i, j = index // width, index % width
        logits = model(codes if condition is None else (codes, condition))[:, i, j]
        drawn = draw(logits, temperature, tf.random.experimental.stateless_fold_in(seed, index))
        updates = tf.tensor_scatter_nd_update(tf.transpose(codes, (1, 2, 0)), [[i, j]], drawn[None])
        return tf.transpose(updates, (2, 0, 1)), logits

    codes = tf.zeros((batch_size, height, width), tf.int32)
    used = []
    for index in range(positions or height * width):
        codes, logits = step(codes, tf.constant(index))
        used.append(logits)
    return codes, tf.stack(used, axis=1)
