"""pixelcnn.py: masks, causality, the blind spot, exact fast sampling, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import pixelcnn


def test_masks():
    A = pixelcnn.make_mask(3, "A")
    np.testing.assert_array_equal(A, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(pixelcnn.make_mask(3, "B"), [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(pixelcnn.make_mask(3, "VA"), [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(pixelcnn.make_mask(3, "VB"), [[1, 1, 1], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(pixelcnn.make_mask(3, "HA"), [[0, 0, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(pixelcnn.make_mask(3, "HB"), [[0, 0, 0], [1, 1, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="mask_type must be one of"):
        pixelcnn.make_mask(3, "C")
    with pytest.raises(ValueError, match="sees nothing"):
        pixelcnn.MaskedConv2D(4, 1, "A")
    with pytest.raises(ValueError, match="positive odd"):
        pixelcnn.MaskedConv2D(4, 4, "B")


def random_model(variant, num_embeddings=6, scale=0.4, **kwargs):
    """A small PixelCNN with weights large enough that its logits are far from uniform."""
    keras.utils.set_random_seed(0)
    settings = dict(filters=8, num_layers=3, num_res_blocks=2, kernel_size=3, first_kernel_size=5)
    settings.update(kwargs)
    model = pixelcnn.PixelCNN(num_embeddings, variant, **settings)
    rng = np.random.default_rng(1)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(0, scale, weight.shape).astype(np.float32))
    return model


def dependence(model, codes, position):
    """Which positions' logits change when the code at `position` changes."""
    changed = codes.copy()
    changed[(0,) + position] = (changed[(0,) + position] + 1) % model.num_embeddings
    difference = np.abs(model(changed).numpy() - model(codes).numpy()).max(axis=-1)[0]
    return difference > 1e-6


@pytest.mark.parametrize("variant", ["plain", "gated"])
def test_logits_never_see_the_code_they_predict_or_later_ones(variant):
    model = random_model(variant)
    codes = np.random.default_rng(0).integers(0, 6, (1, 6, 7)).astype(np.int32)
    for position in [(0, 0), (2, 3), (3, 0), (5, 6)]:
        affected = dependence(model, codes, position)
        flat = affected.reshape(-1)
        index = position[0] * 7 + position[1]
        assert not flat[: index + 1].any(), f"{variant}: logits at or before {position} saw it"
        if index < flat.size - 1:
            assert flat[index + 1:].any()


def test_gated_has_no_blind_spot_plain_has_one():
    codes = np.random.default_rng(0).integers(0, 6, (1, 6, 8)).astype(np.int32)
    # (2, 5) is up and two to the right of (3, 3): in the receptive field of the gated
    # network, but in the blind spot of a plain one with 3x3 kernels.
    gated = random_model("gated", num_layers=2, first_kernel_size=3)
    plain = random_model("plain", num_layers=0, num_res_blocks=1, first_kernel_size=3)
    assert dependence(gated, codes, (2, 5))[3, 3]
    assert not dependence(plain, codes, (2, 5))[3, 3]


@pytest.mark.parametrize("variant", ["plain", "gated"])
@pytest.mark.parametrize("height, width", [(5, 5), (4, 9)])
def test_fast_sampler_is_exact(variant, height, width):
    model = random_model(variant)
    sampler = pixelcnn.Sampler(model, batch_size=3, height=height, width=width)
    rows = []
    codes = sampler.sample(temperature=1.0, seed=7, progress=rows.append)
    assert codes.shape == (3, height, width) and codes.dtype == tf.int32
    assert rows == list(range(1, height + 1))
    assert 0 <= codes.numpy().min() and codes.numpy().max() < 6
    # The model is causal, so the logits at each position of one full pass over the finished
    # grid are the logits the code there was drawn from.
    np.testing.assert_allclose(sampler.used_logits().numpy(), model(codes).numpy(), atol=1e-4)
    # And the naive sampler (whole network at every position) draws the very same codes.
    naive_codes, naive_logits = pixelcnn.naive_sample(model, 3, height, width, seed=7)
    np.testing.assert_array_equal(naive_codes.numpy(), codes.numpy())
    np.testing.assert_allclose(naive_logits.numpy().reshape(3, height, width, -1),
                               sampler.used_logits().numpy(), atol=1e-4)


