#!/usr/bin/python3
"""movalloc's inspector: stat, top, trace and plot (tools/movalloc runs it).

    inspect.py stat PID [--json] [--arenas N|all] [--vmas]
    inspect.py top PID [-i SECONDS] [-n FRAMES] [--arenas N|all]
    inspect.py trace (PID | FILE) [--json] [--follow]
    inspect.py plot INPUT... [-o OUT.png|OUT.svg]

Memory figures come from /proc/PID/smaps (any process); a movalloc process's
arenas and migrations from its inspection channel, the memfd "movalloc" that
only the process's owner (or root) can open through /proc/PID/fd (layout:
shim/mv_channel.h). Exit status: 0 done, 1 failed (see the message), 2 bad
usage.
"""

import argparse
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import time

# ---- errors ------------------------------------------------------------------


class Failure(Exception):
    """What went wrong and what to do; exit status 1."""


def fail(msg):
    raise Failure(msg)


# ---- /proc/PID/smaps -----------------------------------------------------------

HEAP_CLASSES = ("movalloc arenas", "[heap]", "anonymous")


def proc_path(pid, name):
    return f"/proc/{pid}/{name}"


def check_pid(pid):
    if not os.path.exists(proc_path(pid, "")):
        fail(f"no process {pid}: it does not exist or has exited; list processes with `ps`")


def read_smaps(pid):
    """List of VMAs: dict(start, end, perms, path, fields{name: kB}, thp_eligible)."""
    check_pid(pid)
    try:
        with open(proc_path(pid, "smaps")) as f:
            text = f.read()
    except PermissionError:
        fail(f"cannot read /proc/{pid}/smaps: process {pid} belongs to another user; "
             f"run this as that user (or root)")
    except FileNotFoundError:
        fail(f"process {pid} exited")
    vmas, cur = [], None
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            start, end = (int(x, 16) for x in head[0].split("-"))
            cur = {"start": start, "end": end, "perms": head[1], "inode": int(head[4]),
                   "path": head[5].strip() if len(head) > 5 else "", "fields": {},
                   "thp_eligible": False}
            vmas.append(cur)
        elif cur is not None and ":" in line:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if key == "THPeligible":
                cur["thp_eligible"] = parts[:1] == ["1"]
            elif len(parts) == 2 and parts[1] == "kB":
                cur["fields"][key] = int(parts[0])
    if not vmas:
        fail(f"process {pid} has no mappings (a kernel thread, or it exited)")
    return vmas


def classify(vma, arena_range):
    """Heap-like class of a VMA, or None."""
    if vma["path"] == "[heap]":
        return "[heap]"
    if vma["path"] or vma["inode"] or "p" not in vma["perms"]:
        return None  # files, shared memory, stacks, vdso
    if arena_range and arena_range[0] <= vma["start"] < arena_range[1]:
        return "movalloc arenas"
    return "anonymous"


def heap_summary(vmas, arena_range):
    """Per class: vmas, size, rss, anon, anon_huge, thp_4k (kB), coverage."""
    rows = {c: {"class": c, "vmas": 0, "size_kib": 0, "rss_kib": 0, "anon_kib": 0,
                "anon_huge_kib": 0, "thp_eligible_4k_kib": 0} for c in HEAP_CLASSES}
    for v in vmas:
        c = classify(v, arena_range)
        if c is None or (c == "movalloc arenas" and v["perms"].startswith("---")):
            continue  # the reservation's untouched PROT_NONE part
        f, r = v["fields"], rows[c]
        r["vmas"] += 1
        r["size_kib"] += f.get("Size", 0)
        r["rss_kib"] += f.get("Rss", 0)
        r["anon_kib"] += f.get("Anonymous", 0)
        r["anon_huge_kib"] += f.get("AnonHugePages", 0)
        if v["thp_eligible"]:
            r["thp_eligible_4k_kib"] += max(0, f.get("Anonymous", 0) - f.get("AnonHugePages", 0))
    out = [r for r in rows.values() if r["vmas"]]
    for r in out:
        r["coverage"] = r["anon_huge_kib"] / r["anon_kib"] if r["anon_kib"] else 0.0
    return out


# ---- the channel (shim/mv_channel.h) -------------------------------------------

