#!/usr/bin/env bash
# The TLB-bound target of the compactor: bench/wl_chase (dependent random
# accesses over a multi-GiB heap of small malloc'ed nodes) with its heap built
# while tools/fragment makes every fresh THP fault fall back to 4 KiB pages.
# The fragmenter lets go once the heap is built; the walks start SETTLE
# seconds later. glibc's heap stays on 4 KiB pages; movalloc's compactor can
# rebuild huge pages in between. Prints ns per access, the share of anonymous
# memory on huge pages at the start of the walks, and the ratio.
#
# Usage (root): bench/tlb.sh [--settle SECONDS] [--scale X]   (default 30, 1)
set -euo pipefail
cd "$(dirname "$0")/.."
settle=30 scale=1
while (($#)); do
  case $1 in
    --settle) settle=$2; shift ;;
    --scale) scale=$2; shift ;;
    *) echo "usage: bench/tlb.sh [--settle SECONDS] [--scale X]" >&2; exit 2 ;;
  esac
  shift
done
[[ $(id -u) == 0 ]] || { echo "bench/tlb.sh: tools/fragment needs root" >&2; exit 1; }
bazel build //bench:wl_chase //tools/fragment:fragment //shim:libmovalloc.so >/dev/null 2>&1 ||
  { echo "bench/tlb.sh: the build failed: run bazel build //bench:wl_chase" >&2; exit 1; }
bin=$(bazel info bazel-bin 2>/dev/null)
lib=$(readlink -f "$bin/shim/libmovalloc.so")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# run NAME PRELOAD: the chase, built under the fragmenter; prints its metrics.
run() {
  local name=$1 preload=$2
  # The fragmenter runs the inner shell while memory is broken up and undoes
  # itself when it exits: that is once the chase says it is built.
  "$bin/tools/fragment/fragment" -- bash -c '
    env ${0:+LD_PRELOAD=$0} "$1" --big --scale "$2" --settle "$3" >"$4/out" 2>"$4/err" &
    echo $! >"$4/pid"
    until grep -q "chase: built" "$4/err" 2>/dev/null; do
      kill -0 "$(cat "$4/pid")" 2>/dev/null || exit 1
      sleep 0.2
    done' "$preload" "$bin/bench/wl_chase" "$scale" "$settle" "$tmp" 2>"$tmp/fragment.err" ||
    { echo "bench/tlb.sh: $name: the fragmenter or the build failed:" >&2; tail -5 "$tmp/fragment.err" "$tmp/err" >&2; exit 1; }
  while kill -0 "$(cat "$tmp/pid")" 2>/dev/null; do sleep 0.5; done
  grep -q '^checksum' "$tmp/out" || { echo "bench/tlb.sh: $name: the chase failed" >&2; cat "$tmp/err" >&2; exit 1; }
  local ns huge
  ns=$(awk '$2 == "ns_per_access" {print $3}' "$tmp/out")
  huge=$(awk '$2 == "huge_pct" {print $3}' "$tmp/out")
  printf '%-9s ns/access %8s   huge pages at the walks %6s%%\n' "$name" "$ns" "$huge" >&2
  echo "$ns"
}

echo "bench/tlb.sh: heap built under tools/fragment, walks $settle s after it is built" >&2
glibc_ns=$(run glibc "")
movalloc_ns=$(run movalloc "$lib")
awk -v g="$glibc_ns" -v m="$movalloc_ns" 'BEGIN {printf "movalloc is %.2fx faster than glibc per access\n", g / m}'
