#!/usr/bin/env bash
# What the free-list encoding costs (docs/RESULTS.md, "Hardening cost"): builds
# libmovalloc.so as shipped and with -DMV_FREELIST_PLAIN (plain links), then on
# the small-object workloads
#   1. counts instructions with valgrind's callgrind (repeatable on a busy
#      machine), with the calls to malloc and free, and
#   2. times both libraries with bench/run.py, alternating which goes first.
# Leaves bazel-bin as shipped (the plain build is rebuilt over at the end).
#
# Usage: bench/hardening.sh [OUTDIR] [ROUNDS]   (defaults /tmp/movalloc-hardening, 5)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/movalloc-hardening}
rounds=${2:-5}
workloads=(churn threads xthread larson)
mkdir -p "$out"

bazel build --copt=-DMV_FREELIST_PLAIN //shim:libmovalloc.so
cp -L bazel-bin/shim/libmovalloc.so "$out/libmovalloc_plain.so"
bazel build //shim:libmovalloc.so //bench/...
cp -L bazel-bin/shim/libmovalloc.so "$out/libmovalloc_hardened.so"

# Calls made to each named function, summed over a callgrind output file.
calls() { # file, function
  python3 - "$1" "$2" <<'EOF'
import re, sys
names, calls, cur = {}, 0, None
for line in open(sys.argv[1]):
    m = re.match(r'(c?fn)=\((\d+)\)(?: (.*))?', line)
    if m:
        if m.group(3): names[m.group(2)] = m.group(3).strip()
        if m.group(1) == 'cfn': cur = names.get(m.group(2))
    elif line.startswith('calls=') and cur == sys.argv[2]:
        calls += int(line.split('=')[1].split()[0])
print(calls)
EOF
}

echo "| workload | instructions, hardened | plain | extra per malloc+free | extra |"
echo "|---|---|---|---|---|"
for w in "${workloads[@]}"; do
  declare -A ir=()
  for v in hardened plain; do
    f=$out/cg.$w.$v.out
    MOVALLOC_COMPACT=0 LD_PRELOAD=$out/libmovalloc_$v.so valgrind --tool=callgrind \
      --callgrind-out-file="$f" "bazel-bin/bench/wl_$w" --scale 0.02 >/dev/null 2>&1
    ir[$v]=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
  done
  n=$(calls "$out/cg.$w.hardened.out" malloc)
  awk -v w="$w" -v h="${ir[hardened]}" -v p="${ir[plain]}" -v n="$n" 'BEGIN {
    printf "| %s | %d | %d | %.1f | %+.1f%% |\n", w, h, p, (h - p) / n, 100 * (h - p) / p }'
done

only=$(IFS=,; echo "${workloads[*]}")
for ((r = 1; r <= rounds; r++)); do
  order="hardened plain"
  ((r % 2)) || order="plain hardened"
  for v in $order; do
    /usr/bin/python3 bench/run.py --reps 1 --only "$only" --allocators movalloc \
      --movalloc "$out/libmovalloc_$v.so" --json "$out/$v.$r.json" >/dev/null
  done
done
python3 - "$out" "$rounds" "${workloads[@]}" <<'EOF'
import json, statistics, sys
out, rounds, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {}
for v in ("hardened", "plain"):
    for r in range(1, rounds + 1):
        for run in json.load(open(f"{out}/{v}.{r}.json"))["runs"]:
            if run["error"]: sys.exit(f"{v} round {r} {run['workload']}: {run['error']}")
            runs.setdefault((run["workload"], v), []).append(run)
print(f"\n| workload | wall s, hardened | plain | ratio | CPU s, hardened | plain | ratio |")
print("|---|---|---|---|---|---|---|")
for w in workloads:
    med = lambda v, f: statistics.median(f(x) for x in runs[(w, v)])
    wall = lambda x: x["wall_s"]
    cpu = lambda x: x["user_s"] + x["sys_s"]
    hw, pw, hc, pc = med("hardened", wall), med("plain", wall), med("hardened", cpu), med("plain", cpu)
    print(f"| {w} | {hw:.2f} | {pw:.2f} | {hw / pw:.2f} | {hc:.2f} | {pc:.2f} | {hc / pc:.2f} |")
EOF
