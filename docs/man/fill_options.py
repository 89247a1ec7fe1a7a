#!/usr/bin/python3
"""Fills the @OPTIONS@ marker of docs/man/movalloc.3.in with README.md's option
table (the table tools/cli_test.sh checks against shim/mv_options.c), so the
man page and the README cannot disagree.

    fill_options.py README.md movalloc.3.in > movalloc.3
"""
import re
import sys

ROW = re.compile(r"^\| `(MOVALLOC_[A-Z0-9_]+)` \| (.*?) \| (.*?) \| (.*) \|$")


def troff(text):
    """Markdown cell -> troff text: `code` in bold, backslashes and leading dots escaped."""
    text = text.replace("\\|", "|").replace("\\", "\\e")
    text = re.sub(r"`([^`]*)`", r"\\fB\1\\fR", text)
    return "\\&" + text


def main(readme, template):
    rows = [ROW.match(l) for l in open(readme).read().splitlines()]
    rows = [m for m in rows if m]
    if not rows:
        sys.exit(f"fill_options.py: no '| `MOVALLOC_...` | values | default | meaning |' rows in {readme}")
    entries = "".join(f".TP\n.B {name}\n{troff(values)}; default {troff(default)}.\n{troff(meaning)}\n"
                      for name, values, default, meaning in (m.groups() for m in rows))
    out, n = re.subn(r"^\.\\\" @OPTIONS@.*\n(?:\.\\\" .*\n)*", entries, open(template).read(), flags=re.M)
    if n != 1:
        sys.exit(f"fill_options.py: {template} has no '.\\\" @OPTIONS@' marker")
    sys.stdout.write(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: fill_options.py README.md movalloc.3.in > movalloc.3")
    main(sys.argv[1], sys.argv[2])
