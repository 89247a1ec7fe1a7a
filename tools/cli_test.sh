#!/usr/bin/env bash
# Tests of the CLI (tools/movalloc stat, top, trace, plot, install) against real
# processes. Prints "PASS name" / "FAIL name" (a failure's details indented
# below it); exit status 0 only if all passed. tools/test runs it.
#
# Usage: MOVALLOC_LIB=/path/libmovalloc.so OBSERVE=/path/observe tools/cli_test.sh
set -uo pipefail
cd "$(dirname "$0")/.."
lib=${MOVALLOC_LIB:?set MOVALLOC_LIB to the path of libmovalloc.so}
observe=${OBSERVE:?set OBSERVE to the path of tools/observe/observe}
cli=tools/movalloc
failed=0
tmp=$(mktemp -d)
chmod 755 "$tmp"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

check() { # name, command...: PASS when the command succeeds
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    echo "PASS cli: $name"
  else
    failed=1
    echo "FAIL cli: $name"
    sed 's/^/    /' <<<"$out" | tail -20
  fi
}

# python3 holding a heap of N entries for S seconds; prints its pid.
hold() { # env..., then entries seconds
  cat >"$tmp/hold.py" <<'EOF'
import sys, time
d = {i: str(i) * 3 for i in range(int(sys.argv[1]))}
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
EOF
  chmod 644 "$tmp/hold.py"
}
hold

wait_ready() { # fifo-less: poll the output file for "ready"
  for _ in $(seq 100); do grep -q ready "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "the test program did not start: $(cat "$1")"
  return 1
}

# ---- a movalloc process and a glibc one --------------------------------------
MOVALLOC_TRACE=$tmp/trace.csv PYTHONMALLOC=malloc LD_PRELOAD=$lib \
  "$observe" -i 100 -o "$tmp/observe.csv" -- python3 "$tmp/hold.py" 400000 120 >"$tmp/mov.out" 2>&1 &
pids+=($!)
python3 -c 'import time; x = bytearray(64 << 20); x[::4096] = b"x" * len(x[::4096]); print("ready", flush=True); time.sleep(120)' >"$tmp/glibc.out" 2>&1 &
glibc_pid=$!
pids+=("$glibc_pid")
wait_ready "$tmp/mov.out" && wait_ready "$tmp/glibc.out" || { echo "FAIL cli: start test programs"; exit 1; }
mov_pid=$(pgrep -f "hold.py 400000 120" -P "${pids[0]}")
pids+=("$mov_pid") # ends the observe run too

stat_glibc() {
  local json
  json=$($cli stat --json "$glibc_pid") || return 1
  python3 - "$json" <<'EOF'
import json, sys
info = json.loads(sys.argv[1])
assert info["movalloc"] is None, "a glibc process reported as movalloc"
rows = {r["class"]: r for r in info["mappings"]}
anon = rows.get("anonymous") or rows.get("[heap]")
assert anon, f"no heap-like mapping found: {rows}"
total = sum(r["anon_kib"] for r in rows.values())
assert total >= 60 * 1024, f"the 64 MiB bytearray is missing: {total} KiB anonymous"
for r in rows.values():
    assert 0 <= r["coverage"] <= 1 and r["anon_huge_kib"] <= r["anon_kib"] and r["vmas"] > 0, r
EOF
  $cli stat "$glibc_pid" | grep -q "not a movalloc process"
}
check "stat of a glibc process" stat_glibc

small_no_channel() { # a heap under 16 MiB: no descriptor beyond the program's own
  LD_PRELOAD=$lib sleep 5 &
  local p=$! out
  pids+=("$p")
  sleep 0.5
  if ls -l /proc/$p/fd | grep -q memfd:movalloc; then
    echo "sleep under movalloc has a channel open: $(ls -l /proc/$p/fd)"
    return 1
  fi
  out=$($cli stat "$p") || return 1
  grep -q "libmovalloc is loaded but has no channel" <<<"$out" || { echo "$out"; return 1; }
}
check "a small movalloc program keeps only its own descriptors" small_no_channel

