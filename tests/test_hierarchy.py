"""hierarchy.py: top codes from blocks, the two-level prior's likelihood, exact sampling, saving."""

import keras
import numpy as np
import tensorflow as tf

import hierarchy


def random_prior(num_embeddings=6, latent_dim=3, top_embeddings=4, factor=2, scale=0.4):
    keras.utils.set_random_seed(0)
    settings = dict(filters=8, num_layers=3, kernel_size=3, first_kernel_size=5)
    prior = hierarchy.HierarchicalPrior(num_embeddings, latent_dim, top_embeddings, factor, top=settings,
                                        bottom=settings)
    rng = np.random.default_rng(1)
    for weight in prior.trainable_weights:
        weight.assign(rng.normal(0, scale, weight.shape).astype(np.float32))
    codebook = rng.normal(0, 1, (num_embeddings, latent_dim)).astype(np.float32)
    prior.fit_top_codebook(codebook, rng.integers(0, num_embeddings, (20, 8, 8)))
    return prior


def test_top_codes_summarise_blocks_of_the_code_grid():
    prior = hierarchy.HierarchicalPrior(4, 2, top_embeddings=2, factor=2, top=dict(filters=4, num_layers=1),
                                        bottom=dict(filters=4, num_layers=1))
    codebook = np.array([[0, 0], [0, 1], [10, 10], [10, 11]], np.float32)
    # Blocks of codes 0/1 (near the origin) and of codes 2/3 (far away): two kinds of block.
    low, high = np.array([[0, 1], [1, 0]]), np.array([[2, 3], [3, 2]])
    grids = np.stack([np.block([[low, high], [high, low]]), np.block([[high, high], [low, low]])])
    prior.fit_top_codebook(codebook, grids)
    top = prior.top_codes(grids).numpy()
    assert top.shape == (2, 2, 2)
    assert top[0, 0, 0] == top[0, 1, 1] == top[1, 1, 0] != top[0, 0, 1] == top[1, 0, 0]


def test_code_nll_is_top_plus_bottom():
    prior = random_prior()
    codes = tf.constant(np.random.default_rng(2).integers(0, 6, (3, 8, 8)), tf.int32)
    top = prior.top_codes(codes)
    total = tf.reduce_sum(prior.code_nll(codes), axis=(1, 2)).numpy()
    expected = (tf.reduce_sum(prior.top.code_nll(top), axis=(1, 2))
                + tf.reduce_sum(prior.bottom.code_nll((codes, top)), axis=(1, 2))).numpy()
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_sampler_is_exact_and_draws_bottom_grids_given_the_top(tmp_path):
    prior = random_prior()
    sampler = hierarchy.sampler_for(prior, 3, 8, 6)
    codes = sampler.sample(1.0, seed=5)
    assert codes.shape == (3, 8, 6) and sampler.top_grid.shape == (3, 4, 3)
    np.testing.assert_allclose(sampler.used_logits().numpy(), prior.bottom((codes, sampler.top_grid)).numpy(),
                               atol=1e-4)
    np.testing.assert_allclose(sampler.top.used_logits().numpy(), prior.top(sampler.top_grid).numpy(), atol=1e-4)
    np.testing.assert_array_equal(hierarchy.sampler_for(prior, 3, 8, 6).sample(1.0, seed=5).numpy(), codes.numpy())
    # A grid the blocks do not divide (HipMRI's 64x53): the last top row and column cover part blocks.
    odd = hierarchy.sampler_for(prior, 2, 7, 5)
    odd_codes = odd.sample(1.0, seed=2)
    assert odd_codes.shape == (2, 7, 5) and odd.top_grid.shape == (2, 4, 3)
    np.testing.assert_allclose(odd.used_logits().numpy(), prior.bottom((odd_codes, odd.top_grid)).numpy(), atol=1e-4)
    total = tf.reduce_sum(prior.code_nll(odd_codes), axis=(1, 2)).numpy()
    top = prior.top_codes(odd_codes)
    expected = (tf.reduce_sum(prior.top.code_nll(top), axis=(1, 2))
                + tf.reduce_sum(prior.bottom.code_nll((odd_codes, top)), axis=(1, 2))).numpy()
    np.testing.assert_allclose(total, expected, rtol=1e-5)  # part blocks spread their NLL over fewer codes

    path = str(tmp_path / "prior.keras")
    prior.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, hierarchy.HierarchicalPrior) and loaded.get_config() == prior.get_config()
    np.testing.assert_allclose(loaded.code_nll(codes).numpy(), prior.code_nll(codes).numpy(), atol=1e-5)
    np.testing.assert_array_equal(loaded.top_codes(codes).numpy(), prior.top_codes(codes).numpy())
