#!/usr/bin/env bash
# Builds the allocator fuzz target (tests/fuzz/fuzz_alloc.c) with clang and
# libFuzzer from the repository's sources (Bazel's gcc toolchain cannot build
# libFuzzer targets), then runs it: first in the default mode, then with
# MOVALLOC_CHECK=1 (canaries). Offline: needs Debian's clang and
# libclang-rt-14-dev only.
#
# Usage: tests/fuzz/run.sh [SECONDS] [libFuzzer args...]
#   SECONDS: total run time (default 30), two thirds default mode, one third check mode.
#   The binary and the corpus are kept in $MOVALLOC_FUZZ_DIR (default
#   /tmp/movalloc-fuzz-<hash of this checkout's path>) and the corpus grows across runs; a crash leaves crash-* there with the input that caused it
#   (replay: $MOVALLOC_FUZZ_DIR/fuzz_alloc crash-...).
# Exit status 0 only if neither run found a crash or a mismatch.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-30}
shift || true
dir=${MOVALLOC_FUZZ_DIR:-/tmp/movalloc-fuzz-$(pwd | md5sum | cut -c1-8)}
mkdir -p "$dir/corpus"
bin=$dir/fuzz_alloc

srcs=(arena/*.c shim/*.c compactor/*.c profiler/*.c tests/fuzz/fuzz_alloc.c)
newest=$(ls -t "${srcs[@]}" arena/*.h shim/*.h compactor/*.h profiler/*.h include/*.h tests/fuzz/run.sh | head -1)
if [[ ! -x $bin || $newest -nt $bin ]]; then
  echo "fuzz: building $bin" >&2
  clang -std=gnu11 -O1 -g -fsanitize=fuzzer -D_GNU_SOURCE -I. -ftls-model=initial-exec \
    -Wno-unused-command-line-argument -pthread -o "$bin.tmp" "${srcs[@]}" -ldl -lm
  mv "$bin.tmp" "$bin"
fi

run() { # seconds, env...
  local t=$1
  shift
  (cd "$dir" && env "$@" "$bin" -max_total_time="$t" -max_len=4096 -len_control=0 -timeout=30 \
     -rss_limit_mb=4096 -print_final_stats=1 "${extra[@]}" corpus)
}
extra=("$@")
default_s=$((seconds * 2 / 3)) check_s=$((seconds - seconds * 2 / 3))
run "$default_s" MOVALLOC_CHECK=0
run "$check_s" MOVALLOC_CHECK=1
