"""scripts/time_suite.py: the README's suite-time line is the measurement's, in its block."""

import importlib.util
import os

from tests.experiment_env import ROOT


def _module():
    spec = importlib.util.spec_from_file_location(
        "time_suite", os.path.join(ROOT, "scripts", "time_suite.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_states_the_measured_wall_time_and_summary():
    mod = _module()
    text = mod.render({"wall_s": 359.6, "summary": "654 passed in 300.10s (0:05:00)",
                       "commit": "abc1234", "cores": 2, "date": "2026-12-01"})
    assert text.startswith(mod.BEGIN) and text.endswith(mod.END)
    assert "**6 min 00 s** wall" in text and "654 passed in 300.10s" in text
    assert "commit abc1234" in text and "2 CPU cores" in text


def test_readme_holds_one_suite_time_block():
    mod = _module()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert readme.count(mod.BEGIN) == 1 and readme.count(mod.END) == 1
    assert readme.index(mod.BEGIN) < readme.index(mod.END)
    block = readme.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0]
    assert " passed" in block and " min " in block and "scripts/time_suite.py" in block, \
        "README's suite-time block is empty: run python scripts/time_suite.py"
