"""vqvae.py: the quantizer, encoder/decoder shapes, the model's training and saving."""

import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import callbacks
import evaluate
import vqvae


def make_quantizer(codebook, **kwargs):
    codebook = np.asarray(codebook, np.float32)
    quantizer = vqvae.VectorQuantizer(codebook.shape[0], codebook.shape[1], **kwargs)
    quantizer.build((None, codebook.shape[1]))
    quantizer.codebook.assign(codebook)
    return quantizer


CODEBOOK = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]


# ---------------------------------------------------------------------------
# VectorQuantizer


def test_nearest_code_is_chosen():
    quantizer = make_quantizer(CODEBOOK)
    inputs = tf.constant([[[0.1, -0.1], [0.9, 0.2], [0.2, 1.5], [0.6, 0.0]]])
    quantized, indices = quantizer(inputs)
    assert indices.numpy().tolist() == [[0, 1, 2, 1]]
    np.testing.assert_allclose(quantized.numpy()[0], np.array(CODEBOOK)[[0, 1, 2, 1]], atol=1e-6)


def test_straight_through_gradient_is_identity():
    quantizer = make_quantizer(CODEBOOK)
    inputs = tf.Variable([[0.1, -0.1], [0.9, 0.2]])
    weights = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    with tf.GradientTape() as tape:
        quantized, _ = quantizer(inputs)
        loss = tf.reduce_sum(quantized * weights)
    np.testing.assert_allclose(tape.gradient(loss, inputs).numpy(), weights.numpy())


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_loss_terms(ema_decay):
    inputs = tf.constant([[0.1, -0.1], [0.9, 0.2]])
    quantizer = make_quantizer(CODEBOOK, beta=0.25, ema_decay=ema_decay)
    quantizer(inputs)
    squared_error = np.mean((inputs.numpy() - np.array(CODEBOOK)[[0, 1]]) ** 2)
    # Commitment term beta * |z - sg(e)|^2, plus the codebook term |sg(z) - e|^2 when the
    # codebook is learnt by gradients rather than moving averages.
    expected = 0.25 * squared_error + (squared_error if ema_decay == 0 else 0)
    np.testing.assert_allclose(float(quantizer.losses[0]), expected, rtol=1e-5)


def test_loss_based_codebook_is_trainable_ema_is_not():
    assert make_quantizer(CODEBOOK, ema_decay=0.0).codebook.trainable
    assert not make_quantizer(CODEBOOK, ema_decay=0.9).codebook.trainable


def test_ema_moves_codes_towards_their_vectors():
    quantizer = make_quantizer(CODEBOOK, ema_decay=0.5, codebook_init="uniform", dead_code_steps=0)
    inputs = tf.constant([[0.2, 0.2], [0.4, 0.0], [1.2, 0.0], [0.0, 1.8]])
    for _ in range(30):
        quantizer(inputs, training=True)
    np.testing.assert_allclose(quantizer.codebook.numpy(), [[0.3, 0.1], [1.2, 0.0], [0.0, 1.8]], atol=1e-3)


def test_kmeans_initialisation_spreads_codes_over_the_data():
    rng = np.random.default_rng(0)
    centres = np.array([[5.0, 5.0], [-5.0, 5.0], [0.0, -6.0], [7.0, -7.0]], np.float32)
    points = (centres[rng.integers(0, 4, 2000)] + rng.normal(0, 0.1, (2000, 2))).astype(np.float32)
    quantizer = vqvae.VectorQuantizer(4, 2, codebook_init="kmeans", kmeans_iterations=20, dead_code_steps=0)
    keras.utils.set_random_seed(1)
    quantizer(tf.constant(points), training=True)
    assert float(quantizer.initialized.numpy()) == 1.0
    _, indices = quantizer(tf.constant(points))
    assert len(np.unique(indices.numpy())) >= 3  # the uniform init would put everything on one code
    learnt = quantizer.codebook.numpy()
    assert min(np.linalg.norm(learnt - c, axis=1).min() for c in centres) < 0.5


def test_dead_codes_are_restarted_from_inputs():
    quantizer = make_quantizer([[0.0, 0.0], [100.0, 100.0]], ema_decay=0.0, codebook_init="uniform",
                               dead_code_steps=3)
    inputs = tf.constant([[0.1, 0.0], [0.0, 0.1], [-0.1, 0.0]])
    for _ in range(3):
        quantizer(inputs, training=True)
    restarted = quantizer.codebook.numpy()[1]
    assert np.min(np.linalg.norm(inputs.numpy() - restarted, axis=1)) < 1e-6
    assert quantizer.steps_unused.numpy()[1] == 0


