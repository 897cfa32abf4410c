#!/usr/bin/env bash
# The queue gpu_session.sh starts: the benchmark alone on the GPU, then the experiment sweeps in three
# concurrent streams (one job at a time per stream; the small model leaves the H100 room for three). All
# W8A8 sweeps come before any W4A8 sweep. Finished jobs are skipped on a re-run (same config digest).
# Arguments, if given, replace the default streams (one argument per stream, its jobs separated by spaces) and
# skip the benchmark, e.g. a second machine finishing what the first did not:
#   gpu_queue.sh "figure4_single_t:w8a8" "table2_calib_source:w8a8 table1_outputs:w8a8"
set -uo pipefail
cd "$STATE/src"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled PTQ4DM_CACHE=$STATE/cache
common=(logger=csv progress=false metrics.inception_path=$STATE/default_1.pt data.root=$STATE/data)

python3 - > "$STATE/results/environment.json" <<'PY'
import json, platform, subprocess, torch, diffusers, pytorch_lightning, hydra, omegaconf, torch_fidelity
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
print(json.dumps({"gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                  "pytorch_lightning": pytorch_lightning.__version__, "hydra_core": hydra.__version__,
                  "omegaconf": omegaconf.__version__, "torch_fidelity": torch_fidelity.__version__}, indent=2))
PY
echo "$(date +%T) benchmark"
[ $# -gt 0 ] || [ -f "$STATE/results/benchmark.json" ] || python3 experiments/paper/benchmark.py --compile \
  --out "$STATE/results/benchmark.json" > "$STATE/logs/benchmark.log" 2>&1
echo "$(date +%T) benchmark exit $?; waiting for the FID network"
while [ ! -f "$STATE/default_1.pt" ]; do sleep 5; done

stream() {  # experiment:bits[:override ...] ...
  for job in "$@"; do
    IFS=: read -r exp bits extra <<< "$job"
    echo "$(date +%T) start $exp $bits $extra"
    python3 -m ptq4dm.run -m "experiment=$exp" "bits=$bits" $extra "${common[@]}" "hydra.sweep.dir=$STATE/multirun/$exp"
    python3 experiments/paper/collect_results.py "$STATE/multirun/$exp" "$STATE/results/$exp"
    echo "$(date +%T) done $exp $bits $extra"
  done
}
if [ $# -gt 0 ]; then
  n=0
  for jobs in "$@"; do
    n=$((n + 1))
    stream $jobs > "$STATE/logs/S$n.log" 2>&1 &
  done
else
  # Most informative first (main_10k W8A8 and W4A8 with the current range search ran on 2026-12-02): the samplers,
  # shortcut splitting and raw-image calibration, then every ablation again with the current search, W8A8 before
  # W4A8 (the machine may be taken back before the end; finished jobs are kept).
  stream table5_samplers:w8a8 main_10k:w8a8:ops.shortcut_split=true main_10k:w8a8:calib=raw \
         table5_samplers:w4a8 > "$STATE/logs/A.log" 2>&1 &
  stream table4_metric:w8a8 table2_calib_source:w8a8 table1_outputs:w8a8 \
         table4_metric:w4a8 table2_calib_source:w4a8 table1_outputs:w4a8 > "$STATE/logs/B.log" 2>&1 &
  stream table3_timesteps:w8a8 figure4_single_t:w8a8 table3_ndtc_grid:w8a8 \
         table3_timesteps:w4a8 figure4_single_t:w4a8 table3_ndtc_grid:w4a8 > "$STATE/logs/C.log" 2>&1 &
fi
wait
grep -h "start\|done" "$STATE"/logs/[ABCS]*.log
echo "$(date +%T) QUEUE DONE"
