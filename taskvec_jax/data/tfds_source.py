"""Reading prepared tensorflow-datasets data without TensorFlow.

``tfds.load`` / ``as_dataset`` need TensorFlow; ``builder.as_data_source`` reads the
array_record files a builder prepared with plain Python (records decoded by Pillow), which
is what this module uses. TensorFlow stays an optional extra.

Order of the search for a task's data in ``data_dir`` (never the network):

1. a local-folder import, ``<data_dir>/local_<task>/<version>/``
   (:func:`taskvec_jax.data.import_folder`);
2. the tfds-prepared dataset, ``<data_dir>/<tfds name>/<config>/<version>/``;
3. only when the caller passes ``download=True``: ``builder.download_and_prepare``
   writing array_record;
4. otherwise :class:`DataNotFoundError`, raised within milliseconds, naming the task, the
   directories searched and the two ways to provide the data. (tensorflow-datasets
   retries DNS for minutes when offline, so nothing here lets it try.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from taskvec_jax.data.registry import (
    SPLITS,
    SplitPlan,
    TaskSpec,
    carve,
    local_dataset_name,
)

__all__ = ["ARRAY_RECORD", "DataNotFoundError", "PreparedData", "default_data_dir",
           "find_prepared", "folder_plan", "local_dataset_dir", "resolve_data_dir",
           "split_records"]

ARRAY_RECORD = "array_record"


class DataNotFoundError(FileNotFoundError):
    """A task's data is not in the data directory (and no download was asked for)."""


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else tensorflow-datasets' default ``~/tensorflow_datasets``."""
    return os.path.abspath(os.path.expanduser(
        os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    return default_data_dir() if data_dir is None else os.path.abspath(
        os.path.expanduser(os.fspath(data_dir)))


def local_dataset_dir(task: str, data_dir: str) -> str | None:
    """The newest prepared version folder of the folder import of ``task``, if any."""
    root = os.path.join(data_dir, local_dataset_name(task))
    if not os.path.isdir(root):
        return None
    versions = []
    for v in os.listdir(root):
        parts = v.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and os.path.isfile(
                os.path.join(root, v, "dataset_info.json")):
            versions.append(tuple(int(p) for p in parts))
    if not versions:
        return None
    return os.path.join(root, ".".join(str(p) for p in max(versions)))


def _missing_message(spec: TaskSpec, data_dir: str, searched: list[str]) -> str:
    lines = [f"task {spec.name!r}: no prepared data in data_dir {data_dir!r}. Searched: "
             + "; ".join(searched) + ".",
             "Provide it in one of two ways:"]
    if spec.tfds_name is not None:
        lines.append(
            f"  1. download: on a machine with network, run "
            f"`python -m taskvec_jax.data download {spec.name} --data_dir DIR` (or "
            f"load_task({spec.name!r}, ..., download=True)); it prepares tensorflow-datasets"
            f" {spec.tfds_name!r} as array_record (some builders need TensorFlow, the `tf` "
            f"extra, to prepare), then copy DIR's contents into {data_dir!r};")
    else:
        lines.append(
            f"  1. download: on a machine with network, fetch the original {spec.name} "
            "archive and extract it (tensorflow-datasets has no builder for it), then "
            "import it as in 2;")
    lines.append(
        f"  2. local folder: import a folder of class sub-folders of images (or train/ and "
        f"test/ folders of them): taskvec_jax.data.import_folder(PATH, {spec.name!r}, "
        f"data_dir={data_dir!r}) or `python -m taskvec_jax.data import-folder {spec.name} "
        f"PATH --data_dir {data_dir}`.")
    if spec.how_to_get:
        lines.append(f"  Note: {spec.how_to_get}.")
    lines.append("Nothing was downloaded: data is fetched only with download=True.")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """A prepared dataset found for a task: its builder, split plan and origin."""

    builder: Any
    plan: SplitPlan
    origin: str  # "folder" or "tfds"
    path: str


def folder_plan(spec: TaskSpec, available: set[str]) -> SplitPlan:
    """The split plan of a folder import: its own validation / test splits where it has
    them, else carved from ``train`` with the task's fractions (default 10% / 20%)."""
    return dataclasses.replace(
        spec.splits,
        train="train",
        validation="validation" if "validation" in available else None,
        test="test" if "test" in available else None)


def find_prepared(spec: TaskSpec, data_dir: str | os.PathLike | None = None, *,
                  download: bool = False) -> PreparedData:
    """Locates (or, with ``download=True``, prepares) ``spec``'s data; see the module doc.

    Raises:
      DataNotFoundError: when the data is absent and ``download`` is false.
      ValueError: when a tfds dataset was prepared in a format other than array_record.
    """
    import tensorflow_datasets as tfds  # lazy: the embedded suite never needs it

    data_dir = resolve_data_dir(data_dir)
    searched = []
    local = local_dataset_dir(spec.name, data_dir)
    searched.append(f"{os.path.join(data_dir, local_dataset_name(spec.name))} "
                    "(local-folder import)")
    if local is not None:
        builder = tfds.builder_from_directory(local)
        available = set(builder.info.splits.keys())
        return PreparedData(builder, folder_plan(spec, available), "folder", local)
    if spec.tfds_name is None:
        raise DataNotFoundError(_missing_message(spec, data_dir, searched))
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format=ARRAY_RECORD)
    searched.append(f"{builder.data_dir} (tensorflow-datasets {spec.tfds_name!r})")
    if builder.is_prepared():
        fmt = builder.info.file_format
        fmt = getattr(fmt, "value", fmt)
        if fmt is not None and str(fmt) != ARRAY_RECORD:
            raise ValueError(
                f"task {spec.name!r}: {builder.data_dir} was prepared as {fmt}, but reading "
                "without TensorFlow needs array_record; convert it with `tfds "
                f"convert_format --dataset_version_dir={builder.data_dir} "
                "--out_file_format=array_record` or prepare it again with "
                "file_format='array_record'")
        return PreparedData(builder, spec.splits, "tfds", builder.data_dir)
    if not download:
        raise DataNotFoundError(_missing_message(spec, data_dir, searched))
    builder.download_and_prepare(file_format=ARRAY_RECORD)
    return PreparedData(builder, spec.splits, "tfds", builder.data_dir)


def split_records(spec: TaskSpec, prepared: PreparedData, split: str
                  ) -> tuple[Any, np.ndarray]:
    """The tfds data source and positions making up ``split`` of ``spec``.

    ``train`` / ``validation`` / ``test`` follow the task's :class:`SplitPlan` (carved
    splits via :func:`taskvec_jax.data.registry.carve`); any other name (``"extra"``,
    ``"train[:1000]"``) is handed to tensorflow-datasets unchanged.
    """
    plan = prepared.plan
    builder = prepared.builder
    if split not in SPLITS:
        source = builder.as_data_source(split=split)
        return source, np.arange(len(source), dtype=np.int64)
    named = {"train": plan.train, "validation": plan.validation, "test": plan.test}[split]
    carved_from_train = split == "train" and (plan.validation is None or plan.test is None)
    if named is not None and not carved_from_train:
        source = builder.as_data_source(split=named)
        return source, np.arange(len(source), dtype=np.int64)
    source = builder.as_data_source(split=plan.train)
    parts = carve(len(source), plan, task=spec.name)
    return source, parts[split]
