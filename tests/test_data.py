"""data.py: layouts, NIfTI shapes, normalisation, splitting, the demo data."""

import os

import nibabel
import numpy as np
import pytest
from conftest import phantom, write_nifti, write_png
from nibabel.testing import data_path as NIBABEL_DATA

import cache
import data
import demo


def batches(dataset):
    return np.concatenate([batch.numpy() for batch in dataset])


# ---------------------------------------------------------------------------
# Names and splits


@pytest.mark.parametrize("name, expected", [
    ("case_014_slice_3.nii.png", "case_014"),
    ("case_002_week_0_slice_17.nii.gz", "case_002"),
    ("Subj12_T1.nii.gz", "Subj12_T1"),
    ("brain_slice_4.png", "brain"),
    ("brain_slice_4.nii.png", "brain"),
    ("scan.nii", "scan"),
])
def test_case_id(name, expected):
    assert data.case_id(os.path.join("some", "folder", name)) == expected


def test_split_by_case_keeps_cases_together_and_is_repeatable():
    files = [f"case_{c:03d}_slice_{s}.png" for c in range(20) for s in range(5)]
    splits = data.split_by_case(files, seed=3)
    cases = {split: {data.case_id(f) for f in fs} for split, fs in splits.items()}
    assert not cases["train"] & cases["validate"]
    assert not cases["train"] & cases["test"]
    assert not cases["validate"] & cases["test"]
    assert sum(len(fs) for fs in splits.values()) == len(files)
    assert [len(cases[s]) for s in data.SPLITS] == [16, 2, 2]
    assert data.split_by_case(files, seed=3) == splits
    assert data.split_by_case(files, seed=4) != splits


def test_split_by_case_needs_three_cases():
    with pytest.raises(data.DataError, match="at least 3 cases"):
        data.split_by_case(["case_001_slice_0.png", "case_002_slice_0.png"], seed=0)


# ---------------------------------------------------------------------------
# Intensities


def test_normalize_clips_percentiles_to_unit_range():
    array = np.arange(1000, dtype=np.float32)
    array[0], array[-1] = -1e6, 1e6  # outliers must not squash the range
    out = data.normalize_intensity(array)
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.45 < out[500] < 0.55


def test_normalize_replaces_nan_and_inf_and_handles_constant():
    array = np.array([[np.nan, np.inf], [-np.inf, 5.0]])
    out = data.normalize_intensity(array)
    assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 1
    assert np.all(data.normalize_intensity(np.full((4, 4), 7.0)) == 0)
    assert np.all(data.normalize_intensity(np.full((4, 4), np.nan)) == 0)


# ---------------------------------------------------------------------------
# NIfTI shapes


@pytest.mark.parametrize("shape, n_slices", [
    ((20, 16), 1),          # a 2D slice
    ((20, 16, 1), 1),       # a slice with a stray singleton axis, as in HipMRI
    ((20, 16, 5), 5),       # a 3D volume, cut along the last axis
    ((20, 16, 5, 3), 5),    # a 4D series: the first volume
])
def test_nifti_slices_shapes(tmp_path, shape, n_slices):
    path = str(tmp_path / "x.nii.gz")
    write_nifti(path, np.random.default_rng(0).uniform(0, 1000, shape).astype(np.float32))
    slices = data.nifti_slices(path)
    assert len(slices) == n_slices
    assert all(s.shape == (20, 16) and s.dtype == np.float32 for s in slices)
    assert min(s.min() for s in slices) >= 0 and max(s.max() for s in slices) <= 1
    assert data.nifti_shape(path) == (20, 16)


def test_nifti_slices_axis_and_volume_index(tmp_path):
    path = str(tmp_path / "x.nii")
    series = np.zeros((6, 8, 4, 2), np.float32)
    series[..., 1] = np.arange(6)[:, None, None]
    write_nifti(path, series)
    assert len(data.nifti_slices(path, slice_axis=0, volume_index=1)) == 6
    assert data.nifti_slices(path, slice_axis=0, volume_index=1)[0].shape == (8, 4)
    assert np.all(data.nifti_slices(path, volume_index=0)[0] == 0)  # constant volume -> zeros
    with pytest.raises(data.DataError, match="no volume 5"):
        data.nifti_slices(path, volume_index=5)


