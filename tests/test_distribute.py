"""Training under tf.distribute.MirroredStrategy on 2 logical CPU devices matches training on
one device (run in a separate process: see distributed_run.py)."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def result():
    completed = subprocess.run([sys.executable, os.path.join(HERE, "distributed_run.py")],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_mirrored_training_matches_one_device(result):
    assert result["replicas"] == 2
    assert result["max_weight_change"] > 0.01  # training moved the weights...
    assert result["max_weight_difference"] < 1e-4  # ...the same way on 1 and on 2 devices
    assert result["codebook_difference"] < 1e-4  # EMA updates use the global batch's statistics
    assert result["output_difference"] < 1e-4
    for key, value in result["single_logs"].items():
        assert result["mirrored_logs"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_kmeans_init_and_restarts_agree_across_replicas(result):
    assert result["replica_codebooks_equal"]
    assert result["restarted_loss"] == result["restarted_loss"]  # finite, not NaN
