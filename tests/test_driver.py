"""driver.py: flag checking, a tiny end-to-end run, and the reconstruct command."""

import csv
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys

import keras
import nibabel
import numpy as np
import pytest
import tensorflow as tf
from conftest import run_error

import cpu
import driver

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The flat gated prior (its own files and logs are checked here); the hierarchical default has
# its own test below.
TINY = ["--K", "8", "--D", "4", "--filters", "4", "8", "--res-blocks", "1", "--batch-size", "4",
        "--learning-rate", "3e-3", "--pcnn-epochs", "2", "--pcnn-filters", "8", "--pcnn-layers", "2",
        "--samples", "3", "--pcnn-variant", "gated"]


# What TensorFlow's C++ logging looks like; none of it may reach a user's terminal.
TENSORFLOW_NOISE = ("E0000", "W0000", "I0000", "NodeDef mentions", "tfg_optimizer", "remapper", "oneDNN",
                    "All log messages before absl")


def summaries(folder):
    """{tag: plugin name} of every summary in the TensorBoard event files of `folder`."""
    tags = {}
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags[value.tag] = value.metadata.plugin_data.plugin_name
    return tags




def test_help_lists_every_flag_with_its_default():
    result = subprocess.run([sys.executable, "driver.py", "-h"], cwd=PROJECT, capture_output=True, text=True,
                            check=True)
    text = " ".join(result.stdout.split())
    for flag in ("--data", "--K", "--D", "--beta", "--epochs", "--batch-size", "--learning-rate", "--shift",
                 "--out", "--seed", "--image-size"):
        assert flag in text
    for default in ("--K K number of codebook vectors (num_embeddings) (default: 128)",
                    "(default: 0.25)", "(default: 16 32)", "(default: hierarchical)"):
        assert default in text
    assert "reconstruct" in text and "sample" in text


