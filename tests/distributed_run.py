"""Train a small VQ-VAE on one device and under MirroredStrategy on 2 logical CPU devices,
from the same weights on the same batches, and print what the test compares as JSON.

Run as a separate process by test_distribute.py: logical devices must be configured
before TensorFlow first uses the CPU, which the other tests in a pytest process already did.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import vqvae  # noqa: E402

STEPS, BATCH = 6, 8


def batches():
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.5, 0.5, (STEPS * BATCH, 16, 16, 1)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices(images).batch(BATCH)


def make(strategy, weights=None, **options):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = vqvae.VQVAE(16, 4, filters=(8, 8), num_res_blocks=1, **options)
        if weights is not None:
            model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model


def train(strategy, weights, **options):
    model = make(strategy, weights, **options)
    history = model.fit(batches(), epochs=1, verbose=0, shuffle=False).history
    return model, {key: float(values[-1]) for key, values in history.items()}


def main():
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    # Deterministic settings (no random k-means draw, no restarts), so both runs see the same
    # arithmetic: EMA codebook updates and batch norm over the global batch.
    options = dict(codebook_init="uniform", dead_code_steps=0)
    start = make(tf.distribute.get_strategy(), **options).get_weights()
    single, single_logs = train(tf.distribute.get_strategy(), start, **options)
    multi, multi_logs = train(mirrored, start, **options)
    differences = [float(np.max(np.abs(a - b))) for a, b in zip(single.get_weights(), multi.get_weights())]
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(start, single.get_weights())]
    probe = np.random.default_rng(1).uniform(-0.5, 0.5, (4, 16, 16, 1)).astype(np.float32)
    output_difference = float(np.max(np.abs(single(probe).numpy() - multi(probe).numpy())))

    # k-means initialisation and dead-code restarts draw random encoder outputs: every replica
    # must end with the same codebook.
    restarted, restarted_logs = train(mirrored, None, codebook_init="kmeans", dead_code_steps=1)
    copies = [v.numpy() for v in mirrored.experimental_local_results(restarted.quantizer.codebook.value)]
    print(json.dumps({
        "replicas": mirrored.num_replicas_in_sync,
        "max_weight_difference": max(differences),
        "max_weight_change": max(moved),
        "output_difference": output_difference,
        "codebook_difference": float(np.max(np.abs(single.quantizer.codebook.numpy()
                                                   - multi.quantizer.codebook.numpy()))),
        "single_logs": single_logs,
        "mirrored_logs": multi_logs,
        "replica_codebooks_equal": bool(all(np.array_equal(copies[0], c) for c in copies[1:])),
        "restarted_loss": restarted_logs["loss"],
    }))


if __name__ == "__main__":
    main()