def test_quantizer_validates_arguments():
    with pytest.raises(ValueError, match="num_embeddings must be >= 2, got 1"):
        vqvae.VectorQuantizer(1, 4)
    with pytest.raises(ValueError, match="embedding_dim must be >= 1, got 0"):
        vqvae.VectorQuantizer(8, 0)
    with pytest.raises(ValueError, match="ema_decay"):
        vqvae.VectorQuantizer(8, 4, ema_decay=1.0)


def test_quantizer_config_round_trip():
    quantizer = vqvae.VectorQuantizer(16, 3, beta=0.5, ema_decay=0.9, codebook_init="uniform", dead_code_steps=7)
    clone = vqvae.VectorQuantizer.from_config(quantizer.get_config())
    assert clone.get_config() == quantizer.get_config()


# ---------------------------------------------------------------------------
# Codebook statistics and SSIM


def test_codebook_statistics_perplexity():
    stats = vqvae.CodebookStatistics(8)
    stats.update_state(tf.constant([[0, 1, 2, 3], [4, 5, 6, 7]]))
    np.testing.assert_allclose(stats.result()["perplexity"].numpy(), 8.0, rtol=1e-5)
    assert stats.result()["codebook_usage"].numpy() == 1.0
    stats.reset_state()
    stats.update_state(tf.constant([3, 3, 3]))
    np.testing.assert_allclose(stats.result()["perplexity"].numpy(), 1.0, rtol=1e-5)
    assert stats.result()["codebook_usage"].numpy() == 1 / 8