MAGIC = 0x314E414843564D4D
VERSION = 1
SEQ_OFF, STATS_OFF = 56, 112
STATE_NAMES = ("free", "active", "isolated", "migrating")
OUTCOMES = ("moved", "retry", "refused", "failed")
STAT_FIELDS = ("reserved_bytes committed_bytes in_use_bytes arena_count arenas_cached "
               "arenas_released huge_objects heaps invalid_frees double_frees huge_page_bytes "
               "migrated migrate_retries isolate_refused migrate_failed staging_failed "
               "bytes_moved").split()
STALL_BUCKETS = 16
STAT_TAIL = "compact_passes compactor_cpu_ns vma_capped".split()


def find_channel(pid):
    """An open descriptor of PID's channel, or None when PID is not a movalloc process."""
    fd_dir = proc_path(pid, "fd")
    try:
        names = os.listdir(fd_dir)
    except PermissionError:
        fail(f"cannot list {fd_dir}: process {pid} belongs to another user; run this as "
             f"that user (or root)")
    except FileNotFoundError:
        fail(f"no process {pid}: it exited")
    for name in names:
        path = f"{fd_dir}/{name}"
        try:
            if not os.readlink(path).startswith("/memfd:movalloc"):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        head = os.pread(fd, 56, 0)
        if len(head) == 56:
            magic, version = struct.unpack_from("<QI", head, 0)
            (owner,) = struct.unpack_from("<i", head, 48)
            if magic == MAGIC and owner == pid:  # not a parent's inherited over fork()
                if version == VERSION:
                    return fd
                os.close(fd)
                fail(f"process {pid}'s movalloc writes channel version {version}; this CLI reads "
                     f"version {VERSION}: use the movalloc command that came with its library")
        os.close(fd)
    return None


def u(fmt, buf, off):
    return struct.unpack_from("<" + fmt, buf, off)[0]


def read_snapshot(fd):
    """The published snapshot: header fields, stats and arena entries (seqlock read)."""
    for _ in range(200):
        head = os.pread(fd, 4096, 0)
        seq = u("Q", head, SEQ_OFF)
        if seq & 1:
            time.sleep(0.001)
            continue
        if (u("I", head, 16), u("I", head, 20)) != (32, 48):
            fail("the channel's entry sizes are not those of shim/mv_channel.h version 1: "
                 "use the movalloc command that came with the process's library")
        count, arenas_off = u("I", head, 80), u("Q", head, 32)
        raw = os.pread(fd, count * 32, arenas_off) if count else b""
        if u("Q", os.pread(fd, 8, SEQ_OFF), 0) == seq:
            break
    else:
        fail("the channel kept changing while being read; try again")
    snap = {"pid": u("i", head, 48), "publishes": u("Q", head, 72), "published_ns": u("Q", head, 64),
            "arena_count": count, "compactor": bool(u("I", head, 84)),
            "arenas_total": u("Q", head, 88), "events": u("Q", head, 96), "heap_base": u("Q", head, 104)}
    off = STATS_OFF
    stats = {}
    for name in STAT_FIELDS:
        stats[name] = u("Q", head, off)
        off += 8
    stats["stall_hist"] = list(struct.unpack_from(f"<{STALL_BUCKETS}Q", head, off))
    off += 8 * STALL_BUCKETS
    for name in STAT_TAIL:
        stats[name] = u("Q", head, off)
        off += 8
    stats["backend"] = head[off:off + 16].split(b"\0")[0].decode(errors="replace")
    stats["backend_reason"] = head[off + 16:off + 128].split(b"\0")[0].decode(errors="replace")
    snap["stats"] = stats
    arenas = []
    for i in range(count):
        state, thp, huge, committed, free_slices = struct.unpack_from("<5B", raw, i * 32)
        in_use, moved, not_moved = struct.unpack_from("<3I", raw, i * 32 + 8)
        arenas.append({"index": i, "address": hex(snap["heap_base"] + (i << 21)),
                       "state": STATE_NAMES[state] if state < 4 else str(state),
                       "thp": bool(thp), "huge": bool(huge), "committed": bool(committed),
                       "free_slices": free_slices, "in_use_bytes": in_use, "moved": moved,
                       "not_moved": not_moved})
    snap["arenas"] = arenas
    return snap


