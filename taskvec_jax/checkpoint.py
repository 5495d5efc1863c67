"""Saving and restoring parameter pytrees (params, trajectories, optimizer states) with orbax.

Every write goes through a closed orbax checkpointer (orbax saves asynchronously; a
process that exits before the save finishes writes nothing), with absolute paths (``~``
expanded), and never destroys what is already on disk: :func:`save` refuses an existing
path unless ``overwrite=True``.

Durability (docs/durability.md): a checkpoint path is a directory of complete versions
``path/version-<n>/``. A save writes a hidden staging directory, checksums and flushes it,
and commits it with one atomic rename, so a crash, a SIGKILL or a full disk at any moment
leaves the previous checkpoint readable; one writer at a time (a second concurrent one is
refused). :func:`restore` reads the newest version whose files match their checksums and
falls back to the previous one, with a warning, when the newest is damaged. Checkpoints
written by earlier versions (a plain orbax directory at ``path``) still restore.
Checkpointed, resumable finetuning lives in :mod:`taskvec_jax.training.resumable`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from taskvec_jax import _checks, _durable, _treespec

PyTree = Any

__all__ = ["exists", "restore", "save"]


def _abs(path: str | os.PathLike) -> str:
    return _durable.expand(path)


def save(path: str | os.PathLike, tree: PyTree, *, overwrite: bool = False,
         max_to_keep: int | None = 2, metadata: dict | None = None) -> str:
    """Saves a pytree of arrays (params, a Trajectory, an optimizer state) to ``path``.

    Crash-safe: the new checkpoint is written beside the existing one and committed by
    one atomic rename; until then ``path`` restores to the previous checkpoint, after it
    to the new one, never to a mix (a SIGKILL, a full disk or a power cut at any moment).
    The containers of ``tree`` (dicts, lists, tuples, NamedTuples such as optax states
    and :class:`~taskvec_jax.Trajectory`) are recorded so that :func:`restore` rebuilds
    them without ``like``.

    Args:
      path: a directory (``~`` expanded, made absolute).
      tree: any pytree of arrays; ``None`` leaves are kept.
      overwrite: replace an existing checkpoint (the old one stays readable until the new
        one is complete).
      max_to_keep: how many complete versions ``path`` keeps (``None``: all); with 2 (the
        default) a damaged newest version falls back to the previous one. Disk use while
        saving: ``max_to_keep + 1`` copies of the tree.
      metadata: a JSON-serializable dict stored in the same atomic version as the
        arrays (read back with ``restore(..., return_metadata=True)``).

    Cost: orbax's write, then one read of the written files (their CRC-32s) and an
    ``fsync`` of each, so that the committed version is on disk, not only in memory.

    Returns:
      The absolute path written.

    Raises:
      ValueError: if ``path`` holds a checkpoint (or anything) and ``overwrite`` is false,
        if it is a file, or if ``metadata`` is not JSON-serializable.
      BlockingIOError: another process is saving to ``path`` at the same moment (the
        second writer is refused; retry).
      OSError: ``errno.ENOSPC`` when the disk fills up during the save; the message names
        ``path``, the partial save is removed and the previous checkpoint is intact.
    """
    path = _abs(path)
    _checks.positive_int(max_to_keep, "max_to_keep", allow_none=True)
    if metadata is not None:
        try:
            metadata = json.loads(json.dumps(metadata, allow_nan=True))
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata for checkpoint {path} must be JSON-serializable: "
                             f"{e}") from None
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path} exists and is not a directory")
    if not overwrite and _occupied(path):
        raise ValueError(f"checkpoint path {path} already exists; pass overwrite=True to "
                         "replace it")
    os.makedirs(path, exist_ok=True)
    with _durable.exclusive_lock(os.path.join(path, _durable.LOCK_NAME),
                                 f"checkpoint {path}"):
        if not overwrite and _occupied(path):  # another writer won the race
            raise ValueError(f"checkpoint path {path} already exists; pass overwrite=True "
                             "to replace it")
        _durable.remove_leftovers(path)
        legacy = _is_legacy(path)

        def write(staging: str) -> None:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(staging, tree)
                ckptr.wait_until_finished()

        _durable.write_version(
            path, write, {"structure": _treespec.describe(tree), "metadata": metadata},
            max_to_keep=max_to_keep)
        if legacy:  # the earlier layout's files, superseded by the committed version
            for name in os.listdir(path):
                if not _ours(name):
                    _durable.remove_entry(os.path.join(path, name))
    return path


def restore(path: str | os.PathLike, like: PyTree | None = None, *,
            return_metadata: bool = False) -> PyTree:
    """Restores a pytree saved by :func:`save`.

    Reads the newest complete version of ``path`` after checking every file against the
    sizes and CRC-32 checksums recorded when it was saved. A damaged newest version (a
    file cut short, deleted or changed, garbled metadata) is skipped with a
    ``RuntimeWarning`` naming it and what is wrong, and the previous version is restored.

    Args:
      path: the checkpoint directory (``~`` expanded).
      like: a tree with the structure, shapes and dtypes to restore into (arrays or
        ``jax.ShapeDtypeStruct``; shardings are honoured). Without it, the saved
        containers are rebuilt: dicts, lists, tuples and NamedTuples (optax states,
        ``Trajectory``) come back as themselves; a tree holding other pytree nodes (flax
        struct dataclasses, ``nnx.State``) needs ``like``. Checkpoints written before
        this layout come back as orbax's dicts and lists.
      return_metadata: also return the ``metadata`` dict given to :func:`save`
        (``None`` if none was).

    Returns:
      The tree, or ``(tree, metadata)`` with ``return_metadata=True``.

    Raises:
      ValueError: if ``path`` holds no checkpoint; if every version is damaged (the
        message names each file and what is wrong with it); if the tree cannot be
        rebuilt without ``like`` (the message says what to pass); if it does not match
        ``like``.
    """
    path = _abs(path)
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint at {path}")
    if _durable.has_versions(path):
        tree, metadata = _durable.read_version(
            path, "checkpoint",
            lambda version, manifest: _restore_version(path, version, manifest, like))
    elif _is_legacy(path):
        tree, metadata = _restore_orbax(path, path, like), None
    else:
        leftovers = any(_durable.is_leftover(n) for n in os.listdir(path))
        raise ValueError(f"no checkpoint at {path}" + (
            " (only the leftovers of an interrupted save, which are never read)"
            if leftovers else ""))
    return (tree, metadata) if return_metadata else tree


def exists(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a checkpoint that :func:`restore` can try to read."""
    path = _abs(path)
    return os.path.isdir(path) and (_durable.has_versions(path) or _is_legacy(path))


