#!/usr/bin/env bash
# Re-run the real-data runs behind the README's numbers and figures, and copy the figures
# into resources/. About 90 minutes on 2 CPU cores. DATA defaults to ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/readme}

python driver.py --data "$DATA/oasis_like" --epochs 6 --max-minutes 18 --pcnn-epochs 3 --out "$OUT-oasis"
python driver.py --data "$DATA/hipmri_like" --epochs 6 --max-minutes 18 --pcnn-epochs 0 --out "$OUT-hipmri"
python benchmarks/sampling.py --run "$OUT-oasis" --json "$OUT-oasis/sampling_benchmark.json"
python benchmarks/prior_variants.py --run "$OUT-oasis" --epochs 2 --json "$OUT-oasis/prior_variants.json"

mkdir -p resources
for name in loss ssim reconstructions code_maps pixelcnn_loss; do
    cp "$OUT-oasis/$name.png" "resources/oasis_$name.png"
done
cp "$OUT-oasis/samples/samples.png" resources/oasis_samples.png
for name in ssim reconstructions code_maps; do
    cp "$OUT-hipmri/$name.png" "resources/hipmri_$name.png"
done
