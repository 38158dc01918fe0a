"""VQ-VAE: compress an MRI slice into a grid of discrete codes and reconstruct it.

Following van den Oord et al. 2017 ("Neural Discrete Representation Learning") and the
keras.io VQ-VAE example, with the fixes that keep the codebook healthy:

1. `VectorQuantizer` maps each encoder output vector to its nearest codebook vector and
   passes gradients straight through. By default the codebook is learnt by exponential
   moving averages of the vectors assigned to each code (appendix A.1 of the paper), is
   initialised by k-means on the first batch of encoder outputs, and codes unused for
   `dead_code_steps` training steps are restarted from recent encoder outputs.
   `ema_decay=0` gives the loss-based codebook of the paper and the keras.io example.
2. `get_encoder` / `get_decoder`: CNNs with stride-2 stages and residual stacks with batch
   (or group) normalisation. Each entry of `filters` is one stride-2 stage, so (16, 64) turns a
   256x256 slice into a 64x64 grid of codes.
3. `VQVAE`: the model, whose `train_step` minimises reconstruction MSE (plus
   `ssim_weight` x (1 - SSIM), if set) plus the quantizer loss (computed once per step),
   and tracks SSIM, PSNR and the codebook's perplexity and usage over each epoch.
   Training it (callbacks, checkpoints, resuming) is `train.py`'s job.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import layers

PACKAGE = "mri_vqvae"
# Batch-norm moving statistics. Keras' default of 0.99 lags the weights badly in runs of a few
# hundred steps (on real slices: train SSIM 0.62, validation 0.35 after 274 steps); 0.9 keeps
# up, at the price of some epoch-to-epoch noise in validation scores (about 0.02 SSIM).
BN_MOMENTUM = 0.9
# tf.image.ssim's definition: an 11-tap Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
SSIM_PAD = SSIM_WINDOW // 2  # half of that window


NORMS = ("batch", "group", "none")
GROUPS = 8  # channel groups of group normalisation (fewer if a layer has fewer channels)


def normalization(kind, channels, name):
    """The normalisation after a convolution of `channels` channels:

    * "batch": batch normalisation, whose statistics, under tf.distribute, are taken over
      the global batch (all replicas), so training on N devices matches training on one.
      Validation and inference use moving averages of those statistics, which at small
      batches lag and jitter behind the weights;
    * "group": group normalisation (Wu and He 2018), per slice over groups of channels: the
      same computation in training and validation, at any batch size;
    * "none": nothing (the convolution keeps its bias instead)."""
    if kind == "batch":
        return layers.BatchNormalization(momentum=BN_MOMENTUM, synchronized=True, name=name)
    if kind == "group":
        return GroupNormalization(groups=max(g for g in range(1, GROUPS + 1) if channels % g == 0), name=name)
    if kind == "none":
        return layers.Identity(name=name)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupNormalization(layers.Layer):
    """Group normalisation (Wu and He 2018): each slice's channels in `groups` groups, each
    group normalised by its mean and variance over the slice, then a learnt scale and shift
    per channel. The same figures as `keras.layers.GroupNormalization` (to float rounding;
    tested), about twice as fast on CPU (`benchmarks/throughput.py`): the statistics come
    from two reductions of the whole map (the channels' means of x and of x^2, then averaged
    within each group), and the normalisation is one multiply-add per value with a scale and
    shift per channel, where Keras' layer reshapes the map into groups and takes its
    moments, several passes over the largest tensors of the step (`group_normalize` does
    the work, its gradient written out).

    It has Keras' layer's class name and weights (gamma, then beta) on purpose: a saved
    model files each layer's weights under its class name, so runs saved with Keras' layer
    load with this one (tested)."""

    def __init__(self, groups, epsilon=1e-3, **kwargs):
        super().__init__(**kwargs)
        if int(groups) < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups, self.epsilon = int(groups), float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.groups:
            raise ValueError(f"{channels} channels do not split into {self.groups} groups")
        self.gamma = self.add_weight(shape=(channels,), name="gamma", initializer="ones")
        self.beta = self.add_weight(shape=(channels,), name="beta", initializer="zeros")

    def call(self, inputs):
        x = tf.cast(inputs, tf.float32)  # statistics in float32 under mixed precision
        outputs = group_normalize(x, tf.cast(self.gamma, tf.float32), tf.cast(self.beta, tf.float32),
                                  self.groups, self.epsilon)
        return tf.cast(outputs, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(groups=self.groups, epsilon=self.epsilon)
        return config


def group_normalize(x, gamma, beta, groups, epsilon):
    """Group normalisation of (B, H, W, C) maps with a per-channel scale `gamma` and shift
    `beta`, and its gradient written out: the automatic one takes about ten passes over the
    map (the scale's product, the statistics' broadcasts, the square's two products and
    their sum), this one five (dy * x, the two sums over pixels, and dx as
    dy * a + x * b + c, with a, b and c per slice and channel)."""
    size = x.shape[-1] // groups

    def group_mean(per_channel):  # (B, C) -> (B, C): the mean over each channel's group
        return tf.repeat(tf.reduce_mean(tf.reshape(per_channel, (-1, groups, size)), axis=-1), size, axis=-1)

    def per_pixel(per_channel):  # (B, C) -> (B, 1, 1, C)
        return per_channel[:, None, None, :]

    @tf.custom_gradient
    def normalize(x, gamma, beta):
        mean = group_mean(tf.reduce_mean(x, axis=(1, 2)))
        variance = tf.maximum(group_mean(tf.reduce_mean(x * x, axis=(1, 2))) - mean * mean, 0.0)
        inverse_std = tf.math.rsqrt(variance + epsilon)
        scale = gamma * inverse_std
        outputs = x * per_pixel(scale) + per_pixel(beta - mean * scale)

        def gradient(d_outputs):
            pixels = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], tf.float32)
            sum_d = tf.reduce_sum(d_outputs, axis=(1, 2))
            sum_d_normalized = inverse_std * (tf.reduce_sum(d_outputs * x, axis=(1, 2)) - mean * sum_d)
            # d_x = inverse_std * (gamma d - group mean of gamma d - normalized x * group mean of
            # gamma d normalized x), the group means taken over the group's channels and pixels.
            mean_d = group_mean(gamma * sum_d) / pixels
            mean_d_normalized = group_mean(gamma * sum_d_normalized) / pixels
            x_coefficient = -inverse_std * inverse_std * mean_d_normalized
            constant = inverse_std * (inverse_std * mean * mean_d_normalized - mean_d)
            d_x = d_outputs * per_pixel(scale) + (x * per_pixel(x_coefficient) + per_pixel(constant))
            return d_x, tf.reduce_sum(sum_d_normalized, axis=0), tf.reduce_sum(sum_d, axis=0)

        return outputs, gradient

    return normalize(x, gamma, beta)


# ---------------------------------------------------------------------------
# The quantizer


def nearest_rows(flat, codebook):
    """Index of the nearest codebook row (squared L2) for each row of (N, D) vectors.

    |x - c|^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 is the same for every code of a row, so
    the argmin leaves it out: a pass over the inputs and one over the (N, K) distances less
    (6.6 -> 5.0 ms of a 189-ms VQ-VAE training step, the same indices)."""
    distances_less_row_norm = tf.reduce_sum(codebook**2, axis=1) - 2 * tf.matmul(flat, codebook, transpose_b=True)
    return tf.argmin(distances_less_row_norm, axis=1, output_type=tf.int32)


def kmeans(flat, k, iterations=10):
    """Lloyd's k-means on (N, D) vectors from k random rows: the centres and how many
    vectors each holds (a centre that loses all its vectors stays where it was)."""
    centers = random_rows(flat, k)
    counts = tf.zeros((k,))
    for _ in range(iterations):
        indices = nearest_rows(flat, centers)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(flat[:, 0]), indices, k)
        sums = tf.math.unsorted_segment_sum(flat, indices, k)
        centers = tf.where(counts[:, None] > 0, sums / tf.maximum(counts[:, None], 1.0), centers)
    return centers, counts


def random_rows(flat, count):
    """`count` rows of (N, D) vectors drawn at random, with replacement."""
    return tf.gather(flat, tf.random.uniform((count,), 0, tf.shape(flat)[0], dtype=tf.int32))


def from_first_replica(tensors):
    """The first replica's values of `tensors` on every replica (as they are, on one device):
    where every replica must make the same random draw."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensors
    first = tf.equal(context.replica_id_in_sync_group, 0)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, [tensor * tf.cast(first, tensor.dtype) for tensor in tensors])


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorQuantizer(layers.Layer):
    """Nearest-neighbour lookup into a codebook of `num_embeddings` vectors of size
    `embedding_dim`, with the straight-through gradient estimator.

    Adds `beta * commitment_loss` (+ the codebook loss when `ema_decay == 0`) as a layer
    loss. `call` returns the quantized tensor and the (..., ) int32 code indices."""

    def __init__(self, num_embeddings, embedding_dim, beta=0.25, ema_decay=0.99, epsilon=1e-5,
                 codebook_init="kmeans", kmeans_iterations=10, dead_code_steps=10, **kwargs):
        super().__init__(**kwargs)
        if int(num_embeddings) < 2:
            raise ValueError(f"num_embeddings must be >= 2, got {num_embeddings}")
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if not 0 <= float(ema_decay) < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if codebook_init not in ("kmeans", "uniform"):
            raise ValueError(f"codebook_init must be 'kmeans' or 'uniform', got {codebook_init!r}")
        if int(dead_code_steps) < 0:
            raise ValueError(f"dead_code_steps must be >= 0 (0 turns restarts off), got {dead_code_steps}")
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.beta = float(beta)
        self.ema_decay = float(ema_decay)
        self.epsilon = float(epsilon)
        self.codebook_init = codebook_init
        self.kmeans_iterations = int(kmeans_iterations)
        self.dead_code_steps = int(dead_code_steps)

    @property
    def uses_ema(self):
        return self.ema_decay > 0

    def build(self, input_shape):
        if input_shape[-1] != self.embedding_dim:
            raise ValueError(f"VectorQuantizer expects inputs with {self.embedding_dim} channels, "
                             f"got shape {input_shape}")
        k, d = self.num_embeddings, self.embedding_dim
        # Under tf.distribute every replica computes the same update (the statistics are
        # all-reduced and random draws come from the first replica), so the first replica's
        # value is the one kept.
        state = dict(aggregation="only_first_replica")
        self.codebook = self.add_weight(
            shape=(k, d), name="codebook", trainable=not self.uses_ema,
            initializer=keras.initializers.RandomUniform(-1.0 / k, 1.0 / k), **state,
        )
        # Moving averages of how many vectors each code received, and of their sum.
        self.cluster_size = self.add_weight(shape=(k,), name="cluster_size", initializer="zeros",
                                            trainable=False, **state)
        self.embedding_sum = self.add_weight(shape=(k, d), name="embedding_sum", initializer="zeros",
                                             trainable=False, **state)
        self.steps_unused = self.add_weight(shape=(k,), name="steps_unused", initializer="zeros",
                                            trainable=False, **state)
        self.initialized = self.add_weight(shape=(), name="initialized", initializer="zeros",
                                           trainable=False, **state)

    def nearest_codes(self, flat_inputs):
        """Index of the nearest codebook vector (squared L2) for each row of (N, D) inputs."""
        return nearest_rows(flat_inputs, self.codebook)

    def call(self, inputs, training=False):
        quantized, indices = self.quantize_inputs(inputs, training)
        self.add_loss(self.quantization_loss(inputs, indices))
        return quantized, indices

    def quantize_inputs(self, inputs, training=False):
        """The quantized inputs and their code indices, without adding the layer loss (`VQVAE`
        computes that once per step itself). In training, the codebook learns first."""
        inputs = tf.cast(inputs, self.codebook.dtype)  # float16 encoder outputs under mixed precision
        flat = tf.reshape(inputs, (-1, self.embedding_dim))
        if training and self.codebook_init == "kmeans":
            self._initialize_once(flat)
        indices = self.nearest_codes(flat)
        quantized = tf.reshape(tf.gather(self.codebook, indices), tf.shape(inputs))
        if training:  # after the lookup: this step decodes the codebook it was quantized with
            counts, sums = self._assignment_stats(flat, indices)
            if self.uses_ema:
                self._ema_update(counts, sums)
            if self.dead_code_steps:
                self._restart_dead_codes(flat, counts)
        # Straight-through estimator: the forward pass uses the codes, the backward pass
        # copies the decoder's gradient to the encoder output as if quantization were identity.
        quantized = inputs + tf.stop_gradient(quantized - inputs)
        return quantized, tf.reshape(indices, tf.shape(inputs)[:-1])

    def quantization_loss(self, inputs, indices):
        """beta * the commitment loss, plus the codebook loss when the codebook is learnt by
        gradients (ema_decay == 0), for the inputs of a call and the indices it returned.

        `VQVAE` calls this itself instead of reading the layer's `losses`: under
        MirroredStrategy the replicas run in threads that share that list."""
        inputs = tf.cast(inputs, self.codebook.dtype)  # float16 encoder outputs under mixed precision
        quantized = tf.gather(self.codebook, indices)
        loss = self.beta * tf.reduce_mean((inputs - tf.stop_gradient(quantized)) ** 2)
        if not self.uses_ema:
            loss += tf.reduce_mean((tf.stop_gradient(inputs) - quantized) ** 2)
        return loss

    def _assignment_stats(self, flat, indices):
        """How many vectors went to each code and their sum, over all replicas."""
        counts = tf.math.unsorted_segment_sum(tf.ones_like(flat[:, 0]), indices, self.num_embeddings)
        sums = tf.math.unsorted_segment_sum(flat, indices, self.num_embeddings)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            counts, sums = context.all_reduce(tf.distribute.ReduceOp.SUM, [counts, sums])
        return counts, sums

    def _initialize_once(self, flat):
        """Initialise the codebook by k-means on the first training batch.

        The k-means runs inside a tf.cond, where tf.distribute allows no communication
        between replicas, so it is local; its result is then taken from the first replica
        and assigned outside the cond (on later steps the assignments keep the values)."""
        first_step = self.initialized <= 0
        centers, counts = tf.cond(first_step, lambda: kmeans(flat, self.num_embeddings, self.kmeans_iterations),
                                  lambda: (tf.identity(self.codebook), tf.identity(self.cluster_size)))
        centers, counts = from_first_replica([centers, counts])
        self.codebook.assign(tf.where(first_step, centers, self.codebook))
        self.cluster_size.assign(tf.where(first_step, counts, self.cluster_size))
        self.embedding_sum.assign(tf.where(first_step, centers * counts[:, None], self.embedding_sum))
        self.initialized.assign(1.0)

    def _ema_update(self, counts, sums):
        """Move each code to the moving average of the vectors assigned to it."""
        decay = self.ema_decay
        self.cluster_size.assign(decay * self.cluster_size + (1 - decay) * counts)
        self.embedding_sum.assign(decay * self.embedding_sum + (1 - decay) * sums)
        # Laplace smoothing keeps codes with a tiny cluster size from dividing by ~0.
        total = tf.reduce_sum(self.cluster_size)
        smoothed = (self.cluster_size + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total
        self.codebook.assign(self.embedding_sum / smoothed[:, None])

    def _restart_dead_codes(self, flat, counts):
        """Move codes unused for `dead_code_steps` steps onto random recent encoder outputs."""
        steps_unused = tf.where(counts > 0, 0.0, self.steps_unused + 1)
        dead = steps_unused >= self.dead_code_steps
        # Every replica must restart a code at the same vector: take the first replica's draw.
        [replacement] = from_first_replica([random_rows(flat, self.num_embeddings)])
        self.codebook.assign(tf.where(dead[:, None], replacement, self.codebook))
        if self.uses_ema:
            self.cluster_size.assign(tf.where(dead, 1.0, self.cluster_size))
            self.embedding_sum.assign(tf.where(dead[:, None], replacement, self.embedding_sum))
        self.steps_unused.assign(tf.where(dead, 0.0, steps_unused))

    def compute_output_shape(self, input_shape):
        return input_shape, input_shape[:-1]

    def get_config(self):
        config = super().get_config()
        config.update(
            num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim, beta=self.beta,
            ema_decay=self.ema_decay, epsilon=self.epsilon, codebook_init=self.codebook_init,
            kmeans_iterations=self.kmeans_iterations, dead_code_steps=self.dead_code_steps,
        )
        return config


# ---------------------------------------------------------------------------
# Encoder and decoder


def residual_block(x, filters, name, norm="batch"):
    """ReLU -> 3x3 conv -> norm -> ReLU -> 1x1 conv -> norm, added back to the input."""
    bias = norm == "none"
    y = layers.ReLU(name=f"{name}_relu1")(x)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=bias, name=f"{name}_conv3")(y)
    y = normalization(norm, filters, name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu2")(y)
    y = layers.Conv2D(filters, 1, use_bias=bias, name=f"{name}_conv1")(y)
    y = normalization(norm, filters, name=f"{name}_bn2")(y)
    return layers.Add(name=f"{name}_add")([x, y])


def get_encoder(latent_dim, filters=(16, 64), num_res_blocks=2, norm="batch"):
    """(B, H, W, 1) slices -> (B, H / 2^len(filters), W / 2^len(filters), latent_dim)."""
    inputs = keras.Input((None, None, 1))
    x = inputs
    for stage, width in enumerate(filters):
        x = layers.Conv2D(width, 4, strides=2, padding="same", use_bias=norm == "none", name=f"down{stage}_conv")(x)
        x = normalization(norm, width, name=f"down{stage}_bn")(x)
        x = layers.ReLU(name=f"down{stage}_relu")(x)
    for block in range(num_res_blocks):
        x = residual_block(x, filters[-1], f"res{block}", norm)
    x = layers.ReLU(name="out_relu")(x)
    outputs = layers.Conv2D(latent_dim, 1, name="to_latent")(x)
    return keras.Model(inputs, outputs, name="encoder")


def get_decoder(latent_dim, filters=(16, 64), num_res_blocks=2, norm="batch"):
    """(B, h, w, latent_dim) codes -> (B, h * 2^len(filters), w * 2^len(filters), 1).

    A residual stack at the code resolution, then one stride-2 transposed conv per entry
    of `filters` (widths filters[-1], ..., filters[1], then straight to the image)."""
    inputs = keras.Input((None, None, latent_dim))
    x = layers.Conv2D(filters[-1], 3, padding="same", name="from_latent")(inputs)
    for block in range(num_res_blocks):
        x = residual_block(x, filters[-1], f"res{block}", norm)
    x = layers.ReLU(name="res_relu")(x)
    for stage, width in enumerate(reversed(filters[1:])):
        x = layers.Conv2DTranspose(width, 4, strides=2, padding="same", use_bias=norm == "none",
                                   name=f"up{stage}_conv")(x)
        x = normalization(norm, width, name=f"up{stage}_bn")(x)
        x = layers.ReLU(name=f"up{stage}_relu")(x)
    # The last stage upsamples straight to the image. A hidden full-resolution layer
    # followed by a 3x3 conv to one channel took half of each training step on CPU and left
    # a checkerboard texture (demo: validation SSIM 0.79 in 173 s, against 0.88 in 105 s).
    # float32 even under a mixed-precision policy: the loss and SSIM are computed on it.
    outputs = layers.Conv2DTranspose(1, 4, strides=2, padding="same", dtype="float32", name="to_image")(x)
    return keras.Model(inputs, outputs, name="decoder")


# ---------------------------------------------------------------------------
# Metrics


@keras.saving.register_keras_serializable(package=PACKAGE)
class CodebookStatistics(keras.metrics.Metric):
    """Perplexity and fraction of codes used, over every code index seen since the last
    reset (so over a whole epoch or split, not one batch)."""

    def __init__(self, num_embeddings, name="codebook", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_embeddings = int(num_embeddings)
        self.counts = self.add_variable(shape=(self.num_embeddings,), initializer="zeros", name="counts")

    def update_state(self, indices, sample_weight=None):
        flat = tf.reshape(tf.cast(indices, tf.int32), (-1,))
        # A segment sum rather than tf.math.bincount, which XLA (--jit) cannot compile.
        self.counts.assign_add(tf.math.unsorted_segment_sum(tf.ones_like(flat, tf.float32), flat,
                                                            self.num_embeddings))

    def result(self):
        probabilities = self.counts / tf.maximum(tf.reduce_sum(self.counts), 1.0)
        entropy = -tf.reduce_sum(tf.math.multiply_no_nan(tf.math.log(probabilities), probabilities))
        used = tf.reduce_sum(tf.cast(self.counts > 0, tf.float32)) / self.num_embeddings
        return {"perplexity": tf.exp(entropy), "codebook_usage": used}

    def reset_state(self):
        self.counts.assign(tf.zeros_like(self.counts))

    def get_config(self):
        return {"num_embeddings": self.num_embeddings, "name": self.name}


def scored_range(images, reconstructions, shift):
    """Images and reconstructions as SSIM and PSNR score them: moved back to [0, 1] (SSIM is
    not shift-invariant), the reconstructions clipped to it."""
    return images - shift, tf.clip_by_value(reconstructions - shift, 0.0, 1.0)


def ssim_loss_and_score(images, reconstructions, shift):
    """(1 - SSIM of a batch on images mirror-padded by half the SSIM window: the loss term,
    the batch's mean SSIM as tf.image.ssim scores it: the training metric), from one SSIM map.

    tf.image.ssim slides its window only where it fits ('valid'), so a pixel within 5 of the
    edge is only ever at the faint rim of a window, and a model trained on it lets that frame
    go (measured: SSIM 0.30 there); padded, every pixel is the centre of some window. The
    windows of the padded map that hold no padding are the central crop, and exactly the
    unpadded map's, so the metric needs no second SSIM."""
    pad = [[0, 0], [SSIM_PAD, SSIM_PAD], [SSIM_PAD, SSIM_PAD], [0, 0]]
    padded = ssim_map(*(batch_as_channels(tf.pad(x, pad, mode="REFLECT"))
                        for x in scored_range(images, reconstructions, shift)))
    return 1.0 - tf.reduce_mean(padded), tf.reduce_mean(padded[:, SSIM_PAD:-SSIM_PAD, SSIM_PAD:-SSIM_PAD])


def image_ssim(images, reconstructions, shift):
    """Per-image SSIM on the scored range (`scored_range`)."""
    return tf.image.ssim(*scored_range(images, reconstructions, shift), max_val=1.0)


def mean_ssim(images, reconstructions, shift):
    """The mean of `image_ssim` over a batch, computed several times faster on CPU (a test
    checks it against tf.image.ssim).

    tf.image.ssim scores each channel separately and averages the channels, and a depthwise
    filter is far faster on one (1, H, W, B) image than on B images of (H, W, 1); so the batch
    goes to the channel axis, and `ssim_map` applies the Gaussian as two 11-tap passes."""
    return tf.reduce_mean(ssim_map(*(batch_as_channels(x) for x in scored_range(images, reconstructions, shift))))


def batch_as_channels(images):
    """(B, H, W, 1) -> (1, H, W, B)."""
    return tf.transpose(images[..., 0], (1, 2, 0))[None]


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    """The normalised 1D Gaussian whose outer product is tf.image.ssim's 2D window."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    window = np.exp(-0.5 * x**2 / sigma**2)
    return (window / window.sum()).astype(np.float32)


def local_mean(maps, window):
    """Gaussian-weighted local means of (1, H, W, C) maps, 'valid' padding, per channel:
    tf.image.ssim's 2D Gaussian is separable, so a column pass and a row pass of the 1D
    window give its result at 2k instead of k^2 multiplies per pixel."""
    channels = tf.shape(maps)[-1]
    rows = tf.tile(window[:, None, None, None], [1, 1, channels, 1])
    columns = tf.tile(window[None, :, None, None], [1, 1, channels, 1])
    maps = tf.nn.depthwise_conv2d(maps, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(maps, columns, [1, 1, 1, 1], "VALID")


def ssim_map(x, y, window=None):
    """The (1, H - k + 1, W - k + 1, C) SSIM map of each channel of (1, H, W, C) maps `y`
    against `x` in [0, 1] (`x` may have one channel, compared with each of `y`'s):
    tf.image.ssim's formula (K1 0.01, K2 0.03, max value 1) with `window` (default: its
    11-tap, sigma 1.5 Gaussian). The local means are filtered in two batches (of `x`'s
    maps and of `y`'s), as wider depthwise filters run faster than one per map."""
    window = tf.constant(gaussian_window()) if window is None else window
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_x, xx = tf.split(local_mean(tf.concat([x, x * x], axis=-1), window), 2, axis=-1)
    mu_y, yy, xy = tf.split(local_mean(tf.concat([y, y * y, x * y], axis=-1), window), 3, axis=-1)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * (xy - mu_x * mu_y) + c2) / (xx + yy - mu_x**2 - mu_y**2 + c2)
    return luminance * contrast_structure


def image_psnr(images, reconstructions, shift):
    return tf.image.psnr(*scored_range(images, reconstructions, shift), max_val=1.0)


# ---------------------------------------------------------------------------
# The model


@keras.saving.register_keras_serializable(package=PACKAGE)
class VQVAE(keras.Model):
    """Encoder -> VectorQuantizer -> decoder, trained on reconstruction MSE + the VQ loss.

    `shift` is where the data's [0, 1] range was moved to ([shift, 1 + shift]); it is only
    used to score SSIM and PSNR on the original range."""

    def __init__(self, num_embeddings=128, latent_dim=64, beta=0.25, filters=(16, 32), num_res_blocks=2,
                 ema_decay=0.99, codebook_init="kmeans", dead_code_steps=10, shift=-0.5, norm="batch",
                 ssim_weight=0.0, **kwargs):
        super().__init__(**kwargs)
        if not filters or min(filters) < 1:
            raise ValueError(f"filters must be a non-empty list of positive widths, got {filters}")
        self.num_embeddings = int(num_embeddings)
        self.latent_dim = int(latent_dim)
        self.beta = float(beta)
        self.filters = tuple(int(f) for f in filters)
        self.num_res_blocks = int(num_res_blocks)
        self.ema_decay = float(ema_decay)
        self.codebook_init = codebook_init
        self.dead_code_steps = int(dead_code_steps)
        self.shift = float(shift)
        self.norm = norm
        self.ssim_weight = float(ssim_weight)

        self.encoder = get_encoder(self.latent_dim, self.filters, self.num_res_blocks, norm)
        self.quantizer = VectorQuantizer(self.num_embeddings, self.latent_dim, self.beta, self.ema_decay,
                                         codebook_init=codebook_init, dead_code_steps=dead_code_steps,
                                         dtype="float32", name="vector_quantizer")  # distances in float32
        self.decoder = get_decoder(self.latent_dim, self.filters, self.num_res_blocks, norm)
        # Encoder and decoder are functional models and take any (H, W); build the quantizer
        # too, so the model has all its weights before it first sees data (and can be saved).
        self.quantizer.build((None, None, None, self.latent_dim))
        self.built = True

        self.total_loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.vq_loss_tracker = keras.metrics.Mean(name="vq_loss")
        self.ssim_tracker = keras.metrics.Mean(name="ssim")
        self.psnr_tracker = keras.metrics.Mean(name="psnr")
        self.codebook_tracker = CodebookStatistics(self.num_embeddings)

    @property
    def downsampling(self):
        """How many pixels along each side one code covers."""
        return 2 ** len(self.filters)

    def call(self, images, training=False):
        return self.reconstruct(images, training=training)[0]

    def reconstruct(self, images, training=False):
        """(B, H, W, 1) images -> their reconstructions and (B, H / d, W / d) code indices."""
        quantized, indices = self.quantizer.quantize_inputs(self.encoder(images, training=training), training=training)
        return self.decoder(quantized, training=training), indices

    def encode(self, images):
        """(B, H, W, 1) images -> (B, H / d, W / d) int32 code indices."""
        _, indices = self.quantizer.quantize_inputs(self.encoder(images, training=False))
        return indices

    def decode(self, indices):
        """(B, h, w) code indices -> (B, h * d, w * d, 1) images."""
        return self.decoder(tf.gather(self.quantizer.codebook, indices), training=False)

    def to_slices(self, outputs):
        """Decoder outputs -> NumPy slices in [0, 1], as they are scored and shown: moved back
        by the shift, clipped."""
        return np.clip(np.asarray(outputs) - self.shift, 0.0, 1.0)

    def decode_images(self, indices):
        """(B, h, w) code indices -> (B, H, W, 1) NumPy slices in [0, 1] (`to_slices`)."""
        return self.to_slices(self.decode(indices))

    def reconstruct_images(self, slices):
        """(B, H, W, 1) slices in [0, 1] -> their (B, H, W, 1) NumPy reconstructions in [0, 1],
        as they are scored and shown: moved by the shift, reconstructed, moved back, clipped."""
        moved = np.asarray(slices, np.float32) + self.shift
        return self.to_slices(self(moved, training=False))

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.vq_loss_tracker,
                self.ssim_tracker, self.psnr_tracker, self.codebook_tracker]

    def _step(self, images, training):
        latents = self.encoder(images, training=training)
        quantized, indices = self.quantizer.quantize_inputs(latents, training=training)
        reconstructions = self.decoder(quantized, training=training)
        reconstruction_loss = tf.reduce_mean((images - reconstructions) ** 2)
        if self.ssim_weight:  # train for what is scored: structure, not only squared error
            ssim_term, ssim = ssim_loss_and_score(images, reconstructions, self.shift)
            reconstruction_loss += self.ssim_weight * ssim_term
        else:
            ssim = mean_ssim(images, reconstructions, self.shift)
        vq_loss = self.quantizer.quantization_loss(latents, indices)
        return reconstructions, indices, reconstruction_loss, vq_loss, ssim

    def _update_metrics(self, images, reconstructions, indices, reconstruction_loss, vq_loss, ssim):
        self.total_loss_tracker.update_state(reconstruction_loss + vq_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.vq_loss_tracker.update_state(vq_loss)
        batch_size = tf.cast(tf.shape(images)[0], tf.float32)
        self.ssim_tracker.update_state(ssim, sample_weight=batch_size)
        self.psnr_tracker.update_state(image_psnr(images, reconstructions, self.shift))
        self.codebook_tracker.update_state(indices)
        results = {}
        for metric in self.metrics:
            result = metric.result()
            results.update(result if isinstance(result, dict) else {metric.name: result})
        return results

    def train_step(self, images):
        with tf.GradientTape() as tape:
            reconstructions, indices, reconstruction_loss, vq_loss, ssim = self._step(images, training=True)
            loss = reconstruction_loss + vq_loss
            # Under tf.distribute each replica's loss is the mean over its share of the batch and
            # the gradients are summed over replicas; under mixed precision the optimizer is a
            # LossScaleOptimizer, whose scale_loss keeps small float16 gradients from vanishing.
            scaled_loss = self.optimizer.scale_loss(loss / tf.distribute.get_strategy().num_replicas_in_sync)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return self._update_metrics(images, reconstructions, indices, reconstruction_loss, vq_loss, ssim)

    def test_step(self, images):
        return self._update_metrics(images, *self._step(images, training=False))

    def get_config(self):
        return {
            "num_embeddings": self.num_embeddings, "latent_dim": self.latent_dim, "beta": self.beta,
            "filters": list(self.filters), "num_res_blocks": self.num_res_blocks,
            "ema_decay": self.ema_decay, "codebook_init": self.codebook_init,
            "dead_code_steps": self.dead_code_steps, "shift": self.shift, "norm": self.norm,
            "ssim_weight": self.ssim_weight, "name": self.name,
        }
