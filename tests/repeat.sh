#!/usr/bin/env bash
# `make e2e-repeat`: each e2e tier RUNS times in a row (default 5) from a clean clone of HEAD,
# as CI would run it, and a table of the runs: which passed, how long each took, what failed.
# A flaky test shows here before it refuses good work in CI. Exits 1 if any run failed.
#
# Usage: tests/repeat.sh [TIER...]   (default: e2e e2e-kind; RUNS=n to change the count)
# With LOAD=1 a parallel process keeps one core busy meanwhile (flakes that only CPU
# contention brings out). KEEP_LOGS=1 keeps the logs of passing runs too (beside the clone).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
tiers=("$@")
(( ${#tiers[@]} )) || tiers=(e2e e2e-kind)
head=$(git rev-parse --short HEAD)
[ -z "$(git status --porcelain)" ] || echo "repeat: uncommitted changes are not in the clone of $head" >&2
clone=$(mktemp -d -t kubeforge-repeat.XXXXXX)
results=$clone.results
load_pid=
cleanup() {
    [ -z "$load_pid" ] || kill "$load_pid" 2>/dev/null || true
    rm -rf "$clone"
}
trap cleanup EXIT
git clone --quiet --no-local . "$clone"
echo "repeat: ${tiers[*]}, $runs runs each, of $head in $clone" >&2
if [ "${LOAD:-0}" = 1 ]; then
    python3 -c 'while True: pass' & load_pid=$!
    echo "repeat: one core kept busy (pid $load_pid)" >&2
fi
make -C "$clone" venv >/dev/null
printf '%-10s %-4s %-6s %8s  %s\n' tier run result seconds failed >"$results"
failed=0
for tier in "${tiers[@]}"; do
    for ((i = 1; i <= runs; i++)); do
        log=$clone.$tier.$i.log
        start=$(date +%s)
        if make -C "$clone" "$tier" >"$log" 2>&1; then
            result=pass
        else
            result=FAIL failed=1
        fi
        secs=$(( $(date +%s) - start ))
        which=$(grep -E '^(FAILED|ERROR) tests/' "$log" | cut -d' ' -f2 | paste -sd, - || true)
        printf '%-10s %-4s %-6s %8s  %s\n' "$tier" "$i" "$result" "$secs" "${which:--}" | tee -a "$results" >&2
        [ "$result" = pass ] || echo "repeat: log kept at $log" >&2
        [ "$result" = pass ] && [ "${KEEP_LOGS:-0}" != 1 ] && rm -f "$log"
    done
done
cat "$results"
rm -f "$results"
exit "$failed"
