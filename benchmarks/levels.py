"""Which level of a hierarchical prior loses the anatomy? Samples drawn from each level
down, given the real grids above it, against real test slices.

    python benchmarks/levels.py --run RUN [--samples 160] [--top-temperatures 1.0 0.7]
                                [--bottom-temperatures 0.8 0.6] [--given middle bottom] [--no-controls] [--no-nearest]

For a run with a hierarchical prior, takes --samples test slices spread over the test split
and their grids at every level (C2ST needs 150+ slices to mean much). For each level, it
keeps the real grids above that level, draws the level and every finer one from the prior
(`HierarchicalSampler.sample(above=...)`, temperature 1), decodes the codes and scores the slices as `driver.py evaluate` does (realism.py, evaluate.py): C2ST
against the real test slices, left-right symmetry, one piece, near-empty, solidity, and the
nearest-train and pairwise SSIM. Whole samples (drawn from the top) are scored at every
--top-temperatures value (the top grid's temperature; the finer levels at 1), and at each
--bottom-temperatures value (the codes' temperature; the top grid at the first
--top-temperatures value, a middle grid at 1). A level whose
row is far worse than the row below it is where the prior loses the anatomy. The real slices,
their reconstructions and the validation-vs-test control come first (--no-controls skips
them, e.g. for a second run on the same VQ-VAE and data, whose controls are the same).
--given picks the rows drawn given real grids (by the first level drawn: middle, bottom;
default all), and --no-nearest skips the nearest-train SSIM, the slowest score (every slice
against every training slice: about 8 minutes a row at 256x256 on a slow 2-core day).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import table  # noqa: E402


def scores(name, images, test, train_batches, seed, c2st=True):
    """One table row of realism figures of (N, H, W) slices in [0, 1] against the test slices
    (no C2ST for the test slices themselves; no nearest-train SSIM without `train_batches`)."""
    import evaluate
    import realism

    start = time.time()
    nearest = float(evaluate.nearest_neighbours(images, train_batches())[0].mean()) if train_batches else float("nan")
    row = {"slices": name, "c2st": realism.c2st_accuracy(images, test, seed=seed) if c2st else float("nan"),
           **realism.anatomy_statistics(images), "nearest_train_ssim": nearest,
           "pairwise_ssim": evaluate.mean_pairwise_ssim(images)}
    print(f"{name}: C2ST {row['c2st']:.3f}, symmetry {row['symmetry']:.3f} ({time.time() - start:.0f} s)", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run with a hierarchical prior")
    parser.add_argument("--samples", type=int, default=160, help="slices per row (150+ for the C2ST)")
    parser.add_argument("--top-temperatures", type=float, nargs="+", default=[1.0],
                        help="temperatures of the top grid for whole samples (default: 1.0)")
    parser.add_argument("--bottom-temperatures", type=float, nargs="*", default=[],
                        help="temperatures of the codes for whole samples (default: none)")
    parser.add_argument("--given", nargs="*", default=None, metavar="LEVEL",
                        help="rows drawn given the real grids above LEVEL (default: every level but the top)")
    parser.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                        help="score the real slices, their reconstructions and the validation control")
    parser.add_argument("--nearest", action=argparse.BooleanOptionalAction, default=True,
                        help="score the nearest-train SSIM (slow)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and C2ST seed")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    import quiet

    quiet.hide_tensorflow_logs()
    import driver
    import evaluate
    import hierarchy
    import runs
    import train

    config = driver.Config.from_saved(runs.load_config(args.run))
    model, prior = runs.load_model(args.run, "vqvae.keras"), runs.load_model(args.run, "pixelcnn.keras")
    if not isinstance(prior, hierarchy.HierarchicalPrior):
        sys.exit(f"levels.py: --run {args.run}: its prior is not hierarchical")
    _, _, splits = train.prepare_data(config, config.cache or os.path.join(args.run, "cache"))
    test = evaluate.split_images(splits["test"], model.shift)
    codes = np.load(os.path.join(args.run, "codes.npz"))["test"]
    pick = np.linspace(0, len(test) - 1, min(args.samples, len(test))).astype(int)
    real = [grid.numpy() for grid in prior.level_codes(codes[pick])] + [codes[pick]]
    sampler = hierarchy.HierarchicalSampler(prior, len(pick), *codes.shape[1:])
    decode = lambda grid: np.clip(model.decode(grid).numpy()[..., 0] - model.shift, 0, 1)  # noqa: E731
    train_batches = (lambda: (images.numpy() - model.shift for images in splits["train"].rebatch(256))
                     ) if args.nearest else None  # noqa: E731
    given = prior.names[1:] if args.given is None else args.given
    unknown = [name for name in given if name not in prior.names[1:]]
    if unknown:
        sys.exit(f"levels.py: --given {' '.join(unknown)}: expected levels of {' '.join(prior.names[1:])}")

    rows = []
    if args.controls:
        control = evaluate.split_images(splits["validate"], model.shift)
        rows = [scores("real test slices", test[pick], test, train_batches, args.seed, c2st=False),
                scores("their reconstructions", decode(codes[pick]), test, train_batches, args.seed),
                scores("validation slices (control)", control, test, train_batches, args.seed)]
    top = args.top_temperatures[0]
    runs_of = ([(0, t, 1.0) for t in args.top_temperatures] + [(0, top, t) for t in args.bottom_temperatures]
               + [(prior.names.index(name), 1.0, 1.0) for name in given])
    for start, top_temperature, bottom_temperature in runs_of:
        # The top grid and the codes at these temperatures, a middle grid at 1.
        prior.top_temperature, prior.bottom_temperature = top_temperature, bottom_temperature
        grid = sampler.sample(1.0, args.seed, above=real[:start]).numpy()
        above = "nothing" if start == 0 else "the real " + " and ".join(prior.names[:start])
        name = f"{'+'.join(prior.names[start:])} drawn given {above}" + (
            f", top at T {top_temperature:g}" if start == 0 else "") + (
            f", bottom at T {bottom_temperature:g}" if bottom_temperature != 1 else "")
        rows.append(scores(name, decode(grid), test, train_batches, args.seed))

    table.print_table([("slices", 72, "{}"), ("C2ST", 5, "{:.3f}"), ("symmetry", 8, "{:.3f}"),
                       ("one piece", 9, "{:.1%}"), ("near-empty", 10, "{:.1%}"), ("solidity", 8, "{:.3f}"),
                       ("nearest-train", 13, "{:.3f}"), ("pairwise", 8, "{:.3f}")],
                      [[row["slices"], row["c2st"], row["symmetry"], row["one_piece"], row["near_empty"],
                        row["solidity"], row["nearest_train_ssim"], row["pairwise_ssim"]] for row in rows])
    table.save(args.json, {"run": args.run, "rows": rows})


if __name__ == "__main__":
    main()