def read_events(fd, since):
    """Events numbered since.. that the ring still holds: (events, next number, missed)."""
    head = os.pread(fd, 128, 0)
    cap, events_off, pid = u("I", head, 28), u("Q", head, 40), u("i", head, 48)
    end = u("Q", head, 96)
    first = max(since, end - cap)
    out = []
    for n in range(first, end):
        off = events_off + (n % cap) * 48
        raw = os.pread(fd, 48, off)
        seq, t, arena, rc, stall, nbytes, outcome = struct.unpack_from("<QQQiIIB", raw, 0)
        backend = raw[37:48].split(b"\0")[0].decode(errors="replace")
        if seq != n + 1 or u("Q", os.pread(fd, 8, off), 0) != seq:
            break  # overwritten meanwhile: the writer lapped us
        out.append({"time_ns": t, "pid": pid, "arena": hex(arena), "backend": backend,
                    "outcome": OUTCOMES[outcome] if outcome < 4 else str(outcome), "rc": rc,
                    "bytes": nbytes, "stall_us": stall})
    return out, first + len(out), first - since


# ---- stat / top ------------------------------------------------------------------


def mib(kib):
    return f"{kib / 1024:.1f}"


def gather(pid):
    vmas = read_smaps(pid)
    fd = find_channel(pid)
    snap = None
    if fd is not None:
        try:
            snap = read_snapshot(fd)
        finally:
            os.close(fd)
    arena_range = None
    if snap and snap["stats"]["reserved_bytes"]:
        arena_range = (snap["heap_base"], snap["heap_base"] + snap["stats"]["reserved_bytes"])
    try:
        with open(proc_path(pid, "comm")) as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    return {"pid": pid, "command": comm, "mappings": heap_summary(vmas, arena_range),
            "vmas_total": len(vmas), "movalloc": snap,
            "libmovalloc_mapped": any("libmovalloc" in os.path.basename(v["path"]) for v in vmas),
            "heap_vmas": [v for v in vmas if classify(v, arena_range)]}


def arena_limit(arg):
    if arg == "all":
        return None
    try:
        n = int(arg)
        if n >= 0:
            return n
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--arenas takes a count or 'all', not {arg!r}")


