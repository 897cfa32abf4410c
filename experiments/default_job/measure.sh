#!/usr/bin/env bash
# The README's first command, timed in a fresh clone: the install once, then the default job three times, each
# with an empty cache (no FP images or reference statistics from an earlier run). Prints each wall time.
#   bash experiments/default_job/measure.sh [WORKDIR]    (default WORKDIR: a new temporary folder)
set -u
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=${1:-$(mktemp -d)}
git clone -q "$repo" "$work/main" && cd "$work/main" || exit 1
s=$(date +%s.%N)
python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . > "$work/install.log" 2>&1 || exit 1
echo "install $(echo "$(date +%s.%N) - $s" | bc) s"
for i in 1 2 3; do
  export PTQ4DM_CACHE="$work/cache$i"
  s=$(date +%s.%N)
  python -m ptq4dm.run > "$work/job$i.log" 2>&1; rc=$?
  echo "job $i: exit $rc, $(echo "$(date +%s.%N) - $s" | bc) s; $(grep -a 'job wall time' "$work/job$i.log")"
done
