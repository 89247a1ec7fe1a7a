#!/usr/bin/env bash
# Debian's /usr/bin/python3 (not a pyenv one on PATH): a deterministic workload
# of large dicts, lists, strings, realloc-grown buffers, cycles for the gc and
# threads, printing checksums; then some of CPython's own regression tests.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
it_init python3

PY=/usr/bin/python3
# CPython regression tests run under the preload; add modules here, slowest
# first so that they start first.
PY_TESTS=(test_subprocess test_threading test_weakref test_gc test_set test_json
  test_unicode test_re test_dict test_list)
# MOVALLOC_PY_TESTS="test_x test_y" runs those instead (tools/test under stress).
if [[ -n ${MOVALLOC_PY_TESTS:-} ]]; then read -ra PY_TESTS <<<"$MOVALLOC_PY_TESTS"; fi
# Each test module runs in its own regrtest process, for a verdict line per
# module, this many at a time.
PY_TEST_JOBS=4

it_need python3 test -x "$PY"
PY_VER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
it_need "libpython$PY_VER-testsuite" "$PY" -c 'import test.test_dict'

py_workload() {
  "$PY" - <<'EOF'
import gc, hashlib, json, os, random, threading

def digest(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
    return h.hexdigest()[:16]

lib = os.environ.get("MOVALLOC_LIB", "")
with open("/proc/self/maps") as f:
    if lib and lib in f.read():
        open(os.environ["IT_MAPPED_FILE"], "w").close()

rnd = random.Random(20240611)

# Dict of 300k entries, then half deleted and refilled: holes, resizes.
d = {"k%012x" % rnd.getrandbits(48): (i, rnd.random()) for i in range(300_000)}
for k in list(d)[::2]:
    del d[k]
for i in range(100_000):
    d["n%d" % i] = [i] * (i % 7)
items = sorted(d.items())
print("dict", len(d), digest(items[:500], items[-500:], items[len(items) // 2]))

# Lists: sort, dedupe, slices, list of lists.
xs = [rnd.randrange(1 << 30) for _ in range(1_000_000)]
ys = sorted(xs)
zs = sorted(set(xs), reverse=True)
nested = [xs[i:i + rnd.randrange(1, 50)] for i in range(0, 200_000, 7)]
nested.sort(key=lambda l: (len(l), sum(l)))
print("list", len(ys), len(zs), sum(ys[::1000]), digest(zs[:100], nested[:20], nested[-20:]))

# Strings: many small ones, one huge join, split/replace/case, sorting.
words = ["".join(chr(97 + rnd.randrange(26)) for _ in range(rnd.randrange(1, 12)))
         for _ in range(200_000)]
big = " ".join(words)
big2 = big.replace("a", "<A>").upper()
parts = big2.split("<A>")
print("str", len(big), len(big2), len(parts),
      hashlib.sha256(big2.encode()).hexdigest()[:16], digest(sorted(words)[:100], sorted(parts, key=len)[-3:]))
u = "".join(chr(0x400 + (i % 500)) + chr(0x1F600 + (i % 50)) for i in range(100_000))
print("unicode", len(u), hashlib.sha256(u.encode("utf-8")).hexdigest()[:16], u.count("\U0001F601"))

# A buffer grown by appends (realloc), big bytes objects (mmap sized).
buf = bytearray()
for i in range(200_000):
    buf += i.to_bytes(4, "little") * (i % 5)
blobs = [bytes([i % 256]) * (1 << (10 + i % 11)) for i in range(60)]
print("bytes", len(buf), hashlib.sha256(buf).hexdigest()[:16], sum(map(len, blobs)))

# Reference cycles only the collector frees.
class Node:
    def __init__(self, v):
        self.v, self.next = v, None
gc.collect()
for round_ in range(5):
    nodes = [Node(i) for i in range(50_000)]
    for a, b in zip(nodes, nodes[1:] + nodes[:1]):
        a.next = b
    total = sum(n.next.v for n in nodes)
    del nodes, a, b
    gc.collect()
print("gc", total)

# JSON round trip of a large structure.
doc = {"k%d" % i: {"v": i, "s": words[i], "l": list(range(i % 20))} for i in range(50_000)}
text = json.dumps(doc, sort_keys=True)
print("json", len(text), hashlib.sha256(text.encode()).hexdigest()[:16], json.loads(text) == doc)

# Threads allocating and freeing at once (the GIL still switches among them).
results = [None] * 4
def worker(t):
    r = random.Random(t)
    acc = {}
    for i in range(60_000):
        acc[r.randrange(20_000)] = "x" * r.randrange(1, 300)
        if i % 3 == 0:
            acc.pop(r.randrange(20_000), None)
    results[t] = digest(sorted((k, len(v)) for k, v in acc.items()))
threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("threads", results)
EOF
}

# Prints one line per test module: its exit code and regrtest's verdict.
py_regrtests() {
  local t running=0
  for t in "${PY_TESTS[@]}"; do
    if ((running >= PY_TEST_JOBS)); then
      wait -n
      running=$((running - 1))
    fi
    py_regrtest "$t" &
    running=$((running + 1))
  done
  wait
  for t in "${PY_TESTS[@]}"; do cat "$t.result"; done
  # Any failing module fails the run, whichever run it is.
  ! grep -qv ' rc=0 Tests result: SUCCESS$' "${PY_TESTS[@]/%/.result}"
}

# Without MOVALLOC_STATS: many tests run Python children (which inherit the
# preload) and require their stderr to be exactly what the child wrote.
# The soft RLIMIT_NOFILE of a stock Debian session (1024, below a far higher
# hard limit): movalloc then keeps its descriptors above the soft limit, out of
# the range test_subprocess's fd_status.py scans. Where soft == hard (this
# container: 20000/20000) they sit at 512+, and test_pass_fds_redirected sees
# them in a child whose compactor runs (always, under MOVALLOC_COMPACT_STRESS).
py_regrtest() {
  local rc=0
  if (($(ulimit -Sn) > 1024)) && [[ $(ulimit -Hn) == unlimited || $(ulimit -Hn) -gt 1040 ]]; then
    ulimit -Sn 1024
  fi
  env -u MOVALLOC_STATS "$PY" -m test -q --timeout=240 "$1" >"$1.log" 2>&1 || rc=$?
  echo "$1 rc=$rc $(grep '^Tests result:' "$1.log" | tail -n 1)" >"$1.result"
  if ((rc != 0)); then tail -n 30 "$1.log" >&2; fi
}

workload() {
  # The regression tests are mostly waiting: run them beside the workload.
  py_regrtests >regrtests.txt &
  py_workload
  wait "$!"
  cat regrtests.txt
}

it_compare_runs workload
