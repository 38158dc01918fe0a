"""Which level of a hierarchical prior loses the anatomy? Samples drawn from each level
down, given the real grids above it, against real test slices.

    python benchmarks/levels.py --run RUN [--samples 160] [--top-temperatures 1.0 0.7]
                                [--bottom-temperatures 0.8 0.6] [--given middle bottom] [--no-controls] [--no-nearest]
                                [--seeds 0 1 2] [--by-position] [--extremes FIGURE.png]

For a run with a hierarchical prior, takes --samples test slices spread over the test split
and their grids at every level (C2ST needs 150+ slices to mean much). For each level, it
keeps the real grids above that level, draws the level and every finer one from the prior
(`HierarchicalSampler.sample(above=...)`, temperature 1), decodes the codes and scores the slices as `driver.py evaluate` does (realism.py, evaluate.py): C2ST
against the real test slices, left-right symmetry, one piece, near-empty, solidity, and the
nearest-train and pairwise SSIM. With several --seeds each row is the mean over them (each seed
draws its own slices and trains its own C2ST classifiers; the C2ST's spread over the seeds is
printed beside it): one seed's C2ST of 160 slices moves by 0.05-0.1. Whole samples (drawn from the top) are scored at every
--top-temperatures value (the top grid's temperature; the finer levels at 1), and at each
--bottom-temperatures value (the codes' temperature; the top grid at the first
--top-temperatures value, a middle grid at 1). A level whose
row is far worse than the row below it is where the prior loses the anatomy. The real slices,
their reconstructions, the validation-vs-test control and as many training slices as there are test
slices (what a prior that only copied training slices would score) come first (--no-controls
skips them, e.g. for a second run on the same VQ-VAE and data, whose controls are the same).
--given picks the rows drawn given real grids (by the first level drawn: middle, bottom;
default all), and --no-nearest skips the nearest-train SSIM, the slowest score (every slice
against every training slice: about 8 minutes a row at 256x256 on a slow 2-core day).
--figure draws the first seed's first slices of every row, one row each, to look at.

--by-position asks what the classifier tells apart: for every row, how well the C2ST's held-out
scores tell the row's slices from the real test slices of each fifth of the volume (slice
positions from the file names or NIfTI slice indices: 0 the lowest slice, 1 the crown), as an
AUROC (0.5: that part of the brain is as likely to be taken for the row's slices as they are;
1: always told apart), and --extremes draws, for the first seed of the first row drawn from
the prior, the eight real slices the classifier is surest are real, the eight it takes most for
samples, and the same two ends of the samples.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import table  # noqa: E402

SHOWN = 8  # slices of each row in --figure


def scores(name, draw, test, train_batches, seeds, c2st=True, positions=None):
    """One table row of realism figures of the (N, H, W) slices in [0, 1] that `draw(seed)`
    gives, against the test slices, averaged over `seeds` (each seed its own slices and its
    own C2ST folds and classifier); the nearest-train SSIM (none without `train_batches`) is
    of the first seed's slices only, and no C2ST is run for the test slices themselves. With
    the test slices' `positions`, also the C2ST's AUROC against each fifth of the volume
    (`realism.position_aurocs`), and the first seed's slices and C2ST logits for --extremes."""
    import evaluate
    import realism

    start = time.time()
    per_seed = []
    for index, seed in enumerate(seeds):
        images = draw(seed)
        if index == 0:
            shown = images[:SHOWN]
        nearest = (float(evaluate.nearest_neighbours(images, train_batches())[0].mean())
                   if train_batches and index == 0 else float("nan"))
        figures = {"c2st": float("nan")}
        if c2st:
            logits, picked, real_logits, real_picked = realism.c2st_logits(images, test, seed=seed)
            figures["c2st"] = realism.held_out_accuracy(logits, real_logits)
            if positions is not None:
                figures.update({f"auroc_{fifth}": value for fifth, value in realism.position_aurocs(
                    logits, real_logits, positions[real_picked]).items()})
                if index == 0:
                    extremes = (images[picked], logits, test[real_picked], real_logits)
        per_seed.append({**figures, **realism.anatomy_statistics(images), "nearest_train_ssim": nearest,
                         "pairwise_ssim": evaluate.mean_pairwise_ssim(images)})
    row = {"slices": name, "seeds": list(seeds), "per_seed": per_seed, "shown": shown,
           **{key: float(np.nanmean([values[key] for values in per_seed]) if any(
               np.isfinite(values[key]) for values in per_seed) else float("nan")) for key in per_seed[0]},
           "c2st_sd": float(np.std([values["c2st"] for values in per_seed]))}
    if c2st and positions is not None:
        row["extremes"] = extremes
    print(f"{name}: C2ST {row['c2st']:.3f} (sd {row['c2st_sd']:.3f} over {len(seeds)} seeds), "
          f"symmetry {row['symmetry']:.3f} ({time.time() - start:.0f} s)", flush=True)
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
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                        help="sampling and C2ST seeds: each row is the mean over them (default: 0)")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--figure", help=f"also draw the first seed's first {SHOWN} slices of each row here (PNG)")
    parser.add_argument("--by-position", action="store_true",
                        help="also tell each row from the real test slices of each fifth of the volume (AUROC)")
    parser.add_argument("--extremes", metavar="FIGURE",
                        help="draw the slices the classifier is surest and least sure of (first drawn row, seed)")
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
    source, _, splits = train.prepare_data(config, config.cache or os.path.join(args.run, "cache"))
    test = evaluate.split_images(splits["test"], model.shift)
    positions = None
    if args.by_position or args.extremes:
        positions = np.asarray(source.positions["test"], np.float64)
        if not np.isfinite(positions).any():
            sys.exit(f"levels.py: --by-position / --extremes: the test slices of {config.data} have no known "
                     "positions (OASIS file names with '_slice_N', or NIfTI volumes)")
    codes = np.load(os.path.join(args.run, "codes.npz"))["test"]
    pick = np.linspace(0, len(test) - 1, min(args.samples, len(test))).astype(int)
    real = [grid.numpy() for grid in prior.level_codes(codes[pick])] + [codes[pick]]
    sampler = hierarchy.HierarchicalSampler(prior, len(pick), *codes.shape[1:])
    decode = lambda grid: model.decode_images(grid)[..., 0]  # noqa: E731
    train_batches = (lambda: (images.numpy() - model.shift for images in splits["train"].rebatch(256))
                     ) if args.nearest else None  # noqa: E731
    given = prior.names[1:] if args.given is None else args.given
    unknown = [name for name in given if name not in prior.names[1:]]
    if unknown:
        sys.exit(f"levels.py: --given {' '.join(unknown)}: expected levels of {' '.join(prior.names[1:])}")

    rows = []
    if args.controls:
        control = evaluate.split_images(splits["validate"], model.shift)
        training = evaluate.split_images(splits["train"], model.shift)
        some_training = lambda seed: training[np.random.default_rng(seed).permutation(len(training))[:len(test)]]  # noqa: E731
        reconstructions = decode(codes[pick])
        rows = [scores("real test slices", lambda seed: test[pick], test, train_batches, args.seeds[:1], c2st=False),
                scores("their reconstructions", lambda seed: reconstructions, test, train_batches, args.seeds,
                       positions=positions),
                scores("validation slices (control)", lambda seed: control, test, train_batches, args.seeds,
                       positions=positions),
                scores("training slices (what copying them would score)", some_training, test, None, args.seeds,
                       positions=positions)]
    top = args.top_temperatures[0]
    runs_of = ([(0, t, 1.0) for t in args.top_temperatures] + [(0, top, t) for t in args.bottom_temperatures]
               + [(prior.names.index(name), 1.0, 1.0) for name in given])
    for start, top_temperature, bottom_temperature in runs_of:
        # The top grid and the codes at these temperatures, a middle grid at 1.
        prior.top_temperature, prior.bottom_temperature = top_temperature, bottom_temperature
        draw = lambda seed: decode(sampler.sample(1.0, seed, above=real[:start]).numpy())  # noqa: E731
        above = "nothing" if start == 0 else "the real " + " and ".join(prior.names[:start])
        name = f"{'+'.join(prior.names[start:])} drawn given {above}" + (
            f", top at T {top_temperature:g}" if start == 0 else "") + (
            f", bottom at T {bottom_temperature:g}" if bottom_temperature != 1 else "")
        rows.append(scores(name, draw, test, train_batches, args.seeds, positions=positions))

    print(f"\nmeans over seeds {' '.join(map(str, args.seeds))}; nearest-train SSIM of the first seed's slices")
    table.print_table([("slices", 72, "{}"), ("C2ST", 5, "{:.3f}"), ("sd", 5, "{:.3f}"), ("symmetry", 8, "{:.3f}"),
                       ("one piece", 9, "{:.1%}"), ("near-empty", 10, "{:.1%}"), ("solidity", 8, "{:.3f}"),
                       ("nearest-train", 13, "{:.3f}"), ("pairwise", 8, "{:.3f}")],
                      [[row["slices"], row["c2st"], row["c2st_sd"], row["symmetry"], row["one_piece"], row["near_empty"],
                        row["solidity"], row["nearest_train_ssim"], row["pairwise_ssim"]] for row in rows])
    if positions is not None:
        import realism

        bins = realism.position_bins(positions)
        print("\nAUROC of the C2ST's held-out scores, each row against the real test slices of each fifth of the "
              "volume (0 = the lowest slice; test slices in each: " + ", ".join(str(int(inside.sum()))
                                                                        for inside in bins.values())
              + "; 0.5 = not told apart)")
        table.print_table([("slices", 72, "{}")] + [(name, 7, "{:.3f}") for name in bins],
                          [[row["slices"]] + [row[f"auroc_{name}"] for name in bins]
                           for row in rows if f"auroc_{next(iter(bins))}" in row])
    table.save(args.json, {"run": args.run, "rows": [{k: v for k, v in row.items() if k not in ("shown", "extremes")}
                                                     for row in rows]})
    if args.figure:
        import plots

        plots.image_grid([row["shown"] for row in rows], args.figure, [row["slices"].replace(" drawn given ", "\n| ")
                                                                       for row in rows], cmap=config.cmap)
    if args.extremes:
        import plots

        drawn = next((row for row in rows if "drawn" in row["slices"]), None)
        if drawn is None:
            sys.exit("levels.py: --extremes: no row drawn from the prior")
        images, logits, real, real_logits = drawn["extremes"]
        sure = lambda values: np.argsort(values)[:SHOWN]  # noqa: E731  (lowest logit: surest it is real)
        plots.image_grid([real[sure(real_logits)], real[sure(-real_logits)], images[sure(logits)],
                          images[sure(-logits)]], args.extremes,
                         ["real: surest real", "real: most taken\nfor samples", "samples: most taken\nfor real",
                          "samples: surest\nsamples"], cmap=config.cmap,
                         title=f"{drawn['slices']}, seed {args.seeds[0]}: the classifier's surest and least sure")


if __name__ == "__main__":
    main()
