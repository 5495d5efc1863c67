"""Importing a local folder of images as an array_record tensorflow-datasets dataset.

This is how a user provides a dataset that cannot be downloaded here (RESISC45, GTSRB,
Cars): a folder of class sub-folders, converted once into ``<data_dir>/local_<task>/1.0.0``
by a ``GeneratorBasedBuilder`` fed with Pillow images (no TensorFlow involved), then read
like any other prepared dataset. Two layouts are accepted::

    PATH/<class>/<image>                          one split, "train"
    PATH/train/<class>/<image>                    several splits; "val" is read as
    PATH/test/<class>/<image>                     "validation"
    [PATH/validation/<class>/<image>]

Splits the folder does not have are carved from ``train`` when read (see
:func:`taskvec_jax.data.tfds_source.folder_plan`).

Labels: for a registered task, class folders map onto the task's class names (compared
case-insensitively with every run of non-alphanumerics as one ``_``), or are read as the
integer label when every folder name is an integer (GTSRB's ``00000`` .. ``00042``); for
any other name the classes are the sorted folder names.

Pixels are kept exactly: when every image is a JPEG of one colour mode its bytes are
stored unchanged; otherwise every image is stored as PNG (lossless). Images are stored
with one channel when all of them are grayscale, else as RGB.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import types
import uuid
from typing import Sequence

from taskvec_jax import _durable
from taskvec_jax.data.registry import (
    get_task,
    is_registered,
    local_dataset_name,
    readable_class_names,
)
from taskvec_jax.data.tfds_source import resolve_data_dir

__all__ = ["IMAGE_EXTENSIONS", "VERSION", "import_folder", "label_map", "scan_folder"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif",
                    ".tiff", ".webp")
VERSION = "1.0.0"
_SPLIT_DIRS = {"train": "train", "validation": "validation", "val": "validation",
               "test": "test"}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path)
                  if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def _images(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if not f.startswith(".")
                  and f.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(path, f)))


def scan_folder(path: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """``{split: {class folder: [image paths]}}`` for a folder in either layout."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    subdirs = _subdirs(path)
    split_dirs = [d for d in subdirs if d.lower() in _SPLIT_DIRS]
    if split_dirs and "train" in [d.lower() for d in split_dirs]:
        roots = {_SPLIT_DIRS[d.lower()]: os.path.join(path, d) for d in split_dirs}
    else:
        roots = {"train": path}
    out: dict[str, dict[str, list[str]]] = {}
    for split, root in roots.items():
        classes = {c: [os.path.join(root, c, f) for f in _images(os.path.join(root, c))]
                   for c in _subdirs(root)}
        classes = {c: files for c, files in classes.items() if files}
        if not classes:
            raise ValueError(f"{root!r} has no class sub-folders containing images "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        out[split] = classes
    return out


def label_map(folders: Sequence[str], class_names: Sequence[str] | None, *,
              task: str) -> tuple[dict[str, int], tuple[str, ...]]:
    """Maps class folder names to labels; returns ``(folder -> label, class names)``."""
    folders = sorted(set(folders))
    if not class_names:
        return {f: i for i, f in enumerate(folders)}, tuple(folders)
    n = len(class_names)
    if all(f.isdigit() for f in folders):
        bad = [f for f in folders if int(f) >= n]
        if bad:
            raise ValueError(f"{task}: integer class folders {bad} are not below the "
                             f"task's {n} classes")
        return {f: int(f) for f in folders}, tuple(class_names)
    lookup: dict[str, int] = {}
    for names in (class_names, readable_class_names(class_names)):
        for i, name in enumerate(names):
            lookup.setdefault(_norm(name), i)
    mapping = {f: lookup.get(_norm(f), -1) for f in folders}
    unknown = [f for f, i in mapping.items() if i < 0]
    if unknown:
        raise ValueError(
            f"{task}: class folders {unknown[:10]} match none of the task's {n} class names "
            f"(e.g. {list(class_names[:5])}); rename them, name them by integer label, or "
            "import under another name to use the folder names as classes")
    return mapping, tuple(class_names)


def _inspect(files: list[str]) -> tuple[int, str]:
    """``(channels, encoding)``: 1 if every image is grayscale else 3; "jpeg" when every
    image is a JPEG in one mode matching the channels (bytes kept), else "png"."""
    import PIL.Image

    formats, modes = set(), set()
    for f in files:
        with PIL.Image.open(f) as im:
            formats.add(im.format)
            modes.add(im.mode)
    channels = 1 if modes <= {"L", "1", "I;16", "I"} else 3
    jpeg_ok = formats == {"JPEG"} and modes == ({"L"} if channels == 1 else {"RGB"})
    return channels, "jpeg" if jpeg_ok else "png"


def _make_builder(name: str, class_names: tuple[str, ...], items: dict, channels: int,
                  encoding: str, description: str, data_dir: str):
    import PIL.Image
    import tensorflow_datasets as tfds

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, channels),
                                             encoding_format=encoding),
                "label": tfds.features.ClassLabel(names=list(class_names)),
                "filename": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(examples) for split, examples in
                items.items()}

    def _generate_examples(self, examples):
        for key, path, label in examples:
            if encoding == "jpeg":
                with open(path, "rb") as fh:
                    image = fh.read()
            else:
                with PIL.Image.open(path) as im:
                    image = im.convert("L" if channels == 1 else "RGB")
                    image.load()
            yield key, {"image": image, "label": label, "filename": key}

    def body(ns):
        ns.update(name=name, VERSION=tfds.core.Version(VERSION),
                  RELEASE_NOTES={VERSION: "Imported from a local folder."},
                  _info=_info, _split_generators=_split_generators,
                  _generate_examples=_generate_examples)

    cls = types.new_class("LocalFolderImages", (tfds.core.GeneratorBasedBuilder,),
                          {"skip_registration": True}, body)
    return cls(data_dir=data_dir, file_format="array_record")


