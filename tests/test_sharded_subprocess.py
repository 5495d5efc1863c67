"""Runs tests/test_sharded.py in a fresh interpreter with 8 fake CPU devices.

The device count is fixed when XLA's backend starts, so the sharded tests cannot share a
process with the rest of the suite (see conftest.py). Failures show the child's report.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_suite_passes_on_eight_fake_devices():
    env = {**os.environ, "TVJ_TEST_DEVICES": "8", "PYTHONPATH": ROOT + os.pathsep +
           os.environ.get("PYTHONPATH", "")}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(ROOT, "tests", "test_sharded.py"),
         "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "failed" not in proc.stdout, report