def test_sampler_keeps_fixed_codes_and_redraws_the_rest_given_them():
    """Healing: codes where `keep` is set stay; the others are drawn given every code before
    them (kept or redrawn), so the logits still equal a full pass over the result."""
    model = random_model("gated")
    rng = np.random.default_rng(0)
    fixed = rng.integers(0, 6, (3, 5, 6)).astype(np.int32)
    keep = rng.uniform(size=(3, 5, 6)) < 0.7
    sampler = pixelcnn.Sampler(model, batch_size=3, height=5, width=6)
    healed = sampler.sample(1.0, seed=2, fixed=fixed, keep=keep).numpy()
    np.testing.assert_array_equal(healed[keep], fixed[keep])
    assert (healed[~keep] != fixed[~keep]).any()
    np.testing.assert_allclose(sampler.used_logits().numpy(), model(healed).numpy(), atol=1e-4)
    # Nothing kept: an ordinary sample, the same codes as without the mask.
    np.testing.assert_array_equal(sampler.sample(1.0, seed=2, fixed=fixed, keep=np.zeros_like(keep)).numpy(),
                                  sampler.sample(1.0, seed=2).numpy())
    with pytest.raises(ValueError, match="both"):
        sampler.sample(fixed=fixed)


def test_sampling_is_seeded_and_temperature_sharpens():
    model = random_model("gated")
    sampler = pixelcnn.Sampler(model, batch_size=4, height=4, width=4)
    first = sampler.sample(seed=3).numpy()
    assert np.array_equal(sampler.sample(seed=3).numpy(), first)
    assert not np.array_equal(sampler.sample(seed=4).numpy(), first)
    greedy = sampler.sample(temperature=1e-4, seed=5).numpy()
    np.testing.assert_array_equal(greedy, np.argmax(model(greedy).numpy(), axis=-1))


