"""Samples of a position-conditioned prior at several levels of the brain, one row each.

    python benchmarks/sample_positions.py --run RUN [--positions 0.05 0.3 0.5 0.7 0.95] [--n 8]
                                          [--data ../shared/data/oasis_like]
                                          [--out resources/oasis_samples_by_position.png]

For a run whose hierarchical prior was trained with --pcnn-position-bins > 0: draws --n
slices at each --positions value (as `driver.py sample --position P` does, with the same
seed for every row, so rows differ only by the position), prints their anatomy statistics
(realism.py) and draws the rows. With --data (a root whose test files are named `..._slice_K`,
as OASIS names them), each row has the --n real test slices nearest its position beside it.
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
    parser.add_argument("--data", help="also show real test slices of this data root at each position")
    parser.add_argument("--out", default="resources/oasis_samples_by_position.png")
    args = parser.parse_args()

    import data
    import plots
    import realism
    import runs
    import sample

    config = runs.load_config(args.run)
    model, prior = (runs.load_model(args.run, name) for name in ("vqvae.keras", "pixelcnn.keras"))
    if not getattr(prior, "position_bins", 0):
        sys.exit(f"sample_positions.py: error: the prior of {args.run} was trained without slice positions")
    grid = [size // model.downsampling for size in config["image_size"]]
    real = {}
    if args.data:
        positions = data.slice_positions(data.find_source(args.data).files["test"])
        if not positions:
            sys.exit(f"sample_positions.py: error: no test file of {args.data} is named ..._slice_K, so no "
                     "real slice has a known position")
        paths, known = list(positions), np.array(list(positions.values()))
        for position in args.positions:
            nearest = [paths[i] for i in np.argsort(np.abs(known - position), kind="stable")[: args.n]]
            real[position] = np.stack([image for _, image in data.named_slices(nearest, config["image_size"])])
    rows, labels = [], []
    for position in args.positions:
        if args.data:
            rows.append(real[position])
            labels.append(f"real, {position:g}")
        images = np.concatenate(list(sample.sample_batches(model, prior, grid, args.n, seed=args.seed,
                                                           batch_size=args.n, position=position)))
        statistics = realism.anatomy_statistics(images[..., 0])
        print(f"position {position:g}: " + ", ".join(f"{key} {value:.3f}" for key, value in statistics.items()))
        rows.append(images)
        labels.append(f"position {position:g}")
    plots.image_grid(rows, args.out, labels, cmap=config.get("cmap", "gray"),
                     title=f"samples at each position (seed {args.seed} in every row)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
