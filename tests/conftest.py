"""Shared fixtures: small datasets written to tmp_path in each supported layout."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nibabel  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import data  # noqa: E402
import demo  # noqa: E402


def write_png(path, array):
    """Write a [0, 1] float array as an 8-bit grayscale PNG."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)[..., None]
    tf.io.write_file(path, tf.io.encode_png(pixels))


def write_nifti(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(np.asarray(array), np.eye(4)), path)


def run_error(argv):
    """Run driver.py with `argv`, which must fail with one line naming the problem; return it."""
    import driver

    with pytest.raises(SystemExit) as exit_info:
        driver.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("driver.py: error: ") and "\n" not in message
    return message


def phantom(size, seed):
    return demo.synthetic_brain_slice(size, np.random.default_rng(seed))


@pytest.fixture
def oasis_root(tmp_path):
    """OASIS layout: 32x32 PNG slices, 4 cases of 4 slices in train, 2 cases in each other split,
    plus a segmentation folder that must be ignored."""
    root = tmp_path / "oasis"
    counts = {"train": 16, "validate": 8, "test": 8}
    for split, count in counts.items():
        for i in range(count):
            name = f"case_{split[:2]}{i // 4}_slice_{i % 4}.nii.png"
            write_png(str(root / data.OASIS_DIRS[split] / name), phantom(32, hash((split, i)) % 1000))
    write_png(str(root / "keras_png_slices_seg_train" / "case_x_slice_0.nii.png"), np.ones((32, 32)))
    return str(root)


@pytest.fixture
def hipmri_root(tmp_path):
    """HipMRI layout: int16 NIfTI slices of mixed shapes (40x24 and 40x32), some with a
    trailing singleton axis, raw intensities in the hundreds."""
    root = tmp_path / "hipmri"
    rng = np.random.default_rng(0)
    for split, count in {"train": 6, "validate": 3, "test": 3}.items():
        for i in range(count):
            width = 24 if i % 2 else 32
            image = (rng.uniform(0, 900, (40, width))).astype(np.int16)
            if i % 3 == 0:
                image = image[..., None]
            write_nifti(str(root / data.HIPMRI_DIRS[split] / f"case_{i:03d}_week_0_slice_{i}.nii.gz"), image)
    return str(root)
