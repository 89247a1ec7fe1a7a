#!/usr/bin/python3
"""Huge-page coverage over time: bench/wl_phased under every allocator, one after another.

Every second (--interval) it records, per allocator: huge-page coverage
(AnonHugePages / anonymous RSS, /proc/PID/smaps_rollup), RSS, the workload's
operations in that second, and for movalloc the CPU time of its compactor thread
(/proc/PID/task/TID/stat). Writes one CSV per allocator, a summary table per
phase (coverage at the end of the phase, seconds until coverage is back at 95%,
peak RSS, throughput) and one gnuplot plot of coverage over time for all of them.

With --fragment PATH (tools/fragment, root), each run starts while fragment holds
every free 2 MiB block, so the heap is built while THP faults fail; fragment is
stopped (undone) when the first grow phase ends, and the run goes on.

    /usr/bin/python3 bench/phased.py --movalloc LIB --workload BIN --out DIR [--fragment F]
"""

import argparse
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

LIBDIR = "/usr/lib/x86_64-linux-gnu"
TARGET = 0.95

# name -> (LD_PRELOAD or None, extra environment); "{movalloc}" is --movalloc.
ALLOCATORS = {
    "movalloc": ("{movalloc}", {}),
    # The RSS baseline: no compactor and no huge pages at fault time (4 KiB pages only).
    "movalloc-nocompact": ("{movalloc}", {"MOVALLOC_COMPACT": "0", "MOVALLOC_THP": "compact"}),
    # movalloc with huge pages from the compactor only: what repairing a 4 KiB heap costs.
    "movalloc-thp-compact": ("{movalloc}", {"MOVALLOC_THP": "compact"}),
    "glibc": (None, {}),
    "glibc-hugetlb": (None, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
    "jemalloc-thp": (f"{LIBDIR}/libjemalloc.so.2", {"MALLOC_CONF": "thp:always"}),
    "tcmalloc": (f"{LIBDIR}/libtcmalloc_minimal.so.4", {}),
    # mimalloc 2.0 (Debian 12) reads MIMALLOC_LARGE_OS_PAGES; 2.1 renamed it ALLOW_LARGE_OS_PAGES.
    "mimalloc-large": (f"{LIBDIR}/libmimalloc.so.2",
                       {"MIMALLOC_LARGE_OS_PAGES": "1", "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}),
}


def rollup(pid):
    """(rss_kib, anon_kib, anon_huge_kib) or None when the process is gone."""
    vals = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in ("Rss", "Anonymous", "AnonHugePages"):
                    vals[k] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if "Rss" not in vals:
        return None
    return vals["Rss"], vals.get("Anonymous", 0), vals.get("AnonHugePages", 0)


def thread_cpu_s(pid, comm_prefix):
    """CPU seconds (user + system) of the process's threads whose name starts with comm_prefix."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        if name.startswith(comm_prefix):
            fields = s[s.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Fragmenter:
    """tools/fragment --until-signal, started before a run and stopped after its first grow."""

    def __init__(self, path, log):
        # --no-compact: skip fragment's own check that compaction moves no pinned page (on 6.18
        # it moved 2 of 7737 once and fragment exited 4); the THP probe still runs.
        self.proc = subprocess.Popen([path, "--until-signal", "--no-compact"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.log = log
        for line in self.proc.stderr:
            log.write(line)
            log.flush()
            if "holding until" in line:
                break
        else:
            raise SystemExit(f"fragment ended before holding (exit {self.proc.wait()})")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.write(line)
        self.log.flush()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait()
        self.proc = None


def run_one(name, args, out):
    preload, extra = ALLOCATORS[name]
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env.update(extra)
    if preload:
        env["LD_PRELOAD"] = preload.format(movalloc=args.movalloc)
    cmd = [args.workload, "--heap-mib", str(args.heap_mib), "--churn-s", str(args.churn_s),
           "--steady-s", str(args.steady_s)]
    frag = None
    if args.fragment:
        frag = Fragmenter(args.fragment, open(out / f"{name}.fragment.log", "w"))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    phases = []  # (name, t)
    ops = {}     # second -> ops
    lock = threading.Lock()

    def reader():
        for line in proc.stdout:
            w = line.split()
            with lock:
                if w and w[0] == "phase":
                    phases.append((w[1], time.monotonic() - t0))
                    if frag and w[1] == "churn":
                        frag.stop()
                elif w and w[0] == "tick":
                    second = int(time.monotonic() - t0)  # a phase's last tick may share it
                    ops[second] = ops.get(second, 0) + int(w[3])

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    rows = []
    cpu0 = 0.0
    while proc.poll() is None:
        time.sleep(args.interval)
        t = time.monotonic() - t0
        r = rollup(proc.pid)
        cpu = thread_cpu_s(proc.pid, "movalloc-cmpct") if name.startswith("movalloc") else 0.0
        if r is None or cpu is None:
            continue
        with lock:
            phase = phases[-1][0] if phases else "start"
        rows.append([t, phase, r[0], r[1], r[2], r[2] / r[1] if r[1] else 0.0, cpu - cpu0])
        cpu0 = cpu
    th.join()
    if frag:
        frag.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: workload exited with {proc.returncode}")
    with open(out / f"{name}.csv", "w") as f:
        f.write("t_s,phase,rss_kib,anon_kib,anon_huge_kib,coverage,compactor_cpu_s,ops\n")
        for row in rows:
            f.write("%.2f,%s,%d,%d,%d,%.4f,%.4f,%d\n" % (*row, ops.get(int(row[0]) - 1, 0)))
    return rows, phases, ops, time.monotonic() - t0


def summarise(name, rows, phases, ops, wall, interval):
    """Per phase: coverage at its end, seconds from its start until coverage >= 95%, peak RSS,
    operations per second; overall: compactor CPU over the steady phases."""
    out = []
    ends = [t for _, t in phases[1:]] + [wall]
    for (ph, start), end in zip(phases, ends):
        if ph == "end":
            continue
        inside = [r for r in rows if start <= r[0] < end]
        after = [r for r in rows if r[0] >= start]
        back = next((r[0] - start for r in after if r[5] >= TARGET), None)
        cov_end = inside[-1][5] if inside else (after[0][5] if after else 0.0)
        secs = [s for s in ops if start <= s < end - 1]
        thr = sum(ops[s] for s in secs) / len(secs) if secs else None
        peak = max((r[2] for r in inside), default=0) / 1024
        cpu = sum(r[6] for r in inside)
        out.append({"alloc": name, "phase": ph, "start": start, "len": end - start,
                    "cov_end": cov_end, "back": back, "peak_rss_mib": peak, "ops_s": thr,
                    "cpu_pct": 100 * cpu / (end - start) if end > start else 0.0})
    return out


def plot(out, names, title):
    png = out / "coverage.png"
    gp = out / "coverage.gp"
    lines = ", ".join(
        f"'{out / (n + '.csv')}' using 1:($6*100) with lines lw 2 title '{n}'" for n in names)
    gp.write_text(
        "set terminal pngcairo size 1100,550 noenhanced\n" if has_cairo() else
        "set terminal png size 1100,550 noenhanced\n")
    with open(gp, "a") as f:
        f.write(f"set output '{png}'\nset datafile separator ','\n"
                f"set title '{title}'\nset xlabel 'seconds'\nset ylabel 'huge-page coverage %'\n"
                "set yrange [0:105]\nset key outside right\nset grid\n"
                f"plot {lines}, 95 with lines dt 2 lc rgb 'gray' title '95%'\n")
    subprocess.run(["gnuplot", str(gp)], check=True)
    return png


def has_cairo():
    r = subprocess.run(["gnuplot", "-e", "set terminal"], capture_output=True, text=True)
    return "pngcairo" in (r.stdout + r.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--movalloc", required=True, help="path of libmovalloc.so")
    ap.add_argument("--workload", required=True, help="path of bench/wl_phased")
    ap.add_argument("--out", required=True, help="directory for the CSVs, summary and plot")
    ap.add_argument("--allocators", default=",".join(a for a in ALLOCATORS if a != "movalloc-thp-compact"),
                    help="comma-separated, run in this order (default: all but movalloc-thp-compact): "
                    + ",".join(ALLOCATORS))
    ap.add_argument("--heap-mib", type=int, default=2048)
    ap.add_argument("--churn-s", type=float, default=15)
    ap.add_argument("--steady-s", type=float, default=10)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--fragment", help="tools/fragment binary: build each heap while THP faults fail")
    ap.add_argument("--title", default="huge-page coverage, bench/wl_phased")
    args = ap.parse_args()
    names = args.allocators.split(",")
    for n in names:
        if n not in ALLOCATORS:
            sys.exit(f"unknown allocator {n}; known: {','.join(ALLOCATORS)}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for n in names:
        print(f"phased: {n}...", file=sys.stderr, flush=True)
        rows, phases, ops, wall = run_one(n, args, out)
        table += summarise(n, rows, phases, ops, wall, args.interval)
    lines = ["| allocator | phase | start s | coverage at end | s to >= 95% | peak RSS MiB | "
             "Mops/s | compactor CPU % |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        back = "never" if r["back"] is None else "%.0f" % r["back"]
        thr = "-" if r["ops_s"] is None else "%.2f" % (r["ops_s"] / 1e6)
        lines.append("| %s | %s | %.0f | %.1f%% | %s | %.0f | %s | %.2f |" % (
            r["alloc"], r["phase"], r["start"], 100 * r["cov_end"], back, r["peak_rss_mib"], thr,
            r["cpu_pct"]))
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    print("plot:", plot(out, names, args.title))


if __name__ == "__main__":
    main()
