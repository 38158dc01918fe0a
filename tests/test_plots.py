"""plots.py: the figures (and data.py's atomic writes, which every figure goes through)."""

import json
import os

import matplotlib.image
import numpy as np
import pytest

import files
import plots


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "metrics.json")
    files.write_json(path, {"ssim": 0.9})

    def broken(temporary):
        with open(temporary, "w") as f:
            f.write('{"ssim": 0.')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        files.atomic_write(path, broken)
    assert json.load(open(path)) == {"ssim": 0.9}
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~files.UMASK  # not mkstemp's owner-only 0600


def test_atomic_write_keeps_multi_part_suffixes(tmp_path):
    seen = []
    files.atomic_write(str(tmp_path / "x.nii.gz"), lambda temporary: seen.append(temporary) or open(temporary, "w"))
    assert seen[0].endswith(".nii.gz") and os.path.exists(tmp_path / "x.nii.gz")


def test_reconstruction_grid_and_code_map(tmp_path):
    rng = np.random.default_rng(0)
    originals = rng.uniform(0, 1, (16, 32, 16, 1))
    path = str(tmp_path / "grid.png")
    plots.reconstruction_grid(originals, originals * 0.9, path, ssims=np.full(16, 0.5), cmap="magma")
    image = matplotlib.image.imread(path)
    assert min(image.shape[:2]) > 100 and image.shape[2] in (3, 4)
    plots.code_map_figure(originals[:3], rng.integers(0, 8, (3, 8, 4)), 8, str(tmp_path / "codes.png"))
    assert os.path.getsize(tmp_path / "codes.png") > 1000


def test_training_plots_are_rewritten_each_epoch(tmp_path):
    callback = plots.TrainingPlots(str(tmp_path))
    for epoch, loss in enumerate([0.5, 0.2, 0.1]):
        callback.on_epoch_end(epoch, {"loss": loss, "val_loss": loss * 1.1, "ssim": 1 - loss, "val_ssim": 0.9 - loss})
    assert callback.history["val_ssim"] == pytest.approx([0.4, 0.7, 0.8])
    assert os.path.exists(tmp_path / "loss.png") and os.path.exists(tmp_path / "ssim.png")