_LEGACY_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")


def _is_legacy(path: str) -> bool:
    """A plain orbax checkpoint directly at ``path`` (the layout before versions)."""
    return any(os.path.isfile(os.path.join(path, m)) for m in _LEGACY_MARKERS)


def _ours(name: str) -> bool:
    return (name == _durable.LOCK_NAME or _durable.is_leftover(name)
            or (name.startswith(_durable.VERSION_PREFIX)
                and name[len(_durable.VERSION_PREFIX):].isdigit()))


def _occupied(path: str) -> bool:
    """``path`` exists and holds more than the lock and leftovers of interrupted saves."""
    if not os.path.isdir(path):
        return os.path.lexists(path)
    return any(not (n == _durable.LOCK_NAME or _durable.is_leftover(n))
               for n in os.listdir(path))


def _restore_orbax(path: str, directory: str, like: PyTree | None) -> PyTree:
    target = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(directory, target)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and the likely cause
        where = path if directory == path else f"{path} ({os.path.basename(directory)})"
        cause = ("it does not match `like` (structure, shapes or dtypes)" if like is not None
                 else "a file may be missing, cut short or garbled")
        raise ValueError(f"checkpoint {where} cannot be restored: {cause}. "
                         f"{type(e).__name__}: {str(e)[:500]}") from e


def _restore_version(path: str, version: str, manifest: dict,
                     like: PyTree | None) -> tuple[PyTree, dict | None]:
    metadata = manifest.get("metadata")
    if like is not None:
        return _restore_orbax(path, version, like), metadata
    spec = manifest.get("structure")
    try:
        _treespec.check(spec)  # before reading any array
        return _treespec.rebuild(spec, _restore_orbax(path, version, None)), metadata
    except _treespec.UnsupportedTree as e:
        raise ValueError(
            f"checkpoint {path} cannot be restored without `like`: {e}. Pass like= a tree "
            "of the saved structure (e.g. restore(path, like={'params': params, "
            "'opt_state': optimizer.init(params)}); jax.ShapeDtypeStruct leaves suffice)"
        ) from None
