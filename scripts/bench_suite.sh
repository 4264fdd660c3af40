#!/usr/bin/env bash
# The runs behind BENCHMARKS.md, one after another; each writes OUT/<name>.json and OUT/<name>.txt.
#   scripts/bench_suite.sh OUT [name ...]     (no names: all of them; about 35 minutes)
set -u
cd "$(dirname "$0")/.."
OUT="${1:?usage: scripts/bench_suite.sh OUT [name ...]}"; shift
mkdir -p "$OUT"
LT=".venv/bin/python scripts/loadtest.py"
declare -A RUNS=(
  [held1k]="-n 1000 --rate 200 --repeat 3"
  [held1k-info]="-n 1000 --rate 200 --repeat 3 --server-env LOG_LEVEL=info"
  [held1k-50]="-n 1000 --rate 50 --repeat 3"
  [held10k]="-n 10000 --rate 200 --open-rate 250 --repeat 3"
  [callbacks-max]="--mode callbacks -n 3000 --rate 0 --callback-connections 16 --repeat 3"
  [callbacks-300]="--mode callbacks -n 6000 --rate 300 --repeat 3"
  [both]="--mode both -n 1000 --rate 50 --settle 10 --repeat 3"
  [profile]="-n 2000 --rate 100 --open-rate 300 --py-spy $OUT/profile.collapsed"
  [drop]="--mode drop -n 6000 --concurrency 300 --repeat 3"
)
ORDER=(held1k held1k-info held1k-50 callbacks-max callbacks-300 both held10k profile drop)
[ $# -gt 0 ] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  echo "==> $name: $LT ${RUNS[$name]} --json $OUT/$name.json" | tee "$OUT/$name.txt"
  $LT ${RUNS[$name]} --json "$OUT/$name.json" 2>"$OUT/$name.err" | tee -a "$OUT/$name.txt"
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/$name.txt"
done
