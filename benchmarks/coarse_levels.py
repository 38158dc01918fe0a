"""Are the coarse grids a hierarchical prior draws like real ones? Each coarse level on its own.

    python benchmarks/coarse_levels.py --run RUN [--top-temperatures 0.7 1.0] [--seeds 0 1] [--top-only]

`levels.py` scores whole slices; this looks at the top and middle grids alone, before any
finer level is drawn. A coarse grid is shown as an image by decoding its centres (each code
of the grid is its centre vector, repeated over the block of codes it stands for, through the
VQ-VAE's decoder): blurred slices that keep the head's outline (top) or its larger parts
(middle). For each level it runs the C2ST (realism.py: a small CNN, 5-fold cross-validated)
of 160 such images against the test split's own grids decoded alike, for:

* the validation split's grids (the control: real subjects differ too);
* the top grid drawn at each --top-temperatures value;
* the middle grid drawn given the real top grid, and given a drawn top grid at each value;

and the head's size in each set of top images (share of pixels above 0.1: mean, spread and
5th / 95th percentiles), to see whether the top prior draws heads of every size the data
holds. One row per set, means over --seeds (each its own draws and classifiers). --top-only
skips the middle grid's rows (e.g. to compare top PixelCNNs retrained with `retrain_level.py`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import table  # noqa: E402

SAMPLES = 160


def decode_level(model, prior, grid, level, batch_size=32):
    """(N, h', w') grid of coarse `level` (0: top) -> (N, H, W) images in [0, 1]: its centre
    vectors repeated over their blocks of codes, decoded."""
    import tensorflow as tf

    _, _, centres, factor = prior.levels[level]
    height, width = (side * factor for side in grid.shape[1:])
    images = []
    for start in range(0, len(grid), batch_size):
        vectors = prior.upsample(tf.gather(centres, tf.constant(grid[start: start + batch_size])), height, width,
                                 factor)
        images.append(model.to_slices(model.decoder(vectors, training=False)))
    return np.concatenate(images)[..., 0]


def head_sizes(images):
    """Share of each image's pixels above 0.1."""
    return (images > 0.1).mean(axis=(1, 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run with a hierarchical prior of three levels")
    parser.add_argument("--top-temperatures", type=float, nargs="+", default=[0.7, 1.0],
                        help="temperatures of the drawn top grids (default: 0.7 1.0)")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0, 1], help="draws and C2ST seeds")
    parser.add_argument("--top-only", action="store_true", help="score the top grid's rows only")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    import quiet

    quiet.hide_tensorflow_logs()
    import tensorflow as tf

    import hierarchy
    import pixelcnn
    import realism
    import runs

    model, prior = runs.load_model(args.run, "vqvae.keras"), runs.load_model(args.run, "pixelcnn.keras")
    if not isinstance(prior, hierarchy.HierarchicalPrior) or len(prior.levels) != 2:
        sys.exit(f"coarse_levels.py: --run {args.run}: its prior is not hierarchical with a top and a middle grid")
    if prior.position_bins:
        sys.exit(f"coarse_levels.py: --run {args.run}: its top grid is conditioned on positions; not supported")
    codes = np.load(os.path.join(args.run, "codes.npz"))
    spread = lambda grids: grids[np.linspace(0, len(grids) - 1, min(SAMPLES, len(grids))).astype(int)]  # noqa: E731
    test = [grid.numpy() for grid in prior.level_codes(codes["test"])]
    validation = [grid.numpy() for grid in prior.level_codes(spread(codes["validate"]))]
    real_top = spread(test[0])
    test_images = [decode_level(model, prior, grid, level) for level, grid in enumerate(test)]
    top_sampler, middle_sampler = (pixelcnn.Sampler(network, SAMPLES, *grid.shape[1:])
                                   for network, grid in zip(prior.networks, test))

    rows = []

    def score(level, name, draw):
        per_seed, sizes = [], []
        for seed in args.seeds:
            images = decode_level(model, prior, draw(seed), level)
            per_seed.append(realism.c2st_accuracy(images, test_images[level], seed=seed))
            sizes.append(head_sizes(images))
        sizes = np.concatenate(sizes)
        rows.append([("top", "middle")[level], name, float(np.mean(per_seed)), float(np.std(per_seed)),
                     float(sizes.mean()), float(sizes.std()), *np.quantile(sizes, [0.05, 0.95]).tolist()])
        print(f"{rows[-1][0]}: {name}: C2ST {rows[-1][2]:.3f} (" + " ".join(f"{c:.3f}" for c in per_seed)
              + f"), head size {sizes.mean():.3f} (sd {sizes.std():.3f})", flush=True)

    def drawn_top(temperature):
        return lambda seed: top_sampler.sample(temperature, seed).numpy()

    def middle_given(top):
        return lambda seed: middle_sampler.sample(1.0, seed + hierarchy.seed_offset(1, 3),
                                                  condition=tf.constant(top(seed))).numpy()

    sizes = head_sizes(test_images[0])
    rows.append(["top", "the test split's own (what the others are tested against)", float("nan"), float("nan"),
                 float(sizes.mean()), float(sizes.std()), *np.quantile(sizes, [0.05, 0.95]).tolist()])
    score(0, "validation grids (control)", lambda seed: validation[0])
    for temperature in args.top_temperatures:
        score(0, f"drawn at T {temperature:g}", drawn_top(temperature))
    if not args.top_only:
        score(1, "validation grids (control)", lambda seed: validation[1])
        score(1, "drawn given the real top", middle_given(lambda seed: real_top))
        for temperature in args.top_temperatures:
            score(1, f"drawn given a top drawn at T {temperature:g}", middle_given(drawn_top(temperature)))

    print(f"\nmeans over seeds {' '.join(map(str, args.seeds))}; {SAMPLES} images a set; head size: share of "
          "pixels above 0.1 of the decoded grid")
    table.print_table([("level: grids", 68, "{}"), ("C2ST", 5, "{:.3f}"), ("sd", 5, "{:.3f}"),
                       ("head size", 9, "{:.3f}"), ("sd", 5, "{:.3f}"), ("5%", 5, "{:.3f}"), ("95%", 5, "{:.3f}")],
                      [[f"{row[0]}: {row[1]}", *row[2:]] for row in rows])
    table.save(args.json, {"run": args.run, "rows": [dict(zip(("level", "grids", "c2st", "c2st_sd", "head_size",
                                                               "head_size_sd", "head_size_5", "head_size_95"), row))
                                                      for row in rows]})


if __name__ == "__main__":
    main()
