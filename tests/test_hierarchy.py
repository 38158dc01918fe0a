"""hierarchy.py: top codes from blocks, the two-level prior's likelihood, exact sampling, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import hierarchy


def random_prior(num_embeddings=6, latent_dim=3, top_embeddings=4, factor=2, scale=0.4, position_bins=0,
                 middle_embeddings=0, top_temperature=1.0, bottom_temperature=1.0):
    keras.utils.set_random_seed(0)
    settings = dict(filters=8, num_layers=3, kernel_size=3, first_kernel_size=5)
    below = dict(settings, condition_blocks=2)
    prior = hierarchy.HierarchicalPrior(num_embeddings, latent_dim, top_embeddings, factor, top=settings,
                                        bottom=below, position_bins=position_bins,
                                        middle_embeddings=middle_embeddings, middle=below,
                                        top_temperature=top_temperature, bottom_temperature=bottom_temperature)
    rng = np.random.default_rng(1)
    for weight in prior.trainable_weights:
        weight.assign(rng.normal(0, scale, weight.shape).astype(np.float32))
    codebook = rng.normal(0, 1, (num_embeddings, latent_dim)).astype(np.float32)
    prior.fit_codebooks(codebook, rng.integers(0, num_embeddings, (20, 8, 8)))
    return prior


def test_top_codes_summarise_blocks_of_the_code_grid():
    prior = hierarchy.HierarchicalPrior(4, 2, top_embeddings=2, factor=2, top=dict(filters=4, num_layers=1),
                                        bottom=dict(filters=4, num_layers=1))
    codebook = np.array([[0, 0], [0, 1], [10, 10], [10, 11]], np.float32)
    # Blocks of codes 0/1 (near the origin) and of codes 2/3 (far away): two kinds of block.
    low, high = np.array([[0, 1], [1, 0]]), np.array([[2, 3], [3, 2]])
    grids = np.stack([np.block([[low, high], [high, low]]), np.block([[high, high], [low, low]])])
    prior.fit_codebooks(codebook, grids)
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


def test_prior_conditioned_on_slice_position():
    prior = random_prior(position_bins=4)
    np.testing.assert_array_equal(prior.position_classes([-1, 0, 0.24, 0.25, 0.99, 1.0]), [0, 1, 1, 2, 4, 4])
    codes = tf.constant(np.random.default_rng(2).integers(0, 6, (2, 8, 8)), tf.int32)
    top = prior.top_codes(codes)
    # The position changes the top grid's likelihood, not the bottom's given the top grid.
    low, high = prior.code_nll(codes, [0.1, 0.1]).numpy(), prior.code_nll(codes, [0.9, 0.9]).numpy()
    assert not np.allclose(low, high)
    np.testing.assert_allclose(low - high, np.repeat(np.repeat(
        (prior.top.code_nll((top, tf.constant([[[1]], [[1]]])))
         - prior.top.code_nll((top, tf.constant([[[4]], [[4]]])))).numpy() / 4, 2, axis=1), 2, axis=2), atol=1e-5)

    # Sampling at a position is exact: the top logits are a full pass's with that position's class.
    sampler = hierarchy.sampler_for(prior, 3, 8, 6)
    sampler.sample(1.0, seed=1, position=0.6)
    np.testing.assert_allclose(sampler.top.used_logits().numpy(),
                               prior.top((sampler.top_grid, tf.fill((3, 1, 1), 3))).numpy(), atol=1e-4)
    # With no position, positions are drawn as often as the training slices had them.
    prior.count_positions(np.array([0.1] * 30 + [0.8] * 10 + [-1] * 5))
    np.testing.assert_array_equal(prior.position_counts.numpy(), [5, 30, 0, 0, 10])
    drawn = prior.draw_positions(4000, seed=0)
    assert set(np.round(drawn, 3)) == {0.125, 0.875} and abs(np.mean(drawn < 0.5) - 0.75) < 0.03


def test_position_prior_saves_and_loads_its_counts(tmp_path):
    prior = random_prior(position_bins=3)
    prior.count_positions(np.array([0.0, 0.5, 0.5, 1.0]))
    path = str(tmp_path / "prior.keras")
    prior.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.position_bins == 3
    np.testing.assert_array_equal(loaded.position_counts.numpy(), [0, 1, 2, 1])
    codes = tf.constant(np.random.default_rng(3).integers(0, 6, (2, 8, 8)), tf.int32)
    np.testing.assert_allclose(loaded.code_nll(codes, [0.2, 0.9]).numpy(), prior.code_nll(codes, [0.2, 0.9]).numpy(),
                               atol=1e-5)
    with pytest.raises(ValueError, match="without slice positions"):
        hierarchy.sampler_for(random_prior(), 1, 4, 4).sample(position=0.5)


def test_training_hides_the_position_of_a_share_of_grids_anew_each_epoch():
    import train

    grids = np.arange(1000, dtype=np.int32)[:, None, None] * np.ones((1, 2, 2), np.int32)  # grid i holds i
    condition = np.full((1000, 1, 1), 3, np.int32)
    dataset = train.code_dataset(grids, 100, shuffle=True, seed=0, condition=condition, hidden_share=0.1)
    hidden = []
    for _ in range(2):
        batches = [(inputs[0].numpy()[:, 0, 0], inputs[1].numpy().ravel()) for inputs, _ in dataset]
        ids, seen = (np.concatenate(part) for part in zip(*batches))
        assert set(seen) == {0, 3} and 0.07 < np.mean(seen == 0) < 0.13
        hidden.append(set(ids[seen == 0]))
    assert hidden[0] != hidden[1]
    unchanged = train.code_dataset(grids, 100, condition=condition)
    assert all((inputs[1].numpy() == 3).all() for inputs, _ in unchanged)
    plain = train.code_dataset(grids, 100, shuffle=True, hidden_share=0.1)  # nothing to hide
    assert all(inputs.shape == (100, 2, 2) for inputs, _ in plain)


def test_finer_levels_train_on_condition_grids_with_a_share_of_codes_slipped():
    """Conditioning augmentation: each time a grid is used, about `slip_share` of its
    condition codes come from one of its alternatives, the others stay real; validation
    batches (no slips) see the real condition."""
    import train

    grids = np.arange(200, dtype=np.int32)[:, None, None] * np.ones((1, 4, 4), np.int32)
    condition = np.zeros((200, 4, 4), np.int32)
    slips = np.stack([np.full((200, 4, 4), 1 + r, np.int32) for r in range(3)], axis=1)  # (N, 3, 4, 4)
    dataset = train.code_dataset(grids, 50, shuffle=True, seed=0, condition=condition, slips=slips, slip_share=0.3)
    epochs = []
    for _ in range(2):
        batches = []
        for (codes, given), target in dataset:
            np.testing.assert_array_equal(codes.numpy(), target.numpy())
            batches.append((codes.numpy()[:, 0, 0], given.numpy()))
        ids, given = (np.concatenate(part) for part in zip(*batches))
        epochs.append(given[np.argsort(ids)])  # by grid
    seen = np.concatenate(epochs)
    assert 0.25 < np.mean(seen != 0) < 0.35  # the share slipped
    assert set(np.unique(seen)) == {0, 1, 2, 3}  # every alternative is used
    per_grid = [set(np.unique(grid)) - {0} for grid in seen]
    assert all(len(values) <= 1 for values in per_grid)  # one alternative per use of a grid
    assert not np.array_equal(epochs[0] != 0, epochs[1] != 0)  # each grid slipped anew each epoch
    plain = train.code_dataset(grids, 50, condition=condition)
    assert all((inputs[1].numpy() == 0).all() for inputs, _ in plain)
    with pytest.raises(ValueError, match="no condition"):
        train.code_dataset(grids, 50, slips=slips, slip_share=0.3)


def test_teacher_forced_draws_follow_the_prior_given_the_real_codes_before():
    import train

    prior = random_prior(scale=0.4)
    rng = np.random.default_rng(2)
    tops = rng.integers(0, 4, (40, 4, 4)).astype(np.int32)
    draws = train.teacher_forced_draws(prior.top, tops, draws=3, seed=0, batch_size=16)
    assert draws.shape == (40, 3, 4, 4) and draws.dtype == np.int32 and draws.min() >= 0 and draws.max() < 4
    assert not np.array_equal(draws[:, 0], draws[:, 1])
    # A network sure of one code everywhere: every draw is that code.
    sure = random_prior(scale=0.0)
    bias = sure.top.weights[-1]
    bias.assign(np.where(np.arange(4) == 2, 50.0, 0.0).astype(np.float32))
    assert (train.teacher_forced_draws(sure.top, tops, draws=2) == 2).all()
    # A conditioned level: its draws take its condition grid.
    codes = rng.integers(0, 6, (10, 8, 8)).astype(np.int32)
    level = prior.top_codes(codes).numpy()
    assert train.teacher_forced_draws(prior.bottom, codes, level, draws=2).shape == (10, 2, 8, 8)


def test_top_prior_learns_from_shifted_grids_a_new_draw_each_epoch():
    import train

    prior = random_prior()
    rng = np.random.default_rng(4)
    codes = {split: rng.integers(0, 6, (n, 8, 8)).astype(np.int32) for split, n in (("train", 5), ("validate", 3))}
    tops = {split: prior.top_codes(grids).numpy() for split, grids in codes.items()}
    positions = {split: np.arange(len(grids))[:, None, None] for split, grids in codes.items()}
    moved, condition = train.shifted_top_grids(prior, codes, tops, positions, 1)
    assert moved["train"].shape == (9 * 5, 4, 4) and condition["train"].shape == (9 * 5, 1, 1)
    np.testing.assert_array_equal(moved["validate"], tops["validate"])  # only the training grids move
    copies = moved["train"].reshape(9, 5, 4, 4)  # shifts in order (-1, -1), (-1, 0), ... (1, 1)
    np.testing.assert_array_equal(copies[4], tops["train"])
    np.testing.assert_array_equal(copies[8], prior.top_codes(np.roll(codes["train"], (1, 1), axis=(1, 2))).numpy())
    assert not np.array_equal(copies[0], copies[8])
    np.testing.assert_array_equal(condition["train"].reshape(9, 5), np.tile(np.arange(5), (9, 1)))

    ids = np.arange(90, dtype=np.int32)[:, None, None] * np.ones((1, 2, 2), np.int32)
    dataset = train.code_dataset(ids, 10, shuffle=True, seed=0, epoch_size=30)
    epochs = [np.concatenate([inputs.numpy()[:, 0, 0] for inputs, _ in dataset]) for _ in range(2)]
    assert [len(set(epoch)) for epoch in epochs] == [30, 30] and set(epochs[0]) != set(epochs[1])


def test_prior_grids_follow_the_cache_order_and_add_mirrored_slices(tmp_path, monkeypatch):
    """The training grids line up with the slices' positions (the shuffled training split
    would not, nor would shards read interleaved), and mirroring adds each training slice
    flipped left to right. A run's grids from before are encoded again, its level codebooks
    kept."""
    import cache
    import data
    import train
    from conftest import write_png

    monkeypatch.setattr(cache, "SHARD_BYTES", 2 * 8 * 8 * 2)  # 2 slices a shard: 3 shards a split

    root = tmp_path / "oasis"
    for split in data.SPLITS:
        for k in range(6):
            image = np.zeros((8, 8))
            image[:, : k + 1] = (k + 1) / 10  # slice k: its left k + 1 columns at brightness (k + 1) / 10
            write_png(str(root / data.OASIS_DIRS[split] / f"case_001_slice_{k}.nii.png"), image)
    source = data.find_source(str(root))
    source.manifests = {split: cache.cache_split(source, split, (8, 8), str(tmp_path / "cache"), verbose=False)
                        for split in data.SPLITS}

    class Brightness:  # a stand-in encoder: each slice's brightest pixel, and where its left edge is lit
        def encode(self, images):
            images = images.numpy()[..., 0]
            return tf.constant(np.stack([np.round(images.max(axis=(1, 2)) * 10),
                                         (images[:, :, 0] > 0).mean(axis=1)], axis=1)[:, :, None].astype(np.int32))

    config = type("Config", (), dict(batch_size=4, shift=0.0))
    codes = train.encode_codes(Brightness(), train.ordered_splits(config, source), mirror=True)
    np.testing.assert_array_equal(codes["train"][:, 0, 0], [1, 2, 3, 4, 5, 6])  # slices 0-5 in order
    np.testing.assert_array_equal(codes["train"][:, 1, 0], 1)  # lit at the left edge
    np.testing.assert_array_equal(codes["train_mirrored"][:, 0, 0], [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(codes["train_mirrored"][:, 1, 0], 0)  # mirrored: lit at the right edge only
    positions = {split: np.asarray(m["positions"], np.float32) for split, m in source.manifests.items()}
    grids, where = train.training_grids(codes, positions, mirror=True)
    assert len(grids["train"]) == 12 and len(grids["validate"]) == 6
    np.testing.assert_allclose(where["train"], np.tile(np.arange(6) / 5, 2), atol=1e-6)

    earlier = {"train": codes["train"][::-1], "in_order": np.array(True), "top_codebook": np.ones((3, 2))}
    again = train.encoded_again(earlier, Brightness(), train.ordered_splits(config, source), mirror=True)
    np.testing.assert_array_equal(again["train"], codes["train"])
    np.testing.assert_array_equal(again["top_codebook"], earlier["top_codebook"])
    assert again["file_order"] and "in_order" not in again


def test_three_levels_sample_exactly_and_add_up(tmp_path):
    """A middle grid between the top grid and the codes: each level is drawn given the one
    above, exactly, and the likelihood is the sum of the three levels'."""
    prior = random_prior(top_embeddings=3, factor=4, middle_embeddings=5)
    assert prior.names == ["top", "middle", "bottom"] and prior.factors == [4, 2, 1]
    sampler = hierarchy.sampler_for(prior, 2, 8, 7)
    codes = sampler.sample(1.0, seed=4)
    top, middle = sampler.grids[:2]
    assert codes.shape == (2, 8, 7) and top.shape == (2, 2, 2) and middle.shape == (2, 4, 4)
    np.testing.assert_allclose(sampler.samplers[1].used_logits().numpy(), prior.middle((middle, top)).numpy(),
                               atol=1e-4)
    np.testing.assert_allclose(sampler.used_logits().numpy(), prior.bottom((codes, middle)).numpy(), atol=1e-4)
    grids, nlls = prior.level_nll(codes)
    assert [grid.shape for grid in grids] == [(2, 2, 2), (2, 4, 4), (2, 8, 7)]
    total = tf.reduce_sum(prior.code_nll(codes), axis=(1, 2)).numpy()
    np.testing.assert_allclose(total, sum(tf.reduce_sum(nll, axis=(1, 2)).numpy() for nll in nlls), rtol=1e-5)
    path = str(tmp_path / "prior.keras")
    prior.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config() == prior.get_config() and loaded.middle_codebook.numpy().any()
    np.testing.assert_allclose(loaded.code_nll(codes).numpy(), prior.code_nll(codes).numpy(), atol=1e-5)
    given = sampler.sample(1.0, seed=5, above=[top]).numpy()  # the top grid given, the rest drawn
    np.testing.assert_array_equal(sampler.grids[0], top)
    np.testing.assert_allclose(sampler.samplers[1].used_logits().numpy(),
                               prior.middle((sampler.grids[1], top)).numpy(), atol=1e-4)
    np.testing.assert_allclose(sampler.used_logits().numpy(), prior.bottom((given, sampler.grids[1])).numpy(),
                               atol=1e-4)
    with pytest.raises(ValueError, match="levels above the codes"):
        sampler.sample(1.0, above=[top, middle, codes])
    with pytest.raises(ValueError, match="a middle level needs"):
        hierarchy.HierarchicalPrior(6, 3, 4, factor=4, middle_embeddings=5, middle_factor=3)



