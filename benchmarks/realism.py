"""Are the samples brains? Several trained runs side by side, against real slices.

    python benchmarks/realism.py --runs runs/gated runs/hierarchical [--samples 160]

For each run whose metrics.json has no realism scores yet (or with --again), runs
`driver.py evaluate --samples N` (a classifier two-sample test of N samples against the
real test slices, with the validation-vs-test control, and the anatomy statistics; see
realism.py), then prints one table: C2ST accuracy and its real-vs-real floor, left-right
symmetry, share in one piece, share near-empty, solidity, nearest-train and pairwise SSIM
against the same for real slices, prior bits per code, test SSIM and training minutes.
"""

import argparse
import json
import os
import subprocess
import sys

import table

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="trained run folders")
    parser.add_argument("--samples", type=int, default=160, help="samples per run for the tests")
    parser.add_argument("--again", action="store_true", help="evaluate even runs that have realism scores")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    rows = []
    for run in args.runs:
        metrics_path = os.path.join(run, "metrics.json")
        if args.again or "c2st_samples_vs_real" not in json.load(open(metrics_path)):
            print(f"evaluating {run} with {args.samples} samples", flush=True)
            subprocess.run([sys.executable, os.path.join(PROJECT, "driver.py"), "evaluate", "--run", run,
                            "--samples", str(args.samples)], check=True)
        metrics = json.load(open(metrics_path))
        minutes = (metrics.get("vqvae_train_seconds", 0) + metrics.get("prior_train_seconds", 0)) / 60
        rows.append({"run": os.path.basename(os.path.normpath(run)), "minutes": minutes, **metrics})

    def pair(key):
        shown = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
        return lambda row: f"{shown(row[f'samples_{key}'])} / {shown(row[f'real_{key}'])}"

    print("\nsamples / real test slices; C2ST: samples vs real / validation vs test subjects (the floor)")
    columns = [("run", 16, "{}", lambda row: row["run"]),
               ("prior", 12, "{}", lambda row: row.get("prior_variant", "")),
               ("C2ST", 13, "{}", lambda row: f"{row['c2st_samples_vs_real']:.3f} / {row['c2st_real_vs_real']:.3f}"),
               ("symmetry", 13, "{}", pair("symmetry")), ("one piece", 13, "{}", pair("one_piece")),
               ("near-empty", 13, "{}", pair("near_empty")), ("solidity", 13, "{}", pair("solidity")),
               ("nearest-train", 13, "{}", pair("nn_ssim_mean")), ("pairwise", 13, "{}", pair("pairwise_ssim")),
               ("bits/code", 9, "{:.3f}", lambda row: row["prior_test_bits_per_code"]),
               ("test SSIM", 9, "{:.3f}", lambda row: row["test_ssim_mean"]),
               ("minutes", 7, "{:.1f}", lambda row: row["minutes"])]
    table.print_table([column[:3] for column in columns], [[column[3](row) for column in columns] for row in rows])
    table.save(args.json, rows)


if __name__ == "__main__":
    main()
