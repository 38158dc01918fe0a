"""anomaly.py and `driver.py anomaly`: healing unlikely codes, maps at each input's size."""

import csv
import json
import os

import keras
import nibabel
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage
from conftest import phantom, run_error, write_nifti, write_png

import anomaly
import data
import driver
import hierarchy
import pixelcnn
import vqvae


def confident_prior(num_embeddings=4, steps=60):
    """A gated PixelCNN trained until it expects code 0 everywhere."""
    keras.utils.set_random_seed(0)
    prior = pixelcnn.PixelCNN(num_embeddings, "gated", filters=8, num_layers=2, first_kernel_size=3)
    prior.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    grids = np.zeros((32, 6, 6), np.int32)
    prior.fit(grids, grids, batch_size=16, epochs=steps // 2, verbose=0)
    return prior


def test_healer_redraws_only_the_unlikely_codes():
    prior = confident_prior()
    codes = np.zeros((2, 6, 6), np.int32)
    codes[0, 2:4, 3:5] = 3  # a "lesion" in the first grid; the second is healthy
    healthy = anomaly.reference(prior, np.zeros((8, 6, 6), np.int32), quantile=0.99)
    healthy["bottom"]["limit"] += 0.5
    healed, marked = anomaly.Healer(prior, 2, 6, 6).heal(codes, healthy)
    assert marked[0, 2:4, 3:5].all() and not marked[1].any()
    np.testing.assert_array_equal(healed[1], 0)
    np.testing.assert_array_equal(healed[0], 0)  # the prior redraws the lesion's codes as healthy ones


def test_map_returns_to_the_input_size():
    image = np.zeros((40, 24), np.float32)
    image[10:30, 6:18] = 1.0
    fitted = data.fit_to_size(image[..., None], (32, 32)).numpy()[..., 0]
    back = anomaly.to_input_size(fitted, (40, 24), (32, 32))
    assert back.shape == (40, 24)
    assert np.abs(back - image).mean() < 0.08 and back[15:25, 9:15].min() > 0.9


@pytest.mark.parametrize("name, expected", [("case_001_slice_3.nii.png", "case_001_slice_3"),
                                            ("Subj1_T1.nii.gz", "Subj1_T1"), ("scan.nii", "scan"),
                                            ("a.png", "a"), (".png", ".png")])
def test_stem(name, expected):
    assert anomaly.stem(f"/some/folder/{name}") == expected


def tiny_run(folder, position_bins=0):
    """A run folder with an untrained 32x32 VQ-VAE and hierarchical prior, as the driver saves them."""
    keras.utils.set_random_seed(0)
    model = vqvae.VQVAE(num_embeddings=8, latent_dim=4, filters=(4, 8), num_res_blocks=1)
    settings = dict(filters=8, num_layers=2)
    prior = hierarchy.HierarchicalPrior(8, 4, top_embeddings=4, factor=2, top=settings, bottom=settings,
                                        position_bins=position_bins)
    grids = np.random.default_rng(0).integers(0, 8, (12, 8, 8)).astype(np.int32)
    prior.fit_codebooks(model.quantizer.codebook.numpy(), grids)
    os.makedirs(folder)
    model.save(os.path.join(folder, "vqvae.keras"))
    prior.save(os.path.join(folder, "pixelcnn.keras"))
    np.savez(os.path.join(folder, "codes.npz"), train=grids, validate=grids[:6], test=grids[6:])
    json.dump({"image_size": [32, 32], "slice_axis": -1, "volume_index": 0, "cmap": "gray"},
              open(os.path.join(folder, "config.json"), "w"))
    return folder


def test_anomaly_command_writes_maps_at_each_inputs_size(tmp_path):
    run = tiny_run(str(tmp_path / "run"))
    inputs = tmp_path / "new"
    write_png(str(inputs / "case_001_slice_3.nii.png"), phantom(40, 1)[:, :24])
    write_nifti(str(inputs / "slice.nii.gz"), (phantom(36, 2)[:, :28] * 900).astype(np.int16))
    write_nifti(str(inputs / "volume.nii"), np.random.default_rng(3).uniform(0, 500, (20, 16, 3)))
    write_nifti(str(inputs / "thin.nii.gz"), (phantom(30, 4)[:, :20, None] * 700).astype(np.int16))  # (H, W, 1)
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = str(tmp_path / "maps")
    rows = driver.main(["anomaly", "--run", run, "--data", str(inputs), "--out", out, "--draws", "2",
                        "--batch-size", "2"])
    assert [name for name, _ in rows] == ["case_001_slice_3.nii.png", "slice.nii.gz", "thin.nii.gz", "volume.nii"]
    shapes = {"case_001_slice_3": (40, 24), "slice": (36, 28), "volume": (20, 16, 3), "thin": (30, 20, 1)}
    for stem, shape in shapes.items():
        image = nibabel.load(os.path.join(out, f"{stem}_anomaly.nii.gz"))
        assert image.shape == shape and image.get_data_dtype() == np.float32, stem
        assert np.isfinite(image.get_fdata()).all() and image.get_fdata().min() >= 0
        assert os.path.exists(os.path.join(out, f"{stem}_anomaly.png"))
    assert np.load(os.path.join(out, "case_001_slice_3_code_nll.npy")).shape == (8, 8)
    assert np.load(os.path.join(out, "volume_code_nll.npy")).shape == (3, 8, 8)
    assert np.load(os.path.join(out, "thin_code_nll.npy")).shape == (1, 8, 8)  # one slice of a volume
    np.testing.assert_allclose(nibabel.load(os.path.join(out, "slice_anomaly.nii.gz")).affine,
                               nibabel.load(str(inputs / "slice.nii.gz")).affine)
    with open(os.path.join(out, "scores.csv")) as f:
        scores = list(csv.DictReader(f))
    assert [row["file"] for row in scores] == [name for name, _ in rows] and all(float(r["score"]) >= 0 for r in scores)
    with np.load(os.path.join(run, "anomaly_reference.npz")) as saved:
        assert float(saved["quantile"]) == 0.995
        assert saved["top_mean"].shape == (4, 4) and saved["bottom_spread"].shape == (8, 8)
    with np.load(os.path.join(run, "anomaly_atlas.npz")) as saved:  # the default map's healthy heads
        assert saved["boxes"].shape[1] == 4 and len(saved["boxes"]) == len(saved["features"])
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]


