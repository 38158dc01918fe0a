"""evaluate.py: each metric on a case with a known answer, and MS-SSIM on small images."""

import numpy as np
import pytest
import tensorflow as tf

import evaluate


def images(count, size=(32, 24), seed=0):
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(0, 1, (count, size[0] // 4, size[1] // 4, 1))
    return (tf.image.resize(smooth, size).numpy()[..., 0] * 0.8 + rng.uniform(0, 0.2, (count, *size))).astype(np.float32)


def test_pairwise_ssim_equals_tf_image_ssim_on_every_pair():
    a, b = images(3, seed=1), images(5, seed=2)
    scores = evaluate.pairwise_ssim(a, b, chunk=2)  # chunks split the references unevenly
    expected = np.array([[tf.image.ssim(x[..., None], y[..., None], max_val=1.0).numpy() for y in b] for x in a])
    assert scores.shape == (3, 5)
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_identical_images_have_ssim_one_and_ms_ssim_one():
    a = images(4)
    np.testing.assert_allclose(np.diag(evaluate.pairwise_ssim(a, a)), 1.0, atol=1e-5)
    settings = evaluate.ms_ssim_settings(*a.shape[1:])
    np.testing.assert_allclose(evaluate.ms_ssim(a[..., None], a[..., None], settings).numpy(), 1.0, atol=1e-5)


def test_copies_of_training_slices_have_nearest_neighbour_ssim_one():
    train = images(10, seed=3)
    copies = train[[7, 2, 9]]
    batches = [train[:4], train[4:8], train[8:]]
    best, index, nearest = evaluate.nearest_neighbours(copies, batches)
    np.testing.assert_allclose(best, 1.0, atol=1e-5)
    assert index.tolist() == [7, 2, 9]
    np.testing.assert_array_equal(nearest, copies)
    fresh, _, _ = evaluate.nearest_neighbours(images(3, seed=4), batches)
    assert np.all(fresh < 0.9)


def test_mean_pairwise_ssim_ignores_self_pairs():
    same = np.repeat(images(1), 3, axis=0)
    assert evaluate.mean_pairwise_ssim(same) == pytest.approx(1.0, abs=1e-5)
    assert evaluate.mean_pairwise_ssim(images(4, seed=5)) < 0.9


def test_equally_used_codebook_has_perplexity_k():
    stats = evaluate.codebook_statistics(evaluate.code_counts(np.tile(np.arange(16), 5), 16))
    assert stats["perplexity"] == pytest.approx(16.0)
    assert stats["codes_used"] == 16 and stats["dead_codes"] == 0 and stats["codebook_usage"] == 1.0
    half = evaluate.codebook_statistics(evaluate.code_counts(np.arange(8), 16))
    assert half["perplexity"] == pytest.approx(8.0) and half["dead_codes"] == 8


def test_js_divergence_is_zero_for_the_same_histogram_and_one_bit_for_disjoint_ones():
    assert evaluate.js_divergence([1, 2, 3, 0], [2, 4, 6, 0]) == pytest.approx(0.0, abs=1e-12)
    assert evaluate.js_divergence([5, 5, 0, 0], [0, 0, 1, 3]) == pytest.approx(1.0)
    assert 0 < evaluate.js_divergence([1, 1, 1, 1], [4, 1, 1, 1]) < 1


@pytest.mark.parametrize("size, scales, filter_size", [
    ((256, 256), 5, 11), ((256, 128), 4, 11), ((128, 128), 4, 11), ((64, 64), 3, 11), ((32, 24), 2, 11),
    ((8, 8), 1, 8)])
def test_ms_ssim_settings_fit_the_image(size, scales, filter_size):
    settings = evaluate.ms_ssim_settings(*size)
    assert settings["scales"] == scales and settings["filter_size"] == filter_size
    assert len(settings["power_factors"]) == scales and sum(settings["power_factors"]) == pytest.approx(1.0)
    a = np.random.default_rng(0).uniform(0, 1, (2, *size, 1)).astype(np.float32)
    score = evaluate.ms_ssim(a, np.clip(a + 0.05, 0, 1), settings).numpy()  # tf raises if a scale is too small
    assert score.shape == (2,) and np.all((0 < score) & (score < 1))


def test_tf_default_ms_ssim_fails_on_128_wide_slices():
    """The reason ms_ssim_settings exists."""
    a = tf.zeros((1, 256, 128, 1))
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.image.ssim_multiscale(a, a, max_val=1.0)