# The compactor moves settled arenas about a second after they fill.
wait_migrated() {
  for _ in $(seq 50); do
    [[ $(wc -l <"$tmp/trace.csv" 2>/dev/null || echo 0) -gt 1 ]] && return 0
    sleep 0.2
  done
  echo "no migration in 10 s: $($cli stat "$mov_pid")"
  return 1
}

stat_movalloc() {
  wait_migrated || return 1
  sleep 1.2 # the next compactor round publishes what it moved
  local json
  json=$($cli stat --json "$mov_pid") || return 1
  python3 - "$json" <<'EOF'
import json, sys
info = json.loads(sys.argv[1])
m = info["movalloc"]
assert m, "no channel found in a movalloc process"
s = m["stats"]
assert 20 << 20 <= s["in_use_bytes"] <= s["committed_bytes"], s
assert m["arena_count"] == len(m["arenas"]) >= s["arena_count"] > 0, (m["arena_count"], s["arena_count"])
active = [a for a in m["arenas"] if a["state"] != "free"]
assert len(active) == s["arena_count"], (len(active), s["arena_count"])
# An idle program: the per-arena walk and the heap's total agree exactly.
assert sum(a["in_use_bytes"] for a in active) == s["in_use_bytes"], \
    (sum(a["in_use_bytes"] for a in active), s["in_use_bytes"])
assert all(a["in_use_bytes"] <= 2 << 20 for a in m["arenas"])
assert s["migrated"] >= 1 and sum(a["moved"] for a in m["arenas"]) == s["migrated"], s["migrated"]
assert sum(a["thp"] for a in active) * (2 << 20) == s["huge_page_bytes"]
rows = {r["class"]: r for r in info["mappings"]}
arenas = rows["movalloc arenas"]
assert arenas["rss_kib"] * 1024 >= s["in_use_bytes"] * 0.9, (arenas, s["in_use_bytes"])
assert arenas["anon_huge_kib"] > 0, "migrated arenas but no AnonHugePages in the arena mapping"
EOF
  $cli stat "$mov_pid" | grep -q "^  arenas "
}
check "stat of a movalloc process (arenas, migrations, huge pages)" stat_movalloc

trace_formats() {
  python3 - "$tmp/trace.csv" <<'EOF' || return 1
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
assert rows[0] == "time_ns,pid,arena,backend,outcome,rc,bytes,stall_us".split(","), rows[0]
assert len(rows) > 1
EOF
  $cli trace "$tmp/trace.csv" >"$tmp/t.csv" && $cli trace --json "$tmp/trace.csv" >"$tmp/t.json" &&
    $cli trace "$mov_pid" >"$tmp/p.csv" && $cli trace --json "$mov_pid" >"$tmp/p.json" || return 1
  python3 - "$tmp" "$mov_pid" <<'EOF'
import csv, json, sys
tmp, pid = sys.argv[1], int(sys.argv[2])
cols = "time_ns,pid,arena,backend,outcome,rc,bytes,stall_us".split(",")
for name in ("t.csv", "p.csv"):
    rows = list(csv.DictReader(open(f"{tmp}/{name}")))
    assert rows, f"{name}: no events"
    assert list(rows[0]) == cols, list(rows[0])
    for r in rows:
        assert int(r["pid"]) == pid and r["outcome"] in ("moved", "retry", "refused", "failed"), r
        assert int(r["bytes"]) in (0, 2 << 20) and int(r["stall_us"]) >= 0 and r["arena"].startswith("0x"), r
for name in ("t.json", "p.json"):
    evs = [json.loads(l) for l in open(f"{tmp}/{name}")]
    assert evs and all(list(e) == cols for e in evs), name
    assert all(isinstance(e["time_ns"], int) and isinstance(e["stall_us"], int) for e in evs)
# The channel's ring and the file saw the same migrations (the ring keeps the last 1024).
f = [(e["arena"], e["outcome"]) for e in map(json.loads, open(f"{tmp}/t.json"))]
p = [(e["arena"], e["outcome"]) for e in map(json.loads, open(f"{tmp}/p.json"))]
assert f[-len(p):] == p or f[:len(p)] == p[:len(f)], (len(f), len(p))
EOF
}
check "trace: CSV and JSON lines, from the file and from the process" trace_formats