def test_nibabel_bundled_real_files():
    anatomical = data.nifti_slices(os.path.join(NIBABEL_DATA, "anatomical.nii"))  # big-endian int16 T1
    assert len(anatomical) == 25 and anatomical[0].shape == (33, 41)
    assert max(s.max() for s in anatomical) == 1.0
    series = data.nifti_slices(os.path.join(NIBABEL_DATA, "example4d.nii.gz"))
    assert len(series) == 24 and series[0].shape == (128, 96)
    # resampled_anat_moved.nii: big-endian float32 with 153 of its 1071 voxels NaN.
    path = os.path.join(NIBABEL_DATA, "resampled_anat_moved.nii")
    raw = np.asanyarray(nibabel.load(path).dataobj)
    assert np.isnan(raw).sum() == 153
    partly_nan = data.nifti_slices(path)
    assert len(partly_nan) == 3 and all(np.isfinite(s).all() and s.min() >= 0 and s.max() <= 1 for s in partly_nan)
    assert np.all(np.stack(partly_nan, axis=-1)[np.isnan(raw)] == 0)


def test_broken_nifti_names_the_file(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti file")
    with pytest.raises(data.DataError, match="broken.nii.gz"):
        data.nifti_slices(str(path))


# ---------------------------------------------------------------------------
# Layouts and datasets


def test_oasis_layout(oasis_root):
    source = data.find_source(oasis_root)
    assert source.layout == "oasis"
    assert [len(source.files[s]) for s in data.SPLITS] == [16, 8, 8]
    assert all("seg" not in f for fs in source.files.values() for f in fs)
    assert data.default_image_size(source, 4) == (32, 32)
    images = batches(cache.split_dataset(source, "test", (32, 32), batch_size=3, shift=-0.5))
    assert images.shape == (8, 32, 32, 1) and images.dtype == np.float32
    assert images.min() >= -0.5 and images.max() <= 0.5
    # The PNG pipeline reproduces the written pixels (scaled by 1/255).
    expected = np.round(phantom(32, hash(("test", 0)) % 1000) * 255) / 255 - 0.5
    assert np.abs(images - expected[None, ..., None]).min(axis=(1, 2, 3)).max() < 1e-6


def test_hipmri_layout_mixed_shapes(hipmri_root):
    source = data.find_source(hipmri_root)
    assert source.layout == "hipmri"
    size = data.default_image_size(source, 4)
    assert size == (40, 32)
    images = batches(cache.split_dataset(source, "train", size, batch_size=4, shift=0.0))
    assert images.shape == (6, 40, 32, 1)
    assert images.min() >= 0 and images.max() <= 1
    # The narrower 40x24 slices are centred with zero padding on both sides.
    narrow = images[1, :, :, 0]
    assert np.all(narrow[:, :4] == 0) and np.all(narrow[:, -4:] == 0) and narrow[:, 4:-4].max() > 0


def test_hipmri_shuffled_split_is_a_permutation(hipmri_root):
    source = data.find_source(hipmri_root)
    plain = batches(cache.split_dataset(source, "train", (40, 32), 4))
    shuffled = batches(cache.split_dataset(source, "train", (40, 32), 4, shuffle=True, seed=1))
    assert sorted(plain.sum(axis=(1, 2, 3)).round(3)) == sorted(shuffled.sum(axis=(1, 2, 3)).round(3))


def test_flat_nifti_volumes_split_by_subject(tmp_path):
    rng = np.random.default_rng(0)
    for subject in range(1, 7):
        write_nifti(str(tmp_path / "vols" / f"Subj{subject}_T1.nii.gz"), rng.uniform(0, 2800, (12, 10, 8)))
    source = data.find_source(str(tmp_path / "vols"), seed=0)
    assert source.layout == "flat-nifti"
    assert sorted(len(v) for v in source.files.values()) == [1, 1, 4]
    images = batches(cache.split_dataset(source, "test", (12, 12), batch_size=5))
    assert images.shape == (8, 12, 12, 1)


def test_flat_png_folder(tmp_path):
    for case in range(5):
        for s in range(2):
            write_png(str(tmp_path / "flat" / f"case_{case:03d}_slice_{s}.png"), phantom(16, case * 10 + s))
    source = data.find_source(str(tmp_path / "flat"), seed=0)
    assert source.layout == "flat-png"
    images = batches(cache.split_dataset(source, "train", (16, 16), batch_size=4))
    assert images.shape == (len(source.files["train"]), 16, 16, 1)


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "no such folder"),
    (lambda root: os.makedirs(root), "no images found"),
    (lambda root: [os.makedirs(os.path.join(root, d)) for d in ("keras_png_slices_train", "keras_png_slices_test")],
     "missing keras_png_slices_validate"),
    (lambda root: [os.makedirs(os.path.join(root, d)) for d in data.HIPMRI_DIRS.values()],
     "no .nii/.nii.gz files"),
])
def test_bad_data_folders(tmp_path, make, message):
    root = str(tmp_path / "data")
    make(root)
    with pytest.raises(data.DataError, match=message):
        data.find_source(root)