def import_folder(path: str | os.PathLike, name: str, *,
                  data_dir: str | os.PathLike | None = None,
                  class_names: Sequence[str] | None = None,
                  overwrite: bool = False) -> str:
    """Converts a folder of class sub-folders of images into a readable dataset.

    Args:
      path: the image folder (layouts in the module docstring).
      name: the task name it is read under: a registered task (``"resisc45"``,
        ``"gtsrb"``, ``"cars"``) or any new name.
      data_dir: where to write (default :func:`taskvec_jax.data.default_data_dir`); the
        dataset lands in ``<data_dir>/local_<name>/1.0.0``.
      class_names: the class names in label order; default: the registered task's, or the
        sorted folder names for a new name.
      overwrite: replace an existing import of ``name``; the old dataset stays in place
        until the new one is completely prepared.

    Returns:
      The prepared dataset's folder.

    Raises:
      FileExistsError: if ``name`` was imported already and ``overwrite`` is false.
      BlockingIOError: another process is importing ``name`` into ``data_dir`` right now.
      OSError: ``errno.ENOSPC`` when the disk fills up (nothing at the destination
        changed).
      ValueError: if the folder has no images, or its class folders do not match the
        task's class names.
    """
    data_dir = resolve_data_dir(data_dir)
    spec = get_task(name) if is_registered(name) else None
    task = spec.name if spec is not None else name
    if spec is not None and spec.source == "embedded":
        raise ValueError(f"task {task!r} is part of the embedded suite and needs no import")
    if class_names is None and spec is not None:
        class_names = spec.class_names
    scanned = scan_folder(path)
    folders = [c for classes in scanned.values() for c in classes]
    mapping, names = label_map(folders, class_names, task=task)
    items = {split: [(os.path.relpath(f, os.fspath(path)), f, mapping[c])
                     for c, files in classes.items() for f in files]
             for split, classes in scanned.items()}
    channels, encoding = _inspect([f for split in items.values() for _, f, _ in split])
    root = os.path.join(data_dir, local_dataset_name(task))
    if os.path.exists(root) and not overwrite:
        raise FileExistsError(f"{task!r} was already imported into {root!r}; pass "
                              "overwrite=True to import it again")
    counts = ", ".join(f"{s}: {len(v)}" for s, v in items.items())
    description = (f"Task {task!r} imported from the local folder {os.path.abspath(path)} "
                   f"({counts} images, {len(names)} classes).")
    # Crash-safe: prepared in a hidden staging data dir, then swapped in whole (a killed
    # import leaves the old dataset or none at `root`, never a part; docs/durability.md).
    os.makedirs(data_dir, exist_ok=True)
    hidden = os.path.join(data_dir, f".{local_dataset_name(task)}")
    with _durable.exclusive_lock(hidden + ".lock", f"the import of {task!r} into {root!r}"):
        if os.path.exists(root) and not overwrite:  # another import won the race
            raise FileExistsError(f"{task!r} was already imported into {root!r}; pass "
                                  "overwrite=True to import it again")
        for entry in os.listdir(data_dir):  # leftovers of killed imports, never read
            if entry.startswith((f"{os.path.basename(hidden)}.staging-",
                                 f"{os.path.basename(hidden)}.trash-")):
                shutil.rmtree(os.path.join(data_dir, entry), ignore_errors=True)
        staging = f"{hidden}.staging-{uuid.uuid4().hex}"
        try:
            builder = _make_builder(local_dataset_name(task), names, items, channels,
                                    encoding, description, staging)
            builder.download_and_prepare()
            _durable.crash_point("prepared")
            staged = os.path.join(staging, local_dataset_name(task))
            _durable.fsync_tree(staged)
            _durable.swap_in(staged, root, f"{hidden}.trash-{uuid.uuid4().hex}")
        except BaseException as exc:
            if isinstance(exc, Exception) and _durable.disk_full_error(exc):
                raise OSError(errno.ENOSPC, f"no space left on device while importing "
                              f"{task!r} into {root!r}; nothing was changed there",
                              root) from exc
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(root, os.path.basename(os.fspath(builder.data_dir)))
