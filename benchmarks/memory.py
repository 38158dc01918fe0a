"""Peak memory (RSS) of a training run on 1k and on 10k slices.

    python benchmarks/memory.py --slices 1000 10000 --size 128

For each count, writes a synthetic dataset in the OASIS layout (80/10/10 split; kept in
--work so a second run reuses it), then runs `driver.py --epochs 1 --pcnn-epochs 0` on it in
a fresh process and reads that process's peak resident set size from the kernel (wait4).
One epoch is enough: the first decodes every slice into the cache, and memory then stays
where it is; the VQ-VAE's training, validation and test scoring all run. The prior is left
out: its code grids (N x h x w int32) are held in memory by design, 16 KB per slice at 128x128.
The issue's target: peak RSS at 10k slices within 10% of that at 1k.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)


def synthetic_data(work, count, size):
    import data

    root = os.path.join(work, f"synthetic-{count}-{size}")
    counts = (count * 8 // 10, count // 10, count - count * 8 // 10 - count // 10)
    print(f"writing (or reusing) {count} synthetic {size}x{size} slices in {root}", flush=True)
    return data.write_demo_dataset(root, size=size, counts=counts, slices_per_case=64)


def peak_rss_of_run(data_root, size, extra):
    """Peak RSS in MiB and wall seconds of one training run in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, os.path.join(PROJECT, "driver.py"), "--data", data_root, "--out",
                   os.path.join(out, "run"), "--epochs", "1", "--pcnn-epochs", "0", "--grid-every", "0",
                   "--image-size", str(size), *extra]
        start = time.time()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.time() - start
        if status != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
        return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mri-vqvae-memory-benchmark"))
    parser.add_argument("--json", help="also write the results here")
    args, extra = parser.parse_known_args()

    results = []
    for count in args.slices:
        root = synthetic_data(args.work, count, args.size)
        rss, seconds = peak_rss_of_run(root, args.size, extra)
        results.append({"slices": count, "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 1)})
        print(f"{count} slices: peak RSS {rss:.0f} MiB ({seconds:.0f} s)", flush=True)

    print(f"\n{'slices':>8s} {'peak RSS (MiB)':>15s} {'vs first':>9s} {'seconds':>8s}")
    for result in results:
        ratio = result["peak_rss_mib"] / results[0]["peak_rss_mib"]
        print(f"{result['slices']:>8d} {result['peak_rss_mib']:>15.0f} {ratio:>8.1%} {result['seconds']:>8.0f}")
    if args.json:
        import files

        files.write_json(args.json, results)


if __name__ == "__main__":
    main()
