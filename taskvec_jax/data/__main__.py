"""Command line for task data: list tasks, check a data dir, download, import a folder.

    python -m taskvec_jax.data list
    python -m taskvec_jax.data check [--data_dir DIR]
    python -m taskvec_jax.data download eurosat [--data_dir DIR]       # needs network
    python -m taskvec_jax.data import-folder gtsrb PATH [--data_dir DIR] [--overwrite]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from taskvec_jax import data

__all__ = ["main", "task_status"]


def _list() -> int:
    for name in data.task_names():
        spec = data.get_task(name)
        src = spec.tfds_name if spec.tfds_name else spec.source
        print(f"{name:22s} {spec.num_classes:4d} classes  [{src}]  {spec.description}")
    for suite in data.SUITES.values():
        extra = f" (base model from {suite.source!r})" if suite.source else ""
        print(f"suite {suite.name}: {', '.join(suite.tasks)}{extra}")
    return 0


@contextlib.contextmanager
def _quiet_absl():
    """Silences absl's warnings (tfds logs one per version folder it cannot read, which is
    what "missing" already says)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_status(name: str, data_dir: str) -> str:
    """One task's status: ``"ready (...)"`` with where it is read from, or ``"missing"``."""
    spec = data.get_task(name)
    if spec.source == "embedded":
        try:
            return f"ready (embedded: {data.embedded.source_file(spec.name)})"
        except (ImportError, FileNotFoundError) as err:
            return f"missing ({err})"
    try:
        with _quiet_absl():
            prepared = data.find_prepared(spec, data_dir)
        return f"ready ({prepared.origin}: {prepared.path})"
    except data.DataNotFoundError:
        return "missing"


def _check(data_dir: str | None) -> int:
    data_dir = data.resolve_data_dir(data_dir)
    print(f"data_dir: {data_dir}")
    names = data.task_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"  {name:{width}s} {task_status(name, data_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m taskvec_jax.data",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered tasks and suites")
    check = sub.add_parser("check", help="which tasks are present in the data dir")
    check.add_argument("--data_dir")
    download = sub.add_parser("download", help="download and prepare tfds tasks "
                                               "(array_record; needs network)")
    download.add_argument("tasks", nargs="+")
    download.add_argument("--data_dir")
    folder = sub.add_parser("import-folder", help="import a folder of class sub-folders")
    folder.add_argument("task")
    folder.add_argument("path")
    folder.add_argument("--data_dir")
    folder.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "list":
        return _list()
    if args.command == "check":
        return _check(args.data_dir)
    if args.command == "download":
        for task in args.tasks:
            prepared = data.find_prepared(data.get_task(task), args.data_dir, download=True)
            print(f"{task}: {prepared.path}")
        return 0
    path = data.import_folder(args.path, args.task, data_dir=args.data_dir,
                              overwrite=args.overwrite)
    print(f"{args.task}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
