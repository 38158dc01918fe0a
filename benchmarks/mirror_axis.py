"""Which way is a slice mirrored? The asymmetry map's mirror axis on real slices.

    python benchmarks/mirror_axis.py --data ../shared/data/volumes_t1 --every 3
    python benchmarks/mirror_axis.py --data ../shared/data/oasis_like/keras_png_slices_validate

For every image file in each --data folder (PNG or NIfTI, found and read as `driver.py
anomaly` finds and reads them, at their own size) and every --every-th slice with a head
(over --head of its pixels above the foreground threshold), `anomaly.mirror_fits` finds the
best left-to-right and the best top-to-bottom mirror image. A slice is taken as lying on its
side when the second differs from it by under `anomaly.SIDEWAYS` times the first
(`mirror_transform`).
Per folder, it reports:

* the slices taken as on their side;
* the ratio of the two differences (top-to-bottom over left-to-right): its least, median
  and largest value;
* the mean |slice - bent mirror image| inside the head, across the axis chosen and across
  the other one (`--bend`; each slice bent both ways, so slower).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import table  # noqa: E402


def folder_slices(folder, every, head_share):
    """Every `every`-th slice with a head of each image file of `folder` (its test split
    folder, if it has split folders, as `driver.py anomaly` finds them), in name order."""
    import anomaly
    import data
    import runs

    try:
        _, paths = runs.input_files(folder)
    except data.DataError as error:
        raise SystemExit(str(error)) from None
    found = []
    for path in paths:
        slices = [image for image in anomaly.file_slices(path)[0] if (image > anomaly.FOREGROUND).mean() > head_share]
        found += slices[::every]
    return paths, found


def mismatch(image, transform):
    """Mean |slice - its mirror image turned, moved and bent by `transform`| inside the head."""
    import anomaly

    mirror = anomaly.mirrored(image, transform, anomaly.mirror_field(image, transform))
    return float(np.abs(mirror - image)[image > anomaly.FOREGROUND].mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, nargs="+", help="folders of PNG or NIfTI files")
    parser.add_argument("--every", type=int, default=1, help="take every n-th slice with a head of each file")
    parser.add_argument("--head", type=float, default=0.05, help="share of a slice's pixels a head must fill")
    parser.add_argument("--bend", action="store_true", help="also the mismatch across each axis (slower)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import anomaly

    results, rows = {}, []
    for folder in args.data:
        paths, slices = folder_slices(folder, args.every, args.head)
        fits = anomaly.each(anomaly.mirror_fits, slices)
        ratios = np.array([sideways / upright for (_, upright), (_, sideways) in fits])
        sideways = ratios < anomaly.SIDEWAYS
        result = {"files": len(paths), "slices": len(slices), "sideways": int(sideways.sum()),
                  "ratio_min": float(ratios.min()), "ratio_median": float(np.median(ratios)),
                  "ratio_max": float(ratios.max())}
        if args.bend:
            def both(job):
                image, ((angle, shift), _), ((sideways_angle, sideways_shift), _), across = job
                upright, turned = (angle, shift, False), (sideways_angle, sideways_shift, True)
                chosen, other = (turned, upright) if across else (upright, turned)
                return mismatch(image, chosen), mismatch(image, other)

            pairs = np.array(anomaly.each(both, [(image, *fit, across) for image, fit, across
                                                 in zip(slices, fits, sideways)]))
            result.update(mismatch_chosen=float(pairs[:, 0].mean()), mismatch_other=float(pairs[:, 1].mean()))
        results[folder] = result
        rows.append([folder, result["files"], result["slices"], result["sideways"], result["ratio_min"],
                     result["ratio_median"], result["ratio_max"], result.get("mismatch_chosen", float("nan")),
                     result.get("mismatch_other", float("nan"))])
    table.print_table([("folder", 48, "{}"), ("files", 5, "{}"), ("slices", 6, "{}"), ("on side", 7, "{}"),
                       ("ratio min", 9, "{:.3f}"), ("median", 6, "{:.3f}"), ("max", 6, "{:.3f}"),
                       ("mismatch chosen", 15, "{:.4f}"), ("other axis", 10, "{:.4f}")], rows)
    table.save(args.json, {"every": args.every, "head": args.head, "sideways": anomaly.SIDEWAYS, "results": results})


if __name__ == "__main__":
    main()