def test_slices_from_several_files_share_a_batch_and_each_file_gets_its_own_results(tmp_path):
    """A batch mixes files' slices (a PNG folder is one slice a file); each file must still get its own
    slices' results, in order: the per-code NLL (no randomness in it) is the same at every batch size."""
    run = tiny_run(str(tmp_path / "run"))
    inputs = tmp_path / "new"
    write_png(str(inputs / "a.png"), phantom(32, 1))
    write_nifti(str(inputs / "b.nii"), np.random.default_rng(4).uniform(0, 500, (32, 32, 3)))
    write_png(str(inputs / "c.png"), phantom(32, 5))
    nll = {}
    for batch_size in (1, 3, 8):
        out = str(tmp_path / f"maps{batch_size}")
        rows = driver.main(["anomaly", "--run", run, "--data", str(inputs), "--out", out, "--draws", "1",
                            "--batch-size", str(batch_size)])
        assert [name for name, _ in rows] == ["a.png", "b.nii", "c.png"]
        nll[batch_size] = [np.load(os.path.join(out, f"{stem}_code_nll.npy")) for stem in "abc"]
    assert [grid.shape for grid in nll[1]] == [(8, 8), (3, 8, 8), (8, 8)]
    assert not np.allclose(nll[1][0], nll[1][2])  # different slices score differently
    for batch_size in (3, 8):
        for one, batched in zip(nll[1], nll[batch_size]):
            np.testing.assert_allclose(batched, one, rtol=1e-5, atol=1e-5)


def test_fewer_slices_than_a_batch_are_healed_without_blank_padding(tmp_path, monkeypatch):
    """The healer is sized to the first batch: the default batch for many slices, all the slices for
    fewer, so that one file is not healed with a batch of blank slices beside it."""
    run = tiny_run(str(tmp_path / "run"))
    inputs = tmp_path / "new"
    write_png(str(inputs / "a.png"), phantom(32, 1))
    write_nifti(str(inputs / "b.nii"), np.random.default_rng(4).uniform(0, 500, (32, 32, 3)))
    sizes, healer = [], anomaly.Healer
    monkeypatch.setattr(anomaly, "Healer", lambda prior, size, *grid: sizes.append(size) or healer(prior, size, *grid))
    for batch_size in (32, 3):
        driver.main(["anomaly", "--run", run, "--data", str(inputs), "--out", str(tmp_path / f"maps{batch_size}"),
                     "--draws", "2", "--batch-size", str(batch_size)])
    assert sizes == [4 * 2, 3 * 2]  # 4 slices in all; then batches of 3 (the last one padded)


def test_anomaly_command_errors(tmp_path):
    run = tiny_run(str(tmp_path / "run"))
    message = run_error(["anomaly", "--run", run])
    assert "--data is required" in message
    os.remove(os.path.join(run, "pixelcnn.keras"))
    (tmp_path / "new").mkdir()
    write_png(str(tmp_path / "new" / "a.png"), phantom(32, 0))
    assert "no pixelcnn.keras" in run_error(["anomaly", "--run", run, "--data", str(tmp_path / "new")])
    assert "--quantile must be between 0 and 1" in run_error(["anomaly", "--run", run, "--data", str(tmp_path),
                                                                "--quantile", "1.5"])
    assert "--map must be 'asymmetry', 'likelihood' or 'healing', got 'residual'" in run_error(
        ["anomaly", "--run", run, "--data", str(tmp_path), "--map", "residual"])


