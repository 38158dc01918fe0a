"""Samples of a position-conditioned prior at several levels of the brain, one row each.

    python benchmarks/sample_positions.py --run RUN [--positions 0.05 0.3 0.5 0.7 0.95] [--n 8]
                                          [--out resources/oasis_samples_by_position.png]

For a run whose hierarchical prior was trained with --pcnn-position-bins > 0: draws --n
slices at each --positions value (as `driver.py sample --position P` does, with the same
seed for every row, so rows differ only by the position), prints their anatomy statistics
(realism.py) and draws the rows, with real test slices from the same levels above them if
--data is given.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run with a position-conditioned hierarchical prior")
    parser.add_argument("--positions", type=float, nargs="+", default=[0.05, 0.3, 0.5, 0.7, 0.95])
    parser.add_argument("--n", type=int, default=8, help="samples per position")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="resources/oasis_samples_by_position.png")
    args = parser.parse_args()

    import plots
    import realism
    import runs
    import sample

    config = runs.load_config(args.run)
    model, prior = (runs.load_model(args.run, name) for name in ("vqvae.keras", "pixelcnn.keras"))
    if not getattr(prior, "position_bins", 0):
        sys.exit(f"sample_positions.py: error: the prior of {args.run} was trained without slice positions")
    grid = [size // model.downsampling for size in config["image_size"]]
    rows = []
    for position in args.positions:
        images = np.concatenate(list(sample.sample_batches(model, prior, grid, args.n, seed=args.seed,
                                                           batch_size=args.n, position=position)))
        statistics = realism.anatomy_statistics(images[..., 0])
        print(f"position {position:g}: " + ", ".join(f"{key} {value:.3f}" for key, value in statistics.items()))
        rows.append(images)
    plots.image_grid(rows, args.out, [f"position {p:g}" for p in args.positions], cmap=config.get("cmap", "gray"),
                     title=f"samples at each position (seed {args.seed} in every row)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
