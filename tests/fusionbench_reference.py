"""FusionBench's own merge functions, loaded from the installed package's source files.

FusionBench 0.2.33 (``pip install --no-deps fusion-bench==0.2.33``, scripts/setup.sh)
imports its whole framework (hydra, lightning, datasets, ...) from ``fusion_bench/__init__``.
The merge functions the parity tests call need only torch: this module executes the
method's source file itself, with the three framework names its *classes* derive from
(``BaseAlgorithm``, ``SimpleProfilerMixin``, ``BaseModelPool``, ``auto_register_config``)
stubbed for the duration of the load, and ``sys.modules`` restored afterwards. The
functions under test are FusionBench's code, unmodified.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types


def _package_dir() -> str:
    """FusionBench's installed package folder, found without importing it (the one lookup
    of tests/reference_impls.py, which also copes with a stub package already loaded)."""
    from tests.reference_impls import fusion_bench_root
    return fusion_bench_root()


def _stub_modules() -> dict[str, types.ModuleType]:
    class _Stub:
        def __init__(self, *args, **kwargs):
            pass

    root = types.ModuleType("fusion_bench")
    root.__path__ = []
    method = types.ModuleType("fusion_bench.method")
    method.__path__ = []
    method.BaseAlgorithm = type("BaseAlgorithm", (_Stub,), {})
    mixins = types.ModuleType("fusion_bench.mixins")
    mixins.SimpleProfilerMixin = type("SimpleProfilerMixin", (), {})
    mixins.auto_register_config = lambda cls: cls
    modelpool = types.ModuleType("fusion_bench.modelpool")
    modelpool.BaseModelPool = type("BaseModelPool", (_Stub,), {})
    return {"fusion_bench": root, "fusion_bench.method": method,
            "fusion_bench.mixins": mixins, "fusion_bench.modelpool": modelpool}


def _load(package: str, files: tuple[str, ...]) -> types.ModuleType:
    """Executes ``fusion_bench/method/<package>/<file>.py`` for each file; returns the last."""
    base = os.path.join(_package_dir(), "method", package)
    stubs = _stub_modules()
    pkg_name = f"fusion_bench.method.{package}"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [base]
    stubs[pkg_name] = pkg
    names = list(stubs) + [f"{pkg_name}.{f}" for f in files]
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    try:
        sys.modules.update(stubs)
        module = None
        for f in files:
            name = f"{pkg_name}.{f}"
            spec = importlib.util.spec_from_file_location(name, os.path.join(base, f + ".py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return module
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


@functools.lru_cache(maxsize=None)
def fisher_merging():
    """``fusion_bench/method/fisher_merging/fisher_merging.py``."""
    return _load("fisher_merging", ("fisher_merging",))


@functools.lru_cache(maxsize=None)
def regmean():
    """``fusion_bench/method/regmean/regmean.py`` (with its ``utils.py``)."""
    return _load("regmean", ("utils", "regmean"))
