"""How steady is VQ-VAE training? Several runs' validation SSIM curves side by side.

    python benchmarks/stability.py --runs runs/a runs/b ... [--labels A B ...] [--after 3]
                                   [--plot resources/ssim_curves.png] [--json out.json]

For each trained run (a folder with history.csv and metrics.json), prints the epochs run,
the best and last validation SSIM, the largest fall of validation SSIM from one epoch to the
next after epoch --after (the issue's steadiness figure; epochs are counted from 1), how
many such falls exceed 0.02, and the test SSIM (mean and worst slice) of the saved model;
and draws every run's validation SSIM per epoch on one figure. With --regions, it also
splits the validation SSIM of each run's best and last models (vqvae.keras and
vqvae_last.keras) into the head, the background (the rest) and the 5-pixel border, to see
where a fall is.
"""

import argparse
import csv
import json
import os
import sys

import table

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def validation_ssim(run):
    """The run's validation SSIM per epoch, from its history.csv."""
    with open(os.path.join(run, "history.csv"), newline="") as f:
        return [float(row["val_ssim"]) for row in csv.DictReader(f) if row.get("val_ssim") not in (None, "")]


def largest_fall(curve, after):
    """The largest drop of `curve` from one epoch to the next, over epochs after `after`
    (1-based), and how many drops exceed 0.02 there."""
    falls = [curve[i - 1] - curve[i] for i in range(max(1, after), len(curve))]
    return max([0.0] + falls), sum(fall > 0.02 for fall in falls)


BORDER = 5  # px: the frame tf.image.ssim's 'valid' 11-pixel windows barely see


def ssim_map(first, second):
    """Per-pixel SSIM of two (N, H, W) [0, 1] stacks, as tf.image.ssim computes it (11-pixel
    Gaussian window, sigma 1.5, K1 0.01, K2 0.03) before it averages the map."""
    from scipy import ndimage

    def blur(x):
        return ndimage.gaussian_filter(x, (0, 1.5, 1.5), truncate=3.5)

    mean_a, mean_b = blur(first), blur(second)
    var_a, var_b = blur(first * first) - mean_a ** 2, blur(second * second) - mean_b ** 2
    cov = blur(first * second) - mean_a * mean_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2))


def region_ssim(run, data_root, slices=96):
    """{model file: (head SSIM, background SSIM)} on `slices` validation slices spread over
    the split; the head is the filled foreground (> 0.1) widened by 5 px."""
    import numpy as np
    from scipy import ndimage

    import data
    import runs

    config = runs.load_config(run)
    files = data.find_source(data_root).files["validate"]
    chosen = [files[i] for i in np.linspace(0, len(files) - 1, min(slices, len(files))).astype(int)]
    images = np.stack([data.fit_to_size(data.decode_png(p) if data.is_png(p) else data.nifti_slices(p)[0][..., None],
                                        config["image_size"]).numpy()[..., 0] for p in chosen]).astype(np.float64)
    heads = np.stack([ndimage.binary_dilation(ndimage.binary_fill_holes(image > 0.1), iterations=5) for image in images])
    found = {}
    for name in ("vqvae.keras", "vqvae_last.keras"):
        model = runs.load_model(run, name)
        outputs = np.concatenate([model.reconstruct_images(images[i: i + 16, ..., None])
                                  for i in range(0, len(images), 16)])[..., 0]
        pixels = ssim_map(images, outputs.astype(np.float64))
        border = np.ones(pixels.shape[1:], bool)
        border[BORDER:-BORDER, BORDER:-BORDER] = False
        found[name] = (float(pixels[heads].mean()), float(pixels[~heads].mean()), float(pixels.mean()),
                       float(pixels[:, border].mean()))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="trained run folders")
    parser.add_argument("--labels", nargs="+", help="a label per run (default: the folder names)")
    parser.add_argument("--after", type=int, default=3, help="count falls only after this epoch")
    parser.add_argument("--plot", help="draw the curves into this PNG")
    parser.add_argument("--title", default="validation SSIM per epoch", help="the figure's title")
    parser.add_argument("--regions", action="store_true", help="split best and last models' validation SSIM into "
                                                                "head and background (each run's own validation split)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    labels = args.labels or [os.path.basename(os.path.normpath(run)) for run in args.runs]
    if len(labels) != len(args.runs):
        sys.exit(f"stability.py: error: {len(labels)} labels for {len(args.runs)} runs")

    rows, curves = [], {}
    for run, label in zip(args.runs, labels):
        curve = validation_ssim(run)
        metrics = json.load(open(os.path.join(run, "metrics.json")))
        fall, big_falls = largest_fall(curve, args.after)
        curves[label] = curve
        rows.append({"run": label, "epochs": len(curve), "val_best": max(curve), "val_last": curve[-1],
                     "largest_fall": fall, "falls_over_0.02": big_falls,
                     "test_ssim": metrics.get("test_ssim_mean"), "test_ssim_min": metrics.get("test_ssim_min"),
                     "minutes": metrics.get("vqvae_train_seconds", 0) / 60})
    table.print_table([("run", 28, "{}"), ("epochs", 6, "{}"), ("val best", 8, "{:.3f}"), ("val last", 8, "{:.3f}"),
                       (f"largest fall after epoch {args.after}", 27, "{:.3f}"), ("falls > 0.02", 12, "{}"),
                       ("test SSIM", 9, "{:.4f}"), ("worst test", 10, "{:.3f}"), ("minutes", 7, "{:.1f}")],
                      [list(row.values()) for row in rows])
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        import files

        figure, axis = plt.subplots(figsize=(8, 4.5))
        for label, curve in curves.items():
            axis.plot(range(1, len(curve) + 1), curve, marker=".", label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel("validation SSIM")
        axis.set_title(args.title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        low = min(min(curve[args.after:] or curve) for curve in curves.values())
        axis.set_ylim(max(0.0, low - 0.05), 1.0)
        files.atomic_write(args.plot, lambda path: figure.savefig(path, dpi=110, bbox_inches="tight", format="png"))
        plt.close(figure)
        print(f"wrote {args.plot}")
    if args.regions:
        import runs

        print("\nvalidation SSIM by region:")
        region_rows = []
        for run, label in zip(args.runs, labels):
            for name, (head, background, whole, border) in region_ssim(run, runs.load_config(run)["data"]).items():
                region_rows.append([label, name, whole, head, background, border])
        table.print_table([("run", 28, "{}"), ("model", 16, "{}"), ("whole", 6, "{:.4f}"), ("head", 6, "{:.4f}"),
                           ("background", 10, "{:.4f}"), (f"{BORDER}-px border", 11, "{:.4f}")], region_rows)
    table.save(args.json, rows)


if __name__ == "__main__":
    main()
