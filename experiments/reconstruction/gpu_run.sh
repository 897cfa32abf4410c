#!/usr/bin/env bash
# recon_benchmark.py on a lent GPU, as a background queue that outlives each (10-minute) call:
#   bash experiments/reconstruction/gpu_run.sh start   # install the carried wheels (.whl), snapshot the code, start
#   bash experiments/reconstruction/gpu_run.sh poll S  # wait up to S seconds, then copy the results into $OUT
# The machine goes back 30 s after a call ends and takes the queue with it: follow 'start' with 'poll' at once,
# every time (a slow turn between calls lost a queue on 2026-12-03). Where one call's 10 minutes suffice, run
# recon_benchmark.py directly with --out under $OUT instead.
set -uo pipefail
STATE=${STATE:-/root/recon_gpu}
OUT=${OUT:-/tmp/out}
mkdir -p "$STATE" "$OUT"
case $1 in
  start)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
    rm -rf "$STATE/src" && mkdir -p "$STATE/src" && cp -r conf ptq4dm experiments pyproject.toml "$STATE/src/"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    cat > "$STATE/queue.sh" <<'Q'
cd "$STATE/src" && export PYTHONPATH=/tmp/site:$STATE/src PYTHONUNBUFFERED=1
B="python3 experiments/reconstruction/recon_benchmark.py --out $STATE/recon_h200.json"
$B quality --bits w4a8 --recon none brecq qdrop --iters 2000
$B quality --bits w4a8 --recon brecq --iters 500 --batch-size 128
$B scaling --iters 100 400
for seed in 1 2 3; do $B quality --bits w4a8 --recon brecq --iters 500 --batch-size 128 --seed $seed; done
$B quality --bits w8a8 w4a4 --recon none brecq --iters 500 --batch-size 128
echo QUEUE DONE
Q
    STATE=$STATE setsid nohup bash "$STATE/queue.sh" > "$STATE/queue.log" 2>&1 < /dev/null &
    sleep 45; tail -n 20 "$STATE/queue.log"
    ;;
  poll)
    end=$((SECONDS + $2))
    while [ $SECONDS -lt $end ] && ! grep -q "QUEUE DONE" "$STATE/queue.log"; do sleep 10; done
    cp "$STATE/recon_h200.json" "$STATE/queue.log" "$OUT/" 2>/dev/null
    tail -n 8 "$STATE/queue.log" | cut -c1-400
    ;;
esac
