"""benchmarks/run.py: a partial run replaces its suites' rows only and says what made each."""

import json

from benchmarks import run as bench_run

MACHINE = {"platform": "cpu", "device": "cpu", "device_count": 1, "jax": "x", "python": "y",
           "cores": 2}


def row(suite, name, median=1.0):
    return {"name": name, "setting": "s", "target": "<= 1", "ok": median <= 1,
            "suite": suite, "ratio": {"min": median, "median": median, "max": median}}


def test_partial_run_keeps_other_suites_and_records_each_suites_command():
    # A file from before per-suite provenance: its rows inherit its top-level command.
    old = {"machine": MACHINE, "date": "2026-11-23", "command": "python -m benchmarks.run",
           "entries": [row("merging", "m1"), row("tangent", "t-old"), row("theory", "h1")]}
    new = bench_run.merge_results(old, ["tangent"], [row("tangent", "t-new", 2.0)], MACHINE,
                                  "python -m benchmarks.run --only tangent", "2026-12-01",
                                  {"tangent": 7})
    assert [e["name"] for e in new["entries"]] == ["m1", "h1", "t-new"]
    assert new["suites"] == {
        "merging": {"command": "python -m benchmarks.run", "date": "2026-11-23"},
        "theory": {"command": "python -m benchmarks.run", "date": "2026-11-23"},
        "tangent": {"command": "python -m benchmarks.run --only tangent",
                    "date": "2026-12-01", "seconds": 7}}
    assert bench_run._provenance(new) == (
        "Rows of merging, theory: `python -m benchmarks.run` (2026-11-23); "
        "tangent: `python -m benchmarks.run --only tangent` (2026-12-01).")
    # A second partial run keeps the first one's provenance.
    again = bench_run.merge_results(new, ["merging"], [row("merging", "m2")], MACHINE,
                                    "python -m benchmarks.run --only merging", "2026-12-02")
    assert again["suites"]["tangent"] == new["suites"]["tangent"]
    assert again["suites"]["merging"]["command"] == "python -m benchmarks.run --only merging"
    assert [e["name"] for e in again["entries"]] == ["h1", "t-new", "m2"]


def test_methods_run_replaces_only_its_methods_rows_in_place():
    old = {"machine": MACHINE, "date": "2026-11-23", "command": "python -m benchmarks.run",
           "entries": [row("merging", "ta: time"), row("merging", "dare: time", 1.2),
                       row("merging", "dare: memory"), row("merging", "ties: time"),
                       row("theory", "h1")]}
    cmd = "python -m benchmarks.run --only merging --methods dare torch_dare"
    new = bench_run.merge_results(old, ["merging"], [row("merging", "dare: time", 0.8),
                                                     row("merging", "dare: memory", 0.5)],
                                  MACHINE, cmd, "2026-12-01", {"merging": 9},
                                  methods=["dare", "torch_dare"])
    assert [(e["name"], e["ratio"]["median"]) for e in new["entries"]] == [
        ("ta: time", 1.0), ("dare: time", 0.8), ("dare: memory", 0.5), ("ties: time", 1.0),
        ("h1", 1.0)]
    # the suite keeps the provenance of its other rows; the new rows carry their own
    assert new["suites"]["merging"] == {"command": "python -m benchmarks.run",
                                        "date": "2026-11-23"}
    assert new["entries"][1]["provenance"] == {"command": cmd, "date": "2026-12-01"}
    assert bench_run._provenance(new) == (
        "Rows of merging, theory: `python -m benchmarks.run` (2026-11-23); "
        f"merging (dare): `{cmd}` (2026-12-01).")


def test_render_writes_every_row_with_its_provenance(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    run = bench_run.merge_results({"entries": []}, ["merging_families"],
                                  [row("merging_families", "della: time", 3.5),
                                   {**row("merging_families", "iso_cts: time"),
                                    "ratio": None, "ok": False}],
                                  MACHINE, "python -m benchmarks.run --only merging_families",
                                  "2026-12-01")
    (results / "cpu.json").write_text(json.dumps(run))
    out = tmp_path / "B.md"
    bench_run.render(str(results), str(out))
    text = out.read_text()
    assert "merging_families: `python -m benchmarks.run --only merging_families`" in text
    assert "| della: time | s | 3.5 (3.5 - 3.5) | <= 1 | **no** |" in text
    assert "| iso_cts: time | s | n/a | <= 1 | **no** |" in text
    assert "merging_families" in bench_run.SUITES
