"""The one command line of every experiment: a config file, overrides, a workdir, JSON.

Every entry point (``experiments/reproduce.py``, ``experiments/theorem.py``) parses its
arguments here, the way the flax examples do, with ml_collections ``config_flags``::

    python -m experiments.reproduce --config=experiments/configs/reproduce.py:quick
    python -m experiments.reproduce --config=experiments/configs/reproduce.py \\
        --config.finetune.minibatch_epochs=8 --workdir=results/long
    python -m experiments.reproduce --quick          # = --config=<its default file>:quick

``--config=PATH[:ARG]`` names a Python file whose ``get_config(ARG)`` returns an
``ml_collections.ConfigDict`` (``get_config()`` without ``:ARG``); ``--config.a.b=VALUE``
overrides one existing entry, with the entry's type checked (tuples as
``--config.model.widths='(64, 32)'``). ``--quick`` is a convenience for ``:quick`` on the
entry point's config file. ``--workdir`` is where the run writes everything.

:func:`jsonable` and :func:`write_json` are the one way results become JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, NamedTuple, Sequence

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

__all__ = ["Args", "CONFIG_DIR", "config_path", "enable_x64", "jsonable", "parse",
           "write_json"]

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_path(name: str) -> str:
    """The absolute path of ``experiments/configs/<name>.py``."""
    return os.path.join(CONFIG_DIR, f"{name}.py")


class Args(NamedTuple):
    """What an entry point gets from the command line."""

    config: ml_collections.ConfigDict
    workdir: str | None   # None when --workdir was not given and there is no default


def _apply_quick(argv: list[str], default_config: str) -> list[str]:
    """Replaces ``--quick`` by ``:quick`` on the config file (the given or the default)."""
    if "--quick" not in argv:
        return argv
    argv = [a for a in argv if a != "--quick"]
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            index, value, form = i + 1, argv[i + 1], "{}"
            break
        if arg.startswith("--config="):
            index, value, form = i, arg[len("--config="):], "--config={}"
            break
    else:
        return [f"--config={default_config}:quick"] + argv
    path, sep, arg = value.partition(":")
    if sep and arg != "quick":
        raise flags.Error(f"--quick means {path}:quick, but --config also asks for "
                          f"{value!r}: give one of them")
    argv[index] = form.format(f"{path}:quick")
    return argv


def parse(argv: Sequence[str] | None, *, default_config: str,
          default_workdir: str | None = None, description: str = "") -> Args:
    """Parses ``argv`` (without the program name; ``None``: ``sys.argv[1:]``).

    Args:
      argv: the arguments, e.g. ``["--quick", "--workdir", "/tmp/run"]``.
      default_config: the config file used when ``--config`` is not given.
      default_workdir: the ``--workdir`` default.
      description: the first line of ``--help``.

    Returns:
      The loaded, overridden config and the workdir.

    Raises:
      SystemExit: with status 2 and a message on a bad argument (status 0 for --help).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "experiment"
    fv = flags.FlagValues()
    flags.DEFINE_bool("help", False, "show this help and exit", flag_values=fv)
    flags.DEFINE_bool("quick", False, "the config file's 'quick' variant (= PATH:quick)",
                      flag_values=fv)
    flags.DEFINE_string("workdir", default_workdir, "where the run writes its results",
                        flag_values=fv)
    try:
        full = [prog] + _apply_quick(argv, default_config)
        config_flags.DEFINE_config_file(
            "config", default_config, "a config file PATH[:ARG] (get_config(ARG)); "
            "--config.a.b=VALUE overrides one entry", flag_values=fv, sys_argv=full)
        rest = fv(full)
        if len(rest) > 1:
            raise flags.Error(f"unexpected positional arguments {rest[1:]}")
        config = fv.config
        config.keys()   # config_flags reports a file that failed to load only on access
    except (AttributeError, KeyError) as err:   # config_flags' words for a missing entry
        _usage_error(prog, f"the config has no entry {err} (--config.a.b overrides only "
                           "existing entries)")
    except (flags.Error, ValueError, TypeError, OSError) as err:
        _usage_error(prog, str(err))
    if fv.help:
        print(f"{description}\n\n{fv.get_help()}")
        raise SystemExit(0)
    return Args(config, fv.workdir)


def _usage_error(prog: str, message: str):
    print(f"{prog}: error: {message}\n(--help lists the arguments)", file=sys.stderr)
    raise SystemExit(2)


def enable_x64() -> None:
    """float64 everywhere: the theorems are checked to rounding, and slopes over a decade
    of step sizes need it (call before any array is made)."""
    import jax

    jax.config.update("jax_enable_x64", True)


def jsonable(x: Any, *, allow_nan: bool = False, _path: str = "results") -> Any:
    """``x`` with numpy/JAX arrays and scalars turned into lists and Python numbers.

    Args:
      x: nested dicts, lists, tuples, arrays and numbers (dict keys become strings).
      allow_nan: keep non-finite floats (written as ``NaN``/``Infinity``, which Python's
        json reads back); otherwise they raise.

    Raises:
      ValueError: naming where a non-finite number sits, when ``allow_nan`` is false.
    """
    if isinstance(x, ml_collections.ConfigDict):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): jsonable(v, allow_nan=allow_nan, _path=f"{_path}[{str(k)!r}]")
                for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v, allow_nan=allow_nan, _path=f"{_path}[{i}]")
                for i, v in enumerate(x)]
    if hasattr(x, "__array__") and not isinstance(x, (np.generic, float, int)):
        return jsonable(np.asarray(x).tolist(), allow_nan=allow_nan, _path=_path)
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        if not allow_nan and not math.isfinite(x):
            raise ValueError(f"non-finite number {x} at {_path}")
        return x
    return x


def write_json(path: str, obj: Any, *, allow_nan: bool = False) -> Any:
    """Writes :func:`jsonable` ``(obj)`` to ``path`` (indented) and returns it."""
    out = jsonable(obj, allow_nan=allow_nan)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1, allow_nan=allow_nan)
    return out