@pytest.mark.parametrize("argv, message", [
    (["--K", "1"], "--K must be >= 2, got 1"),
    (["--D", "0"], "--D must be >= 1, got 0"),
    (["--epochs", "-3"], "--epochs must be >= 1, got -3"),
    (["--image-size", "102"], "--image-size 102x102 is not divisible by the downsampling factor 4"),
    (["--image-size", "64", "60", "--filters", "8", "8", "8"], "not divisible by the downsampling factor 8"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: no such folder"),
    (["--learning-rate", "0"], "--learning-rate must be > 0"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--cmap", "nonsense"], "--cmap 'nonsense' is not a matplotlib colormap"),
    (["--pcnn-variant", "fancy"], "--pcnn-variant must be 'plain', 'gated' or 'hierarchical', got 'fancy'"),
    (["--pcnn-epochs", "-1"], "--pcnn-epochs must be >= 0, got -1"),
    (["--pcnn-head-units", "-2"], "--pcnn-head-units must be >= 0 (0 = --pcnn-filters), got -2"),
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--pcnn-top-temperature", "0"], "--pcnn-top-temperature must be > 0, got 0.0"),
    (["--pcnn-bottom-temperature", "-1"], "--pcnn-bottom-temperature must be > 0, got -1.0"),
    (["--pcnn-middle-codes", "1"], "--pcnn-middle-codes must be 0 (no middle grid) or >= 2, got 1"),
    (["--pcnn-middle-factor", "3"], "--pcnn-middle-factor 3 must be smaller than --pcnn-top-factor 4 and divide it"),
    (["--pcnn-condition-blocks", "-1"], "--pcnn-condition-blocks must be >= 0, got -1"),
    (["--pcnn-middle-layers", "-1"], "--pcnn-middle-layers must be >= 0, got -1"),
    (["--pcnn-top-dropout", "1"], "--pcnn-top-dropout must be in [0, 1), got 1.0"),
    (["--pcnn-condition-slips", "1.5"], "--pcnn-condition-slips must be in [0, 1], got 1.5"),
    (["--pcnn-slip-levels", "top"], "--pcnn-slip-levels must be 'bottom', 'middle' or 'both', got 'top'"),
    (["--pcnn-weights-ema", "1"], "--pcnn-weights-ema must be in [0, 1), got 1.0"),
    (["sample", "--run", "/nowhere", "--n", "0"], "--n must be >= 1, got 0"),
])
def test_bad_flags_exit_with_one_line(argv, message):
    assert message in run_error(argv)


def test_folder_with_no_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    assert "no images found" in run_error(["--data", str(tmp_path), "--out", str(tmp_path / "run")])


def test_train_then_reconstruct(oasis_root, tmp_path):
    run = str(tmp_path / "run")
    run_dir, metrics = driver.main(["--data", oasis_root, "--out", run, "--epochs", "2", *TINY,
                                    "--pcnn-head-units", "12"])
    assert run_dir == run
    for name in ("vqvae.keras", "vqvae_last.keras", "config.json", "metrics.json", "history.csv", "loss.png",
                 "ssim.png", "reconstructions.png", "reconstructions_latest.png", "code_maps.png"):
        assert os.path.exists(os.path.join(run, name)), name
    saved = json.load(open(os.path.join(run, "metrics.json")))
    for key in ("val_ssim_best", "test_ssim_mean", "test_ssim_min", "test_psnr_mean", "codebook_usage",
                "perplexity"):
        assert key in saved
    assert saved["test_slices"] == 8 and -1 <= saved["test_ssim_min"] <= saved["test_ssim_mean"] <= 1
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["image_size"] == [32, 32] and config["layout"] == "oasis" and config["K"] == 8
    # Called in a process that does other things (this test session), the run leaves the
    # process-wide math mode alone and records what the process computes in.
    assert config["cpu_math_used"] == cpu.current_math() and config["cpu_math"] == "float32"
    with open(os.path.join(run, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "val_ssim" in rows[0]
    model = keras.models.load_model(os.path.join(run, "vqvae.keras"))
    assert model.num_embeddings == 8

    summary = driver.main(["reconstruct", "--run", run, "--batch-size", "3"])
    out = os.path.join(run, "reconstruct-keras_png_slices_test")
    with open(os.path.join(out, "reconstruction.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and rows[0]["slice"].endswith(".png")
    assert abs(summary["ssim_mean"] - saved["test_ssim_mean"]) < 1e-3  # same slices, same model
    assert os.path.exists(os.path.join(out, "grid_00.png"))

    for key in ("prior_val_bits_per_code", "prior_test_bits_per_code", "log2_K", "sampling_seconds"):
        assert key in saved
    assert saved["log2_K"] == 3.0 and 0 < saved["prior_test_bits_per_code"]
    for name in ("pixelcnn.keras", "pixelcnn_history.csv", "pixelcnn_loss.png", "samples/samples.png",
                 "samples/sample_002.png", "samples/sample_002.nii.gz"):
        assert os.path.exists(os.path.join(run, name)), name
    assert keras.models.load_model(os.path.join(run, "pixelcnn.keras")).head_units == 12
    assert not os.path.exists(os.path.join(run, "backup"))  # a finished run is tidy

    # TensorBoard: every tracked metric and the learning rate per epoch, images of
    # reconstructions and of the final samples.
    logs = os.path.join(run, "logs")
    train_tags, validation_tags = summaries(f"{logs}/vqvae/train"), summaries(f"{logs}/vqvae/validation")
    for tag in ("loss", "reconstruction_loss", "vq_loss", "ssim", "psnr", "perplexity", "codebook_usage",
                "learning_rate"):
        assert train_tags.get(f"epoch_{tag}") == "scalars", (tag, train_tags)
    assert validation_tags.get("epoch_ssim") == "scalars" and "epoch_codebook_usage" in validation_tags
    assert set(summaries(f"{logs}/vqvae/reconstructions").values()) == {"images"}
    assert summaries(f"{logs}/prior/train").get("epoch_bits_per_code") == "scalars"
    assert "epoch_bits_per_code" in summaries(f"{logs}/prior/validation")
    assert set(summaries(f"{logs}/prior/samples").values()) == {"images"}
    with open(os.path.join(run, "pixelcnn_history.csv")) as f:
        rates = [float(row["learning_rate"]) for row in csv.DictReader(f)]
    # The prior's learning rate decays along a half cosine over --pcnn-epochs.
    assert rates[0] == pytest.approx(config["pcnn_learning_rate"]) and rates[1] < rates[0]

    # A fresh process loads both saved models with plain keras.models.load_model and samples.
    out = str(tmp_path / "fresh_samples")
    result = subprocess.run([sys.executable, os.path.join(PROJECT, "driver.py"), "sample", "--run", run, "--n", "5",
                             "--batch-size", "2", "--seed", "3", "--out", out], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    noise = [line for line in result.stderr.splitlines() if any(mark in line for mark in TENSORFLOW_NOISE)]
    assert not noise, noise  # TensorFlow's C++ log lines are hidden
    assert "24/24" in result.stdout  # the progress bar knows its total: 3 batches of 8 code rows
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == [
        "sample_000.png", "sample_001.png", "sample_002.png", "sample_003.png", "sample_004.png", "samples.png"]
    image = nibabel.load(os.path.join(out, "sample_004.nii.gz")).get_fdata()
    assert image.shape == (32, 32) and 0 <= image.min() and image.max() <= 1

    # evaluate: scores merged into metrics.json, and one self-contained HTML page.
    merged, report = driver.main(["evaluate", "--run", run, "--samples", "4", "--batch-size", "4"])
    assert json.load(open(os.path.join(run, "metrics.json"))) == merged
    assert merged["val_ssim_best"] == saved["val_ssim_best"]  # training metrics are kept
    assert abs(merged["test_ssim_mean"] - saved["test_ssim_mean"]) < 1e-3
    assert merged["test_codes_used"] + merged["test_dead_codes"] == 8
    assert merged["ms_ssim_settings"]["scales"] == 2 and 0 < merged["test_ms_ssim_mean"] <= 1
    for key in ("samples_nn_ssim_mean", "real_nn_ssim_mean", "samples_pairwise_ssim", "real_pairwise_ssim"):
        assert -1 <= merged[key] <= 1, key
    assert 0 <= merged["code_histogram_js_bits"] <= 1 and merged["prior_test_bits_per_code"] > 0
    # The OASIS names give slice positions, so the C2ST is also broken down by fifth of the volume.
    by_level = {key: value for key, value in merged.items() if key.startswith("c2st_samples_auroc_")}
    assert by_level and all(0 <= value <= 1 for value in by_level.values()), by_level
    page = open(report).read()
    assert "Realism by level" in page
    assert page.count("data:image/png;base64,") == 9  # 3 curves, 3 reconstruction and 2 codebook figures, samples
    # Self-contained: no external links. The base64 images are stripped first, since four
    # random base64 characters can spell "http".
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", page)
    assert "http" not in text.replace("http-equiv", "")
    for name in ("ssim_histogram.png", "worst_reconstructions.png", "codebook_usage.png", "samples_nearest.png"):
        assert os.path.exists(os.path.join(run, "evaluation", name)), name
    assert "--samples must be >= 0" in run_error(["evaluate", "--run", run, "--samples", "-1"])
    assert "trained without slice positions" in run_error(["sample", "--run", run, "--position", "0.5"])
    again, _ = driver.main(["evaluate", "--run", run, "--samples", "0", "--batch-size", "4"])
    assert "samples_nn_ssim_mean" not in again and again["val_ssim_best"] == saved["val_ssim_best"]

    assert "already holds a run" in run_error(["--data", oasis_root, "--out", run])
    assert "no config.json" in run_error(["reconstruct", "--run", str(tmp_path)])


def test_train_on_nifti_volumes_with_image_size(hipmri_root, tmp_path):
    run = str(tmp_path / "run")
    _, metrics = driver.main(["--data", hipmri_root, "--out", run, "--epochs", "1", "--image-size", "24", "16",
                              *TINY, "--pcnn-epochs", "0"])
    assert json.load(open(os.path.join(run, "config.json")))["image_size"] == [24, 16]
    assert metrics["test_slices"] == 3
    assert not os.path.exists(os.path.join(run, "pixelcnn.keras"))
    assert "no pixelcnn.keras" in run_error(["sample", "--run", run])


@pytest.mark.parametrize("flags", [["--jit"], ["--mixed-precision"]])
def test_jit_and_mixed_precision_runs(oasis_root, tmp_path, flags):
    run = str(tmp_path / "run")
    _, metrics = driver.main(["--data", oasis_root, "--out", run, "--epochs", "2", "--grid-every", "0", *TINY, *flags])
    assert 0 < metrics["test_ssim_mean"] <= 1 and metrics["prior_test_bits_per_code"] > 0
    model = keras.models.load_model(os.path.join(run, "vqvae.keras"))
    assert model.decode(np.zeros((1, 8, 8), np.int32)).dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # the policy does not leak past the VQ-VAE


def test_group_norm_ssim_loss_and_weight_averaging_run_and_reload(oasis_root, tmp_path):
    run = str(tmp_path / "run")
    _, metrics = driver.main(["--data", oasis_root, "--out", run, "--epochs", "3", "--grid-every", "0", *TINY,
                              "--pcnn-epochs", "0", "--norm", "group", "--ssim-weight", "0.5", "--weights-ema", "0.9"])
    model = keras.models.load_model(os.path.join(run, "vqvae.keras"))
    assert model.norm == "group" and model.ssim_weight == 0.5
    assert 0 < metrics["test_ssim_mean"] <= 1 and len(model.optimizer._model_variables_moving_average) > 0
    assert "--weights-ema must be in [0, 1), got 1.0" in run_error(["--data", oasis_root, "--weights-ema", "1"])
    assert "--norm must be 'batch', 'group' or 'none', got 'layer'" in run_error(["--norm", "layer"])
    assert "--pcnn-precision must be 'auto', 'float32' or 'bfloat16', got 'half'" in run_error(
        ["--pcnn-precision", "half"])
    assert "--cpu-math must be 'float32' or 'bfloat16', got 'half'" in run_error(["--cpu-math", "half"])


def test_multiworker_strategy_runs_as_a_single_worker(oasis_root, tmp_path):
    """Without TF_CONFIG, MultiWorkerMirroredStrategy is one worker: the run must work the same."""
    run = str(tmp_path / "run")
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    result = subprocess.run([sys.executable, "driver.py", "--data", oasis_root, "--out", run, "--epochs", "1",
                             "--strategy", "multiworker", *TINY, "--pcnn-epochs", "0", "--cpu-math", "bfloat16"],
                            cwd=PROJECT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.load(open(os.path.join(run, "metrics.json")))["test_slices"] == 8
    # The command line's own process takes --cpu-math's math mode, and records it.
    assert json.load(open(os.path.join(run, "config.json")))["cpu_math_used"] == "bfloat16"
    assert "convolutions and matrix products multiply in bfloat16" in result.stdout


def test_cpu_math_sets_the_math_mode_only_as_asked(monkeypatch):
    monkeypatch.setenv(cpu.MATH_MODE, "")  # so that the session's own environment comes back after the test
    monkeypatch.delenv(cpu.MATH_MODE)
    assert cpu.use_cpu_math("float32") == "float32" and cpu.MATH_MODE not in os.environ
    assert cpu.use_cpu_math("bfloat16") == "bfloat16" and os.environ[cpu.MATH_MODE] == "BF16"
    assert cpu.use_cpu_math("float32") == "float32" and cpu.MATH_MODE not in os.environ  # the flag wins
    with pytest.raises(ValueError, match="--cpu-math must be one of float32, bfloat16, got 'half'"):
        cpu.use_cpu_math("half")


def test_hierarchical_prior_run_samples_and_reloads(oasis_root, tmp_path, capsys):
    """A tiny run of the hierarchical prior, its top grid conditioned on the slice position,
    the bottom level trained on condition grids with slips (the unconditioned default differs
    in building no position input: its sampler is covered in tests/test_hierarchy.py, its
    `sample --position` error below, without a run)."""
    import hierarchy

    run = str(tmp_path / "run")
    _, metrics = driver.main(["--data", oasis_root, "--out", run, "--epochs", "1", "--grid-every", "0", *TINY,
                              "--pcnn-variant", "hierarchical", "--pcnn-top-codes", "4", "--pcnn-top-factor", "4",
                              "--pcnn-top-filters", "8", "--pcnn-top-layers", "2", "--pcnn-top-epochs", "2",
                              "--pcnn-middle-codes", "6", "--pcnn-middle-epochs", "2",
                              "--pcnn-position-bins", "10", "--pcnn-condition-slips", "0.5"])
    assert metrics["prior_variant"] == "hierarchical" and 0 < metrics["prior_test_bits_per_code"]
    printed = capsys.readouterr().out  # --pcnn-slip-levels bottom, the default: the middle trains on real grids
    assert "bottom PixelCNN: 50% of its condition codes swapped" in printed and "middle PixelCNN: 50%" not in printed
    prior = keras.models.load_model(os.path.join(run, "pixelcnn.keras"))
    assert isinstance(prior, hierarchy.HierarchicalPrior) and prior.top_codebook.numpy().any()
    assert prior.names == ["top", "middle", "bottom"] and prior.middle_codebook.numpy().any()
    for name in ("prior_top_history.csv", "prior_middle_history.csv", "prior_bottom_history.csv",
                 "samples/sample_002.png"):
        assert os.path.exists(os.path.join(run, name)), name
    assert summaries(os.path.join(run, "logs", "prior_top", "train")).get("epoch_bits_per_code") == "scalars"
    images = driver.main(["sample", "--run", run, "--n", "3", "--out", str(tmp_path / "more")])
    assert images.shape == (3, 32, 32, 1) and 0 <= images.min() and images.max() <= 1
    # The tiny OASIS-layout slices are numbered 0-3 in each case: the top grid knows their level,
    # for each training slice and its mirror image.
    np.testing.assert_array_equal(prior.position_counts.numpy(), [0, 8, 0, 0, 8, 0, 0, 8, 0, 0, 8])
    codes = np.load(os.path.join(run, "codes.npz"))
    assert codes["train_mirrored"].shape == codes["train"].shape == (16, 8, 8)

    images = driver.main(["sample", "--run", run, "--n", "2", "--position", "0.4"])
    assert images.shape == (2, 32, 32, 1) and os.path.exists(os.path.join(run, "samples-seed0-position0.4",
                                                                          "sample_001.png"))
    assert "--position must be between 0 and 1, got 1.5" in run_error(["sample", "--run", run, "--position", "1.5"])


def test_sampling_at_a_position_needs_a_prior_trained_with_positions(tmp_path):
    """A hierarchical prior without position bins, saved untrained beside a VQ-VAE."""
    import train

    config = driver.Config(K=8, D=4, filters=[4, 8], res_blocks=1, pcnn_top_codes=4, pcnn_top_filters=8,
                           pcnn_top_layers=2, pcnn_middle_codes=6, pcnn_filters=8, pcnn_layers=2,
                           pcnn_position_bins=0)
    (tmp_path / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "image_size": [32, 32]}))
    train.build_vqvae(config).save(str(tmp_path / "vqvae.keras"))
    train.build_prior(config).save(str(tmp_path / "pixelcnn.keras"))
    assert "trained without slice positions" in run_error(["sample", "--run", str(tmp_path), "--position", "0.5"])


def test_the_middle_pixelcnn_takes_its_own_depth_and_the_top_one_its_dropout():
    import train

    small = dict(K=8, D=4, pcnn_top_codes=4, pcnn_top_filters=8, pcnn_top_layers=3, pcnn_middle_codes=6,
                 pcnn_filters=8, pcnn_layers=2)
    prior = train.build_prior(driver.Config(**small, pcnn_middle_layers=0, pcnn_top_dropout=0))  # 0: the top one's depth
    assert (prior.top.num_layers, prior.middle.num_layers, prior.top.dropout_rate) == (3, 3, 0.0)
    prior = train.build_prior(driver.Config(**small, pcnn_middle_layers=2, pcnn_top_dropout=0.25))
    assert (prior.top.num_layers, prior.middle.num_layers, prior.bottom.num_layers) == (3, 2, 2)
    assert (prior.top.dropout_rate, prior.middle.dropout_rate, prior.bottom.dropout_rate) == (0.25, 0.0, 0.0)
    assert prior.middle.filters == prior.top.filters == 8


def test_a_run_made_before_the_middle_grid_reloads_as_it_was(tmp_path):
    """A config.json from before --pcnn-middle-codes, --pcnn-condition-blocks,
    --pcnn-top-temperature, --pcnn-bottom-temperature, --pcnn-precision, --pcnn-weights-ema and
    --pcnn-slip-levels existed (and --pcnn-condition-slips, or its default of 0.3) resumes as
    the two-level float32-trained prior without slips it was."""
    import runs

    saved = {field: value for field, value in dataclasses.asdict(driver.Config()).items()
             if field not in runs.EARLIER_SETTINGS}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = driver.Config.from_saved(runs.load_config(str(tmp_path)))
    assert (config.pcnn_middle_codes, config.pcnn_condition_blocks, config.pcnn_top_temperature,
            config.pcnn_bottom_temperature, config.pcnn_middle_layers, config.pcnn_top_dropout,
            config.pcnn_precision, config.pcnn_weights_ema, config.pcnn_slip_levels, config.pcnn_condition_slips) == (
        0, 0, 1.0, 1.0, 0, 0.0, "float32", 0.0, "both", 0.0)
    assert config.pcnn_position_bins == 0 and driver.Config().pcnn_position_bins == 10  # no positions then
    assert config.K == driver.Config().K
    (tmp_path / "config.json").write_text(json.dumps({**saved, "pcnn_middle_codes": 256}))
    assert runs.load_config(str(tmp_path))["pcnn_middle_codes"] == 256
