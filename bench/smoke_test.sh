#!/bin/bash
# Every bench workload at a small scale, under glibc, under movalloc and under
# movalloc with the profiler on: each must exit 0 and print the same checksum (the workloads check their own
# blocks, and exit 3 on a wrong byte). Keeps the workloads and the paths they
# take through the allocator (hugegrow's realloc moves, large's span reuse,
# chase's big heap) covered by CI, where bench/run.py does not run; and
# checks what phased's ticks count.
#
# Usage: smoke_test.sh [DIR_OF_WORKLOADS [LIBMOVALLOC]]
#        bazel test //bench:smoke_test
set -u

here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$here}
lib=${2:-$here/../shim/libmovalloc.so}
[[ -x $bin/wl_churn ]] || { echo "smoke_test: no workloads in $bin"; exit 2; }
[[ -f $lib ]] || { echo "smoke_test: no $lib"; exit 2; }
lib=$(cd "$(dirname "$lib")" && pwd)/$(basename "$lib")

failed=0
# workload and scale: about 0.1 s each under glibc on a 2-core VM
for entry in churn:0.02 threads:0.02 xthread:0.02 larson:0.05 realloc:0.05 large:0.1 \
             fragment:0.05 chase:0.02 kv:0.05 cxx:0.05 hugegrow:0.1 lifetimes:0.05; do
  wl=${entry%%:*} scale=${entry#*:}
  plain=$("$bin/wl_$wl" --scale "$scale" 2>&1)
  rc_plain=$?
  sum_plain=$(grep '^checksum ' <<<"$plain")
  for profile in off on; do
    ours=$(env LD_PRELOAD="$lib" MOVALLOC_PROFILE=$profile "$bin/wl_$wl" --scale "$scale" 2>&1)
    rc_ours=$?
    sum_ours=$(grep '^checksum ' <<<"$ours")
    if [[ $rc_plain != 0 || $rc_ours != 0 || -z $sum_plain || $sum_plain != "$sum_ours" ]]; then
      echo "FAIL $wl (profile $profile): glibc exit $rc_plain '$sum_plain'," \
           "movalloc exit $rc_ours '$sum_ours'"
      grep -m3 -E 'CORRUPT|movalloc' <<<"$ours"
      failed=$((failed + 1))
    else
      echo "ok   $wl (profile $profile): $sum_ours"
    fi
  done
done

# phased: every tick counts the operations of one phase (tools/movalloc demo's
# rates rest on it). A 16 MiB grow is over long before the first whole second,
# and still gets a tick with an operation per object of at most 512 bytes.
for l in "" "$lib"; do
  out=$(env ${l:+LD_PRELOAD=$l} "$bin/wl_phased" --heap-mib 16 --churn-s 1.2 --steady-s 0.2 2>&1)
  rc=$?
  bad=$(awk '$1 == "phase" { ph = $2 }
             $1 == "tick" { if ($3 != ph) print "a tick of " $3 " during " ph; ops[$3] += $4 }
             END { if (ops["grow"] < 16 * 1048576 / 512) print "grow counted " ops["grow"] + 0 " operations" }' \
        <<<"$out")
  if [[ $rc != 0 || -n $bad ]]; then
    echo "FAIL phased (${l:-glibc}): exit $rc; $bad"
    failed=$((failed + 1))
  else
    echo "ok   phased (${l:-glibc}): each tick counts one phase"
  fi
done
exit $((failed > 0))
