"""How long a training step of one level of the hierarchical prior takes, at several depths
and in each precision.

    python benchmarks/prior_step.py --run RUN --level middle --layers 12 6 [--precisions float32 bfloat16]
                                    [--batch 32] [--repeats 3] [--steps 8]

Builds that level's PixelCNN from RUN's config.json with each --layers value (the other
settings as the run has them: channels, head, condition blocks), trained as each of
--precisions does it (`train.prior_twin` for bfloat16), and times `train_on_batch` on --batch
random code grids of the level's size (a 64x64 code grid: top 16x16, middle 32x32, bottom
64x64), the variants alternating, --repeats rounds of --steps steps each after 3 warm-up
steps, so that a slower minute of the CPU falls on every variant alike. Prints the fastest
and slowest round's milliseconds per step and the parameter count of each. Random grids cost
what real ones do: a step's work does not depend on the codes' values.
"""

import argparse
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

LAYER_KEYS = {"top": "pcnn_top_layers", "middle": "pcnn_middle_layers", "bottom": "pcnn_layers"}


def level_inputs(prior, level, batch, rng, grid=64):
    """(inputs, targets) of random grids for the `level` PixelCNN of `prior`."""
    names = prior.names
    index = names.index(level)
    side = grid // prior.factors[index]
    network = prior.networks[index]
    codes = rng.integers(0, network.num_embeddings, (batch, side, side)).astype(np.int32)
    if index == 0:
        return prior.top_inputs(codes), codes
    above = prior.networks[index - 1].num_embeddings
    side_above = grid // prior.factors[index - 1]
    return (codes, rng.integers(0, above, (batch, side_above, side_above)).astype(np.int32)), codes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run with a hierarchical prior (its config.json is read)")
    parser.add_argument("--level", choices=sorted(LAYER_KEYS), default="middle")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="gated layers to time")
    parser.add_argument("--precisions", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                        help="what the PixelCNN computes in while training (default: float32)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    import quiet

    quiet.hide_tensorflow_logs()
    import runs
    import train

    saved = runs.load_config(args.run)
    if saved.get("pcnn_variant") != "hierarchical":
        raise SystemExit(f"prior_step.py: error: --run {args.run}: not a run with a hierarchical prior")
    if args.level == "middle" and not saved.get("pcnn_middle_codes"):
        raise SystemExit(f"prior_step.py: error: --run {args.run}: its prior has no middle level")
    rng = np.random.default_rng(0)
    networks, batches = {}, {}
    for layers in args.layers:
        config = types.SimpleNamespace(**{**saved, LAYER_KEYS[args.level]: layers})
        prior = train.build_prior(config)
        network = prior.networks[prior.names.index(args.level)]
        batch = level_inputs(prior, args.level, args.batch, rng)
        for precision in args.precisions:
            variant = (layers, precision)
            networks[variant] = network if precision == "float32" else train.prior_twin(network, config)
            batches[variant] = batch
            for _ in range(3):
                networks[variant].train_on_batch(*batch)
    times = {variant: [] for variant in networks}
    for _ in range(args.repeats):
        for variant, network in networks.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                network.train_on_batch(*batches[variant])
            times[variant].append((time.perf_counter() - start) / args.steps)
    for (layers, precision), found in times.items():
        print(f"{args.level} PixelCNN, {layers} layers, {precision}: {1000 * min(found):.0f}-{1000 * max(found):.0f} "
              f"ms per step of {args.batch} grids, {networks[layers, precision].count_params():,} parameters",
              flush=True)


if __name__ == "__main__":
    main()
