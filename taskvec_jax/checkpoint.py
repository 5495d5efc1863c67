"""Saving and restoring parameter pytrees (params, trajectories, optimizer states) with orbax.

Every write goes through a closed orbax checkpointer (orbax saves asynchronously; a
process that exits before the save finishes writes nothing), with absolute paths, and
never destroys what is already on disk: :func:`save` refuses an existing path unless
``overwrite=True``, and then writes the new checkpoint beside the old one and swaps them
only once the new one is complete. Checkpointed, resumable finetuning lives in
:mod:`taskvec_jax.training.resumable`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any

__all__ = ["restore", "save"]


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def save(path: str | os.PathLike, tree: PyTree, *, overwrite: bool = False) -> str:
    """Saves a pytree of arrays (params, a Trajectory, an optimizer state) to ``path``.

    Args:
      path: a directory to create (made absolute).
      tree: any pytree of arrays; ``None`` leaves are kept.
      overwrite: replace an existing checkpoint; the old one is removed only after the
        new one is completely written.

    Returns:
      The absolute path written.

    Raises:
      ValueError: if ``path`` exists and ``overwrite`` is false.
    """
    path = _abs(path)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"checkpoint path {path} already exists; pass overwrite=True to "
                         "replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(path)}.saving-{uuid.uuid4().hex}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(staging, tree)
            ckptr.wait_until_finished()
        if os.path.exists(path):
            old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex}")
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old)
        else:
            os.rename(staging, path)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return path


def restore(path: str | os.PathLike, like: PyTree | None = None) -> PyTree:
    """Restores a pytree saved by :func:`save`.

    Args:
      path: the checkpoint directory.
      like: a tree with the structure, shapes and dtypes to restore into (arrays or
        ``jax.ShapeDtypeStruct``; shardings are honoured). Without it, containers come
        back as dicts and lists.

    Raises:
      ValueError: if ``path`` holds no checkpoint.
    """
    path = _abs(path)
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint at {path}")
    target = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)
