"""Time the naive PixelCNN sampler against the cached one, on the same weights, and check
that they agree.

    python benchmarks/sampling.py                  # driver.py's default prior, random weights
    python benchmarks/sampling.py --run RUN_DIR    # a trained run's pixelcnn.keras
    python benchmarks/sampling.py --cpu-math bfloat16   # in oneDNN's bfloat16 math mode (cpu.py)

The naive sampler runs the whole network over the grid for every position, compiled with
tf.function (already faster than the keras.io example's `predict` per position). Its
cost is the same at every position, so it is timed on the first `--naive-rows` rows and
extrapolated to the whole grid. The cached sampler is timed on whole grids. Both draw
with the same seeds, so they must draw the same codes from the same logits.

For a run with a hierarchical prior, the timed network is the bottom PixelCNN over the
largest grid, given the grid above it (the middle grid of the three-level default) drawn by
the coarser PixelCNNs; the cached time includes drawing those coarser grids.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import cpu  # noqa: E402
import driver  # noqa: E402
import files  # noqa: E402
import hierarchy  # noqa: E402
import pixelcnn  # noqa: E402
import train  # noqa: E402
import vqvae  # noqa: E402, F401  (registers the saved classes)


def load_or_build(args):
    if args.run:
        return keras.models.load_model(os.path.join(args.run, "pixelcnn.keras"))
    keras.utils.set_random_seed(0)
    model = train.build_prior(driver.Config(K=args.K, pcnn_variant=args.variant, pcnn_filters=args.filters,
                                            pcnn_layers=args.layers, pcnn_res_blocks=args.res_blocks,
                                            pcnn_head_units=0))
    # Random weights scaled up, so the logits (and the codes drawn) are far from uniform.
    rng = np.random.default_rng(0)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(0, 0.2, weight.shape).astype(np.float32))
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run folder with a trained pixelcnn.keras")
    parser.add_argument("--variant", default="gated", choices=("plain", "gated"))
    parser.add_argument("--K", type=int, default=128)
    parser.add_argument("--filters", type=int, default=64)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--res-blocks", type=int, default=2)
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--naive-rows", type=int, default=2, help="rows the naive sampler is timed on")
    parser.add_argument("--cpu-math", default="float32", choices=cpu.CPU_MATHS,
                        help="what convolutions and matrix products multiply in (driver.py --cpu-math)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    math = cpu.use_cpu_math(args.cpu_math)  # before the first convolution, when TensorFlow reads it
    prior = load_or_build(args)
    hierarchical = isinstance(prior, hierarchy.HierarchicalPrior)
    model = prior.bottom if hierarchical else prior
    print(f"{'hierarchical' if hierarchical else model.variant} prior, K={model.num_embeddings}, "
          f"{prior.count_params():,} parameters, batch {args.batch_size}, convolutions in {math}")
    results = []
    for size in args.grids:
        sampler = hierarchy.sampler_for(prior, args.batch_size, size, size)
        start = time.time()
        codes = sampler.sample(seed=1)
        first_call = time.time() - start  # includes tracing the tf.functions once
        start = time.time()
        codes = sampler.sample(seed=1)
        fast = time.time() - start
        condition = sampler.grids[-2] if hierarchical else None  # the bottom PixelCNN's: the grid above
        seed = 1 + hierarchy.BOTTOM_SEED_OFFSET if hierarchical else 1
        inputs = codes if condition is None else (codes, condition)
        exact = float(np.abs(sampler.used_logits().numpy() - model(inputs).numpy()).max())

        positions = args.naive_rows * size
        pixelcnn.naive_sample(model, args.batch_size, size, size, seed=seed, positions=1, condition=condition)
        start = time.time()
        naive_codes, naive_logits = pixelcnn.naive_sample(model, args.batch_size, size, size, seed=seed,
                                                          positions=positions, condition=condition)
        naive = (time.time() - start) / positions * size * size
        fast_logits = sampler.used_logits().numpy().reshape(args.batch_size, size * size, -1)[:, :positions]
        agreement = float(np.abs(naive_logits.numpy() - fast_logits).max())
        same_codes = bool(np.array_equal(naive_codes.numpy().reshape(args.batch_size, -1)[:, :positions],
                                         codes.numpy().reshape(args.batch_size, -1)[:, :positions]))
        result = {"grid": f"{size}x{size}", "batch": args.batch_size, "naive_seconds": round(naive, 1),
                  "naive_timed_positions": positions, "fast_seconds": round(fast, 2),
                  "fast_first_call_seconds": round(first_call, 2), "speedup": round(naive / fast, 1),
                  "max_logit_difference_vs_full_pass": exact, "max_logit_difference_vs_naive": agreement,
                  "same_codes_as_naive": same_codes}
        results.append(result)
        print(f"{size}x{size}: naive {naive:8.1f} s (from {positions} positions)  cached {fast:6.2f} s "
              f"(first call {first_call:.2f} s)  speedup {naive / fast:6.1f}x  "
              f"max |logit diff| vs full pass {exact:.1e}, vs naive {agreement:.1e}, same codes {same_codes}",
              flush=True)
    if args.json:
        files.write_json(args.json, {"model": prior.get_config(), "parameters": prior.count_params(),
                                    "results": results})


if __name__ == "__main__":
    main()