def test_top_grid_is_drawn_at_the_priors_own_temperature(tmp_path):
    """`top_temperature` scales the top grid's temperature only: near zero, every seed draws
    the same (most likely) top grid while the codes below still vary; it is saved."""
    def draw(prior, seed):
        sampler = hierarchy.sampler_for(prior, 4, 8, 8)
        codes = sampler.sample(1.0, seed=seed).numpy()
        return sampler.top_grid.numpy(), codes

    cold = random_prior(scale=0.1, top_temperature=1e-4)
    (top_1, codes_1), (top_2, codes_2) = draw(cold, 1), draw(cold, 2)
    np.testing.assert_array_equal(top_1, top_2)
    assert not np.array_equal(codes_1, codes_2)
    warm = random_prior(scale=0.1)
    assert not np.array_equal(draw(warm, 1)[0], draw(warm, 2)[0])
    path = str(tmp_path / "prior.keras")
    cold.save(path)
    assert keras.models.load_model(path).top_temperature == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="top_temperature must be > 0"):
        hierarchy.HierarchicalPrior(6, 3, 4, 2, top_temperature=0)


def test_codes_are_drawn_at_the_priors_bottom_temperature(tmp_path):
    """`bottom_temperature` scales the codes' temperature only: near zero, the codes are the
    most likely ones given the grid above (the same for two seeds that draw the same grids
    above), while the middle grid, at the asked temperature, still varies; it is saved."""
    prior = random_prior(top_embeddings=3, factor=4, scale=0.1, middle_embeddings=5, top_temperature=1e-4,
                         bottom_temperature=1e-4)
    sampler = hierarchy.sampler_for(prior, 4, 8, 8)
    draws = []
    for seed in (1, 2):
        codes = sampler.sample(1.0, seed=seed).numpy()
        draws.append(([grid.numpy() for grid in sampler.grids], codes))
    (grids_1, codes_1), (grids_2, codes_2) = draws
    np.testing.assert_array_equal(grids_1[0], grids_2[0])  # the top grid: cold
    assert not np.array_equal(grids_1[1], grids_2[1])  # the middle grid: at temperature 1
    again = sampler.sample(1.0, seed=3, above=grids_1[:2]).numpy()  # the same grids above, another seed
    np.testing.assert_array_equal(again, codes_1)
    path = str(tmp_path / "prior.keras")
    prior.save(path)
    assert keras.models.load_model(path).bottom_temperature == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="bottom_temperature must be > 0"):
        hierarchy.HierarchicalPrior(6, 3, 4, 2, bottom_temperature=-1)