def test_a_top_level_that_knows_positions_scores_each_slice_at_its_likeliest_one():
    keras.utils.set_random_seed(0)
    prior = hierarchy.HierarchicalPrior(6, 3, top_embeddings=4, factor=2, top=dict(filters=4, num_layers=1),
                                        bottom=dict(filters=4, num_layers=1), position_bins=3)
    grids = np.random.default_rng(2).integers(0, 6, (5, 4, 4)).astype(np.int32)
    prior.fit_codebooks(np.random.default_rng(3).normal(size=(6, 3)).astype(np.float32), grids)
    top = prior.top_codes(tf.constant(grids))
    per_bin = [prior.networks[0].code_nll((top, tf.fill((5, 1, 1), position))).numpy() for position in (1, 2, 3)]
    expected = np.stack(per_bin, 1)[np.arange(5), np.stack(per_bin, 1).sum(axis=(2, 3)).argmin(axis=1)]
    levels = anomaly.level_nll(prior, tf.constant(grids))
    found = levels["top"]
    np.testing.assert_allclose(found, expected, rtol=1e-5)
    assert found.sum() <= min(nll.sum() for nll in per_bin) + 1e-3 * found.size
    # the per-code NLL written beside each map is the prior's own, slice position unknown
    np.testing.assert_allclose(levels["code_nll"], prior.code_nll(tf.constant(grids)).numpy(), rtol=1e-5)


def test_maps_are_zero_outside_the_head():
    images = np.zeros((1, 32, 32), np.float32)
    images[0, 8:24, 8:24] = 0.5
    images[0, 12:16, 12:16] = 0.0  # a dark hole inside the head is still the head
    inside = anomaly.head(images, 2)
    assert inside[0, 6:26, 6:26].all() and inside.sum() == 20 * 20


def test_depth_rises_from_the_heads_edge_to_one_a_scalp_inside():
    images = np.zeros((2, 64, 64), np.float32)
    images[0, 8:56, 8:56] = 0.5
    images[0, 20:28, 20:28] = 0.0  # a dark hole inside the head is deep, not an edge
    found = anomaly.depth(images, scalp=8 / 64)
    assert found.shape == (2, 64, 64) and found.dtype == np.float32
    assert (found[0, :8] == 0).all() and (found[1] == 0).all()  # outside the head; a blank slice has none
    assert found[0, 8, 32] == pytest.approx(1 / 8) and found[0, 11, 32] == pytest.approx(4 / 8)
    assert (found[0, 16:48, 16:48] == 1).all()  # 8 px (the scalp) or more inside, the hole included
    assert (np.diff(found[0, 8:16, 32]) > 0).all()


def test_a_slice_scores_by_how_far_its_brightest_spot_stands_above_the_rest_of_its_map():
    maps = np.full((2, 100, 100), 0.1, np.float32)
    maps[:, :5, :5] = 1.0  # the same bright spot (25 px)
    maps[1, 50:, :6] = 0.8  # and, in the second, 300 px of lesser marks: the spot stands out less
    scores = anomaly.slice_scores(maps)
    assert scores.shape == (2,)
    assert scores[0] == pytest.approx(0.9) and scores[1] == pytest.approx(0.2)
    np.testing.assert_allclose(anomaly.slice_scores(3 * maps), 3 * scores, rtol=1e-6)


def test_the_drivers_map_choices_are_anomalys():
    assert driver.ANOMALY_MAPS == anomaly.MAPS


