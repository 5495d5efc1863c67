"""Vision task data: the paper's datasets, local folders, and an embedded offline suite.

One interface whatever the source, so an experiment switches suites by config alone::

    from taskvec_jax import data
    train = data.load_task("embedded/rotate90", "train")        # offline, always there
    test  = data.load_task("eurosat", "test", image_size=224, channels=3,
                           normalization="clip")                # prepared tfds data
    suite = data.load_suite("embedded")   # {task: {"train": ..., "validation": ..., "test": ...}}
    base  = data.load_task(data.SUITES["embedded"].source, "train")   # pretraining data

    split = data.open_split("sun397", "train", image_size=224)  # lazy, random access
    for batch in data.batches(split, 128, key=jax.random.key(0), epoch=e): ...

Every batch is ``{"image": float32 [N, H, W, C], "label": int32 [N]}`` (numpy), the
layout :func:`taskvec_jax.finetune` and :func:`taskvec_jax.models.make_loss_fn` expect.
Missing data raises :class:`DataNotFoundError` at once; data is downloaded only with
``download=True``. See docs/data.md.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from taskvec_jax.data import embedded
from taskvec_jax.data.embedded import (EMBEDDED_SOURCE, EMBEDDED_TASKS, QUADRANTS_SOURCE,
                                       QUADRANTS_TASKS, permuted_digits_tasks)
from taskvec_jax.data.folder import import_folder
from taskvec_jax.data.pipeline import (
    ArrayRecords,
    Batch,
    TaskSplit,
    batches,
    default_num_threads,
    epoch_order,
)
from taskvec_jax.data.preprocess import NORMALIZATIONS, Preprocess
from taskvec_jax.data.registry import (
    SPLITS,
    VISION8,
    SplitPlan,
    TaskSpec,
    carve,
    get_task,
    is_registered,
    readable_class_names,
    register_task,
    stable_permutation,
    task_names,
    unregister_task,
)
from taskvec_jax.data.tfds_source import (
    DataNotFoundError,
    default_data_dir,
    find_prepared,
    local_dataset_dir,
    resolve_data_dir,
    split_records,
)


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named group of tasks.

    Attributes:
      name: the suite's name.
      tasks: its task names.
      source: the task whose ``train`` split pretrains the base model, or ``None`` when
        the base model comes from elsewhere (a pretrained CLIP for the vision tasks).
    """

    name: str
    tasks: tuple[str, ...]
    source: str | None = None


SUITES: dict[str, Suite] = {
    "embedded": Suite("embedded", EMBEDDED_TASKS, EMBEDDED_SOURCE),
    "embedded_quadrants": Suite("embedded_quadrants", QUADRANTS_TASKS, QUADRANTS_SOURCE),
    "vision8": Suite("vision8", VISION8),
}


def get_suite(suite: str | Sequence[str] | Suite) -> Suite:
    """A :class:`Suite` from its name, a sequence of task names, or itself."""
    if isinstance(suite, Suite):
        return suite
    if isinstance(suite, str):
        if suite in SUITES:
            return SUITES[suite]
        if is_registered(suite):
            return Suite(suite, (suite,))
        raise KeyError(f"unknown suite {suite!r}; suites: {sorted(SUITES)} (or pass a list "
                       "of task names)")
    return Suite("custom", tuple(suite))


def task_spec(name: str, data_dir: str | os.PathLike | None = None) -> TaskSpec:
    """The registered task ``name``, or the spec of an imported folder of that name."""
    if is_registered(name):
        return get_task(name)
    data_dir = resolve_data_dir(data_dir)
    local = local_dataset_dir(name, data_dir)
    if local is None:
        get_task(name)  # raises KeyError listing the registered tasks
    import tensorflow_datasets as tfds

    names = tuple(tfds.builder_from_directory(local).info.features["label"].names)
    return TaskSpec(name=name, source="folder", num_classes=len(names),
                    explicit_class_names=names, description=f"imported folder ({local})")