def test_a_prior_trained_in_bfloat16_learns_and_reloads_as_float32(tmp_path):
    """`train.prior_twin` computes in bfloat16 (logits in float32) from the same weights, so
    its logits are the float32 network's to bfloat16's precision; it learns; and its
    checkpoint reloads as a float32 PixelCNN that samples exactly."""
    import types

    import pixelcnn
    import train

    keras.utils.set_random_seed(0)
    config = types.SimpleNamespace(pcnn_learning_rate=1e-2, jit=False, pcnn_precision="bfloat16",
                                   pcnn_weights_ema=0.0)
    network = pixelcnn.PixelCNN(4, filters=16, num_layers=2, condition_classes=3, condition_factor=2,
                                condition_blocks=1, position_grid=(6, 6))
    train.compile_prior(network, config)
    twin = train.prior_twin(network, config)
    assert keras.mixed_precision.global_policy().name == "float32"  # the policy does not leak
    assert twin.compute_dtype == "bfloat16" and twin.gated_layers[0][0].compute_dtype == "bfloat16"
    pattern = np.arange(6 * 6).reshape(6, 6) % 4
    codes = np.repeat(pattern[None], 32, axis=0).astype(np.int32)
    condition = np.zeros((32, 3, 3), np.int32)
    logits = twin((codes[:2], condition[:2]))
    assert logits.dtype == tf.float32
    np.testing.assert_allclose(logits.numpy(), network((codes[:2], condition[:2])).numpy(), atol=0.05)
    history = twin.fit((codes, condition), codes, batch_size=8, epochs=15, verbose=0).history
    assert pixelcnn.bits_per_code(history["loss"][-1]) < 0.5 * np.log2(4)
    path = str(tmp_path / "prior.keras")
    twin.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.compute_dtype == "float32" and loaded.gated_layers[0][0].compute_dtype == "float32"
    for saved, trained in zip(loaded.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(saved, trained)
    sampler = pixelcnn.Sampler(loaded, 2, 6, 6)
    drawn = sampler.sample(1.0, 3, condition=tf.constant(condition[:2]))
    np.testing.assert_allclose(sampler.used_logits().numpy(), loaded((drawn, condition[:2])).numpy(), atol=1e-4)


def test_prior_precision_is_bfloat16_by_default_only_where_the_cpu_has_it(monkeypatch):
    import types

    import cpu
    import train

    config = types.SimpleNamespace(pcnn_precision="auto")
    monkeypatch.setattr(cpu, "native_bfloat16", lambda: None)
    assert train.prior_precision(config) == "float32"
    monkeypatch.setattr(cpu, "native_bfloat16", lambda: "amx_bf16")
    assert train.prior_precision(config) == "bfloat16"
    assert train.prior_precision(types.SimpleNamespace(pcnn_precision="float32")) == "float32"
    monkeypatch.setattr(cpu, "native_bfloat16", lambda: None)
    assert train.prior_precision(types.SimpleNamespace(pcnn_precision="bfloat16")) == "bfloat16"


def test_top_prior_is_no_deeper_than_its_grid_has_rows():
    import dataclasses

    import driver
    import train

    config = dataclasses.replace(driver.Config(), pcnn_top_layers=16, pcnn_top_factor=4)
    # 256x256 slices: 64x64 codes, a 16x16 top grid (the default's 16 layers); 128x128: 8x8.
    assert train.top_layers(config, 64) == 16 and train.top_layers(config, 32) == 8
    assert train.top_layers(config, 4) == 1 and train.top_layers(config) == 16  # rows unknown: as set
    assert train.top_layers(config, 25) == 7  # 25 code rows: 6 whole blocks and a partial one
    prior = train.build_prior(config, 32)
    assert prior.networks[0].num_layers == 8
    assert prior.networks[1].num_layers == config.pcnn_middle_layers  # only the top one is capped


def test_a_prior_with_weights_ema_validates_and_saves_the_averaged_weights(tmp_path):
    """--pcnn-weights-ema: what each epoch validates is the moving average of the weights,
    and the checkpoint fit_prior returns is that average (its loss on the validation grids is
    the best validation loss logged), not the weights as trained."""
    import driver
    import pixelcnn
    import train

    rng = np.random.default_rng(0)
    grids = {split: rng.integers(0, 4, (n, 6, 6)).astype(np.int32) for split, n in (("train", 64), ("validate", 16))}
    fitted = {}
    for momentum in (0.0, 0.9):
        keras.utils.set_random_seed(0)
        config = driver.Config(K=4, pcnn_learning_rate=1e-2, pcnn_batch_size=8, pcnn_precision="float32",
                               pcnn_weights_ema=momentum)
        network = pixelcnn.PixelCNN(4, filters=8, num_layers=2)
        train.compile_prior(network, config)
        run_dir = tmp_path / f"ema{momentum}"
        run_dir.mkdir()
        fitted[momentum] = train.fit_prior(network, config, grids, str(run_dir), "prior", 3, "prior")
        history = train.read_history(str(run_dir / "prior_history.csv"))
        loss = fitted[momentum].evaluate(grids["validate"], grids["validate"], batch_size=8, verbose=0)
        assert loss == pytest.approx(min(history["val_loss"]), abs=1e-5)
    assert fitted[0.9].optimizer.use_ema and not fitted[0.0].optimizer.use_ema
    assert not np.allclose(fitted[0.9].get_weights()[0], fitted[0.0].get_weights()[0])
