#!/usr/bin/python3
"""movalloc demo: one program under glibc's malloc and under movalloc, one after the other.

Samples each run every half second (/proc/PID/smaps_rollup: RSS, anonymous
RSS, AnonHugePages), prints per phase, for both: the time it took, huge-page
coverage (AnonHugePages / anonymous RSS) at its end and on average, and peak
RSS; then writes a plot of coverage over time and prints its path. Everything
printed is what was measured in these two runs.

Phases: a program marks the start of a phase by printing a line "phase NAME"
on stdout ("phase end" ends the last one); a program that prints none is one
phase, "run". bench/wl_phased and tools/demo/lookup.py print them.

    demo.py --movalloc LIB --workload WL_PHASED [phased | python | -- CMD ARGS...]
"""

import argparse
import os
import pathlib
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
INTERVAL = 0.5

sys.path.insert(0, str(REPO / "bench"))
from phased import rollup  # noqa: E402  (rss, anon, anon_huge) in KiB, or None


def run(label, cmd, env, csv_path):
    """Runs cmd, sampling it; returns (samples [(t, rss_kib, coverage)], phases [(name, t)],
    operations per phase, wall)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    phases = []
    ops = {}  # phase -> operations, from "tick T PHASE OPS ..." lines (bench/wl_phased)

    def reader():
        for line in proc.stdout:
            w = line.split()
            if len(w) >= 2 and w[0] == "phase":
                phases.append((w[1], time.monotonic() - t0))
            elif len(w) >= 4 and w[0] == "tick":
                ops[w[2]] = ops.get(w[2], 0) + int(w[3])

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    samples = []
    while proc.poll() is None:
        r = rollup(proc.pid)
        if r:
            rss, anon, huge = r
            samples.append((time.monotonic() - t0, rss, huge / anon if anon else 0.0))
        time.sleep(INTERVAL)
    th.join()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"demo: the {label} run failed (exit {proc.returncode}): {' '.join(cmd)}")
    with open(csv_path, "w") as f:
        f.write("t_s,rss_kib,coverage\n")
        for s in samples:
            f.write("%.2f,%d,%.4f\n" % s)
    if not phases or phases[0][1] > INTERVAL * 2:
        phases.insert(0, ("run" if not phases else "start", 0.0))
    return samples, phases, ops, wall


def per_phase(samples, phases, ops, wall):
    """{name: (seconds, coverage at end, mean coverage, peak RSS MiB, Mops/s or None)}."""
    result = {}
    ends = [t for _, t in phases[1:]] + [wall]
    for (name, start), end in zip(phases, ends):
        if name == "end":
            continue
        inside = [s for s in samples if start <= s[0] < end]
        if not inside:  # shorter than a sample: the first sample after its start
            inside = [s for s in samples if s[0] >= start][:1]
        cov_end = inside[-1][2] if inside else 0.0
        mean = sum(s[2] for s in inside) / len(inside) if inside else 0.0
        peak = max((s[1] for s in inside), default=0) / 1024
        # Ticks come once a second and count the second before: only long phases have a rate.
        rate = ops[name] / (end - start) / 1e6 if name in ops and end - start >= 3 else None
        result[name] = (end - start, cov_end, mean, peak, rate)
    return result


def plot(out, title):
    png = out / "coverage.png"
    script = (
        "set terminal png size 1000,500 noenhanced\n"
        f"set output '{png}'\nset datafile separator ','\nset title '{title}'\n"
        "set xlabel 'seconds since start'\nset ylabel 'huge-page coverage %'\nset yrange [0:105]\n"
        "set key bottom right\nset grid\n"
        f"plot '{out / 'glibc.csv'}' using 1:($3*100) with lines lw 2 title 'glibc', "
        f"'{out / 'movalloc.csv'}' using 1:($3*100) with lines lw 2 title 'movalloc'\n")
    r = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
    if r.returncode != 0:
        print("demo: gnuplot failed: " + r.stderr.strip(), file=sys.stderr)
        return None
    return png


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--movalloc", required=True)
    ap.add_argument("--workload", required=True, help="bench/wl_phased")
    ap.add_argument("--out", default="/tmp/movalloc-demo", help="CSVs and plot (default /tmp/movalloc-demo)")
    ap.add_argument("--heap-mib", type=int, default=1024, help="phased: heap size (default 1024)")
    ap.add_argument("what", nargs="*", help="phased (default), python, or -- CMD ARGS")
    args = ap.parse_args()
    what = args.what or ["phased"]
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if what == ["phased"]:
        cmd = [args.workload, "--heap-mib", str(args.heap_mib), "--churn-s", "10", "--steady-s", "8"]
        about = (f"bench/wl_phased: grows {args.heap_mib} MiB of small objects, churns them 10 s "
                 "(a quarter long-lived), frees 3 in 4 of the rest, churns 8 s, grows back, churns 10 s")
    elif what == ["python"]:
        cmd = ["/usr/bin/python3", str(REPO / "tools/demo/lookup.py"), "4000000", "4000000", "3"]
        env["PYTHONMALLOC"] = "malloc"  # every object from the allocator under test
        about = ("python3 builds a dict of 4 million small objects, waits 3 s, then does 4 million "
                 "random lookups (PYTHONMALLOC=malloc)")
    else:
        cmd = what
        about = " ".join(cmd)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"movalloc demo: {about}; once under glibc's malloc, once under movalloc.")
    print("Sampled every 0.5 s; coverage = AnonHugePages / anonymous RSS of the process.")
    print(f"THP here: enabled={read_sys('enabled')}, defrag={read_sys('defrag')}.\n", flush=True)
    res = {}
    walls = {}
    for label in ("glibc", "movalloc"):
        e = dict(env)
        if label == "movalloc":
            e["LD_PRELOAD"] = args.movalloc
        print(f"  running under {label}...", file=sys.stderr, flush=True)
        samples, phases, ops, wall = run(label, cmd, e, out / f"{label}.csv")
        res[label] = per_phase(samples, phases, ops, wall)
        walls[label] = wall
    names = list(res["movalloc"])
    names += [n for n in res["glibc"] if n not in names]
    print("%-8s | %-43s | %-43s" % ("", "glibc", "movalloc"))
    print("%-8s | %s | %s" % ("phase", *["%7s %9s %8s %9s %6s" % (
        "time s", "cov end", "cov avg", "peak MiB", "Mop/s")] * 2))
    for n in names:
        cells = []
        for label in ("glibc", "movalloc"):
            r = res[label].get(n)
            rate = "-" if not r or r[4] is None else "%.2f" % r[4]
            cells.append("%7.1f %8.1f%% %7.1f%% %9.0f %6s" % (r[0], 100 * r[1], 100 * r[2], r[3], rate)
                         if r else "%43s" % "-")
        print("%-8s | %s | %s" % (n, cells[0], cells[1]))
    print("%-8s | %7.1f %35s | %7.1f" % ("total", walls["glibc"], "", walls["movalloc"]))
    if any(r[4] is not None for lab in res.values() for r in lab.values()):
        print("(Mop/s: the workload's operations per second in phases of 3 s or more; the churn")
        print(" phases run for a fixed time, so compare their Mop/s, not their time)")
    png = plot(out, "huge-page coverage over time: " + (what[0] if len(what) == 1 else os.path.basename(what[0])))
    if png:
        print(f"\nplot of coverage over time: {png}")
    print(f"samples: {out / 'glibc.csv'}, {out / 'movalloc.csv'}")


def read_sys(name):
    try:
        return pathlib.Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


if __name__ == "__main__":
    main()