top_frames() {
  local n
  n=$($cli top -i 0.2 -n 3 "$mov_pid" </dev/null | grep -c '^--- ') || return 1
  [[ $n == 3 ]] || { echo "expected 3 frames without a tty, got $n"; return 1; }
}
check "top without a terminal prints frames" top_frames

top_tty() { # on a terminal (a pty): redraws, and q ends it at once with status 0
  python3 - "$mov_pid" <<'EOF'
import os, pty, select, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execv("tools/movalloc", ["movalloc", "top", "-i", "0.2", sys.argv[1]])
out = b""
deadline = time.time() + 10
while out.count(b"movalloc top") < 2 and time.time() < deadline:
    if select.select([fd], [], [], 1)[0]:
        out += os.read(fd, 65536)
assert out.count(b"\x1b[H\x1b[2J") >= 2, f"no screen redraws: {out[:300]!r}"
os.write(fd, b"q")
t0 = time.time()
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert time.time() - t0 < 1, "q took more than a second"
EOF
}
check "top on a terminal redraws and quits on q" top_tty

plots() {
  local out
  out=$($cli plot "$tmp/trace.csv" "$tmp/observe.csv" -o "$tmp/p.png") || return 1
  [[ $out == "$tmp/p.png" ]] || { echo "printed '$out', not the path written"; return 1; }
  # Relative paths are the caller's, not the source tree's.
  (cd "$tmp" && "$OLDPWD/$cli" plot trace.csv -o p.svg >/dev/null) || return 1
  python3 - "$tmp/p.png" "$tmp/p.svg" <<'EOF'
import struct, sys, xml.etree.ElementTree as ET
png = open(sys.argv[1], "rb").read()
assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, "not a PNG"
w, h = struct.unpack(">II", png[16:24])
assert w >= 500 and h >= 500, (w, h)
root = ET.parse(sys.argv[2]).getroot()
assert root.tag.endswith("svg") and len(list(root.iter())) > 50, "an empty SVG"
EOF
}
check "plot writes a PNG and an SVG" plots