def format_stat(info, arenas_shown=20, show_vmas=False):
    lines = [f"process {info['pid']} ({info['command']}): {info['vmas_total']} VMAs"]
    lines.append(f"{'mapping':<16} {'VMAs':>6} {'RSS MiB':>9} {'anon MiB':>9} {'huge MiB':>9} "
                 f"{'coverage':>8} {'THP-eligible 4K MiB':>20}")
    tot = {"vmas": 0, "rss_kib": 0, "anon_kib": 0, "anon_huge_kib": 0, "thp_eligible_4k_kib": 0}
    for r in info["mappings"]:
        lines.append(f"{r['class']:<16} {r['vmas']:>6} {mib(r['rss_kib']):>9} {mib(r['anon_kib']):>9} "
                     f"{mib(r['anon_huge_kib']):>9} {r['coverage']:>8.0%} "
                     f"{mib(r['thp_eligible_4k_kib']):>20}")
        for k in tot:
            tot[k] += r[k]
    cov = tot["anon_huge_kib"] / tot["anon_kib"] if tot["anon_kib"] else 0
    lines.append(f"{'all heap-like':<16} {tot['vmas']:>6} {mib(tot['rss_kib']):>9} "
                 f"{mib(tot['anon_kib']):>9} {mib(tot['anon_huge_kib']):>9} {cov:>8.0%} "
                 f"{mib(tot['thp_eligible_4k_kib']):>20}")
    if show_vmas:
        lines.append("")
        lines.append(f"{'VMA':<27} {'perms':<5} {'RSS KiB':>9} {'huge KiB':>9} THP-eligible")
        for v in info["heap_vmas"]:
            f = v["fields"]
            lines.append(f"{v['start']:012x}-{v['end']:012x} {v['perms']:<5} {f.get('Rss', 0):>9} "
                         f"{f.get('AnonHugePages', 0):>9} {'yes' if v['thp_eligible'] else 'no'}")
    snap = info["movalloc"]
    lines.append("")
    if snap is None and info["libmovalloc_mapped"]:
        lines.append("libmovalloc is loaded but has no channel open: its heap never reached "
                     "16 MiB (small programs get none), or memfd_create was refused (seccomp)")
        return "\n".join(lines)
    if snap is None:
        lines.append("not a movalloc process (no movalloc channel among its descriptors)")
        return "\n".join(lines)
    s = snap["stats"]
    age = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - snap["published_ns"]) / 1e9
    if not snap["publishes"]:
        lines.append("movalloc: no snapshot published yet (the heap has not grown since start-up)")
    else:
        lines.append(f"movalloc: snapshot {age:.1f} s old, "
                     f"{'refreshed by the compactor every round' if snap['compactor'] else 'no compactor thread: published when the heap grows'}")
    lines.append(f"  heap       {mib(s['in_use_bytes'] / 1024)} MiB in use in {s['arena_count']} arenas; "
                 f"committed {mib(s['committed_bytes'] / 1024)} MiB; {s['arenas_cached']} cached, "
                 f"{s['arenas_released']} released")
    hp = s["huge_page_bytes"] / s["committed_bytes"] if s["committed_bytes"] else 0
    lines.append(f"  huge pages {mib(s['huge_page_bytes'] / 1024)} MiB ({hp:.0%} of committed)")
    lines.append(f"  migration  backend {s['backend'] or '-'} ({s['backend_reason']}): "
                 f"{s['migrated']} moved, {s['migrate_retries']} retried, {s['isolate_refused']} refused, "
                 f"{s['migrate_failed']} failed, {s['staging_failed']} without a huge page; "
                 f"{snap['events']} events")
    states = {}
    for a in snap["arenas"]:
        states[a["state"]] = states.get(a["state"], 0) + 1
    lines.append("  arenas     " + ", ".join(f"{n} {st}" for st, n in sorted(states.items())) +
                 f"; {sum(a['thp'] for a in snap['arenas'])} on huge pages" +
                 (f" ({snap['arenas_total'] - snap['arena_count']} more not listed)"
                  if snap["arenas_total"] > snap["arena_count"] else ""))
    live = [a for a in snap["arenas"] if a["state"] != "free"]
    shown = live if arenas_shown is None else live[:arenas_shown]
    if shown:
        lines.append(f"  {'arena':>6} {'address':<16} {'state':<9} {'in use KiB':>10} {'free/32':>7} "
                     f"{'huge page':<9} {'moved':>5} {'not moved':>9}")
        for a in shown:
            kind = "yes" if a["thp"] else "no"
            lines.append(f"  {a['index']:>6} {a['address']:<16} {a['state'] + ('*' if a['huge'] else ''):<9} "
                         f"{a['in_use_bytes'] // 1024:>10} {a['free_slices']:>7} {kind:<9} "
                         f"{a['moved']:>5} {a['not_moved']:>9}")
        if len(shown) < len(live):
            lines.append(f"  ... {len(live) - len(shown)} more arenas (--arenas all lists them)")
        if any(a["huge"] for a in shown):
            lines.append("  (*: part of one huge object's span)")
    return "\n".join(lines)


def cmd_stat(args):
    info = gather(args.pid)
    if args.json:
        info = dict(info)
        del info["heap_vmas"]
        print(json.dumps(info))
    else:
        print(format_stat(info, args.arenas, args.vmas))
    return 0


def totals(info):
    """RSS and AnonHugePages (KiB) over the heap-like mappings, and migrations."""
    rss = sum(r["rss_kib"] for r in info["mappings"])
    huge = sum(r["anon_huge_kib"] for r in info["mappings"])
    moved = info["movalloc"]["stats"]["migrated"] if info["movalloc"] else 0
    return rss, huge, moved


def changes(prev, info):
    """top's line about what changed since the last frame."""
    if prev is None:
        return ""
    (r0, h0, m0), (r1, h1, m1) = totals(prev), totals(info)
    return (f"since the last frame: heap RSS {(r1 - r0) / 1024:+.1f} MiB, on huge pages "
            f"{(h1 - h0) / 1024:+.1f} MiB, {m1 - m0} arenas moved\n")


