"""Retrain one level of a run's hierarchical prior with other settings, in a copy of the run.

    python benchmarks/retrain_level.py --run RUN --out NEW --level bottom --set pcnn_layers=6

Each level of the hierarchical prior is trained on the real code grids of the level above
it (and the k-means level codebooks are kept in codes.npz), so one level can be swapped
without touching the others: the VQ-VAE, the codes and the other levels stay the same, and
the two runs differ only in that level. Copies RUN to NEW without that level's PixelCNN, the
whole prior and the samples, writes the --set values into NEW/config.json and continues NEW
with `driver.py --resume NEW`, which loads the finished stages and trains the missing level
(and writes the prior's bits per code and 16 samples). Then score both, e.g. with
`python benchmarks/levels.py --run NEW --top-temperatures 0.7`.

--set takes config.json keys (the driver's flags with underscores): a level's network and
training settings (pcnn_filters, pcnn_layers, pcnn_head_units, pcnn_epochs for the bottom;
pcnn_top_* for the top, pcnn_middle_epochs for the middle, ...). Settings that change the
code grids themselves (the level codebooks' sizes and factors, mirroring, every VQ-VAE and
data setting) need a new run and are refused; the slice position bins only with --level top
(only the top PixelCNN sees the position).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import files  # noqa: E402
import runs  # noqa: E402

GRID_KEYS = ("pcnn_top_codes", "pcnn_top_factor", "pcnn_middle_codes", "pcnn_middle_factor", "pcnn_mirror",
             "pcnn_variant")
TOP_ONLY_KEYS = ("pcnn_position_bins",)  # only the top PixelCNN sees them: a top-level retrain may change them
SAMPLING_KEYS = ("samples", "temperature")


def parse_setting(text, saved, level):
    """'key=value' -> (key, value of the same type as the run's own value)."""
    key, sep, value = text.partition("=")
    if not sep or key not in saved:
        raise SystemExit(f"retrain_level.py: error: --set {text!r}: expected KEY=VALUE with KEY a key of config.json")
    if key in TOP_ONLY_KEYS and level != "top":
        raise SystemExit(f"retrain_level.py: error: --set {key}: only the top PixelCNN sees it; retrain --level top")
    if key in GRID_KEYS or not (key.startswith("pcnn_") or key in SAMPLING_KEYS):
        raise SystemExit(f"retrain_level.py: error: --set {key}: not a prior setting, or one that changes the "
                         "code grids; train a new run instead")
    if isinstance(saved[key], str):
        return key, value
    try:
        return key, type(saved[key])(json.loads(value)) if saved[key] is not None else json.loads(value)
    except (ValueError, TypeError):
        raise SystemExit(f"retrain_level.py: error: --set {text!r}: expected a value like the run's "
                         f"{saved[key]!r} ({type(saved[key]).__name__})")


def forget_prior_scores(path):
    """Drop the old prior's figures (training and `driver.py evaluate`'s) from a metrics.json,
    so that the resumed run trains the prior again and no stale score is left beside it."""
    from evaluate import SAMPLE_KEYS

    stale = set(SAMPLE_KEYS) | {"log2_K", "sampling_seconds", "evaluation_seconds", "evaluated_data"}
    files.write_json(path, {key: value for key, value in files.read_json(path).items()
                            if key not in stale and not key.startswith("prior_")})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run with a hierarchical prior")
    parser.add_argument("--out", required=True, help="the new run folder (must not exist)")
    parser.add_argument("--level", required=True, choices=("top", "middle", "bottom"))
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config.json settings to change (--set A=1 B=2, or --set A=1 --set B=2)")
    args = parser.parse_args()

    import quiet

    quiet.hide_tensorflow_logs()
    from data import DataError

    try:
        saved = runs.load_config(args.run)
    except DataError as error:
        sys.exit(f"retrain_level.py: error: {error}")
    if not os.path.exists(os.path.join(args.run, f"prior_{args.level}.keras")):
        sys.exit(f"retrain_level.py: error: --run {args.run}: no prior_{args.level}.keras "
                 "(a finished run with a hierarchical prior was expected)")
    if os.path.exists(args.out):
        sys.exit(f"retrain_level.py: error: --out {args.out} already exists")
    import dataclasses

    import driver

    # A run made before a setting existed ran with its default.
    defaults = {field.name: field.default for field in dataclasses.fields(driver.Config)}
    changes = dict(parse_setting(text, {**defaults, **saved}, args.level) for text in args.set)

    dropped = {f"prior_{args.level}.keras", f"prior_{args.level}_history.csv", f"prior_{args.level}_loss.png",
               "pixelcnn.keras", "samples", "report.html", "samples_nearest.png"}
    shutil.copytree(args.run, args.out, ignore=lambda folder, names: [
        name for name in names if (folder == args.run and name in dropped)
        or os.path.basename(folder) in ("backup", "logs") and name == f"prior_{args.level}"])
    files.write_json(os.path.join(args.out, "config.json"), {**saved, **changes, "out": os.path.abspath(args.out)})
    forget_prior_scores(os.path.join(args.out, "metrics.json"))
    print(f"retraining the {args.level} level of {args.run} in {args.out} with "
          + (", ".join(f"{key}={value}" for key, value in changes.items()) or "the same settings"), flush=True)
    sys.exit(subprocess.call([sys.executable, os.path.join(ROOT, "driver.py"), "--resume", args.out]))


if __name__ == "__main__":
    main()
