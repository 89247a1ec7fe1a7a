#!/usr/bin/python3
"""movalloc demo: one program under glibc's malloc, glibc's malloc asking for huge pages, and movalloc.

Runs the program three times, one after the other: under glibc's malloc; under
glibc's malloc with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, which madvises its
heap for transparent huge pages (the plain way to ask for them, and a control:
what a huge page's first touch costs on this machine is in its time too); and
under movalloc. Samples each run every half second (/proc/PID/smaps_rollup:
RSS, anonymous RSS, AnonHugePages), prints per phase, for each: the time it
took, huge-page coverage (AnonHugePages / anonymous RSS) at its end and on
average, peak RSS and the program's operations per second; then writes a plot
of coverage over time and prints its path. Everything printed is what was
measured in these runs.

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
SETTLE = 4  # seconds between runs

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
        # Ticks count the operations since the tick before, of one phase (the last
        # one ends it); a rate over less than 3 s says little.
        rate = ops[name] / (end - start) / 1e6 if name in ops and end - start >= 3 else None
        result[name] = (end - start, cov_end, mean, peak, rate)
    return result


def plot(out, title, labels):
    png = out / "coverage.png"
    script = (
        "set terminal png size 1000,500 noenhanced\n"
        f"set output '{png}'\nset datafile separator ','\nset title '{title}'\n"
        "set xlabel 'seconds since start'\nset ylabel 'huge-page coverage %'\nset yrange [0:105]\n"
        "set key bottom right\nset grid\n"
        "plot " + ", ".join(f"'{out / (label + '.csv')}' using 1:($3*100) with lines lw 2 title '{label}'"
                            for label, _ in labels) + "\n")
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
    print(f"movalloc demo: {about}.")
    print("Run under glibc's malloc, glibc's malloc with GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    print("(it madvises its heap for huge pages), and movalloc, 4 s apart; sampled every 0.5 s;")
    print("coverage = AnonHugePages / anonymous RSS of the process.")
    print(f"THP here: enabled={read_sys('enabled')}, defrag={read_sys('defrag')}.\n", flush=True)
    labels = [("glibc", {}), ("glibc+THP", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
              ("movalloc", {"LD_PRELOAD": args.movalloc})]
    res = {}
    walls = {}
    for i, (label, extra) in enumerate(labels):
        if i:
            # Memory the run before freed is still backed by the host for a moment
            # (a virtual machine's free page reporting waits 2 s): a run right after
            # one that freed huge pages would fault them in cheaply, and the one
            # before it paid (docs/RESULTS.md, section 3, tenth session).
            time.sleep(SETTLE)
        print(f"  running under {label}...", file=sys.stderr, flush=True)
        samples, phases, ops, wall = run(label, cmd, {**env, **extra}, out / f"{label}.csv")
        res[label] = per_phase(samples, phases, ops, wall)
        walls[label] = wall
    names = list(res["movalloc"])
    names += [n for lab in res.values() for n in lab if n not in names]
    print("%-8s %-10s %7s %9s %8s %9s %6s" % ("phase", "malloc", "time s", "cov end", "cov avg",
                                              "peak MiB", "Mop/s"))
    for n in names:
        first = True
        for label, _ in labels:
            r = res[label].get(n)
            if not r:
                continue
            rate = "-" if r[4] is None else "%.2f" % r[4]
            print("%-8s %-10s %7.1f %8.1f%% %7.1f%% %9.0f %6s" % (
                n if first else "", label, r[0], 100 * r[1], 100 * r[2], r[3], rate))
            first = False
    print("total    " + ", ".join("%s %.1f s" % (label, walls[label]) for label, _ in labels))
    if any(r[4] is not None for lab in res.values() for r in lab.values()):
        print("(Mop/s: the workload's operations per second in phases of 3 s or more; the churn")
        print(" phases run for a fixed time, so compare their Mop/s, not their time)")
    png = plot(out, "huge-page coverage over time: " + (what[0] if len(what) == 1 else os.path.basename(what[0])),
               labels)
    if png:
        print(f"\nplot of coverage over time: {png}")
    print("samples: " + ", ".join(str(out / f"{label}.csv") for label, _ in labels))


def read_sys(name):
    try:
        return pathlib.Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


if __name__ == "__main__":
    main()