def cmd_top(args):
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    old = None
    if tty:
        import termios
        import tty as ttymod
        old = termios.tcgetattr(sys.stdin)
        ttymod.setcbreak(sys.stdin.fileno())
    frames, prev = 0, None
    try:
        while True:
            try:
                info = gather(args.pid)
                text = changes(prev, info) + format_stat(info, args.arenas)
                prev = info
            except Failure as e:
                if frames:  # it was there: say so and end
                    print(f"movalloc top: {e}")
                    return 0
                raise
            stamp = time.strftime("%H:%M:%S")
            if tty:
                sys.stdout.write("\033[H\033[2J" + f"movalloc top {args.pid}  {stamp}  "
                                 f"(every {args.interval:g} s; q quits)\n\n" + text + "\n")
            else:
                sys.stdout.write(f"--- {stamp}\n{text}\n")
            sys.stdout.flush()
            frames += 1
            if args.frames and frames >= args.frames:
                return 0
            if tty:
                ready, _, _ = select.select([sys.stdin], [], [], args.interval)
                if ready and sys.stdin.read(1) in ("q", "Q"):
                    return 0
            else:
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        if old is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, old)


# ---- trace --------------------------------------------------------------------

TRACE_COLUMNS = ["time_ns", "pid", "arena", "backend", "outcome", "rc", "bytes", "stall_us"]
INT_COLUMNS = ("time_ns", "pid", "rc", "bytes", "stall_us")


def parse_trace_line(line, where):
    parts = line.rstrip("\n").split(",")
    if len(parts) != len(TRACE_COLUMNS):
        fail(f"{where}: expected {len(TRACE_COLUMNS)} fields ({','.join(TRACE_COLUMNS)}), "
             f"got {len(parts)}: is this a MOVALLOC_TRACE file?")
    ev = dict(zip(TRACE_COLUMNS, parts))
    try:
        for k in INT_COLUMNS:
            ev[k] = int(ev[k])
    except ValueError:
        fail(f"{where}: a field that should be a number is not: {line.strip()!r}")
    return ev


def open_trace_file(path):
    """The file, positioned after its checked header line."""
    try:
        f = open(path)
    except OSError as e:
        fail(f"cannot open {path}: {e.strerror}; pass a PID or a MOVALLOC_TRACE file")
    if f.readline().strip() != ",".join(TRACE_COLUMNS):
        f.close()
        fail(f"{path}: not a MOVALLOC_TRACE file (its first line is not "
             f"'{','.join(TRACE_COLUMNS)}')")
    return f


def read_trace_file(path):
    with open_trace_file(path) as f:
        return [parse_trace_line(l, f"{path}:{i + 2}") for i, l in enumerate(f) if l.strip()]


def emit(ev, as_json):
    if as_json:
        print(json.dumps(ev), flush=True)
    else:
        print(",".join(str(ev[k]) for k in TRACE_COLUMNS), flush=True)


def trace_process(pid, args):
    check_pid(pid)
    fd = find_channel(pid)
    if fd is None:
        fail(f"process {pid} has no movalloc channel: it is not a movalloc process (run it with "
             f"`movalloc run` or LD_PRELOAD=$(movalloc lib)), or its heap never reached 16 MiB "
             f"(nothing migrates below that)")
    if not args.json:
        print(",".join(TRACE_COLUMNS), flush=True)
    nxt = 0
    try:
        while True:
            events, nxt, missed = read_events(fd, nxt)
            if missed:
                print(f"movalloc trace: {missed} events were overwritten before they were read",
                      file=sys.stderr)
            for ev in events:
                emit(ev, args.json)
            if not args.follow or not os.path.exists(proc_path(pid, "")):
                return 0
            time.sleep(0.2)
    finally:
        os.close(fd)


def trace_file(path, args):
    with open_trace_file(path) as f:
        if not args.json:
            print(",".join(TRACE_COLUMNS), flush=True)
        n = 1
        while True:
            line = f.readline()
            if line.endswith("\n"):  # a line still being written is read again later
                n += 1
                emit(parse_trace_line(line, f"{path}:{n}"), args.json)
                continue
            if not args.follow:
                return 0
            f.seek(f.tell() - len(line.encode()))
            time.sleep(0.2)


def cmd_trace(args):
    try:
        if args.source.isdigit():
            return trace_process(int(args.source), args)
        return trace_file(args.source, args)
    except KeyboardInterrupt:
        return 0


# ---- plot ---------------------------------------------------------------------


def detect(path):
    """'trace', 'observe' or 'bench' from the file's start."""
    try:
        with open(path) as f:
            first = f.readline().strip()
    except OSError as e:
        fail(f"cannot open {path}: {e.strerror}")
    if first == ",".join(TRACE_COLUMNS):
        return "trace"
    if first.startswith("t_s,rss_kib"):
        return "observe"
    if first.startswith("{"):
        return "bench"
    if not first:
        fail(f"{path} is empty: nothing to plot yet")
    fail(f"{path}: not a MOVALLOC_TRACE file, a tools/observe CSV (-o) or a bench JSON "
         f"(movalloc bench --json FILE); cannot plot it")


