#!/usr/bin/env bash
# The queue gpu_session.sh starts: the benchmark alone on the GPU (while the FID network arrives), then the
# experiment sweeps in concurrent streams (one job at a time per stream; the small model leaves the GPU room for
# several, and they share the cores). Finished jobs are skipped on a re-run (same config digest).
# Arguments, if given, replace the default streams of queue.txt (one argument per stream, its jobs separated by
# spaces) and skip the benchmark, e.g. a second machine finishing what the first did not. A job is experiment:bits
# followed by any overrides, each after a colon:
#   gpu_queue.sh "figure4_single_t:w8a8" "table2_calib_source:w8a8 table3_ndtc_grid:w8a8:calib.timesteps.mean=0.2:calib.timesteps.std=0.2,0.4"
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
echo "$(date +%T) benchmark exit $?"
# ALONE (recon_benchmark.py arguments, optional): one reconstruction measured alone on the GPU while the FID network
# arrives, before the streams share it, e.g. ALONE="quality --bits w4a8 --recon qdrop --iters 5000 --images 64".
if [ -n "${ALONE:-}" ]; then
  python3 experiments/reconstruction/recon_benchmark.py --out "$STATE/results/recon_alone.json" $ALONE \
    > "$STATE/logs/alone.log" 2>&1
  echo "$(date +%T) alone exit $?"
fi

stream() {  # experiment:bits[:override ...] ...
  for job in "$@"; do
    IFS=: read -r -a parts <<< "$job"
    exp=${parts[0]} bits=${parts[1]} extra=("${parts[@]:2}")
    # While the FID network is still arriving (gpu_session.sh put), calibrate and sample without it
    # (stop_after=samples); the run below resumes from what that saved and only scores.
    if [ ! -f "$STATE/default_1.pt" ]; then
      echo "$(date +%T) sample $exp $bits ${extra[*]} (FID network not here yet)"
      python3 -m ptq4dm.run -m "experiment=$exp" "bits=$bits" "${extra[@]}" "${common[@]}" stop_after=samples \
        "hydra.sweep.dir=$STATE/multirun/$exp"
      echo "$(date +%T) waiting for the FID network"
      while [ ! -f "$STATE/default_1.pt" ]; do sleep 5; done
    fi
    echo "$(date +%T) start $exp $bits ${extra[*]}"
    python3 -m ptq4dm.run -m "experiment=$exp" "bits=$bits" "${extra[@]}" "${common[@]}" \
      "hydra.sweep.dir=$STATE/multirun/$exp"
    python3 experiments/paper/collect_results.py "$STATE/multirun/$exp" "$STATE/results/$exp" --shared
    echo "$(date +%T) done $exp $bits ${extra[*]}"
  done
}
# Streams: the arguments, else the lines of queue.txt.
if [ $# -gt 0 ]; then streams=("$@"); else mapfile -t streams < <(grep -v '^#' experiments/paper/queue.txt); fi
# The machine's cores shared among the streams: CPU work (FID matrices, compilation) not oversubscribed.
export OMP_NUM_THREADS=$(( $(nproc) / ${#streams[@]} > 0 ? $(nproc) / ${#streams[@]} : 1 ))
n=0
for jobs in "${streams[@]}"; do
  n=$((n + 1))
  stream $jobs > "$STATE/logs/S$n.log" 2>&1 &
done
wait
# Once more, every sweep with the points another sweep's jobs computed for it (collect_results.SHARED_POINTS).
for sweep in "$STATE"/multirun/*/; do
  name=$(basename "$sweep")
  python3 experiments/paper/collect_results.py "$sweep" "$STATE/results/$name" --shared >> "$STATE/logs/collect.log" 2>&1
done
grep -h "start\|done" "$STATE"/logs/S*.log
echo "$(date +%T) QUEUE DONE"