# ---------------------------------------------------------------------------
# The demo dataset


def test_demo_dataset_is_deterministic_and_plausible(tmp_path):
    a = demo.synthetic_brain_slice(64, np.random.default_rng(7))
    b = demo.synthetic_brain_slice(64, np.random.default_rng(7))
    c = demo.synthetic_brain_slice(64, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == (64, 64) and a.min() >= 0 and a.max() <= 1
    assert a[0, 0] < 0.05 and a[32, 10:54].mean() > 0.2  # dark background, tissue in the middle

    root = demo.write_demo_dataset(str(tmp_path / "demo"), size=32, counts=(8, 4, 4), slices_per_case=4)
    source = data.find_source(root)
    assert [len(source.files[s]) for s in data.SPLITS] == [8, 4, 4]
    cases = [{data.case_id(f) for f in source.files[s]} for s in data.SPLITS]
    assert not (cases[0] & cases[1] or cases[0] & cases[2] or cases[1] & cases[2])
    stamp = os.path.getmtime(os.path.join(root, data.OASIS_DIRS["train"], os.listdir(
        os.path.join(root, data.OASIS_DIRS["train"]))[0]))
    demo.write_demo_dataset(root, size=32, counts=(8, 4, 4), slices_per_case=4)  # reused, not rewritten
    assert os.path.getmtime(os.path.join(root, data.OASIS_DIRS["train"], os.listdir(
        os.path.join(root, data.OASIS_DIRS["train"]))[0])) == stamp


def test_real_nifti_written_by_nibabel_big_endian(tmp_path):
    """A big-endian int16 file, as the bundled anatomical.nii is, read through the pipeline."""
    image = nibabel.load(os.path.join(NIBABEL_DATA, "anatomical.nii"))
    assert image.get_data_dtype().byteorder == ">"
    folder = tmp_path / "anat"
    folder.mkdir()
    for i in range(3):
        nibabel.save(image, str(folder / f"case_{i:03d}_anat.nii"))
    source = data.find_source(str(folder))
    images = batches(cache.split_dataset(source, "test", (36, 44), batch_size=8))
    assert images.shape == (25, 36, 44, 1) and np.isfinite(images).all()


# ---------------------------------------------------------------------------
# The slice cache


def test_cache_is_reused_and_follows_file_changes(oasis_root, tmp_path):
    source = data.find_source(oasis_root)
    cache_dir = str(tmp_path / "cache")
    first = cache.cache_split(source, "test", (32, 32), cache_dir, verbose=False)
    stamp = os.path.getmtime(first["shards"][0])
    again = cache.cache_split(source, "test", (32, 32), cache_dir, verbose=False)
    assert again == first and os.path.getmtime(again["shards"][0]) == stamp  # read back, not rewritten
    assert cache.cache_split(source, "test", (16, 16), cache_dir, verbose=False)["shards"] != first["shards"]
    changed = source.files["test"][0]
    write_png(changed, np.zeros((32, 32)))
    os.utime(changed, ns=(1, 1))
    rewritten = cache.cache_split(source, "test", (32, 32), cache_dir, verbose=False)
    assert rewritten["shards"] != first["shards"]
    images = batches(cache.cached_dataset(rewritten, 8))
    assert np.all(images[0] == 0)  # the new content of the changed file


def test_cache_spreads_a_split_over_shards_and_reshuffles_each_epoch(oasis_root, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "SHARD_BYTES", 3 * 32 * 32 * 2)  # 3 slices per shard
    source = data.find_source(oasis_root)
    manifest = cache.cache_split(source, "train", (32, 32), str(tmp_path / "cache"), verbose=False)
    assert manifest["slices"] == 16 and len(manifest["shards"]) == 6
    assert not [name for name in os.listdir(os.path.dirname(manifest["shards"][0])) if name.startswith(".")]
    dataset = cache.cached_dataset(manifest, 4, shuffle=True, seed=0)
    assert dataset.cardinality() == 4  # known in advance, so progress bars have a total
    epochs = [batches(dataset).sum(axis=(1, 2, 3)) for _ in range(2)]
    in_order = batches(cache.cached_dataset(manifest, 4)).sum(axis=(1, 2, 3))
    assert sorted(epochs[0]) == pytest.approx(sorted(in_order)) and sorted(epochs[1]) == pytest.approx(sorted(in_order))
    assert not np.allclose(epochs[0], epochs[1]) and not np.allclose(epochs[0], in_order)


def test_nifti_cache_matches_direct_decoding(hipmri_root, tmp_path):
    source = data.find_source(hipmri_root)
    cached = batches(cache.split_dataset(source, "train", (40, 32), 8, cache_dir=str(tmp_path / "cache")))
    direct = np.stack([data.fit_to_size(data.nifti_slices(path)[0][..., None], (40, 32)).numpy()
                       for path in source.files["train"]])
    assert np.abs(cached - direct).max() < 1e-5


# ---------------------------------------------------------------------------
# Slice positions: each cached slice's level in its volume


def test_slice_positions_from_file_names():
    files = [f"/d/case_001_slice_{k}.nii.png" for k in (3, 5, 7)] + ["/d/case_002_slice_4.nii.png",
                                                                      "/d/case_003_week_0_slice_10.nii.gz",
                                                                      "/d/case_003_week_0_slice_20.nii.gz",
                                                                      "/d/scan.png"]
    positions = data.slice_positions(files)
    assert [positions[f] for f in files[:3]] == [0.0, 0.5, 1.0]
    assert positions["/d/case_003_week_0_slice_20.nii.gz"] == 1.0
    # A case with one numbered slice, and a name with no slice number: unknown.
    assert "/d/case_002_slice_4.nii.png" not in positions and "/d/scan.png" not in positions


@pytest.mark.parametrize("slices_per_shard", [8, 2])
def test_cache_keeps_each_slice_position_in_step_with_its_pixels(tmp_path, monkeypatch, slices_per_shard):
    """OASIS layout with an unreadable file among them: the positions of the slices that
    remain still belong to them (the brightness of each slice encodes its number), also when
    the split spans several shards: an unshuffled read gives the slices in cache order, the
    order of the positions (reading the shards interleaved once paired the training grids with
    other slices' positions)."""
    monkeypatch.setattr(cache, "SHARD_BYTES", slices_per_shard * 8 * 8 * 2)
    root = tmp_path / "oasis"
    for split in data.SPLITS:
        for k in range(5):
            write_png(str(root / data.OASIS_DIRS[split] / f"case_001_slice_{k}.nii.png"),
                      np.full((8, 8), 40 * (k + 1) / 255.0))
    (root / data.OASIS_DIRS["train"] / "case_001_slice_2.nii.png").write_bytes(b"not a png")
    source = data.find_source(str(root))
    manifest = cache.cache_split(source, "train", (8, 8), str(tmp_path / "cache"), verbose=False)
    images = batches(cache.cached_dataset(manifest, 8))
    numbers = np.round(images[:, 0, 0, 0] * 255 / 40).astype(int) - 1
    np.testing.assert_array_equal(numbers, [0, 1, 3, 4])
    np.testing.assert_allclose(manifest["positions"], numbers / 4)


def test_cache_positions_of_volumes_slices_and_unnumbered_files(hipmri_root, tmp_path):
    vols = tmp_path / "vols"
    for subject in range(1, 4):
        write_nifti(str(vols / f"Subj{subject}_T1.nii.gz"), np.random.default_rng(subject).uniform(0, 9, (6, 6, 5)))
    source = data.find_source(str(vols))
    manifest = cache.cache_split(source, "train", (6, 6), str(tmp_path / "cache"), verbose=False)
    assert sorted(manifest["positions"]) == [0.0, 0.25, 0.5, 0.75, 1.0] * (manifest["slices"] // 5)
    # HipMRI-like slices: one numbered slice per case, so the level is unknown.
    manifest = cache.cache_split(data.find_source(hipmri_root), "test", (40, 32), str(tmp_path / "cache2"),
                                 verbose=False)
    assert manifest["positions"] == [data.UNKNOWN_POSITION] * 3
