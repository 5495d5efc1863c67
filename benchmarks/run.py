"""Runs the benchmarks and writes BENCHMARKS.md (figures as ratios measured side by side).

    python -m benchmarks.run                       # everything, this machine
    python -m benchmarks.run --quick               # smaller sizes
    python -m benchmarks.run --only finetune theory

Results of each platform are kept in ``benchmarks/results/<platform>.json``; BENCHMARKS.md
is rendered from every JSON file there, so a GPU run (on a lent machine) and the CPU run
appear side by side.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SUITES = ("finetune", "theory", "merging", "merging_families", "parallel",
          "sharded_merging", "tangent", "data_aware", "data")


def _collect(names, quick, methods=None):
    from benchmarks import (bench_data_aware, bench_finetune, bench_merging,
                            bench_merging_families, bench_parallel, bench_sharded_merging,
                            bench_tangent, bench_theory)
    modules = {"finetune": bench_finetune, "theory": bench_theory, "merging": bench_merging,
               "merging_families": bench_merging_families, "parallel": bench_parallel,
               "sharded_merging": bench_sharded_merging, "tangent": bench_tangent,
               "data_aware": bench_data_aware}
    entries, seconds = [], {}
    for name in names:
        if name == "data":
            continue  # benchmarks/bench_data.py prints its own table (see BENCHMARKS.md)
        t0 = time.time()
        print(f"== {name}", flush=True)
        got = (modules[name].run(quick=quick, methods=methods)
               if methods and name in ("merging", "merging_families")
               else modules[name].run(quick=quick))
        for e in got:
            e["suite"] = name
            r = e.get("ratio")
            print(f"   {e['name']}: {r.fmt() if r else 'n/a'}  target {e['target']}",
                  flush=True)
        entries += got
        seconds[name] = round(time.time() - t0)
        print(f"   ({seconds[name]} s)", flush=True)
    return entries, seconds


def _serialize(entries):
    out = []
    for e in entries:
        r = e.get("ratio")
        out.append({**e, "ratio": None if r is None else
                    {"min": r.min, "median": r.median, "max": r.max}})
    return out


def _method(entry: dict) -> str:
    """The method a row measures: its name up to the first colon (``"dare: time / ..."``)."""
    return entry["name"].split(":")[0]


def merge_results(previous: dict, names, entries: list, machine: dict, command: str,
                  date: str, seconds: dict | None = None, methods=None) -> dict:
    """This run's suites replace theirs in ``previous``; every other suite is kept as is.

    ``suites`` records, per suite, the command and date that produced its rows (a file
    from before this field inherits the file's top-level ``command`` / ``date``), so a
    partial ``--only`` run never claims the rows it did not produce.

    With ``methods`` (``--methods``), only the rows of the methods this run measured are
    replaced, in place; the suite's other rows and its provenance are kept, and each new
    row carries its own ``provenance``.
    """
    provenance = dict(previous.get("suites") or {})
    for e in previous.get("entries", []):
        suite = e.get("suite")
        if suite is not None and suite not in provenance:
            provenance[suite] = {"command": previous.get("command", "?"),
                                 "date": previous.get("date", "?")}
    stamp = {"command": command, "date": date}
    if methods:
        fresh = [{**e, "provenance": dict(stamp)} for e in entries]
        redone = {(e.get("suite"), _method(e)) for e in fresh}
        new, placed = [], set()
        for e in previous.get("entries", []):
            key = (e.get("suite"), _method(e))
            if key not in redone:
                new.append(e)
            elif key not in placed:
                placed.add(key)
                new += [f for f in fresh if (f.get("suite"), _method(f)) == key]
        new += [f for f in fresh if (f.get("suite"), _method(f)) not in placed]
        for name in names:
            provenance.setdefault(name, dict(stamp))
    else:
        for name in names:
            provenance[name] = {**stamp, **({"seconds": seconds[name]}
                                            if seconds and name in seconds else {})}
        kept = [e for e in previous.get("entries", []) if e.get("suite") not in names]
        new = kept + list(entries)
    present = {e.get("suite") for e in new}
    return {"machine": machine, "date": date, "command": command,
            "suites": {k: v for k, v in provenance.items() if k in present},
            "entries": new}


def _provenance(run: dict) -> str:
    """"suites a, b: `command` (date); ..." in the order the suites' rows appear."""
    suites = run.get("suites")
    if not suites:
        return f"{run['date']}, `{run['command']}`."
    groups: dict = {}
    for e in run["entries"]:
        own = e.get("provenance")
        info = own or suites.get(e.get("suite"), {"command": run["command"],
                                                  "date": run["date"]})
        label = f"{e.get('suite')} ({_method(e)})" if own else e.get("suite")
        names = groups.setdefault((info["command"], info["date"]), [])
        if label not in names:
            names.append(label)
    return "Rows of " + "; ".join(f"{', '.join(n)}: `{c}` ({d})"
                                  for (c, d), n in groups.items()) + "."


def render(results_dir: str, path: str) -> None:
    runs = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(results_dir, "*.json")))]
    lines = ["# Benchmarks", "",
             "Every figure is a ratio of two things timed in alternation in the same process "
             "(or, for memory, one process per method), reported as median (min - max) over "
             "repeats. Produced by `bash scripts/bench.sh` (`python -m benchmarks.run`); "
             "the GPU columns by the same command on a lent GPU machine.", ""]
    for run in runs:
        m = run["machine"]
        lines += [f"## {m['platform'].upper()}: {m['device']} x{m['device_count']}", "",
                  f"jax {m['jax']}, python {m['python']}, {m['cores']} cores. "
                  + _provenance(run), "",
                  "| figure | setting | median (min - max) | target | met |",
                  "|---|---|---|---|---|"]
        for e in run["entries"]:
            r = e["ratio"]
            fig = "n/a" if r is None else f"{r['median']:.3g} ({r['min']:.3g} - {r['max']:.3g})"
            met = {True: "yes", False: "**no**", None: ""}[e["ok"]]
            lines.append(f"| {e['name']} | {e['setting']} | {fig} | {e['target']} | {met} |")
        lines.append("")
    notes = os.path.join(os.path.dirname(__file__), "NOTES.md")
    if os.path.exists(notes):
        lines += [open(notes).read()]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=SUITES, default=None)
    parser.add_argument("--methods", nargs="*", default=None,
                        help="only these methods of the merging suites")
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from benchmarks.harness import machine
    names = args.only or [s for s in SUITES]
    entries, seconds = _collect(names, args.quick, args.methods)
    m = machine()
    results_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{m['platform']}.json")
    previous = json.load(open(path)) if os.path.exists(path) else {"entries": []}
    command = ("python -m benchmarks.run" + (" --quick" if args.quick else "")
               + (f" --only {' '.join(names)}" if args.only else "")
               + (f" --methods {' '.join(args.methods)}" if args.methods else ""))
    with open(path, "w") as fh:
        json.dump(merge_results(previous, names, _serialize(entries), m, command,
                                datetime.date.today().isoformat(), seconds, args.methods),
                  fh, indent=1)
    render(results_dir, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