owner_only() {
  local fd
  fd=$(for f in /proc/"$mov_pid"/fd/*; do
         [[ $(readlink "$f") == /memfd:movalloc* ]] && basename "$f"; done | head -1)
  [[ -n $fd ]] || { echo "no movalloc memfd in /proc/$mov_pid/fd"; return 1; }
  head -c 8 "/proc/$mov_pid/fd/$fd" >/dev/null || { echo "the owner cannot read it"; return 1; }
  if setpriv --reuid=65534 --regid=65534 --clear-groups head -c 8 "/proc/$mov_pid/fd/$fd" \
       >/dev/null 2>&1; then
    echo "user nobody read the channel of a root process"
    return 1
  fi
  local out rc=0
  out=$(setpriv --reuid=65534 --regid=65534 --clear-groups \
        /usr/bin/python3 tools/inspect/inspect.py stat "$mov_pid" 2>&1) || rc=$?
  [[ $rc == 1 && $out == *"belongs to another user"* ]] ||
    { echo "stat as nobody: exit $rc: $out"; return 1; }
}
if [[ $(id -u) == 0 ]]; then
  check "channel and stat: owner only (another user is refused)" owner_only
fi

expect() { # status, message pattern, command...: the command exits so, saying that on stderr
  local want=$1 pattern=$2 out rc=0
  shift 2
  out=$("$@" 2>&1 >/dev/null) || rc=$?
  if [[ $rc != "$want" || $out != *$pattern* ]]; then
    echo "$*: exit $rc (want $want), stderr: $out"
    return 1
  fi
}

errors() {
  expect 1 "does not exist" $cli stat 4194303 &&
  expect 2 "unknown subcommand" $cli frobnicate &&
  expect 2 "required" $cli stat &&
  expect 2 "process id" $cli stat abc &&
  expect 2 "positive number" $cli top -i 0 1 &&
  expect 2 ".png or .svg" $cli plot "$tmp/trace.csv" -o "$tmp/x.jpg" &&
  expect 1 "not a MOVALLOC_TRACE file" $cli plot "$tmp/hold.py" &&
  expect 1 "not a MOVALLOC_TRACE file" $cli trace "$tmp/hold.py" &&
  expect 1 "not a movalloc process" $cli trace "$glibc_pid" &&
  expect 2 "KEY=VALUE" $cli run -o &&
  expect 2 "no subcommand" $cli help nosuch &&
  expect 2 "takes no arguments" $cli lib extra
}
check "bad usage exits 2, failures exit 1, each with a message" errors

helps() {
  for sub in run stat top trace plot options lib; do
    $cli "$sub" --help >/dev/null || { echo "$sub --help failed"; return 1; }
    $cli help "$sub" >/dev/null || { echo "help $sub failed"; return 1; }
  done
}
check "every subcommand has --help" helps

# The developer scripts answer --help without running anything, and refuse
# what they do not know (before building or installing anything).
scripts_usage() {
  local script
  for script in test test-matrix soak; do
    tools/$script --help | grep -q "^Usage: tools/$script" || { echo "$script --help"; return 1; }
  done
  expect 2 "unknown argument '--bogus'" tools/test --bogus &&
  expect 2 "unknown option '--bogus'" tools/test-matrix --bogus &&
  expect 2 "no program 'nosuch'" tools/test-matrix nosuch &&
  expect 2 "unknown argument '--bogus'" tools/soak --bogus
}
check "tools/test, test-matrix and soak: --help, and bad arguments refused" scripts_usage

# ---- documentation matches the code --------------------------------------------
options_documented() {
  python3 - <<'EOF'
import re
code = re.findall(r'\{"(MOVALLOC_[A-Z_]+)"', open("shim/mv_options.c").read())
readme = re.findall(r"^\| `(MOVALLOC_[A-Z_]+)` \|", open("README.md").read(), re.M)
import subprocess
page = subprocess.run(["/usr/bin/python3", "docs/man/fill_options.py", "README.md", "docs/man/movalloc.3.in"],
                      capture_output=True, text=True, check=True).stdout
man = re.findall(r"^\.B (MOVALLOC_[A-Z_]+)$", page, re.M)
assert code, "no options found in shim/mv_options.c"
for where, names in (("README.md's option table", readme), ("movalloc(3), made from it", man)):
    missing, extra = set(code) - set(names), set(names) - set(code)
    assert not missing and not extra, f"{where}: missing {sorted(missing)}, not in the code {sorted(extra)}"
EOF
}
check "every MOVALLOC_* option in shim/mv_options.c is in README's table and movalloc(3)" options_documented

# ---- packaging --------------------------------------------------------------------
install_prefix() {
  local pfx=$tmp/prefix
  tools/install --prefix "$pfx" >/dev/null || return 1
  cat >"$tmp/tiny.c" <<'EOF'
#include <movalloc.h>
#include <stdio.h>
#include <stdlib.h>
int main(void) {
  char *p = malloc(100000);
  struct movalloc_stats s;
  if (movalloc_stats_get(&s) != 0 || s.in_use_bytes < 100000) return 1;
  free(p);
  puts("movalloc linked");
  return 0;
}
EOF
  local flags
  flags=$(PKG_CONFIG_PATH=$pfx/lib/pkgconfig pkg-config --cflags --libs movalloc) || return 1
  # shellcheck disable=SC2086
  gcc "$tmp/tiny.c" -o "$tmp/tiny" $flags || return 1
  [[ $("$tmp/tiny") == "movalloc linked" ]] || { echo "the linked program failed"; return 1; }
  [[ $("$pfx/bin/movalloc" lib) == "$pfx/lib/libmovalloc.so" ]] || { echo "installed CLI: wrong lib"; return 1; }
  "$pfx/bin/movalloc" stat "$mov_pid" | grep -q "^  arenas " || { echo "installed CLI: stat failed"; return 1; }
  MANPATH=$pfx/share/man man -w movalloc >/dev/null && MANPATH=$pfx/share/man man -w 3 movalloc >/dev/null ||
    { echo "man pages not found"; return 1; }
  tools/install --prefix "$pfx" --uninstall >/dev/null || return 1
  local left
  left=$(find "$pfx" -type f)
  [[ -z $left ]] || { echo "uninstall left: $left"; return 1; }
}
check "install into a prefix, pkg-config, link and run, uninstall" install_prefix

exit $failed
