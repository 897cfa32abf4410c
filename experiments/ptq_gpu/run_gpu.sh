#!/usr/bin/env bash
# PTQ of small_cifar10 on one GPU at the paper's sizes (1024 NDTC calibration samples, 10k images per FID):
# W8A8 and W4A8 against FP, with calibration wall time and quantized/FP sampling time in each results.json.
#
#   bash experiments/ptq_gpu/run_gpu.sh            # on the lent GPU machine (see experiments/embedded_models)
#
# Not run yet: the first GPU session spent its device time on training the embedded models.
set -euo pipefail
OUT=${OUT:-/tmp/out}
STATE=${STATE:-/root/ptq4dm_gpu}
mkdir -p "$OUT" "$STATE"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PTQ4DM_CACHE=$STATE/cache
python3 -m ptq4dm.run -m model=small_cifar10 experiment=paper_scale bits=w8a8,w4a8 logger=csv progress=false \
  metrics.inception_path="${INCEPTION:-$STATE/default_1.pt}" hydra.sweep.dir="$STATE/ptq_gpu"
cp "$STATE/ptq_gpu/summary.md" "$STATE/ptq_gpu/summary.csv" "$OUT/"
for j in 0 1; do cp "$STATE/ptq_gpu/$j/results.json" "$OUT/results-$j.json"; done
