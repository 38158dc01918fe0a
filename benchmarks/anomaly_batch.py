"""How fast is `driver.py anomaly` at each batch size? Side by side, in one process.

    python benchmarks/anomaly_batch.py --run RUN --data ../shared/data/oasis_like --files 64 --batch-sizes 16 32

Maps --files files of --data's --split folder (spread evenly over it) with the default map
and draws, once per batch size in turn, --repeats rounds (after one round that is not timed),
so that each batch size meets the CPU at the same speed. Prints the seconds per file of each
round (model loading, the healer's tracing and the writing of every file's outputs included)
and checks that every batch size gave every file the same score: the default map does not
depend on the batch (the healed slices, drawn from the prior, do).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run with a prior")
    parser.add_argument("--data", required=True, help="a folder of PNG or NIfTI files, or a data root with splits")
    parser.add_argument("--split", default="test", help="which split folder of a data root")
    parser.add_argument("--files", type=int, default=64, help="files mapped (spread evenly over the folder)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32], help="batch sizes compared")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds")
    args = parser.parse_args()
    if args.files < 1 or args.repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("--files, --repeats and --batch-sizes must be at least 1")

    import anomaly
    import runs

    _, paths = runs.input_files(args.data, args.split)
    chosen = [paths[i] for i in np.linspace(0, len(paths) - 1, min(args.files, len(paths))).astype(int)]
    work = tempfile.mkdtemp(prefix="anomaly-batch-")
    inputs = os.path.join(work, "inputs")
    os.makedirs(inputs)
    for path in chosen:
        os.symlink(os.path.abspath(path), os.path.join(inputs, os.path.basename(path)))
    scores = {}
    try:
        for round_ in range(args.repeats + 1):
            for batch_size in args.batch_sizes:
                out = os.path.join(work, f"maps-{batch_size}")
                start = time.time()
                rows = anomaly.map_folder(args.run, inputs, out=out, batch_size=batch_size)
                seconds = (time.time() - start) / len(rows)
                scores.setdefault(batch_size, dict(rows))
                if round_:
                    print(f"round {round_}, batch size {batch_size}: {seconds:.3f} s a file", flush=True)
                else:
                    print(f"warm-up, batch size {batch_size}: {seconds:.3f} s a file (not counted)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = scores[args.batch_sizes[0]]
    for batch_size, found in scores.items():
        gap = max(abs(found[name] - first[name]) for name in first)
        print(f"batch size {batch_size}: largest score difference from batch size {args.batch_sizes[0]}: {gap:.2g}")


if __name__ == "__main__":
    main()
