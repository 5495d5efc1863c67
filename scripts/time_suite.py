"""Measures the test suite the way CI meets it, and writes the figure into README.md.

    python scripts/time_suite.py            # clone HEAD, time `bash scripts/test.sh`, update README
    python scripts/time_suite.py --dry-run  # measure and print; README untouched

A fresh ``git clone`` of HEAD into a temporary folder (so no venv, no compilation cache,
no results/ of earlier runs), then the README's test command with its install, timed
from the outside. README.md gets the result between its ``suite-time`` markers: the wall
time, pytest's summary line, the commit and the machine's cores. Nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- suite-time -->", "<!-- /suite-time -->"


def measure() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="tvj_clean_")
    try:
        clone = os.path.join(work, "clone")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        start = time.perf_counter()
        proc = subprocess.run(["bash", "scripts/test.sh"], cwd=clone, capture_output=True,
                              text=True)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = [line.strip("= ") for line in proc.stdout.splitlines()
               if re.search(r"\d+ (passed|failed)", line)]
    return {"commit": commit, "wall_s": wall, "returncode": proc.returncode,
            "summary": summary[-1] if summary else "(no pytest summary)",
            "cores": os.cpu_count(), "date": datetime.date.today().isoformat(),
            "tail": proc.stdout[-3000:] + proc.stderr[-3000:]}


def render(m: dict) -> str:
    minutes, seconds = divmod(round(m["wall_s"]), 60)
    return (f"{BEGIN}\nFrom a fresh clone, install included, on {m['cores']} CPU cores: "
            f"**{minutes} min {seconds:02d} s** wall ({m['summary']}; commit {m['commit']}, "
            f"{m['date']}; measured by `python scripts/time_suite.py`).\n{END}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print, leave README alone")
    args = parser.parse_args(argv)
    m = measure()
    text = render(m)
    print(text)
    if m["returncode"] != 0:
        print(m["tail"], file=sys.stderr)
        print(f"the suite failed (exit {m['returncode']}): README not updated", file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    path = os.path.join(ROOT, "README.md")
    readme = open(path).read()
    if BEGIN not in readme or END not in readme:
        print(f"README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(head + text + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
