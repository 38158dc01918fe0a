"""Input pipeline against training, in images per second, and training with and without XLA.

    python benchmarks/pipeline.py --data ../shared/data/hipmri_like
    python benchmarks/pipeline.py --data ../shared/data/oasis_like --image-size 256

Measures, on the train split:
1. the first pass, which decodes every file and writes the slice cache (cache.cache_split);
2. the cached pipeline alone (the batched, shuffled dataset training reads), over whole epochs;
3. VQ-VAE training steps with the driver's default model, without and with --jit (XLA),
   timed after a warm-up, on the same cached batches.
The issue's target: the cached pipeline delivers at least 5x what training consumes.
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import cache  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
import driver  # noqa: E402
import train  # noqa: E402


def pipeline_rate(dataset, epochs):
    """Images per second of iterating `dataset` for whole epochs (the first batch excluded)."""
    images, start = 0, None
    for _ in range(epochs):
        for batch in dataset:
            if start is None:
                start = time.perf_counter()
                continue
            images += int(batch.shape[0])
    return images / (time.perf_counter() - start)


def training_rate(dataset, config, jit, steps):
    """Images per second of VQ-VAE training steps, after one warm-up epoch of `steps`."""
    keras.utils.set_random_seed(0)
    model = train.build_vqvae(dataclasses.replace(config, jit=jit))
    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(dataset.repeat(), steps_per_epoch=steps, epochs=2, verbose=0, callbacks=[Clock()])
    return steps * config.batch_size / times[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--image-size", type=int, nargs="+", help="default: the data's own size")
    parser.add_argument("--batch-size", type=int, default=driver.Config.batch_size)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per setting")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the pipeline alone")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    config = driver.Config(batch_size=args.batch_size)
    source = data.find_source(args.data)
    size = args.image_size or data.default_image_size(source, 2 ** len(config.filters))
    size = [size[0], size[-1]]
    results = {"data": args.data, "layout": source.layout, "image_size": size, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        manifest = cache.cache_split(source, "train", size, cache_dir, verbose=False)
        seconds = time.perf_counter() - start
        results["slices"] = manifest["slices"]
        results["first_pass_images_per_second"] = manifest["slices"] / seconds
        train = cache.cached_dataset(manifest, args.batch_size, config.shift, shuffle=True, seed=0)
        results["cached_pipeline_images_per_second"] = pipeline_rate(train, args.epochs)
        for jit in (False, True):
            results[f"training_images_per_second{'_jit' if jit else ''}"] = training_rate(train, config, jit,
                                                                                         args.steps)
    results["pipeline_over_training"] = (results["cached_pipeline_images_per_second"]
                                         / results["training_images_per_second"])

    print(f"\n{args.data} ({source.layout}), {results['slices']} train slices at {size[0]}x{size[1]}, "
          f"batch {args.batch_size}, {tf.config.threading.get_inter_op_parallelism_threads() or 'default'} threads")
    print(f"{'first pass (decode + write cache)':40s} {results['first_pass_images_per_second']:10.1f} images/s")
    print(f"{'cached pipeline alone':40s} {results['cached_pipeline_images_per_second']:10.1f} images/s")
    print(f"{'VQ-VAE training':40s} {results['training_images_per_second']:10.1f} images/s")
    print(f"{'VQ-VAE training with --jit (XLA)':40s} {results['training_images_per_second_jit']:10.1f} images/s")
    print(f"cached pipeline / training: {results['pipeline_over_training']:.0f}x")
    if args.json:
        files.write_json(args.json, results)


if __name__ == "__main__":
    main()
