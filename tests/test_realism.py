"""realism.py: anatomy statistics on shapes with known answers, and the classifier two-sample test."""

import numpy as np
import pytest

import realism


def disc(size=64, centre=(32, 32), radius=20, value=0.8):
    y, x = np.mgrid[:size, :size]
    return np.where((y - centre[0]) ** 2 + (x - centre[1]) ** 2 < radius**2, value, 0.0)


def test_a_centred_disc_is_whole_solid_and_symmetric():
    stats = realism.slice_anatomy(disc())
    assert stats["one_piece"] == 1.0 and stats["solidity"] == pytest.approx(1.0)
    assert stats["symmetry"] > 0.99 and stats["foreground"] == pytest.approx(np.pi * 20**2 / 64**2, rel=0.05)


def test_an_off_centre_disc_is_still_symmetric_about_its_own_centre():
    assert realism.slice_anatomy(disc(centre=(32, 20), radius=12))["symmetry"] > 0.95


def test_pieces_holes_and_lopsided_slices():
    two = disc(centre=(32, 14), radius=8) + disc(centre=(32, 50), radius=12)
    assert realism.slice_anatomy(two)["one_piece"] == 0.0
    ring = disc(radius=20) - disc(radius=12)
    assert realism.slice_anatomy(ring)["solidity"] == pytest.approx(1 - 12**2 / 20**2, abs=0.05)
    lopsided = disc(radius=20) * np.linspace(0, 1, 64)[None, :]  # bright on the right only
    assert realism.slice_anatomy(lopsided)["symmetry"] < realism.slice_anatomy(disc())["symmetry"] - 0.2


def test_set_statistics_count_near_empty_slices_apart():
    images = np.stack([disc(), disc(radius=3), np.zeros((64, 64))])
    stats = realism.anatomy_statistics(images)
    assert stats["near_empty"] == pytest.approx(2 / 3) and stats["one_piece"] == 1.0
    assert realism.anatomy_statistics(np.zeros((2, 64, 64)))["symmetry"] is None


def test_c2st_tells_different_sets_apart_and_not_alike_ones():
    rng = np.random.default_rng(0)
    discs = np.stack([disc(centre=(32 + rng.integers(-4, 5), 32), radius=rng.integers(14, 20)) for _ in range(24)])
    rings = np.stack([disc(radius=r) - disc(radius=r - 6) for r in rng.integers(14, 20, 24)])
    assert realism.c2st_accuracy(discs, rings, folds=3, epochs=20, batch_size=4) >= 0.8
    noise = rng.uniform(0, 1, (48, 64, 64))
    assert realism.c2st_accuracy(noise[:24], noise[24:], folds=3, epochs=5, batch_size=4) <= 0.75
    with pytest.raises(ValueError, match="at least 2 slices"):
        realism.c2st_accuracy(noise[:1], noise[1:])


def test_c2st_logits_score_each_picked_slice_with_the_fold_that_left_it_out():
    rng = np.random.default_rng(1)
    discs = np.stack([disc(centre=(32 + rng.integers(-4, 5), 32), radius=rng.integers(14, 20)) for _ in range(30)])
    rings = np.stack([disc(radius=r) - disc(radius=r - 6) for r in rng.integers(14, 20, 24)])
    first, picked, second, second_picked = realism.c2st_logits(discs, rings, folds=3, epochs=20, batch_size=4)
    # The larger set is cut to the smaller one's size, each slice picked at most once.
    assert len(first) == len(picked) == len(second) == len(second_picked) == 24
    assert len(set(picked)) == 24 and set(picked) <= set(range(30)) and sorted(second_picked) == list(range(24))
    assert np.mean(first > 0) >= 0.8 and np.mean(second <= 0) >= 0.8  # above 0: "from the first set"
    accuracy = np.mean(np.concatenate([first > 0, second <= 0]))
    assert realism.c2st_accuracy(discs, rings, folds=3, epochs=20, batch_size=4) == pytest.approx(accuracy)


def test_position_aurocs_say_which_fifth_of_the_volume_gives_a_set_away():
    assert realism.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and realism.auroc([1.0], [1.0]) == 0.5
    assert np.isnan(realism.auroc([1.0], []))
    positions = np.array([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0, np.nan])
    bins = realism.position_bins(positions)
    assert list(bins) == ["0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0"]
    assert [int(inside.sum()) for inside in bins.values()] == [2, 1, 1, 1, 2]  # 1 in the last; NaN in none
    # Real slices of the lowest fifth score like the samples (logit 1: "a sample"), the rest far lower.
    real_logits = np.where(positions < 0.2, 1.0, -5.0)
    aurocs = realism.position_aurocs(np.ones(4), real_logits, positions)
    assert aurocs["0.0-0.2"] == 0.5 and aurocs["0.4-0.6"] == 1.0
