"""Do the anomaly maps point at lesions? Synthetic lesions in real test slices.

    python benchmarks/anomaly.py --run RUN --data ../shared/data/oasis_like [--slices 60] [--positions 0.4 1]
                                 [--draws 4] [--quantile 0.995] [--figure resources/anomaly_examples.png]

Takes --slices slices spread over the test split of --data (subjects the run never saw;
with --positions, only those at these levels of their volume, e.g. the brain without the neck),
inserts 1-3 lesions into most of them (bright and dark ellipses with soft edges, radius
3-15 px at 256x256, of several contrasts, inside the head) and leaves --clean-share of
them clean, writes them as PNG files, and runs `driver.py anomaly`'s method on them
(`anomaly.map_folder`, each of its maps, against the run's validation split). Against the
lesion masks it reports, for the prior-based maps and for the reconstruction residual
|slice - reconstruction| (smoothed alike):

* pixel-level AUPRC inside the head (average precision; the lesion share is chance);
* the best Dice over all thresholds;
* slice-level AUROC, lesion slices against clean ones, of each slice's score;
* seconds per slice.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

import realism  # noqa: E402
import table  # noqa: E402


def head_mask(image):
    """The head, as the command's maps see it (`anomaly.head`, not widened): foreground with its
    holes filled."""
    import anomaly

    return anomaly.head(image[None], 0)[0]


def insert_lesions(image, rng, count):
    """The slice with `count` soft-edged ellipses inside the head (each bright or dark, of
    contrast 0.25-0.6, radii 3-15 px at 256 px), and the lesion mask."""
    scale = image.shape[0] / 256
    inside = ndimage.binary_erosion(head_mask(image), iterations=max(1, int(16 * scale)))
    candidates = np.argwhere(inside)
    out, mask = image.copy(), np.zeros(image.shape, bool)
    rows, columns = np.mgrid[: image.shape[0], : image.shape[1]]
    for _ in range(count if len(candidates) else 0):
        centre = candidates[rng.integers(len(candidates))]
        radii = rng.uniform(3, 15, 2) * scale
        angle = rng.uniform(0, np.pi)
        dy, dx = rows - centre[0], columns - centre[1]
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / radii[0]
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / radii[1]
        profile = 1 / (1 + np.exp((np.sqrt(u ** 2 + v ** 2) - 1) * 8))  # soft edge
        contrast = rng.uniform(0.25, 0.6)
        if rng.uniform() < 0.5:
            out = out + contrast * profile * (1 - out)  # bright
        else:
            out = out * (1 - contrast * profile)  # dark
        mask |= profile > 0.5
    return np.clip(out, 0, 1), mask


def average_precision(scores, labels):
    """Area under the precision-recall curve (average precision) of scores for bool labels."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / hits.sum())


def best_dice(scores, labels):
    """The best Dice of `scores > t` against bool labels, over every threshold t."""
    order = np.argsort(-scores, kind="stable")
    true_positives = np.cumsum(labels[order])
    predicted = np.arange(1, len(scores) + 1)
    return float(np.max(2 * true_positives / (predicted + labels.sum())))


def scores_of(maps, images, masks, slice_scores, lesioned):
    """AUPRC and best Dice over the head's pixels, and slice AUROC."""
    heads = np.stack([head_mask(image) for image in images])
    pixels, labels = maps[heads], masks[heads]
    slice_scores = np.asarray(slice_scores)
    return {"auprc": average_precision(pixels, labels), "lesion_share": float(labels.mean()),
            "best_dice": best_dice(pixels, labels),
            "slice_auroc": realism.auroc(slice_scores[lesioned], slice_scores[~lesioned])}


def nll_map_auprc(nll, heads, masks):
    """Pixel AUPRC in the head of a (B, h, w) per-code NLL grid used as a map (each code's
    value over its pixels, smoothed as the maps are)."""
    scale = masks.shape[1] // nll.shape[1]
    upsampled = np.repeat(np.repeat(nll, scale, axis=1), scale, axis=2)[:, : masks.shape[1], : masks.shape[2]]
    return average_precision(ndimage.gaussian_filter(upsampled, (0, 2, 2))[heads], masks[heads])


