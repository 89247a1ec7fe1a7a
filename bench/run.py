#!/usr/bin/python3
"""Run the bench/ workloads under glibc, jemalloc, tcmalloc, mimalloc and movalloc.

Every workload runs under every allocator (LD_PRELOAD) in one invocation, the
allocators interleaved within each repetition so machine noise spreads over all
of them. Reports the median wall time and peak RSS per workload and allocator,
movalloc's ratios to glibc and to the best of jemalloc/tcmalloc/mimalloc, and
their geometric means. A crash, a corruption report or a checksum that differs
between allocators is an error row and makes the exit status non-zero.

    /usr/bin/python3 bench/run.py [--reps 3] [--markdown out.md] [--json out.json]

See bench/README.md.
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
LIBDIR = "/usr/lib/x86_64-linux-gnu"

# name -> (accepts --threads, accepts --big); order is the report's row order.
WORKLOADS = {
    "churn": (False, False),
    "threads": (True, False),
    "xthread": (True, False),
    "larson": (True, False),
    "realloc": (False, False),
    "large": (False, False),
    "fragment": (False, False),
    "chase": (False, True),
    "kv": (False, False),
    "cxx": (False, False),
}
# Run only when named with --only; not part of the tables' geometric means.
EXTRA_WORKLOADS = {
    "hugegrow": (False, False),
}

PEERS = {
    "glibc": None,
    "jemalloc": f"{LIBDIR}/libjemalloc.so.2",
    "tcmalloc": f"{LIBDIR}/libtcmalloc_minimal.so.4",
    "mimalloc": f"{LIBDIR}/libmimalloc.so.2",
}
BEST_OF = ("jemalloc", "tcmalloc", "mimalloc")
NOISY_SPREAD = 0.25  # (max - min) / median of the wall times above which a cell is marked "~"
ALL_ALLOCATORS = list(PEERS) + ["movalloc"]
# WARMUP: on a virtual machine with free page reporting (virtio-balloon), free
# 2 MiB blocks are handed back to the hypervisor about 2 s after they merge,
# and the next process to fault one in as a huge page pays the host's faults
# (chase under movalloc here: 1.04 s back to back, 1.6-2.3 s 5 s apart).
# Allocators that use 4 KiB pages mostly get recently freed memory instead. A
# warm-up run just before each measured one gives every allocator memory the
# machine has just used, as a long-running server's heap is.
PAGE_REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"
DEBIAN_PACKAGES = ["libc6", "libjemalloc2", "libtcmalloc-minimal4", "libmimalloc2.0"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions per workload and allocator (default 3)")
    ap.add_argument("--warmup", type=int, default=1, metavar="N",
                    help="unmeasured runs of the same workload and allocator right before each measured "
                         "one (default 1; see WARMUP)")
    ap.add_argument("--only", help="comma-separated workloads (default: all): " + ",".join(WORKLOADS) +
                    "; also " + ",".join(EXTRA_WORKLOADS))
    ap.add_argument("--allocators", help="comma-separated allocators (default: all): " + ",".join(ALL_ALLOCATORS))
    ap.add_argument("--scale", type=float, help="work multiplier passed to every workload")
    ap.add_argument("--threads", type=int, help="thread count for the threaded workloads")
    ap.add_argument("--big", action="store_true", help="chase over a multi-GiB heap")
    ap.add_argument("--movalloc", default=str(REPO / "bazel-bin/shim/libmovalloc.so"),
                    help="path of libmovalloc.so (default: bazel-bin/shim/libmovalloc.so in the repo)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="set in every run's environment")
    ap.add_argument("--json", metavar="FILE", help="write every run and the summary as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="write the report as Markdown for docs/RESULTS.md")
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a run counts as hung (default 300)")
    ap.add_argument("--build", action="store_true", help="run bazel build //bench/... first even if up to date")
    ap.add_argument("--bazel-output-base", metavar="DIR",
                    help="build and take binaries from this bazel output base instead of bazel-bin")
    args = ap.parse_args()

    args.workloads = pick(args.only, list(WORKLOADS), "workload", list(EXTRA_WORKLOADS))
    args.allocator_names = pick(args.allocators, ALL_ALLOCATORS, "allocator")
    for kv in args.env:
        if "=" not in kv:
            ap.error(f"--env wants K=V, got {kv!r}")
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    return args


def pick(csv, known, what, extra=()):
    if not csv:
        return list(known)
    names = [n.strip() for n in csv.split(",") if n.strip()]
    unknown = [n for n in names if n not in known and n not in extra]
    if unknown:
        sys.exit(f"run.py: unknown {what}(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def resolve_allocators(args):
    """Returns {name: preload path or None}, dropping a movalloc that is not built."""
    out = {}
    for name in args.allocator_names:
        if name != "movalloc":
            out[name] = PEERS[name]
            continue
        path = pathlib.Path(args.movalloc)
        if path.exists():
            out[name] = str(path.resolve())
        elif args.allocators:
            sys.exit(f"run.py: movalloc requested but {path} does not exist")
        else:
            print(f"run.py: movalloc SKIPPED: {path} does not exist "
                  f"(build it with bazel build //shim/..., or pass --movalloc PATH)", file=sys.stderr)
    for name, path in out.items():
        if path and not os.path.exists(path):
            sys.exit(f"run.py: {name} library {path} not found")
    return out


def needs_build(bin_dir, binaries):
    """True if a binary is missing or older than its sources (BUILD edits do not
    count: bazel does not relink a binary whose inputs did not change)."""
    bench = REPO / "bench"
    for b in binaries:
        path = bin_dir / b
        sources = [bench / (b + ".c")] + ([bench / "wl_common.h"] if b.startswith("wl_") else [])
        if not path.exists() or path.stat().st_mtime < max(s.stat().st_mtime for s in sources):
            return True
    return False


def locate_binaries(args, workloads):
    """Returns the directory holding measure and the wl_* binaries, building them if needed."""
    binaries = ["measure"] + ["wl_" + w for w in workloads]
    startup = [f"--output_base={args.bazel_output_base}"] if args.bazel_output_base else []
    bin_dir = REPO / "bazel-bin" / "bench"
    if args.bazel_output_base:
        bin_dir = pathlib.Path(args.bazel_output_base) / "execroot/movalloc/bazel-out/k8-fastbuild/bin/bench"
    if args.build or needs_build(bin_dir, binaries):
        # A private output base must not repoint the shared bazel-bin symlink.
        build_opts = ["--symlink_prefix=/"] if args.bazel_output_base else []
        cmd = ["bazel", *startup, "build", *build_opts, "//bench/..."]
        print("run.py: building: " + shlex.join(cmd), file=sys.stderr)
        subprocess.run(cmd, cwd=REPO, check=True)
        info = subprocess.run(["bazel", *startup, "info", "bazel-bin"], cwd=REPO, check=True,
                              capture_output=True, text=True)
        bin_dir = pathlib.Path(info.stdout.strip()) / "bench"
    missing = [b for b in binaries if not (bin_dir / b).exists()]
    if missing:
        sys.exit(f"run.py: missing in {bin_dir}: {', '.join(missing)}")
    return bin_dir


def workload_argv(args, bin_dir, workload):
    threaded, has_big = {**WORKLOADS, **EXTRA_WORKLOADS}[workload]
    argv = [str(bin_dir / ("wl_" + workload))]
    if args.scale is not None:
        argv += ["--scale", repr(args.scale)]
    if args.threads is not None and threaded:
        argv += ["--threads", str(args.threads)]
    if args.big and has_big:
        argv.append("--big")
    return argv


def run_once(args, bin_dir, workload, allocator, preload):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(kv.split("=", 1) for kv in args.env)
    result = {"workload": workload, "allocator": allocator, "error": None, "metrics": {}, "checksum": None}
    with tempfile.TemporaryDirectory(prefix="movalloc-bench-") as tmp:
        report, out, err = (pathlib.Path(tmp) / n for n in ("report", "stdout", "stderr"))
        cmd = [str(bin_dir / "measure"), *(["-p", preload] if preload else []), str(report)]
        cmd += workload_argv(args, bin_dir, workload)
        with open(out, "wb") as fo, open(err, "wb") as fe:
            # Own session, so a timeout kills the workload and not just measure.
            proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True)
            try:
                proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                result["error"] = f"timeout after {args.timeout:g} s"
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        fields = report.read_text().split() if report.exists() else []
    result["stderr_tail"] = stderr[-2000:]
    if result["error"]:
        return result
    if not fields:
        result["error"] = f"no report from measure (exit {proc.returncode})"
        return result
    rep = dict(zip(fields[0::2], fields[1::2]))
    result.update(wall_s=float(rep["wall_s"]), user_s=float(rep["user_s"]), sys_s=float(rep["sys_s"]),
                  maxrss_kib=int(rep["maxrss_kib"]))
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "checksum":
            result["checksum"] = parts[1]
        elif len(parts) == 3 and parts[0] == "metric":
            result["metrics"][parts[1]] = float(parts[2])
    if rep["signal"] != "0":
        result["error"] = f"killed by signal {rep['signal']} ({signal.Signals(int(rep['signal'])).name})"
    elif rep["exit"] != "0":
        first = next((l for l in stderr.splitlines() if l.strip()), "")
        result["error"] = f"exit {rep['exit']}" + (f": {first}" if first else "")
    elif result["checksum"] is None:
        result["error"] = "no checksum line"
    return result


def progress(text, final=False):
    """On a terminal, one line rewritten in place (errors stay); in a log, one line per run."""
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
    elif final:
        sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_all(args, bin_dir, allocators):
    names = list(allocators)
    total = args.reps * len(args.workloads) * len(names)
    runs, done = [], 0
    for rep in range(args.reps):
        # Rotate the allocator order each repetition so none always runs first.
        order = names[rep % len(names):] + names[:rep % len(names)]
        for workload in args.workloads:
            for allocator in order:
                done += 1
                progress(f"[{done:3d}/{total}] rep {rep + 1}/{args.reps} {workload:<9} {allocator:<9} ...")
                for _ in range(args.warmup):
                    run_once(args, bin_dir, workload, allocator, allocators[allocator])
                r = run_once(args, bin_dir, workload, allocator, allocators[allocator])
                r["rep"] = rep
                runs.append(r)
                status = r["error"] or f"{r['wall_s']:.2f} s {r['maxrss_kib'] / 1024:.1f} MiB"
                progress(f"[{done:3d}/{total}] rep {rep + 1}/{args.reps} {workload:<9} {allocator:<9} {status}",
                         final=bool(r["error"]) or not sys.stderr.isatty())
    progress(f"done: {total} runs", final=True)
    return runs


def check_checksums(runs, workloads):
    """Marks runs whose checksum disagrees with the reference (glibc's, else the most common)."""
    for workload in workloads:
        ok = [r for r in runs if r["workload"] == workload and not r["error"]]
        sums = [r["checksum"] for r in ok]
        if len(set(sums)) <= 1:
            continue
        ref_runs = [r["checksum"] for r in ok if r["allocator"] == "glibc"]
        ref = statistics.mode(ref_runs or sums)
        for r in ok:
            if r["checksum"] != ref:
                r["error"] = f"checksum {r['checksum']} != {ref}"


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(runs, workloads, allocators):
    """Per workload: per allocator medians (or an error), and movalloc's ratios."""
    rows = []
    for workload in workloads:
        cells = {}
        for allocator in allocators:
            mine = [r for r in runs if r["workload"] == workload and r["allocator"] == allocator]
            errors = sorted({r["error"] for r in mine if r["error"]})
            if errors:
                cells[allocator] = {"error": "; ".join(errors)}
                continue
            metric_names = sorted({m for r in mine for m in r["metrics"]})
            walls = [r["wall_s"] for r in mine]
            cells[allocator] = {
                "wall_s": statistics.median(walls),
                "wall_spread": (max(walls) - min(walls)) / statistics.median(walls),
                "rss_mib": statistics.median(r["maxrss_kib"] for r in mine) / 1024,
                "metrics": {m: statistics.median(r["metrics"][m] for r in mine if m in r["metrics"])
                            for m in metric_names},
                "checksum": mine[0]["checksum"],
            }
        row = {"workload": workload, "cells": cells}
        for key in ("wall_s", "rss_mib"):
            row[key + "_vs_glibc"] = ratio(cells, "movalloc", ["glibc"], key)
            row[key + "_vs_best"] = ratio(cells, "movalloc", BEST_OF, key)
        rows.append(row)
    return rows


def ratio(cells, who, against, key):
    mine = cells.get(who, {}).get(key)
    others = [cells[a][key] for a in against if a in cells and key in cells[a]]
    if mine is None or not others or min(others) <= 0:
        return None
    return mine / min(others)


def fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def table(rows, allocators, key, digits, title):
    has_mov = "movalloc" in allocators
    head = ["workload"] + allocators + (["mov/glibc", "mov/best"] if has_mov else [])
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for a in allocators:
            c = row["cells"][a]
            noisy = key == "wall_s" and c.get("wall_spread", 0) > NOISY_SPREAD
            cells.append("ERROR" if "error" in c else fmt(c[key], digits) + (" ~" if noisy else ""))
        if has_mov:
            cells += [fmt(row[key + "_vs_glibc"]), fmt(row[key + "_vs_best"])]
        lines.append(f"| {row['workload']} | " + " | ".join(cells) + " |")
    # Each allocator's geometric mean relative to glibc, then movalloc's ratios.
    foot = []
    for a in allocators:
        rel = [row["cells"][a][key] / row["cells"]["glibc"][key] for row in rows
               if key in row["cells"].get("glibc", {}) and key in row["cells"][a]]
        foot.append(fmt(geomean(rel)) + "×" if rel else "—")
    if has_mov:
        foot += [fmt(geomean([r[key + "_vs_glibc"] for r in rows])),
                 fmt(geomean([r[key + "_vs_best"] for r in rows]))]
    lines.append("| geomean vs glibc | " + " | ".join(foot) + " |")
    return lines


def metrics_table(rows, allocators):
    lines = []
    for row in rows:
        names = sorted({m for c in row["cells"].values() for m in c.get("metrics", {})})
        for m in names:
            vals = [fmt(row["cells"][a].get("metrics", {}).get(m), 1) for a in allocators]
            lines.append(f"| {row['workload']} | {m} | " + " | ".join(vals) + " |")
    if not lines:
        return []
    head = ["workload", "metric"] + allocators
    return ["**Workload metrics** (median; printed by the workload itself)", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + lines


def error_lines(rows):
    out = []
    for row in rows:
        for a, c in row["cells"].items():
            if "error" in c:
                out.append(f"- {row['workload']} / {a}: {c['error']}")
    return ["**Errors**", ""] + out if out else []


def read_first(path, default="?"):
    try:
        return pathlib.Path(path).read_text().strip()
    except OSError:
        return default


def machine_info(args):
    cpu = next((l.split(":", 1)[1].strip() for l in read_first("/proc/cpuinfo", "").splitlines()
                if l.startswith("model name")), platform.processor() or "?")
    mem_kib = next((int(l.split()[1]) for l in read_first("/proc/meminfo", "").splitlines()
                    if l.startswith("MemTotal:")), 0)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "kernel": " ".join(platform.uname()[2:4]),
        "machine": f"{cpu}, {os.cpu_count()} CPUs, {mem_kib / 1048576:.0f} GiB RAM",
        "thp": "enabled " + read_first("/sys/kernel/mm/transparent_hugepage/enabled")
               + "; defrag " + read_first("/sys/kernel/mm/transparent_hugepage/defrag"),
        "free page reporting": ("order " + read_first(PAGE_REPORTING_ORDER)
                                if os.path.exists(PAGE_REPORTING_ORDER) else "none"),
        "warm-up runs": str(args.warmup),
    }
    try:
        pkgs = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *DEBIAN_PACKAGES],
                              capture_output=True, text=True).stdout.split("\n")
        info["packages"] = ", ".join(p for p in pkgs if p)
    except OSError:
        pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        info["tree"] = head + (" + uncommitted changes" if dirty else "")
    except OSError:
        pass
    return info


