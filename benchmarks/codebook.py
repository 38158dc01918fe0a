"""Codebook health: the keras.io loss-based quantizer against our default, on the same
data, model and time budget, for one or more codebook sizes.

    python benchmarks/codebook.py --data ../shared/data/oasis_like --K 128 512 --minutes 6

Each run is a normal `driver.py` training run without a prior (its folder is kept under
--out), and differs only in the quantizer:

    loss-based  --ema-decay 0 --codebook-init uniform --dead-code-steps 0   (keras.io recipe)
    default     EMA updates, k-means initialisation, dead-code restarts      (driver defaults)

(Before the default --dead-code-steps became 10 it was 50; `--also restart-50` adds that row.)

The table gives codebook usage and perplexity over the whole test split, and test SSIM.
"""

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import driver  # noqa: E402
import table  # noqa: E402

QUANTIZERS = {
    "loss-based": dict(ema_decay=0.0, codebook_init="uniform", dead_code_steps=0),
    "default": {},
}
OPTIONAL = {"restart-50": dict(dead_code_steps=50)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="data folder, as for driver.py")
    parser.add_argument("--K", type=int, nargs="+", default=[128, 512], help="codebook sizes")
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget of each run")
    parser.add_argument("--epochs", type=int, default=30, help="epoch cap of each run (the budget usually stops it first)")
    parser.add_argument("--image-size", type=int, nargs="+", help="as for driver.py (default: from the data)")
    parser.add_argument("--out", default="runs/codebook", help="folder for the runs")
    parser.add_argument("--also", nargs="*", default=[], choices=sorted(OPTIONAL), help="extra quantizer rows")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    rows = []
    for k in args.K:
        for name, overrides in [*QUANTIZERS.items(), *((name, OPTIONAL[name]) for name in args.also)]:
            config = driver.Config(data=args.data, K=k, epochs=args.epochs, max_minutes=args.minutes,
                                   image_size=args.image_size, pcnn_epochs=0, grid_every=0,
                                   out=os.path.join(args.out, f"K{k}-{name}"), cache=os.path.join(args.out, "cache"),
                                   **overrides)
            print(f"\n=== K={k}, {name} quantizer: {json.dumps(overrides) if overrides else 'driver defaults'}",
                  flush=True)
            _, metrics = driver.train(config)
            rows.append({"K": k, "quantizer": name, **{key: metrics[key] for key in (
                "epochs_run", "vqvae_train_seconds", "codebook_usage", "perplexity", "test_ssim_mean",
                "test_ssim_min", "test_psnr_mean")}, "settings": dataclasses.asdict(config)})

    print(f"\nsame data, model and budget ({args.minutes:g} min per run); usage and perplexity over the "
          "whole test split")
    table.print_table(
        [("quantizer", 11, "{}"), ("K", 5, "{}"), ("epochs", 6, "{}"), ("codes used", 14, "{}"),
         ("perplexity", 10, "{:.1f}"), ("test SSIM", 9, "{:.3f}"), ("min SSIM", 8, "{:.3f}"), ("PSNR", 6, "{:.2f}")],
        [[row["quantizer"], row["K"], row["epochs_run"],
          f"{round(row['codebook_usage'] * row['K'])} ({row['codebook_usage']:.1%})", row["perplexity"],
          row["test_ssim_mean"], row["test_ssim_min"], row["test_psnr_mean"]] for row in rows])
    table.save(args.json, rows)

if __name__ == "__main__":
    main()