def test_mean_ssim_equals_mean_of_per_image_ssim():
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.5, 0.5, (5, 24, 20, 1)).astype(np.float32)
    noisy = images + rng.normal(0, 0.1, images.shape).astype(np.float32)
    per_image = vqvae.image_ssim(images, noisy, -0.5).numpy()
    np.testing.assert_allclose(vqvae.mean_ssim(images, noisy, -0.5).numpy(), per_image.mean(), rtol=1e-5)
    np.testing.assert_allclose(vqvae.image_ssim(images, images, -0.5).numpy(), 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# Encoder, decoder, model


@pytest.mark.parametrize("height, width", [(32, 32), (256, 128), (40, 24)])
@pytest.mark.parametrize("filters", [(4, 8), (4, 4, 8)])
def test_encoder_decoder_shapes(height, width, filters):
    factor = 2 ** len(filters)
    if height % factor or width % factor:
        pytest.skip("size not divisible by this downsampling")
    model = vqvae.VQVAE(num_embeddings=8, latent_dim=3, filters=filters, num_res_blocks=1)
    images = tf.zeros((2, height, width, 1))
    indices = model.encode(images)
    assert indices.shape == (2, height // factor, width // factor) and indices.dtype == tf.int32
    assert model.decode(indices).shape == (2, height, width, 1)
    assert model(images).shape == (2, height, width, 1)


def test_decode_images_are_decoded_slices_moved_back_to_0_1():
    model = vqvae.VQVAE(num_embeddings=8, latent_dim=3, filters=(4, 8), num_res_blocks=1, shift=0.5)
    model.encode(tf.zeros((1, 16, 16, 1)))  # builds the codebook
    indices = np.arange(2 * 4 * 4).reshape(2, 4, 4) % 8
    # Spread the codebook so some decoded pixels fall outside [0, 1] after the shift.
    model.quantizer.codebook.assign(np.linspace(-30, 30, 24, dtype=np.float32).reshape(8, 3))
    raw = model.decode(indices).numpy() - 0.5
    images = model.decode_images(indices)
    assert isinstance(images, np.ndarray) and images.shape == (2, 16, 16, 1)
    assert ((raw < 0) | (raw > 1)).any()  # the clip is exercised
    assert images.min() >= 0 and images.max() <= 1
    np.testing.assert_allclose(images, np.clip(raw, 0, 1), atol=1e-6)


def test_reconstruct_images_take_and_give_slices_in_0_1():
    model = vqvae.VQVAE(num_embeddings=8, latent_dim=3, filters=(4, 8), num_res_blocks=1, shift=-0.5)
    slices = np.random.default_rng(0).uniform(0, 1, (2, 16, 16, 1))
    raw = model(tf.constant(slices + -0.5, tf.float32)).numpy() + 0.5  # what the model gives, moved back
    images = model.reconstruct_images(slices)
    assert isinstance(images, np.ndarray) and images.shape == (2, 16, 16, 1)
    assert images.min() >= 0 and images.max() <= 1
    np.testing.assert_allclose(images, np.clip(raw, 0, 1), atol=1e-6)


def tiny_images(n=16, size=16, seed=0):
    """Smooth blobs in [-0.5, 0.5]: easy to compress, so training must improve on them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    images = [np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.05) for cx, cy in rng.uniform(0.2, 0.8, (n, 2))]
    return (np.stack(images)[..., None] - 0.5).astype(np.float32)


def fitted_model(epochs=8, **kwargs):
    keras.utils.set_random_seed(0)
    model = vqvae.VQVAE(num_embeddings=16, latent_dim=4, filters=(8, 8), num_res_blocks=1, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    dataset = tf.data.Dataset.from_tensor_slices(tiny_images()).batch(4)
    history = model.fit(dataset, epochs=epochs, verbose=0)
    return model, history.history


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_training_reduces_loss_and_tracks_metrics(norm):
    model, history = fitted_model(norm=norm)
    assert history["reconstruction_loss"][-1] < 0.5 * history["reconstruction_loss"][0]
    assert history["ssim"][-1] > history["ssim"][0]
    for name in ("loss", "vq_loss", "psnr", "perplexity", "codebook_usage"):
        assert np.all(np.isfinite(history[name])), name
    assert 1 <= history["perplexity"][-1] <= 16


def test_validation_callback_logs_val_metrics():
    keras.utils.set_random_seed(0)
    model = vqvae.VQVAE(num_embeddings=8, latent_dim=4, filters=(4, 4), num_res_blocks=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    dataset = tf.data.Dataset.from_tensor_slices(tiny_images(8)).batch(4)
    history = model.fit(dataset, epochs=2, verbose=0, callbacks=[callbacks.ValidationMetrics(dataset, verbose=0)])
    for name in ("val_ssim", "val_psnr", "val_perplexity", "val_codebook_usage", "val_loss"):
        assert len(history.history[name]) == 2


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_save_load_round_trip(tmp_path, norm):
    model, _ = fitted_model(epochs=1, ema_decay=0.9, dead_code_steps=5, shift=-0.25, norm=norm)
    path = str(tmp_path / "vqvae.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: everything is registered
    assert isinstance(loaded, vqvae.VQVAE)
    assert loaded.get_config() == model.get_config()
    images = tiny_images(4, seed=5)
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-5)
    np.testing.assert_array_equal(loaded.encode(images).numpy(), model.encode(images).numpy())
    np.testing.assert_allclose(loaded.quantizer.cluster_size.numpy(), model.quantizer.cluster_size.numpy())


def test_a_model_saved_with_keras_group_normalization_loads(tmp_path, monkeypatch):
    """Runs saved before vqvae.GroupNormalization (with Keras' own layer) still load, with
    their weights: the same reconstructions."""
    with monkeypatch.context() as patch:
        patch.setattr(vqvae, "GroupNormalization", keras.layers.GroupNormalization)
        model, _ = fitted_model(epochs=1, norm="group")
    assert any(type(layer) is keras.layers.GroupNormalization for layer in model.encoder.layers)
    path = str(tmp_path / "vqvae.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert any(type(layer) is vqvae.GroupNormalization for layer in loaded.encoder.layers)
    images = tiny_images(4, seed=6)
    np.testing.assert_allclose(loaded(images).numpy(), model(images).numpy(), atol=1e-4)


def test_score_split():
    model, _ = fitted_model(epochs=1)
    dataset = tf.data.Dataset.from_tensor_slices(tiny_images(6)).batch(4)
    scores = evaluate.score_split(model, dataset, worst=2)
    ssims, psnrs, stats = scores["ssim"], scores["psnr"], scores["codebook"]
    assert ssims.shape == (6,) and psnrs.shape == (6,) and scores["codes"].shape == (6, 4, 4)
    assert np.all(ssims <= 1) and 0 < stats["codebook_usage"] <= 1 and stats["perplexity"] >= 1
    assert stats["codes_used"] + stats["dead_codes"] == model.num_embeddings
    assert [item[0] for item in scores["worst"]] == sorted(ssims)[:2]


def test_cosine_learning_rate_decays_over_the_epochs():
    model, _ = fitted_model(epochs=1)
    schedule = callbacks.CosineLearningRate(0.01, epochs=4)
    schedule.set_model(model)
    schedule.on_train_begin()
    rates = []
    for epoch in range(4):
        schedule.on_epoch_begin(epoch)
        rates.append(float(model.optimizer.learning_rate.numpy()))
    np.testing.assert_allclose(rates, [0.01, 0.01 * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi / 4))),
                                       0.01 * (0.05 + 0.95 * 0.5), 0.01 * (0.05 + 0.95 * 0.5 * (1 + np.cos(3 * np.pi / 4)))],
                               rtol=1e-5)
    timed = callbacks.CosineLearningRate(0.01, epochs=100, minutes=1e-6)  # the time budget is already spent
    timed.set_model(model)
    timed.on_train_begin()
    time.sleep(0.01)
    timed.on_epoch_begin(1)
    np.testing.assert_allclose(float(model.optimizer.learning_rate.numpy()), 0.01 * 0.05, rtol=1e-5)


def test_time_limit_stops_before_an_epoch_would_overrun():
    model, _ = fitted_model(epochs=1)
    for minutes, stops in ((1e-5, True), (60.0, False)):
        limit = callbacks.TimeLimit(minutes)
        limit.set_model(model)
        model.stop_training = False
        limit.on_train_begin()
        limit.on_epoch_begin(0)
        time.sleep(0.01)
        limit.on_epoch_end(0)
        assert model.stop_training == stops


@pytest.mark.parametrize("groups, channels", [(8, 16), (8, 32), (3, 3), (1, 5)])
def test_group_norm_matches_keras_group_normalization(groups, channels):
    """vqvae.GroupNormalization gives Keras' GroupNormalization's outputs and gradients (inputs,
    scale and shift), on maps whose mean is far from 0, and saves and loads its settings."""
    rng = np.random.default_rng(channels)
    inputs = tf.constant(rng.normal(3.0, 2.0, (4, 9, 7, channels)).astype(np.float32))
    gamma, beta = rng.uniform(0.5, 1.5, channels).astype(np.float32), rng.normal(0, 1, channels).astype(np.float32)
    ours, keras_layer = vqvae.GroupNormalization(groups), keras.layers.GroupNormalization(groups=groups)
    for layer in (ours, keras_layer):
        layer.build(inputs.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    found = []
    for layer in (ours, keras_layer):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs)
            loss = tf.reduce_sum(outputs * tf.sin(tf.range(outputs.shape[-1], dtype=tf.float32)))
        found.append([outputs] + tape.gradient(loss, [inputs, layer.gamma, layer.beta]))
    for mine, theirs in zip(*found):
        np.testing.assert_allclose(mine.numpy(), theirs.numpy(), atol=2e-4, rtol=1e-4)
    assert vqvae.GroupNormalization.from_config(ours.get_config()).groups == groups
    with pytest.raises(ValueError, match="5 channels do not split into 2 groups"):
        vqvae.GroupNormalization(2).build((1, 3, 3, 5))


def test_group_norm_scores_a_slice_the_same_alone_or_in_a_batch():
    """Group normalisation works per slice: in training mode too, a slice's reconstruction
    does not depend on the other slices of its batch (batch normalisation's does)."""
    images = tiny_images(4, seed=2)
    for norm, alike in (("group", True), ("batch", False)):
        keras.utils.set_random_seed(0)
        model = vqvae.VQVAE(num_embeddings=16, latent_dim=4, filters=(8, 8), num_res_blocks=1, norm=norm)
        alone, together = model.encoder(images[:1], training=True), model.encoder(images, training=True)[:1]
        assert np.allclose(alone.numpy(), together.numpy(), atol=1e-5) == alike, norm
    with pytest.raises(ValueError, match="norm must be one of batch, group, none, got 'layer'"):
        vqvae.VQVAE(num_embeddings=4, latent_dim=2, filters=(4,), norm="layer")


def test_ssim_loss_weighs_the_edge_pixels_that_tf_image_ssim_barely_sees():
    images = tiny_images(2, size=64, seed=4)
    spoiled = images.copy()
    spoiled[:, :2] = 0.5  # the top two rows only: at the edge of tf.image.ssim's 'valid' windows
    unpadded = 1.0 - float(vqvae.mean_ssim(images, spoiled, -0.5))
    assert float(vqvae.ssim_loss_and_score(images, images, -0.5)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(vqvae.ssim_loss_and_score(images, spoiled, -0.5)[0]) > 4 * unpadded


def test_ssim_score_from_the_padded_map_is_the_unpadded_mean_ssim():
    """The training metric comes from the loss's padded SSIM map (its central crop): the
    same figure as tf.image.ssim's mean over the slices, also for reconstructions outside
    [0, 1] (clipped, as scored)."""
    images = tiny_images(3, size=48, seed=5)
    rng = np.random.default_rng(5)
    noisy = (images + rng.normal(0, 0.2, images.shape)).astype(np.float32)
    _, score = vqvae.ssim_loss_and_score(images, noisy, -0.5)
    np.testing.assert_allclose(float(score), vqvae.image_ssim(images, noisy, -0.5).numpy().mean(), rtol=1e-5)