@pytest.mark.parametrize("variant", ["plain", "gated"])
def test_training_lowers_bits_per_code(variant):
    """A prior fitted to grids that repeat one pattern must beat log2(K) bits per code."""
    keras.utils.set_random_seed(0)
    pattern = np.arange(6 * 6).reshape(6, 6) % 4
    codes = np.repeat(pattern[None], 32, axis=0).astype(np.int32)
    model = pixelcnn.PixelCNN(4, variant, filters=16, num_layers=2, num_res_blocks=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(codes, codes, batch_size=8, epochs=15, verbose=0).history
    assert pixelcnn.bits_per_code(history["loss"][-1]) < 0.5 * np.log2(4)


@pytest.mark.parametrize("variant", ["plain", "gated"])
def test_save_load_round_trip(tmp_path, variant):
    model = random_model(variant)
    path = str(tmp_path / "pixelcnn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, pixelcnn.PixelCNN) and loaded.get_config() == model.get_config()
    codes = np.random.default_rng(0).integers(0, 6, (2, 5, 6)).astype(np.int32)
    np.testing.assert_allclose(loaded(codes).numpy(), model(codes).numpy(), atol=1e-5)
    np.testing.assert_array_equal(pixelcnn.Sampler(loaded, 2, 3, 3).sample(seed=1).numpy(),
                                  pixelcnn.Sampler(model, 2, 3, 3).sample(seed=1).numpy())


@pytest.mark.parametrize("mask_type", pixelcnn.MASK_TYPES)
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_cropped_masked_conv_equals_masked_same_conv(mask_type, kernel_size):
    layer = pixelcnn.MaskedConv2D(4, kernel_size, mask_type)
    inputs = tf.random.stateless_normal((2, 6, 7, 3), seed=(1, 2))
    outputs = layer(inputs)
    layer.bias.assign(tf.random.stateless_normal((4,), seed=(3, 4)))
    expected = tf.nn.conv2d(inputs, layer.masked_kernel(), strides=1, padding="SAME") + layer.bias
    np.testing.assert_allclose(layer(inputs).numpy(), expected.numpy(), atol=1e-5)
    assert outputs.shape == (2, 6, 7, 4)


@pytest.mark.parametrize("mask_type, kernel_size, taps", [
    ("HA", 7, 3), ("HB", 3, 2), ("VA", 3, 3), ("VB", 3, 6), ("A", 3, 4), ("B", 3, 5), ("B", 1, 1)])
def test_masked_conv_stores_only_the_masks_bounding_box(mask_type, kernel_size, taps):
    layer = pixelcnn.MaskedConv2D(4, kernel_size, mask_type)
    layer.build((None, None, None, 3))
    box = layer.kernel.shape[0] * layer.kernel.shape[1]
    # Horizontal and vertical strips are dense; A and B waste only the centre row's right part.
    assert box == (taps if mask_type[0] in "HV" else kernel_size * (kernel_size // 2 + 1))
    assert int(layer.mask.sum()) == taps
    full = layer.masked_kernel().numpy()
    assert full.shape == (kernel_size, kernel_size, 3, 4)
    assert np.all(full[layer.mask == 0] == 0)


def test_head_units_widen_the_layer_before_the_logits(tmp_path):
    model = pixelcnn.PixelCNN(6, "gated", filters=4, num_layers=2, head_units=16)
    assert model.head.kernel.shape == (4, 16) and model.logits.kernel.shape == (16, 6)
    assert pixelcnn.PixelCNN(6, "gated", filters=4, num_layers=2).head.kernel.shape == (4, 4)  # default: filters
    path = str(tmp_path / "pixelcnn.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config()["head_units"] == 16
    sampler = pixelcnn.Sampler(loaded, 2, 3, 3)
    codes = sampler.sample(seed=2)
    np.testing.assert_allclose(sampler.used_logits().numpy(), loaded(codes).numpy(), atol=1e-4)


@pytest.mark.parametrize("condition_blocks", [0, 2])
def test_conditional_prior_uses_its_condition_and_stays_causal_and_exact(tmp_path, condition_blocks):
    model = random_model("gated", condition_classes=5, condition_factor=2, condition_blocks=condition_blocks)
    rng = np.random.default_rng(3)
    condition = tf.constant(rng.integers(0, 5, (3, 3, 4)), tf.int32)
    sampler = pixelcnn.Sampler(model, 3, 6, 8)
    codes = sampler.sample(1.0, 7, condition=condition)
    logits = model((codes, condition)).numpy()
    np.testing.assert_allclose(sampler.used_logits().numpy(), logits, atol=1e-4)
    naive_codes, _ = pixelcnn.naive_sample(model, 3, 6, 8, 1.0, 7, condition=condition)
    np.testing.assert_array_equal(naive_codes.numpy(), codes.numpy())
    assert np.abs(model((codes, (condition + 1) % 5)).numpy() - logits).max() > 1e-2  # the condition matters
    # Row 0 of the codes sees a condition cell two rows below its own only through the
    # condition's CNN (the stacks never look down).
    far = condition.numpy().copy()
    far[:, 2, 3] = (far[:, 2, 3] + 1) % 5
    moved = np.abs(model((codes, tf.constant(far))).numpy() - logits)[:, 0].max()
    assert (moved > 1e-4) == bool(condition_blocks)
    # Still causal in the codes: changing a code changes no logits at or before it.
    changed = codes.numpy().copy()
    changed[:, 2, 3] = (changed[:, 2, 3] + 1) % 6
    differs = np.abs(model((tf.constant(changed), condition)).numpy() - logits).max(axis=(0, 3)) > 1e-6
    assert not differs[:2].any() and not differs[2, :4].any()
    with pytest.raises(ValueError, match="give sample\\(\\) its condition"):
        sampler.sample(1.0, 7)
    with pytest.raises(ValueError, match="only the gated PixelCNN takes a condition"):
        pixelcnn.PixelCNN(6, "plain", condition_classes=3)
    with pytest.raises(ValueError, match="condition_blocks must be >= 0, and 0 for a global condition"):
        pixelcnn.PixelCNN(6, "gated", condition_classes=3, condition_factor=0, condition_blocks=1)
    path = str(tmp_path / "conditional.keras")
    model.save(path)
    np.testing.assert_allclose(keras.models.load_model(path)((codes, condition)).numpy(), logits, atol=1e-6)


def test_dropout_acts_in_training_only_and_the_sampler_stays_exact():
    model = random_model("gated", dropout=0.5)
    codes = tf.constant(np.random.default_rng(4).integers(0, 6, (2, 5, 6)), tf.int32)
    inference = model(codes).numpy()
    np.testing.assert_array_equal(model(codes).numpy(), inference)
    assert np.abs(model(codes, training=True).numpy() - inference).max() > 1e-3
    sampler = pixelcnn.Sampler(model, 2, 5, 6)
    drawn = sampler.sample(1.0, 3)
    np.testing.assert_allclose(sampler.used_logits().numpy(), model(drawn).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="dropout must be in"):
        pixelcnn.PixelCNN(6, "gated", dropout=1.0)


def test_position_embedding_tells_positions_apart_and_the_sampler_stays_exact(tmp_path):
    model = random_model("gated", position_grid=(6, 8))
    same = tf.zeros((1, 6, 8), tf.int32)  # the same code everywhere: only the position differs
    logits = model(same).numpy()[0]
    assert np.abs(logits[3, 1] - logits[3, 6]).max() > 1e-2
    sampler = pixelcnn.Sampler(model, 2, 5, 7)  # a smaller grid takes the embedding's corner
    codes = sampler.sample(1.0, 5)
    np.testing.assert_allclose(sampler.used_logits().numpy(), model(codes).numpy(), atol=1e-4)
    naive_codes, _ = pixelcnn.naive_sample(model, 2, 5, 7, 1.0, 5)
    np.testing.assert_array_equal(naive_codes.numpy(), codes.numpy())
    path = str(tmp_path / "positions.keras")
    model.save(path)
    np.testing.assert_allclose(keras.models.load_model(path)(codes).numpy(), model(codes).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="only the gated PixelCNN takes a condition or a position grid"):
        pixelcnn.PixelCNN(6, "plain", position_grid=(4, 4))