def q(s):
    return "'" + s.replace("'", "") + "'"


def plot_script(inputs, out, tmp):
    """gnuplot commands for every panel the inputs give."""
    panels = []
    for path, kind in inputs:
        name = os.path.basename(path)
        if kind == "observe":
            panels.append(
                f"set title {q('RSS and huge-page coverage: ' + name)}\n"
                "set xlabel 'seconds'\nset ylabel 'MiB'\nset y2label 'coverage %'\n"
                "set y2range [0:100]\nset ytics nomirror\nset y2tics\nset key left top\n"
                "set datafile separator ','\n"
                f"plot {q(path)} skip 1 using 1:($2/1024) with lines title 'RSS', "
                f"'' skip 1 using 1:($4/1024) with lines title 'AnonHugePages', "
                f"'' skip 1 using 1:($5*100) axes x1y2 with lines title 'coverage'\n"
                "unset y2tics\nunset y2label\nset ytics mirror\nset datafile separator whitespace\n")
        elif kind == "trace":
            events = read_trace_file(path)
            if not events:
                fail(f"{path}: the trace has no migrations to plot")
            t0 = events[0]["time_ns"]
            cum, moved_mib = os.path.join(tmp, name + ".cum"), 0.0
            hist = {}
            with open(cum, "w") as f:
                for ev in events:
                    moved_mib += ev["bytes"] / 2**20
                    f.write(f"{(ev['time_ns'] - t0) / 1e9} {moved_mib}\n")
                    if ev["outcome"] in ("moved", "retry", "failed") and ev["stall_us"]:
                        b = max(0, ev["stall_us"].bit_length() - 1)  # bucket [2^b, 2^(b+1)) us
                        hist[b] = hist.get(b, 0) + 1
            panels.append(
                f"set title {q('moved onto huge pages: ' + name)}\n"
                "set xlabel 'seconds'\nset ylabel 'MiB moved'\nset key left top\n"
                f"plot {q(cum)} using 1:2 with steps title 'cumulative MiB'\n")
            hf = os.path.join(tmp, name + ".hist")
            with open(hf, "w") as f:
                for b in range(min(hist, default=0), max(hist, default=0) + 1):
                    f.write(f"\"<{2 ** (b + 1)}\" {hist.get(b, 0)}\n")
            panels.append(
                f"set title {q('writer stall per migration: ' + name)}\n"
                "set xlabel 'stall (us)'\nset ylabel 'migrations'\nset style fill solid 0.6\n"
                "set boxwidth 0.8\nset key off\n"
                f"plot {q(hf)} using 0:2:xtic(1) with boxes\nset key on\nset xtics auto\n")
        else:
            try:
                with open(path) as f:
                    data = json.load(f)
                rows = data["summary"]
            except (ValueError, KeyError, OSError):
                fail(f"{path}: not the JSON that `movalloc bench --json FILE` writes")
            allocs = list(data["meta"]["allocators"])
            for key, what in (("wall_s", "wall time"), ("rss_mib", "peak RSS")):
                df = os.path.join(tmp, f"{name}.{key}.dat")
                with open(df, "w") as f:
                    for r in rows:
                        cells = r.get("cells", {})
                        g = cells.get("glibc", {}).get(key)
                        vals = [f"{cells[a][key] / g:.3f}" if g and cells.get(a, {}).get(key) else "NaN"
                                for a in allocs]
                        f.write(r["workload"] + " " + " ".join(vals) + "\n")
                cols = ", ".join(f"{q(df) if i == 0 else chr(39) * 2} using {i + 2}:xtic(1) title {q(a)}"
                                 for i, a in enumerate(allocs))
                panels.append(
                    f"set title {q(what + ' relative to glibc: ' + name)}\n"
                    "set style data histograms\nset style histogram clustered\nset style fill solid 0.7\n"
                    "set ylabel 'x glibc'\nset xlabel ''\nset key top right\nset yrange [0:*]\n"
                    f"plot {cols}\nset style data lines\nset autoscale y\n")
    ext = os.path.splitext(out)[1].lower()
    height = 360 * len(panels)
    term = (f"set terminal pngcairo size 1000,{height}" if ext == ".png"
            else f"set terminal svg size 1000,{height}")
    return (f"{term}\nset output {q(out)}\nset grid\nset datafile separator whitespace\n"
            f"set multiplot layout {len(panels)},1\n" +
            "".join(panels) +
            "unset multiplot\n")


