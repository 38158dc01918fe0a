"""Faults a long run meets: bad files in the data, a kill mid-run, a NaN loss, and repeatability.

What happens to each kind of bad input, and why:
* a file that cannot be used (truncated, corrupt, not an image, unreadable, a dangling
  link, all NaN, a zero-size axis) is skipped, named with its reason in the log and counted:
  one bad file among thousands should not end a run;
* a folder that cannot be used (missing, empty, a missing split folder, a split whose files
  are all bad) and any nonsense flag stop the run before training starts.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import nibabel
import numpy as np
import pytest
import tensorflow as tf

import cache
import data
import driver
import train as stages
from conftest import phantom, write_nifti, write_png

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--K", "8", "--D", "4", "--filters", "4", "8", "--res-blocks", "1", "--batch-size", "4",
        "--learning-rate", "3e-3", "--pcnn-filters", "8", "--pcnn-layers", "2", "--samples", "2",
        "--grid-every", "0", "--pcnn-variant", "gated"]


# ---------------------------------------------------------------------------
# Bad files are skipped, each named with its reason


def make_bad_png_files(folder):
    """One of each kind of unusable PNG, beside good ones; returns {name: expected reason}."""
    good = tf.io.encode_png(np.full((32, 32, 1), 100, np.uint8)).numpy()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    os.symlink(str(folder / "deleted.png"), str(folder / "dangling.png"))
    (folder / "notes.txt").write_text("a stray file without an image suffix")
    return {"truncated.png": "Invalid PNG data", "empty.png": "Input is empty",
            "text.png": "Unknown image file format", "dangling.png": "No such file or directory"}


def oasis_with_bad_files(tmp_path):
    root = tmp_path / "oasis"
    for split, count in {"train": 8, "validate": 4, "test": 4}.items():
        for i in range(count):
            write_png(str(root / data.OASIS_DIRS[split] / f"case_{i // 4}_slice_{i % 4}.png"), phantom(32, i))
    expected = make_bad_png_files(root / data.OASIS_DIRS["train"])
    return str(root), expected


def test_bad_png_files_are_skipped_and_named(tmp_path):
    root, expected = oasis_with_bad_files(tmp_path)
    source = data.find_source(root)
    assert [os.path.basename(f) for f in source.ignored] == ["notes.txt"]
    manifest = cache.cache_split(source, "train", (32, 32), str(tmp_path / "cache"), verbose=False)
    assert manifest["slices"] == 8 and manifest["files"] == 12
    reasons = {os.path.basename(path): reason for path, reason in manifest["skipped"]}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reason in reasons[name], (name, reasons[name])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a file with no read permission")
def test_unreadable_png_is_skipped(tmp_path):
    folder = tmp_path / "flat"
    for case in range(3):
        write_png(str(folder / f"case_{case:03d}_slice_0.png"), phantom(16, case))
    locked = folder / "case_000_slice_1.png"
    write_png(str(locked), phantom(16, 9))
    locked.chmod(0)
    source = data.find_source(str(folder))
    split = next(s for s in data.SPLITS if str(locked) in source.files[s])
    manifest = cache.cache_split(source, split, (16, 16), str(tmp_path / "cache"), verbose=False)
    assert [path for path, _ in manifest["skipped"]] == [str(locked)]


def test_bad_nifti_files_are_skipped_and_named(tmp_path):
    folder = tmp_path / "hipmri" / data.HIPMRI_DIRS["train"]
    write_nifti(str(folder / "good_a.nii.gz"), np.random.default_rng(0).uniform(0, 900, (20, 16)).astype(np.int16))
    write_nifti(str(folder / "good_b.nii"), np.random.default_rng(1).uniform(0, 900, (20, 16)).astype(np.int16))
    write_nifti(str(folder / "all_nan.nii.gz"), np.full((20, 16, 3), np.nan, np.float32))
    write_nifti(str(folder / "zero_size.nii.gz"), np.zeros((0, 16), np.float32))
    whole = (folder / "good_b.nii").read_bytes()
    (folder / "truncated.nii").write_bytes(whole[:-100])
    (folder / "garbage.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    os.symlink(str(folder / "gone.nii"), str(folder / "dangling.nii"))
    for split in ("validate", "test"):
        write_nifti(str(tmp_path / "hipmri" / data.HIPMRI_DIRS[split] / "x.nii.gz"), np.ones((20, 16), np.float32))
    source = data.find_source(str(tmp_path / "hipmri"))
    assert data.default_image_size(source, 4) == (20, 16)  # broken headers do not stop the size guess
    manifest = cache.cache_split(source, "train", (20, 16), str(tmp_path / "cache"), verbose=False)
    assert manifest["slices"] == 2
    reasons = {os.path.basename(path): reason for path, reason in manifest["skipped"]}
    assert set(reasons) == {"all_nan.nii.gz", "zero_size.nii.gz", "truncated.nii", "garbage.nii.gz", "dangling.nii"}
    assert "no finite values" in reasons["all_nan.nii.gz"]
    assert "zero-size axis" in reasons["zero_size.nii.gz"]
    assert all("\n" not in reason for reason in reasons.values())


def test_split_with_only_bad_files_stops_before_training(tmp_path):
    root = tmp_path / "oasis"
    for split in ("validate", "test"):
        write_png(str(root / data.OASIS_DIRS[split] / "case_0_slice_0.png"), phantom(16, 0))
    (root / data.OASIS_DIRS["train"]).mkdir(parents=True)
    (root / data.OASIS_DIRS["train"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(SystemExit) as exit_info:
        driver.main(["--data", str(root), "--out", str(tmp_path / "run"), "--image-size", "16", *TINY])
    message = str(exit_info.value.code)
    assert "no usable slices in the train split" in message and "broken.png" in message
    assert not os.path.exists(tmp_path / "run" / "vqvae.keras")


@pytest.mark.parametrize("make, message", [
    (lambda root: os.makedirs(root), "no images found"),
    (lambda root: [os.makedirs(os.path.join(root, d)) for d in data.OASIS_DIRS.values()], "no PNG files"),
    (lambda root: [os.makedirs(os.path.join(root, d)) for d in ("keras_slices_train", "keras_slices_test")],
     "missing keras_slices_validate"),
])
def test_unusable_folders_stop_before_training(tmp_path, make, message):
    root = str(tmp_path / "data")
    make(root)
    with pytest.raises(SystemExit) as exit_info:
        driver.main(["--data", root, "--out", str(tmp_path / "run"), *TINY])
    assert message in str(exit_info.value.code)
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_run_on_data_with_bad_files_logs_them_and_trains(tmp_path, capsys):
    root, expected = oasis_with_bad_files(tmp_path)
    run_dir, metrics = driver.main(["--data", root, "--out", str(tmp_path / "run"), "--epochs", "1",
                                    "--pcnn-epochs", "0", *TINY])
    log = capsys.readouterr().out
    assert "skipped 4 of 12 files in the train split" in log
    assert all(name in log for name in expected)
    assert "ignored 1 file(s) that are not PNG slices: notes.txt" in log
    assert metrics["test_slices"] == 4

    summary = driver.main(["reconstruct", "--run", run_dir, "--split", "train"])  # skips them too
    log = capsys.readouterr().out
    assert summary["slices"] == 8 and all(f"{name}: " in log for name in expected)


# ---------------------------------------------------------------------------
# Nonsense flags stop with one line naming the flag


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--strategy", "cluster"], "--strategy must be 'default', 'mirrored' or 'multiworker', got 'cluster'"),
    (["--image-size", "0"], "--image-size takes HEIGHT [WIDTH] in pixels, got [0]"),
    (["--image-size", "32", "32", "32"], "--image-size takes HEIGHT [WIDTH] in pixels"),
    (["--filters", "0", "8"], "--filters must be positive channel counts"),
    (["--slice-axis", "5"], "--slice-axis must be one of 0, 1, 2"),
    (["--dead-code-steps", "-1"], "--dead-code-steps must be >= 0"),
    (["--max-minutes", "-2"], "--max-minutes must be >= 0"),
    (["--resume", "/no/such/run"], "--resume /no/such/run: no config.json there"),
    (["evaluate", "--run", "/no/such/run"], "--run /no/such/run: no config.json"),
])
def test_nonsense_flags(argv, message):
    with pytest.raises(SystemExit) as exit_info:
        driver.main(argv)
    text = str(exit_info.value.code)
    assert text.startswith("driver.py: error: ") and message in text and "\n" not in text


def test_flag_of_the_wrong_type_is_an_argparse_error():
    result = subprocess.run([sys.executable, "driver.py", "--K", "many"], cwd=PROJECT, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "argument --K: invalid int value: 'many'" in result.stderr


# ---------------------------------------------------------------------------
# A NaN loss stops training and keeps the best model


def train_tiny_vqvae(train, images, run, epochs):
    """(model, history) of a tiny VQ-VAE trained on the `train` dataset for `epochs`, validated
    on `images` in batches of 4, in the new run folder `run` (the training stage alone)."""
    splits = {"train": train, "validate": tf.data.Dataset.from_tensor_slices(images).batch(4)}
    config = driver.Config(K=8, D=4, filters=[4, 8], res_blocks=1, epochs=epochs, grid_every=0, learning_rate=3e-3)
    os.makedirs(run)
    model, history, _ = stages.train_vqvae(config, splits, run, images[:4], tf.distribute.get_strategy())
    return model, history


def test_nan_loss_keeps_the_best_model(tmp_path, capsys):
    images = np.random.default_rng(0).uniform(-0.5, 0.5, (16, 16, 16, 1)).astype(np.float32)
    epochs_started = []

    def batches():  # clean in the first epoch, NaN from the second on
        epochs_started.append(1)
        for start in range(0, len(images), 4):
            batch = images[start: start + 4]
            yield batch if len(epochs_started) == 1 else batch * np.nan

    train = tf.data.Dataset.from_generator(batches, output_signature=tf.TensorSpec((None, 16, 16, 1), tf.float32))
    run = str(tmp_path / "run")
    model, history = train_tiny_vqvae(train, images, run, epochs=5)
    log = capsys.readouterr().out
    assert "the training loss became NaN in epoch 2; training stopped, keeping the best model" in log
    assert len(history["loss"]) == 2 and np.isnan(history["loss"][1])
    assert os.path.exists(os.path.join(run, "vqvae.keras"))
    assert not os.path.exists(os.path.join(run, "vqvae_last.keras"))  # NaN weights are not saved
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_each_epoch_of_a_finite_dataset_is_one_pass_over_it(tmp_path, capsys):
    """fit_resumably repeats a dataset of known size (one iterator for the whole fit, see its
    comment) and counts each epoch as one pass over it: 10 slices in batches of 4 are 3 steps an
    epoch, the last of 2 slices, and every slice is read in every epoch."""
    images = np.random.default_rng(0).uniform(-0.5, 0.5, (10, 16, 16, 1)).astype(np.float32)
    reads = []

    def record(index):
        reads.append(int(index))
        return index

    indices = tf.data.Dataset.range(10).map(lambda i: tf.ensure_shape(tf.py_function(record, [i], tf.int64), ()))
    train = indices.map(lambda i: tf.gather(images, i)).batch(4)
    _, history = train_tiny_vqvae(train, images, str(tmp_path / "run"), epochs=3)
    log = capsys.readouterr().out
    assert len(history["loss"]) == 3 and log.count("3/3 - ") == 3
    assert sorted(reads[:30]) == sorted(list(range(10)) * 3)  # (reads past 30: the next pass, prefetched)


# ---------------------------------------------------------------------------
# --seed makes a run repeatable


def test_same_seed_same_run(oasis_root, tmp_path):
    runs = []
    for name in ("a", "b"):
        run_dir, metrics = driver.main(["--data", oasis_root, "--out", str(tmp_path / name), "--epochs", "2",
                                        "--pcnn-epochs", "1", "--seed", "3", "--cache", str(tmp_path / "cache"),
                                        *TINY])
        runs.append(run_dir)
    for name, epochs in (("history.csv", 2), ("pixelcnn_history.csv", 1)):
        histories = [list(csv.DictReader(open(os.path.join(run, name)))) for run in runs]
        assert len(histories[0]) == len(histories[1]) == epochs and histories[0][0].keys() == histories[1][0].keys()
        # Equal to float32 rounding: once, in a full-suite run, a val_loss differed in its 7th
        # digit while its terms were equal (not reproduced alone); a real difference is far larger.
        for first, second in zip(*histories):
            np.testing.assert_allclose([float(v) for v in first.values()], [float(v) for v in second.values()],
                                       rtol=1e-6, err_msg=name)
    samples = [nibabel.load(os.path.join(run, "samples", "sample_000.nii.gz")).get_fdata() for run in runs]
    assert np.array_equal(samples[0], samples[1])


# ---------------------------------------------------------------------------
# --resume continues a killed run


def wait_for_backup(process, metadata, epochs, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed:\n" + process.stdout.read()[-2000:]
        try:
            if json.loads(open(metadata).read())["epoch"] >= epochs:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError("no backup appeared")


def kill_during(stage, run, flags, before_resume=None):
    """Start a run, SIGKILL it once `stage` has backed up two epochs, check it with
    `before_resume(run)`, and resume it; returns the finished resume."""
    argv = [sys.executable, "driver.py", "--out", str(run), *flags, *TINY]
    process = subprocess.Popen(argv, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_backup(process, run / "backup" / stage / "training_metadata.json", 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if before_resume:
        before_resume(run)
    result = subprocess.run([sys.executable, "driver.py", "--resume", str(run)], cwd=PROJECT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_resume_after_kill(oasis_root, tmp_path):
    def killed_in_training(run):
        assert (run / "vqvae.keras").exists() and not (run / "metrics.json").exists()

    run = tmp_path / "run"
    result = kill_during("vqvae", run, ["--data", oasis_root, "--epochs", "6", "--pcnn-epochs", "1"],
                         killed_in_training)
    assert "resuming vqvae training after epoch" in result.stdout
    history = stages.read_history(str(run / "history.csv"))
    assert history["epoch"] == list(range(6))  # every epoch once, none lost or repeated
    metrics = json.load(open(run / "metrics.json"))
    assert metrics["epochs_run"] == 6 and "prior_test_bits_per_code" in metrics
    assert not (run / "backup" / "vqvae").exists()  # removed once training finished
    assert not [name for name in os.listdir(run) if name.startswith(".")]  # no partial files left
    assert len(os.listdir(run / "samples")) == 2 * 2 + 1

    # Resuming a finished run loads its models instead of training again.
    again = subprocess.run([sys.executable, "driver.py", "--resume", str(run)], cwd=PROJECT,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "the VQ-VAE finished before" in again.stdout and "the prior finished before" in again.stdout


# ---------------------------------------------------------------------------
# Faults in the later stages: the prior, sample, evaluate, and a full disk


def complete_files(folder):
    """The files of a folder under their real names, each checked to read back whole."""
    names = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(".png"):
            tf.io.decode_png(tf.io.read_file(path))
        elif name.endswith(".nii.gz"):
            nibabel.load(path).get_fdata()
        elif name.endswith(".json"):
            json.load(open(path))
        elif name.endswith(".html"):
            assert open(path).read().rstrip().endswith("</html>"), name
    return names


def kill_when(process, ready, timeout=300):
    """SIGKILL `process` as soon as `ready()` is true."""
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, "it ended before it could be killed:\n" + process.stdout.read()[-2000:]
        assert time.time() < deadline, "never got ready to be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_kills_during_the_prior_sample_and_evaluate(oasis_root, tmp_path):
    def killed_in_the_prior(run):
        assert (run / "pixelcnn.keras").exists()
        assert "prior_test_bits_per_code" not in json.load(open(run / "metrics.json"))

    run = tmp_path / "run"
    result = kill_during("pixelcnn", run, ["--data", oasis_root, "--epochs", "1", "--pcnn-epochs", "6"],
                         killed_in_the_prior)
    assert "the VQ-VAE finished before" in result.stdout and "resuming pixelcnn training after epoch" in result.stdout
    assert stages.read_history(str(run / "pixelcnn_history.csv"))["epoch"] == list(range(6))
    metrics = json.load(open(run / "metrics.json"))
    assert metrics["prior_test_bits_per_code"] > 0 and len(os.listdir(run / "samples")) == 2 * 2 + 1
    assert not (run / "backup").exists() and not [name for name in os.listdir(run) if name.startswith(".")]

    # A killed `sample` leaves only whole files under their real names, and runs again cleanly.
    out = tmp_path / "samples"
    command = [sys.executable, "driver.py", "sample", "--run", str(run), "--n", "10", "--batch-size", "1",
               "--out", str(out)]
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_when(process, lambda: out.exists() and any(name.endswith(".nii.gz") for name in os.listdir(out)))
    assert len(complete_files(out)) < 2 * 10 + 1
    again = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(complete_files(out)) == 2 * 10 + 1

    # A killed `evaluate` leaves metrics.json as it was, and runs again cleanly (without
    # samples: test_driver.py's evaluate scores them).
    before = json.load(open(run / "metrics.json"))
    command = [sys.executable, "driver.py", "evaluate", "--run", str(run), "--samples", "0", "--batch-size", "4"]
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill_when(process, lambda: (run / "evaluation").exists())
    assert json.load(open(run / "metrics.json")) == before
    complete_files(run)
    complete_files(run / "evaluation")
    again = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "test_ms_ssim_mean" in json.load(open(run / "metrics.json")) and "report.html" in complete_files(run)


def test_full_disk_while_saving_a_model_ends_with_one_line(oasis_root, tmp_path, monkeypatch):
    import errno

    import keras

    real_save, saves = keras.Model.save, []

    def save_until_the_disk_is_full(model, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 1:
            return real_save(model, path, *args, **kwargs)
        with open(path, "wb") as f:  # half a file, then the disk is full
            f.write(b"PK\x03\x04 half a model")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(keras.Model, "save", save_until_the_disk_is_full)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        driver.main(["--data", oasis_root, "--out", str(run), "--epochs", "6", "--pcnn-epochs", "0", *TINY])
    message = str(exit_info.value.code)
    assert message.startswith("driver.py: error: cannot write ") and "No space left on device" in message
    assert "\n" not in message and len(saves) == 2
    monkeypatch.undo()
    model = keras.models.load_model(str(run / "vqvae.keras"))  # the model saved before is intact
    assert model.num_embeddings == 8
    assert not [name for name in os.listdir(run) if name.startswith(".")]  # no partial file left