def code_likelihoods(model, prior, images, clean, masks):
    """Why the maps look as they do: each level's mean NLL at the codes the lesions changed,
    with the lesions and without, and the pixel AUPRC of each level's NLL map alone. For a
    hierarchical prior also each finer level's NLL given the level above of the slice
    *without* its lesions (an oracle no real map has): whether the prior finds the lesions
    unlikely once the level above does not already hold them."""
    import tensorflow as tf

    import anomaly

    heads = np.stack([head_mask(image) for image in images])
    levels = {}
    for name, slices in (("lesions", images), ("clean", clean)):
        codes = np.concatenate([model.encode(slices[i: i + 16, ..., None] + model.shift).numpy()
                                for i in range(0, len(slices), 16)])
        parts = [anomaly.level_nll(prior, tf.constant(codes[i: i + 16])) for i in range(0, len(codes), 16)]
        levels[name] = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        levels[name]["codes"] = codes
    grid_key = lambda level: "codes" if level == "bottom" else f"{level}_codes"  # noqa: E731
    names = anomaly.level_names(prior)
    for index, level in enumerate(names):
        changed = levels["lesions"][grid_key(level)] != levels["clean"][grid_key(level)]
        nll = levels["lesions"][level]
        line = (f"{level} codes: {changed.sum()} changed by the lesions; their mean NLL {nll[changed].mean():.2f} nats "
                f"with the lesions, {levels['clean'][level][changed].mean():.2f} without; the NLL map alone: pixel "
                f"AUPRC {nll_map_auprc(nll, heads, masks):.3f}")
        if index:
            grids, above = levels["lesions"][grid_key(level)], levels["clean"][grid_key(names[index - 1])]
            oracle = np.concatenate([prior.networks[index].code_nll(
                (tf.constant(grids[i: i + 16]), tf.constant(above[i: i + 16]))).numpy() for i in range(0, len(grids), 16)])
            line += (f"; given the {names[index - 1]} grid without the lesions: {oracle[changed].mean():.2f} nats, "
                     f"map AUPRC {nll_map_auprc(oracle, heads, masks):.3f}")
        print(line, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run (VQ-VAE and prior) of healthy slices")
    parser.add_argument("--data", required=True, help="data root whose test split gets the lesions")
    parser.add_argument("--slices", type=int, default=60, help="test slices used")
    parser.add_argument("--clean-share", type=float, default=0.3, help="share of slices left without lesions")
    parser.add_argument("--positions", type=float, nargs=2, default=[0.0, 1.0], metavar=("LOW", "HIGH"),
                        help="only test slices at these levels of their volume (from the slice numbers in the file "
                             "names: 0 the first slice, 1 the last), e.g. 0.4 1 for the brain without the neck")
    parser.add_argument("--draws", type=int, default=None, help="healed versions per slice (default: the command's)")
    parser.add_argument("--quantile", type=float, default=None, help="NLL threshold quantile (default: the command's)")
    parser.add_argument("--batch-size", type=int, default=None, help="slices healed at once (default: the command's)")
    parser.add_argument("--seed", type=int, default=0, help="lesion and sampling seed")
    parser.add_argument("--figure", help="write a figure of a few slices here")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import nibabel
    import tensorflow as tf

    import anomaly
    import data
    import plots
    import runs

    config = runs.load_config(args.run)
    model = runs.load_model(args.run, "vqvae.keras")
    size = config["image_size"]
    test = data.find_source(args.data).files["test"]
    if args.positions != [0.0, 1.0]:
        positions = data.slice_positions(test)
        test = [path for path in test if args.positions[0] <= positions.get(path, -1) <= args.positions[1]]
        if not test:
            raise SystemExit(f"--positions {args.positions[0]} {args.positions[1]}: no test slice there (slice numbers "
                             f"are read from names such as case_001_slice_12.nii.png)")
    chosen = [test[i] for i in np.linspace(0, len(test) - 1, min(args.slices, len(test))).astype(int)]
    rng = np.random.default_rng(args.seed)
    images, clean, masks, lesioned = [], [], [], []
    folder = tempfile.mkdtemp(prefix="lesions-")
    for index, path in enumerate(chosen):
        image = data.fit_to_size(data.decode_png(path) if data.is_png(path) else
                                 data.nifti_slices(path)[0][..., None], size).numpy()[..., 0]
        count = 0 if rng.uniform() < args.clean_share else int(rng.integers(1, 4))
        clean.append(image)
        image, mask = insert_lesions(image, rng, count)
        images.append(image)
        masks.append(mask)
        lesioned.append(mask.any())
        png = tf.io.encode_png(np.round(image * 255).astype(np.uint8)[..., None])
        tf.io.write_file(os.path.join(folder, f"slice_{index:03d}.png"), png)
    images, masks, lesioned = np.stack(images), np.stack(masks), np.array(lesioned)
    images = np.round(images * 255) / 255  # as written
    print(f"{len(images)} test slices, {lesioned.sum()} with lesions (lesion share of the head's pixels: "
          f"{masks[np.stack([head_mask(i) for i in images])].mean():.4f}); maps in {folder}/maps-*", flush=True)

    options = {key: value for key, value in (("draws", args.draws), ("quantile", args.quantile),
                                             ("batch_size", args.batch_size)) if value is not None}
    maps, prior_scores, seconds = {}, {}, {}
    for kind in anomaly.MAPS:
        start = time.time()
        out = os.path.join(folder, f"maps-{kind}")
        rows = anomaly.map_folder(args.run, folder, out=out, seed=args.seed, kind=kind, **options)
        seconds[kind] = (time.time() - start) / len(images)
        maps[kind] = np.stack([nibabel.load(os.path.join(out, f"slice_{i:03d}_anomaly.nii.gz")).get_fdata()
                               for i in range(len(images))])
        prior_scores[kind] = [score for _, score in rows]

    start = time.time()
    residuals = []
    for batch in range(0, len(images), 16):
        reconstructed = model.reconstruct_images(images[batch: batch + 16, ..., None])[..., 0]
        residuals.append(ndimage.gaussian_filter(np.abs(images[batch: batch + 16] - reconstructed),
                                                 (0, anomaly.SMOOTHING, anomaly.SMOOTHING)))
    residuals = np.concatenate(residuals)
    residual_seconds = (time.time() - start) / len(images)
    residual_scores = anomaly.slice_scores(residuals)

    code_likelihoods(model, runs.load_model(args.run, "pixelcnn.keras"), images, np.stack(clean), masks)
    names = {"asymmetry": "asymmetry, side share (default)", "likelihood": "prior likelihood",
             "healing": "prior healing"}
    results = {names[kind]: {**scores_of(maps[kind], images, masks, prior_scores[kind], lesioned),
                             "seconds": seconds[kind]} for kind in anomaly.MAPS}
    results["reconstruction residual"] = {**scores_of(residuals, images, masks, residual_scores, lesioned),
                                          "seconds": residual_seconds}
    table.print_table([("map", 32, "{}"), ("pixel AUPRC", 11, "{:.3f}"), ("lesion share", 12, "{:.4f}"),
                       ("best Dice", 9, "{:.3f}"), ("slice AUROC", 11, "{:.3f}"), ("s/slice", 7, "{:.2f}")],
                      [[name, r["auprc"], r["lesion_share"], r["best_dice"], r["slice_auroc"], r["seconds"]]
                       for name, r in results.items()])
    if args.figure:
        shown = [i for i in np.argsort(-masks.sum(axis=(1, 2))) if lesioned[i]][:3] + list(np.where(~lesioned)[0][:1])
        prior = runs.load_model(args.run, "pixelcnn.keras")
        healthy = anomaly.run_reference(args.run, prior, args.quantile or anomaly.QUANTILE)
        draws = args.draws or anomaly.DRAWS
        healer = anomaly.Healer(prior, len(shown) * draws, size[0] // model.downsampling, size[1] // model.downsampling)
        healed = anomaly.anomaly_maps(model, healer, images[shown, ..., None], healthy, draws, args.seed)["healed"]
        figure_rows = [[images[i], healed[k], maps["asymmetry"][i], maps["likelihood"][i], maps["healing"][i],
                        residuals[i], masks[i].astype(float)] for k, i in enumerate(shown)]
        plots.anomaly_figure(figure_rows, args.figure, titles=(
            "slice (lesions added)", "healed", "asymmetry map (default)", "likelihood map", "healing map",
            "residual |slice - reconstruction|", "lesions"), cmap=config.get("cmap", "gray"))
        print(f"wrote {args.figure}")
    table.save(args.json, {"run": args.run, "slices": len(images), "lesion_slices": int(lesioned.sum()),
                           "results": results, **options})


if __name__ == "__main__":
    main()
