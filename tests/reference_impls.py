"""The reference implementations' own merge functions, loaded for the parity tests.

FusionBench's package ``__init__`` imports its whole framework (hydra, lightning, datasets:
minutes to install, ~25 s to import), although the merge functions the parity tests call
need only torch and a few of its own utility modules. So this helper loads exactly those
source files from the installed ``fusion-bench`` wheel, by path, under their real module
names, without running the package ``__init__``: the functions executed are the
reference code, byte for byte. The framework classes that share a file with a merge
function (``MagMaxAlgorithm``'s base classes and decorator) are the only names provided
here, as inert placeholders: they are referenced at class-definition time and never run.

mergekit imports cleanly (its merge functions need torch and pydantic only) and is imported
normally.

Install (the ``parity`` extra; scripts/setup.sh adds the ``--no-deps`` wheels):
``fusion-bench==0.2.33`` and ``mergekit``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

__all__ = ["fusion_bench_module", "fusion_bench_root", "fusion_bench_slerp"]


def fusion_bench_root() -> str:
    shell = sys.modules.get("fusion_bench")
    if shell is not None and getattr(shell, "__path__", None):
        return list(shell.__path__)[0]
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fusion-bench is not installed: install the parity extra "
                          "(bash scripts/setup.sh test,parity)")
    return list(spec.submodule_search_locations)[0]


def _package(name: str, path: str) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    mod = types.ModuleType(name)
    mod.__path__ = [path]          # a namespace shell: submodules import from the wheel
    sys.modules[name] = mod
    return mod


def _load(name: str, path: str) -> types.ModuleType:
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == path:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _inert(name: str) -> type:
    """A class standing for a framework base class a loaded file subclasses, never runs."""
    return type(name, (), {})


def _shells(root: str) -> None:
    fb = _package("fusion_bench", root)
    utils = _package("fusion_bench.utils", os.path.join(root, "utils"))
    _package("fusion_bench.method", os.path.join(root, "method"))
    for sub in ("type", "timer", "parameters"):
        mod = _load(f"fusion_bench.utils.{sub}", os.path.join(root, "utils", f"{sub}.py"))
        for attr in dir(mod):
            if not attr.startswith("_"):
                setattr(utils, attr, getattr(mod, attr))
    # Names MagMaxAlgorithm's class statement needs (the class itself is never used).
    fb.LazyStateDict = _inert("LazyStateDict")
    for name, attrs in {
        "fusion_bench.method.base_algorithm": {"BaseAlgorithm": _inert("BaseAlgorithm")},
        "fusion_bench.mixins": {"SimpleProfilerMixin": _inert("SimpleProfilerMixin"),
                                "auto_register_config": lambda cls: cls},
        "fusion_bench.modelpool": {"BaseModelPool": _inert("BaseModelPool")},
    }.items():
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            sys.modules[name] = mod


_FILES = {
    "iso": "method/isotropic_merging/iso_utils.py",
    "tsvm": "method/task_singular_vector/utils/TSVM_utils.py",
    "interference": "method/task_singular_vector/utils/task_singular_interference.py",
    "magmax": "method/magmax/magmax.py",
    "tall_mask": "method/tall_mask/utils.py",
    "slerp": "method/slerp/slerp_utils.py",
}


def fusion_bench_module(which: str) -> types.ModuleType:
    """One of FusionBench's merge-function modules: ``iso``, ``tsvm``, ``interference``,
    ``magmax`` or ``tall_mask``."""
    root = fusion_bench_root()
    _shells(root)
    rel = _FILES[which]
    name = "fusion_bench." + rel[:-3].replace("/", ".")
    parent = name.rsplit(".", 1)[0]
    parts = parent.split(".")
    for i in range(3, len(parts) + 1):
        _package(".".join(parts[:i]), os.path.join(root, *parts[1:i]))
    return _load(name, os.path.join(root, rel))


def fusion_bench_slerp():
    """FusionBench's per-tensor ``slerp(t, v0, v1)``."""
    return fusion_bench_module("slerp").slerp