def test_reference_scores_each_code_against_healthy_codes_at_its_place():
    prior = hierarchy.HierarchicalPrior(6, 3, top_embeddings=4, factor=2, top=dict(filters=4, num_layers=1),
                                        bottom=dict(filters=4, num_layers=1))
    grids = np.random.default_rng(1).integers(0, 6, (10, 4, 4)).astype(np.int32)
    healthy = anomaly.reference(prior, grids, quantile=0.5)
    assert sorted(healthy) == ["bottom", "top"]
    _, (top_nll, bottom_nll) = prior.level_nll(tf.constant(grids))
    for level, nll in (("top", top_nll.numpy()), ("bottom", bottom_nll.numpy())):
        stats = healthy[level]
        np.testing.assert_allclose(stats["mean"], nll.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(stats["spread"], nll.std(axis=0) + anomaly.SPREAD_FLOOR, rtol=1e-5)
        z = (nll - stats["mean"]) / stats["spread"]
        assert stats["limit"] == pytest.approx(np.median(z), rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(anomaly.level_z(prior, tf.constant(grids), healthy)[level], z, rtol=1e-4, atol=1e-5)


def test_run_reference_is_kept_and_made_again_for_another_quantile_or_floor(tmp_path, monkeypatch):
    run = tiny_run(str(tmp_path / "run"))
    prior = keras.models.load_model(os.path.join(run, "pixelcnn.keras"))
    first = anomaly.run_reference(run, prior, 0.9)
    again = anomaly.run_reference(run, prior, 0.9)
    for level in ("top", "bottom"):
        np.testing.assert_array_equal(again[level]["mean"], first[level]["mean"])
        assert again[level]["limit"] == first[level]["limit"]
    higher = anomaly.run_reference(run, prior, 0.99)
    assert higher["bottom"]["limit"] > first["bottom"]["limit"]
    with np.load(os.path.join(run, "anomaly_reference.npz")) as saved:
        assert float(saved["quantile"]) == 0.99 and float(saved["spread_floor"]) == anomaly.SPREAD_FLOOR
        assert int(saved["version"]) == anomaly.REFERENCE_VERSION
    monkeypatch.setattr(anomaly, "SPREAD_FLOOR", anomaly.SPREAD_FLOOR * 2)  # a new version's floor
    wider = anomaly.run_reference(run, prior, 0.99)
    np.testing.assert_allclose(wider["bottom"]["spread"] - higher["bottom"]["spread"], anomaly.SPREAD_FLOOR / 2,
                               rtol=1e-5)
    os.remove(os.path.join(run, "anomaly_reference.npz"))
    os.remove(os.path.join(run, "codes.npz"))
    with pytest.raises(data.DataError, match="no codes.npz"):
        anomaly.run_reference(run, prior, 0.9)


def test_the_likelihood_map_spreads_the_top_levels_z_scores_over_their_pixels():
    """The default map is the coarsest level's z-scores, each over the pixels its code
    stands for (before clipping at zero and smoothing): here 8 pixels per top code
    (downsampling 4 x factor 2)."""
    keras.utils.set_random_seed(0)
    model = vqvae.VQVAE(num_embeddings=8, latent_dim=4, filters=(4, 8), num_res_blocks=1)
    prior = hierarchy.HierarchicalPrior(8, 4, top_embeddings=4, factor=2, top=dict(filters=8, num_layers=2),
                                        bottom=dict(filters=8, num_layers=2))
    grids = np.random.default_rng(0).integers(0, 8, (12, 8, 8)).astype(np.int32)
    prior.fit_codebooks(model.quantizer.codebook.numpy(), grids)
    healthy = anomaly.reference(prior, grids, quantile=0.9)
    codes = grids[:2]
    z = anomaly.level_z(prior, tf.constant(codes), healthy)
    found, block = anomaly.coarse_z_map(model, prior, z, (32, 30))
    assert block == 8 and found.shape == (2, 32, 30)
    z = z["top"]
    np.testing.assert_allclose(found[:, ::8, ::8], z[:, :, :4], rtol=1e-5)
    np.testing.assert_allclose(found[:, 7, 7], z[:, 0, 0], rtol=1e-5)


def test_the_mirrored_likelihood_map_is_the_same_for_a_slice_and_its_mirror_image(tmp_path):
    """With `mirror`, the map averages the slice's view and its mirror image's (mirrored
    back), so a slice and its mirror image get mirror-image maps."""
    run = tiny_run(str(tmp_path / "run"))
    model, prior = (keras.models.load_model(os.path.join(run, name)) for name in ("vqvae.keras", "pixelcnn.keras"))
    healthy = anomaly.reference(prior, np.load(os.path.join(run, "codes.npz"))["validate"])
    slices = np.stack([phantom(32, 7), phantom(32, 7)[:, ::-1]])[..., None].astype(np.float32)
    healer = anomaly.Healer(prior, 2, 8, 8)
    both = anomaly.anomaly_maps(model, healer, slices, healthy, draws=1, kind="likelihood", mirror=True)["maps"]
    np.testing.assert_allclose(both[1], both[0][:, ::-1], rtol=1e-4, atol=1e-4)
    one = anomaly.anomaly_maps(model, healer, slices, healthy, draws=1, kind="likelihood")["maps"]
    assert not np.allclose(one[1], one[0][:, ::-1], atol=1e-4)  # one view alone is not mirror-symmetric


def symmetric_slice(size=64, angle=4.0, shift=4.0):
    """A left-right symmetric 'head' (an ellipse with two mirrored inner ellipses and one on
    the midline at the back, so that it is not top-bottom symmetric too), turned by `angle`
    degrees and moved `shift` pixels sideways, as slices seldom sit square."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    image = (0.6 * ((x / 24) ** 2 + (y / 28) ** 2 < 1) + 0.3 * (((np.abs(x) - 10) / 5) ** 2 + (y / 8) ** 2 < 1)
             + 0.3 * ((x / 6) ** 2 + ((y - 18) / 5) ** 2 < 1))
    return ndimage.shift(ndimage.rotate(image, angle, reshape=False, order=1), (0, shift), order=1).astype(np.float32)


def test_the_aligned_mirror_image_lies_on_a_turned_and_moved_symmetric_slice():
    image = symmetric_slice()
    inside = image > anomaly.FOREGROUND
    plain = np.abs(image[:, ::-1] - image)[inside].mean()
    aligned = np.abs(anomaly.aligned_mirror(image) - image)[inside].mean()
    assert aligned < 0.25 * plain, (aligned, plain)
    transform = anomaly.mirror_transform(image)
    assert transform[0] != 0 and transform[1] != 0 and not transform[2]  # turned and moved, as the slice was
    field = anomaly.mirror_field(image, transform)
    np.testing.assert_allclose(anomaly.asymmetry(image[None], [transform], [field]), anomaly.asymmetry(image[None]))
    assert anomaly.mirror_transform(np.zeros((64, 64), np.float32)) == (0.0, 0.0, False)  # no head: the plain mirror
    blank = np.zeros((64, 64), np.float32)
    np.testing.assert_array_equal(anomaly.mirror_field(blank, (0.0, 0.0, False)), 0)  # nor a bend


def test_a_head_on_its_side_is_mirrored_top_to_bottom():
    """A 3D volume's slices may hold the head on its side (left to right down the rows): its
    mirror image is then taken across the rows, and lies on it as the upright slice's does."""
    upright = symmetric_slice()
    image = np.ascontiguousarray(upright.T)
    transform = anomaly.mirror_transform(image)
    assert transform[2]
    np.testing.assert_allclose(transform[:2], anomaly.mirror_transform(upright)[:2])
    np.testing.assert_allclose(anomaly.mirrored(image, transform),
                               anomaly.mirrored(upright, transform[:2] + (False,)).T)
    inside = image > anomaly.FOREGROUND
    plain = np.abs(image[:, ::-1] - image)[inside].mean()
    assert np.abs(anomaly.aligned_mirror(image) - image)[inside].mean() < 0.25 * plain
    sick = image.copy()
    sick[20:28, 12:20] = 1.0  # one side only (upright: rows 12-20, columns 20-28, in even tissue)
    found = anomaly.asymmetry(np.stack([image, sick]))
    np.testing.assert_allclose(found[0], anomaly.asymmetry(upright[None])[0].T, atol=0.01)
    assert found[1, 20:28, 12:20].mean() > 0.1 + found[0, 20:28, 12:20].mean()


@pytest.mark.parametrize("shift", [-70, -5, 0, 3, 70])
def test_shift_columns_is_ndimage_shift_by_whole_columns(shift):
    image = phantom(64, 0).astype(np.float32)
    np.testing.assert_array_equal(anomaly.shift_columns(image, shift), ndimage.shift(image, (0, shift), order=1))


def test_the_bent_mirror_image_lies_on_a_slice_whose_halves_differ_but_keeps_a_blob():
    """No two halves of a head are alike: a turn and a shift cannot lay one ventricle on a
    wider one further out, the bend can; a small bright blob in even tissue it cannot make
    vanish."""
    y, x = np.mgrid[:64, :64] - 31.5
    image = (0.6 * ((x / 24) ** 2 + (y / 28) ** 2 < 1) + 0.3 * (((x + 10) / 5) ** 2 + (y / 8) ** 2 < 1)
             + 0.3 * (((x - 12) / 6) ** 2 + (y / 8) ** 2 < 1) + 0.3 * ((x / 6) ** 2 + ((y - 18) / 5) ** 2 < 1)
             ).astype(np.float32)  # the last ellipse at the back, on the midline: upright, not on its side
    inside = image > anomaly.FOREGROUND
    transform = anomaly.mirror_transform(image)
    field = anomaly.mirror_field(image, transform)
    assert field.shape == (2, 64, 64) and np.abs(field).max() > 0.5
    rigid = np.abs(anomaly.mirrored(image, transform) - image)[inside].mean()
    bent = np.abs(anomaly.mirrored(image, transform, field) - image)[inside].mean()
    assert bent < 0.6 * rigid, (bent, rigid)
    sick = image.copy()
    sick[10:16, 20:26] = 1.0
    found = anomaly.asymmetry(np.stack([image, sick]))
    assert found[1, 10:16, 20:26].mean() > found[0, 10:16, 20:26].mean() + 0.1


def test_asymmetry_marks_a_blob_on_one_side_and_its_mirror_place_only():
    image = symmetric_slice(angle=0.0, shift=0.0)
    blob = np.zeros_like(image, bool)
    blob[12:20, 18:26] = True  # in even tissue (`mirror_field` may partly fill one against a bright structure)
    sick = image.copy()
    sick[blob] = 1.0
    found = anomaly.asymmetry(np.stack([image, sick]))
    assert found.shape == (2, 64, 64)
    assert found[1][blob].mean() > 0.1
    assert found[1][blob[:, ::-1]].mean() > 0.05  # its healthy mirror place differs from it too, if less after the bend
    elsewhere = (image > anomaly.FOREGROUND) & ~ndimage.binary_dilation(blob | blob[:, ::-1], iterations=6)
    assert found[1][elsewhere].max() < 0.05
    assert found[0].max() < 0.05  # the symmetric slice: nothing
    np.testing.assert_array_equal(anomaly.asymmetry(np.zeros((1, 64, 64), np.float32)), 0)  # a blank slice: nothing


def test_detail_mismatch_is_high_where_fine_detail_differs_and_low_inside_a_smooth_blob():
    """Sulci that do not quite meet their mirror image's make fine-grained differences, a
    lesion a smooth one: over the mismatch, the blob's asymmetry outranks the stripes'."""
    y, x = np.mgrid[:128, :128] - 63.5
    image = 0.6 * ((x / 50) ** 2 + (y / 56) ** 2 < 1).astype(np.float32)
    stripes = (np.abs(y - 20) < 10) & (np.abs(x - 25) < 10)  # fine texture on one side only
    image[stripes] += 0.15 * np.sin(x[stripes] * np.pi / 2)
    image += 0.2 * np.exp(-((x + 25) ** 2 + (y + 20) ** 2) / (2 * 4 ** 2))  # a smooth blob on the other side
    transforms = [(0.0, 0.0, False)]
    found = anomaly.detail_mismatch(image[None], transforms)
    assert found.shape == (1, 128, 128)
    texture, blob = (slice(None), slice(80, 88), slice(85, 93)), (slice(None), slice(40, 48), slice(35, 43))
    assert found[texture].mean() > 3 * found[blob].mean()
    ratio = anomaly.asymmetry(image[None], transforms) / (found + anomaly.MISMATCH_FLOOR)
    assert ratio[blob].mean() > 2 * ratio[texture].mean()
    np.testing.assert_array_equal(anomaly.detail_mismatch(np.zeros((1, 64, 64), np.float32), transforms), 0)


def textured_head(size=96, seed=0):
    """A smooth random texture inside an ellipse: a head whose tissue varies from place to place."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    texture = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(size, size)), 3)
    return ((0.5 + 2 * texture) * ((x / (0.4 * size)) ** 2 + (y / (0.45 * size)) ** 2 < 1)).astype(np.float32)


def test_the_healthy_estimate_follows_a_candidate_of_other_brightness_and_keeps_a_lesion_out():
    """Each place's fit takes a candidate brighter, darker or of other contrast for what it
    is, and prefers the candidate that looks like the slice; a blob much smaller than the
    window is left out of the estimate, so slice - estimate is the blob."""
    image = textured_head()
    other = textured_head(seed=1)  # another head: no help
    candidates = np.stack([0.6 * image + 0.2, other])
    expected = anomaly.healthy_estimate(image, candidates, anomaly.candidate_weights(2))
    inside = image > 0.1
    assert np.abs(expected - image)[inside].mean() < 0.1 * np.abs(other - image)[inside].mean()
    y, x = np.mgrid[:96, :96]
    blob = 0.4 * np.exp(-((y - 40) ** 2 + (x - 55) ** 2) / (2 * 3 ** 2))
    sick = image + blob.astype(np.float32)
    residual = sick - anomaly.healthy_estimate(sick, candidates, anomaly.candidate_weights(2))
    assert residual[40, 55] > 0.6 * blob[40, 55]
    assert np.abs(residual)[inside & (blob < 0.01)].mean() < 0.1 * residual[40, 55]
    flat = anomaly.healthy_estimate(np.zeros((32, 32), np.float32), np.zeros((1, 32, 32), np.float32), [1.0])
    np.testing.assert_array_equal(flat, 0)  # a blank slice and its blank mirror image: nothing


def test_the_fit_at_half_size_spreads_back_to_any_size():
    """`healthy_estimate` fits its weights on 2x2 block means (`halved`) and spreads them
    back (`doubled`): a smooth ramp comes back as it was, odd sizes included."""
    rows, columns = np.mgrid[:31, :33].astype(np.float32)
    ramp = 0.02 * rows + 0.01 * columns
    halved = anomaly.halved(ramp)
    assert halved.shape == (16, 17)
    assert np.isclose(halved[0, 0], ramp[:2, :2].mean()) and np.isclose(halved[-1, -1], ramp[30, 32])
    back = anomaly.doubled(halved, ramp.shape)
    assert back.shape == ramp.shape
    np.testing.assert_allclose(back[1:-2, 1:-2], ramp[1:-2, 1:-2], atol=1e-5)  # inside: linear is exact
    image = textured_head(size=33)[:31]
    expected = anomaly.healthy_estimate(image, np.stack([0.5 * image + 0.1]), [1.0])
    assert expected.shape == image.shape
    inside = image > 0.1
    candidate_error = np.abs(0.5 * image + 0.1 - image)[inside].mean()
    assert np.abs(expected - image)[inside].mean() < 0.2 * candidate_error  # its contrast and offset: found


def test_candidate_weights_hold_the_mirror_image_to_its_weight_and_share_the_rest():
    np.testing.assert_allclose(anomaly.candidate_weights(1), [1.0])
    weights = anomaly.candidate_weights(6)
    assert weights[0] == anomaly.MIRROR_WEIGHT and np.allclose(weights[1:], (1 - anomaly.MIRROR_WEIGHT) / 5)
    assert np.isclose(weights.sum(), 1)


def test_the_side_share_favours_the_place_the_likelihood_map_marks_over_its_mirror_place():
    """An asymmetry marks a lesion and its healthy mirror place alike; the likelihood map's
    share of the two tells them apart: near 1 where only the lesion's side is unlikely,
    near 0 at its mirror place, a half where both sides are alike."""
    maps = np.full((1, 64, 64), 0.5, np.float32)
    maps[0, 20:28, 8:16] = 3.0  # the lesion's side; its mirror place is columns 48-55
    share = anomaly.side_share(maps, [(0.0, 0.0, False)])
    assert share[0, 20:28, 8:16].min() > 0.8
    assert share[0, 20:28, 48:56].max() < 0.2
    np.testing.assert_allclose(share[0, 40:, :], 0.5, atol=1e-2)
    np.testing.assert_allclose(share + share[:, :, ::-1], 1, atol=1e-2)  # a place and its mirror place share it
    turned = anomaly.side_share(maps, [anomaly.mirror_transform(symmetric_slice())])
    assert turned.shape == maps.shape and np.all((turned >= 0) & (turned <= 1))


def head_at(box, size=64, seed=0):
    """A synthetic head (`phantom`) stretched onto the (top, bottom, left, right) `box` of a
    `size` x `size` frame."""
    image = phantom(size, seed).astype(np.float32)
    return anomaly.fit_to_box(image, anomaly.head_box(image), np.array(box, np.float32), image.shape)


def test_a_head_box_ignores_background_noise_and_fit_to_box_moves_one_head_onto_anothers():
    image = head_at((10, 50, 14, 46))
    noisy = image.copy()
    noisy[2, 60] = 0.9  # a stray bright pixel outside the head
    np.testing.assert_allclose(anomaly.head_box(noisy), (10, 50, 14, 46), atol=1.5)
    assert tuple(anomaly.head_box(np.zeros((8, 6)))) == (0, 7, 0, 5)  # no head: the whole slice
    other = head_at((4, 60, 8, 40))
    moved = anomaly.fit_to_box(other, anomaly.head_box(other), anomaly.head_box(image), image.shape)
    np.testing.assert_allclose(anomaly.head_box(moved), anomaly.head_box(image), atol=1.5)
    assert np.abs(moved - image).mean() < 0.3 * np.abs(other - image).mean()


def grid_atlas(images):
    """An `Atlas` of (N, H, W) healthy slices, each "encoded" as a grid holding its index."""
    grids = np.repeat(np.arange(len(images)), 4).reshape(len(images), 2, 2)
    return anomaly.Atlas.from_grids(lambda g: images[g[:, 0, 0], ..., None], grids)


def test_the_atlas_finds_the_healthy_heads_most_like_a_slice_and_lays_them_on_it():
    healthy = np.stack([head_at((8, 56, 12, 52), seed=seed) for seed in range(6)]
                       + [np.zeros((64, 64), np.float32)] * 2)  # two blank "slices" that must never be chosen
    atlas = grid_atlas(healthy)
    assert atlas.boxes.shape == (16, 4) and atlas.features.shape == (16, anomaly.ATLAS_GRID ** 2)
    query = head_at((4, 60, 18, 46), seed=3)  # slice 3's head, elsewhere and of another shape
    references = atlas.references(query)
    assert references.shape == (anomaly.ATLAS_NEIGHBOURS, 64, 64)
    inside = query > anomaly.FOREGROUND
    assert np.abs(references[0] - query)[inside].mean() < 0.05  # slice 3 (or its mirror image), laid on it
    assert all(reference[inside].mean() > 0.5 * query[inside].mean() for reference in references)  # none blank
    assert atlas.references(np.zeros((64, 64), np.float32)).shape == (0, 64, 64)  # no head, nothing to compare


def test_the_atlas_deviation_marks_a_blob_the_healthy_heads_lack():
    healthy = np.stack([head_at((8, 56, 12, 52), seed=seed) for seed in range(6)])
    query = head_at((8, 56, 12, 52), seed=7)
    blob = np.zeros_like(query, bool)
    blob[24:30, 22:28] = True
    sick = query.copy()
    sick[blob] = 1.0
    found = grid_atlas(healthy).deviation(np.stack([query, sick, np.zeros_like(query)]))
    assert found[1][blob].mean() > found[0][blob].mean() + 0.1
    far = (query > anomaly.FOREGROUND) & ~ndimage.binary_dilation(blob, iterations=8)
    assert found[1][blob].mean() > 3 * found[1][far].mean()
    np.testing.assert_array_equal(found[2], 0)  # a blank slice


def test_run_atlas_is_kept_and_made_again_for_other_training_grids(tmp_path):
    model = vqvae.VQVAE(num_embeddings=8, latent_dim=4, filters=(8,), num_res_blocks=1)
    model(np.zeros((1, 16, 16, 1), np.float32))
    run = str(tmp_path)
    with pytest.raises(data.DataError, match="codes.npz"):
        anomaly.run_atlas(run, model)
    np.savez(os.path.join(run, "codes.npz"), train=np.zeros((3, 8, 8), np.int32))
    first = anomaly.run_atlas(run, model)
    assert first.boxes.shape == (6, 4) and os.path.exists(os.path.join(run, "anomaly_atlas.npz"))
    again = anomaly.run_atlas(run, model)
    np.testing.assert_array_equal(again.features, first.features)
    np.savez(os.path.join(run, "codes.npz"), train=np.ones((3, 8, 8), np.int32))  # as many grids, other codes
    other = anomaly.run_atlas(run, model)
    assert not np.array_equal(other.features, first.features)
    np.savez(os.path.join(run, "codes.npz"), train=np.zeros((5, 8, 8), np.int32))
    assert anomaly.run_atlas(run, model).boxes.shape == (10, 4)
    np.savez(os.path.join(run, "codes.npz"), validate=np.zeros((5, 8, 8), np.int32))
    with pytest.raises(data.DataError, match="no training code grids"):
        anomaly.run_atlas(run, model)


def test_a_lesion_scores_higher_inside_it_than_the_same_slice_without_it():
    """A small VQ-VAE and prior trained on healthy synthetic slices: a bright blob added to
    a slice raises its map inside the blob, and its score. The blob is 3 px of 32, as wide as
    a lesion of radius 12 px at 256 (the benchmark's are 3-15 px): the asymmetry map's fit
    window (`FIT_WINDOW`) is wider than a lesion, not than a sixth of the slice."""
    keras.utils.set_random_seed(0)
    healthy = np.stack([phantom(32, seed) for seed in range(48)])[..., None].astype(np.float32)
    model = vqvae.VQVAE(num_embeddings=16, latent_dim=4, filters=(8, 16), num_res_blocks=1)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(tf.data.Dataset.from_tensor_slices(healthy + model.shift).batch(8), epochs=15, verbose=0)
    codes = model.encode(healthy + model.shift).numpy()
    prior = pixelcnn.PixelCNN(16, "gated", filters=16, num_layers=3)
    prior.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    prior.fit(codes, codes, batch_size=16, epochs=30, verbose=0)

    clean = phantom(32, 100)[..., None].astype(np.float32)
    lesion = np.zeros((32, 32), bool)
    lesion[12:15, 12:15] = True
    sick = clean.copy()
    sick[lesion] = 1.0
    healthy = anomaly.reference(prior, codes, quantile=0.98)
    atlas = anomaly.Atlas.from_grids(model.decode_images, codes)
    for kind, kept in [(kind, None) for kind in anomaly.MAPS] + [("asymmetry", atlas)]:
        found = anomaly.anomaly_maps(model, anomaly.Healer(prior, 8, 8, 8), np.stack([clean, sick]), healthy,
                                     draws=4, kind=kind, atlas=kept)
        maps = found["maps"]
        assert maps[1][lesion].mean() > 2 * maps[0][lesion].mean(), kind
        assert found["scores"][1] > found["scores"][0], kind