def cmd_plot(args):
    out = args.output
    if os.path.splitext(out)[1].lower() not in (".png", ".svg"):
        print(f"movalloc plot: -o {out}: the name must end in .png or .svg", file=sys.stderr)
        return 2
    inputs = [(p, detect(p)) for p in args.inputs]
    with tempfile.TemporaryDirectory(prefix="movalloc-plot-") as tmp:
        script = plot_script(inputs, out, tmp)
        try:
            proc = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True)
        except FileNotFoundError:
            fail("gnuplot is not installed: run tools/install-deps (or apt-get install gnuplot-nox)")
        if proc.returncode != 0 or not os.path.exists(out) or os.path.getsize(out) == 0:
            fail(f"gnuplot could not write {out}: " + (proc.stderr.strip() or "it wrote nothing") +
                 "; check that the directory exists and is writable")
    print(out)
    return 0


# ---- main ---------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"movalloc {self.prog.split()[-1]}: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def positive(v):
    try:
        f = float(v)
        if f > 0:
            return f
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {v!r}")


def pid_arg(v):
    if v.isdigit() and int(v) > 0:
        return int(v)
    raise argparse.ArgumentTypeError(f"expected a process id (a positive number), not {v!r}")


def main(argv):
    if not argv or argv[0] not in ("stat", "top", "trace", "plot"):
        print("usage: inspect.py stat|top|trace|plot ...", file=sys.stderr)
        return 2
    sub, rest = argv[0], argv[1:]
    p = Parser(prog=f"movalloc {sub}")
    if sub == "stat":
        p.description = ("Memory of any process from /proc/PID/smaps (per heap-like mapping: RSS, "
                         "AnonHugePages, coverage, VMAs, THP-eligible bytes still on 4 KiB pages) "
                         "and, for a movalloc process, its arenas and migrations.")
        p.add_argument("pid", type=pid_arg)
        p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
        p.add_argument("--arenas", type=arena_limit, default=20, metavar="N|all",
                       help="arenas to list (default 20)")
        p.add_argument("--vmas", action="store_true", help="also list every heap-like VMA")
        return cmd_stat(p.parse_args(rest))
    if sub == "top":
        p.description = ("`stat` refreshed live: q or Ctrl-C quits. Without a terminal it prints "
                         "one frame per interval, each after a '--- HH:MM:SS' line.")
        p.add_argument("pid", type=pid_arg)
        p.add_argument("-i", "--interval", type=positive, default=1.0, help="seconds between frames (default 1)")
        p.add_argument("-n", "--frames", type=int, default=0, help="stop after this many frames (default: never)")
        p.add_argument("--arenas", type=arena_limit, default=10, metavar="N|all",
                       help="arenas to list (default 10)")
        return cmd_top(p.parse_args(rest))
    if sub == "trace":
        p.description = ("Migration events (time_ns,pid,arena,backend,outcome,rc,bytes,stall_us) "
                         "from a running movalloc process's channel (the last 1024) or from a "
                         "MOVALLOC_TRACE file, as CSV (a header line first) or JSON lines.")
        p.add_argument("source", help="a PID, or a file written with MOVALLOC_TRACE=/path")
        p.add_argument("--json", action="store_true", help="JSON lines instead of CSV")
        p.add_argument("-f", "--follow", action="store_true",
                       help="keep printing new events until the process exits (or Ctrl-C)")
        return cmd_trace(p.parse_args(rest))
    p.description = ("Plots from MOVALLOC_TRACE files (moved MiB over time, stall histogram), "
                     "tools/observe CSVs (RSS and coverage over time) and bench JSONs (wall time "
                     "relative to glibc) with gnuplot; prints the path written.")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--output", default="movalloc-plot.png", help="OUT.png or OUT.svg (default movalloc-plot.png)")
    return cmd_plot(p.parse_args(rest))


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Failure as e:
        print(f"movalloc: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        sys.exit(0)