def open_split(task: str, split: str = "train", *,
               data_dir: str | os.PathLike | None = None,
               image_size: int | tuple[int, int] | None = None,
               channels: int | None = None,
               normalization: str | tuple = "unit",
               resize_mode: str = "crop",
               interpolation: str = "bilinear",
               download: bool = False) -> TaskSplit:
    """Opens one split of one task for random access (nothing is decoded yet).

    Args:
      task: a registered task name or alias (``"eurosat"``, ``"eurosat/rgb"``,
        ``"embedded/rotate90"``) or the name of an imported folder.
      split: ``"train"``, ``"validation"`` or ``"test"`` (carved where the source lacks
        them, see :class:`SplitPlan`); other names go to tensorflow-datasets unchanged.
      data_dir: where prepared data lives (default :func:`default_data_dir`); unused by
        the embedded suite.
      image_size: output resolution (``int`` or ``(h, w)``); ``None`` keeps the native one.
      channels: 1 or 3 output channels (grayscale <-> RGB); ``None`` keeps the native.
      normalization: ``"unit"`` ([0, 1]), ``"symmetric"``, ``"clip"``, ``"imagenet"``
        or ``(mean, std)``.
      resize_mode: ``"crop"`` (cover + center crop) or ``"squash"``.
      interpolation: Pillow resampling filter name.
      download: prepare a missing tfds dataset (needs network); never implicit.

    Raises:
      DataNotFoundError: the data is not in ``data_dir`` (message: task, folders
        searched, how to provide it).
      KeyError: unknown task.
    """
    preprocess = Preprocess(image_size=image_size, channels=channels,
                            normalization=normalization, resize_mode=resize_mode,
                            interpolation=interpolation)
    spec = task_spec(task, data_dir)
    if spec.source == "embedded":
        images, labels = embedded.task_arrays(spec.name, split)
        return TaskSplit(spec, split, ArrayRecords(images, labels),
                         np.arange(labels.shape[0], dtype=np.int64), preprocess)
    prepared = find_prepared(spec, data_dir, download=download)
    records, positions = split_records(spec, prepared, split)
    return TaskSplit(spec, split, records, positions, preprocess)


def load_task(task: str, split: str = "train", *, max_examples: int | None = None,
              num_threads: int | None = None, **kwargs) -> Batch:
    """One split of one task as numpy arrays ``{"image": float32 [N, H, W, C],
    "label": int32 [N]}`` (``max_examples``: only the first ones, in file order).

    ``kwargs`` are those of :func:`open_split`.
    """
    return open_split(task, split, **kwargs).load(max_examples=max_examples,
                                                  num_threads=num_threads)


def load_suite(suite: str | Sequence[str] | Suite = "embedded",
               splits: Sequence[str] = SPLITS, *, max_examples: int | None = None,
               num_threads: int | None = None, **kwargs) -> dict[str, dict[str, Batch]]:
    """Every task of ``suite`` (a suite name or task names), every split in ``splits``.

    Returns:
      ``{task: {split: {"image": ..., "label": ...}}}`` in the suite's task order.
    """
    suite = get_suite(suite)
    return {t: {s: load_task(t, s, max_examples=max_examples, num_threads=num_threads,
                             **kwargs) for s in splits} for t in suite.tasks}


__all__ = [
    "ArrayRecords", "Batch", "DataNotFoundError", "EMBEDDED_SOURCE", "EMBEDDED_TASKS",
    "NORMALIZATIONS", "Preprocess", "QUADRANTS_SOURCE", "QUADRANTS_TASKS", "SPLITS", "SUITES",
    "SplitPlan", "Suite", "TaskSpec",
    "TaskSplit", "VISION8", "batches", "carve", "default_data_dir", "default_num_threads",
    "embedded", "epoch_order", "find_prepared", "get_suite", "get_task", "import_folder",
    "is_registered", "load_suite", "load_task", "open_split", "permuted_digits_tasks",
    "readable_class_names", "register_task", "resolve_data_dir", "stable_permutation",
    "task_names", "task_spec", "unregister_task",
]