def markdown(args, meta, rows, allocators, skipped_movalloc):
    lines = [
        f"Command: `{meta['command']}`",
        "",
        f"- Date: {meta['date']}",
        f"- Kernel: {meta['kernel']}",
        f"- Machine: {meta['machine']}",
        f"- THP: {meta['thp']}",
        f"- Free page reporting to the hypervisor: {meta['free page reporting']}; "
        f"warm-up runs before each measured one: {meta['warm-up runs']}",
        # Other work on the machine is the usual cause of noisy cells.
        f"- Load average (1 min): {meta['load_before']:.2f} before, {meta['load_after']:.2f} after",
    ]
    for key, label in (("packages", "Peers (Debian)"), ("tree", "Tree")):
        if key in meta:
            lines.append(f"- {label}: {meta[key]}")
    if "movalloc" in meta["allocators"]:
        lines.append(f"- movalloc: {meta['allocators']['movalloc']}")
    if skipped_movalloc:
        lines.append(f"- movalloc: **not run** ({args.movalloc} does not exist)")
    lines.append(f"- Repetitions: {args.reps}, scale {args.scale or 1:g}"
                 + (f", threads {args.threads}" if args.threads else "")
                 + (", chase --big" if args.big else "")
                 + (", env " + " ".join(args.env) if args.env else ""))
    lines.append("")
    lines += table(rows, allocators, "wall_s", 2, f"Wall time, s (median of {args.reps})")
    lines.append("")
    lines += table(rows, allocators, "rss_mib", 1, f"Peak RSS, MiB (median of {args.reps})")
    for section in (metrics_table(rows, allocators), error_lines(rows)):
        if section:
            lines += [""] + section
    lines += ["", "mov/glibc, mov/best: movalloc over glibc and over the best of jemalloc, tcmalloc "
                  "and mimalloc for that workload; below 1 is better. The geomean row gives each "
                  "allocator's geometric mean relative to glibc, and the geometric means of movalloc's "
                  f"ratios. `~`: the repetitions' wall times spread by more than {NOISY_SPREAD:.0%} "
                  "of the median (a busy machine); rerun with more --reps."]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    allocators = resolve_allocators(args)
    if not allocators:
        sys.exit("run.py: no allocator to run")
    bin_dir = locate_binaries(args, args.workloads)
    meta = machine_info(args)
    meta["command"] = shlex.join(["/usr/bin/python3"] + sys.argv)
    meta["allocators"] = {a: p or "(system glibc, no preload)" for a, p in allocators.items()}

    meta["load_before"] = os.getloadavg()[0]
    runs = run_all(args, bin_dir, allocators)
    meta["load_after"] = os.getloadavg()[0]
    check_checksums(runs, args.workloads)
    names = list(allocators)
    rows = summarize(runs, args.workloads, names)
    skipped_movalloc = "movalloc" in args.allocator_names and "movalloc" not in allocators
    report = markdown(args, meta, rows, names, skipped_movalloc)
    print(report)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(report)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1))
    return 1 if any(r["error"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
