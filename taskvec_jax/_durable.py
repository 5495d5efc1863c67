"""Crash-safe writes to the local filesystem (private module).

What every writer of the library that must survive a crash (``checkpoint.save``, the
resumable finetune, ``data.import_folder``) builds on:

- ``write_version`` / ``read_version``: a *versioned directory*. ``path`` holds complete
  versions ``path/version-<n>/`` and nothing is ever written in place: a version is
  written into a hidden staging directory ``path/.staging-<id>/``, given a manifest
  (every file's size and CRC-32, plus a JSON payload), flushed to disk (``fsync`` of every
  file and directory), and committed by ONE ``os.rename`` to ``version-<n+1>``. A rename
  is atomic, so at every instant ``path`` holds the previous complete versions and
  possibly the new one, never a part of one. Older versions beyond ``max_to_keep`` are
  renamed away (atomically) and then deleted only after the commit. Leftovers of an
  interrupted save (``.staging-*``, ``.trash-*``) are never read and are removed by the
  next save. Readers take the newest version whose files all match its manifest and fall
  back to the previous one, with a warning, when the newest is damaged.
- ``exclusive_lock``: one writer per path (``fcntl.flock`` on ``path/.lock``, not
  blocking; the kernel releases it when the holder dies, even by SIGKILL). A second
  concurrent writer is refused with ``BlockingIOError``.
- ``disk_full_error``: recognizes "no space left on device" in an exception (an
  ``OSError`` or tensorstore's ``RESOURCE_EXHAUSTED ... [os_error_code='28']``).
- ``swap_in``: replaces a directory by a complete staged one with two renames (the old
  data or none is at the path while they run, never a partial tree).
- ``crash_point``: a no-op called between the critical steps; the fault tests replace it
  with a pause so that a SIGKILL lands between two renames.

Local (POSIX) filesystems only: ``flock`` and atomic directory renames are what make the
guarantees, and object stores (``gs://``) offer neither. Single-process writers: with
``jax.distributed`` only one process may call these functions on a path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import uuid
import warnings
import zlib
from typing import Any, Callable, Iterator

__all__ = [
    "LOCK_NAME", "MANIFEST_NAME", "VERSION_PREFIX", "CorruptVersion", "crash_point",
    "disk_full_error", "exclusive_lock", "expand", "fsync_dir", "fsync_tree",
    "has_versions", "is_leftover", "list_versions", "read_version", "remove_entry",
    "remove_leftovers",
    "swap_in", "verify_version", "write_version",
]

LOCK_NAME = ".lock"
MANIFEST_NAME = "TASKVEC_MANIFEST.json"
VERSION_PREFIX = "version-"
_STAGING = ".staging-"
_TRASH = ".trash-"
_VERSION_RE = re.compile(r"^version-(\d+)$")
_FORMAT = 1
_CHUNK = 1 << 20


def crash_point(stage: str) -> None:
    """Called between the steps of a durable write; a no-op (tests make it pause)."""
    del stage


def expand(path: str | os.PathLike) -> str:
    """``~`` expanded and made absolute."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


# ---------------------------------------------------------------------------- flushing


def fsync_dir(path: str) -> None:
    """Flushes a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flushes every file and directory under ``root`` (and ``root``) to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


# ---------------------------------------------------------------------------- errors


def disk_full_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if ("No space left on device" in text or "os_error_code='28'" in text
                or "Disk quota exceeded" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full(path: str, exc: BaseException, had_previous: bool) -> OSError:
    kept = ("the previous complete version there is intact"
            if had_previous else "nothing was there before")
    return OSError(errno.ENOSPC,
                   f"no space left on device while writing {path}: the save did not "
                   f"complete and its partial files were removed; {kept}. Free space "
                   f"(or lower max_to_keep) and save again. ({type(exc).__name__}: "
                   f"{str(exc)[:300]})", path)


# ---------------------------------------------------------------------------- locking


@contextlib.contextmanager
def exclusive_lock(lock_path: str, what: str) -> Iterator[None]:
    """Holds ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``lock_path`` (created if missing).

    Raises:
      BlockingIOError: another process (or another call in this one) holds the lock;
        the message names ``what`` and the lock file.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(
                errno.EWOULDBLOCK,
                f"{what} is being written by another process right now (lock "
                f"{lock_path} is held); refusing a second concurrent writer so that the "
                "result is one complete write, never a mix. Retry when it is done, or "
                "write elsewhere.", lock_path) from None
        yield
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------- versions


def is_leftover(name: str) -> bool:
    """A staging or trash entry left by an interrupted write (never read)."""
    return name.startswith((_STAGING, _TRASH))


def list_versions(path: str) -> list[tuple[int, str]]:
    """``[(n, abs dir)]`` of the ``version-<n>`` directories in ``path``, newest first."""
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for name in names:
        m = _VERSION_RE.match(name)
        if m and os.path.isdir(os.path.join(path, name)):
            out.append((int(m.group(1)), os.path.join(path, name)))
    return sorted(out, reverse=True)


def has_versions(path: str) -> bool:
    return bool(list_versions(path))


def remove_entry(path: str) -> None:
    """Removes a file or directory; a directory is first renamed to a ``.trash-*``
    sibling (one atomic step) so that a crash mid-delete leaves a leftover, not a
    half-deleted tree under its old name."""
    if os.path.isdir(path) and not os.path.islink(path):
        trash = os.path.join(os.path.dirname(path),
                             f"{_TRASH}{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def remove_leftovers(path: str) -> None:
    """Deletes the staging and trash entries of interrupted writes in ``path``."""
    for name in os.listdir(path):
        if is_leftover(name):
            full = os.path.join(path, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(full)


def _manifest(root: str, payload: dict) -> dict:
    files = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            files[rel] = [os.path.getsize(full), _crc32(full)]
    return {"format": _FORMAT, "files": files, **payload}


def write_version(path: str, write: Callable[[str], None], payload: dict, *,
                  max_to_keep: int | None = 2) -> str:
    """Writes one new complete version of ``path`` (the caller holds the lock).

    Args:
      path: the versioned directory (must exist).
      write: ``write(staging_dir)`` fills a directory that does not exist yet.
      payload: JSON-serializable entries stored in the version's manifest.
      max_to_keep: how many complete versions to keep after the commit (``None``: all).

    Returns:
      The committed version's directory.

    Raises:
      OSError: ``ENOSPC`` with a message naming ``path`` when the disk is full (the
        partial version is removed, earlier versions are untouched).
    """
    had_previous = has_versions(path)
    staging = os.path.join(path, f"{_STAGING}{uuid.uuid4().hex}")
    try:
        write(staging)
        crash_point("written")
        manifest = _manifest(staging, payload)
        tmp = os.path.join(staging, MANIFEST_NAME + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(manifest, fh)
        os.replace(tmp, os.path.join(staging, MANIFEST_NAME))
        fsync_tree(staging)
        crash_point("flushed")
        versions = list_versions(path)
        number = versions[0][0] + 1 if versions else 1
        final = os.path.join(path, f"{VERSION_PREFIX}{number}")
        os.rename(staging, final)
        fsync_dir(path)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        for name in os.listdir(path):  # orbax's own temporary sibling of the staging dir
            if name.startswith(os.path.basename(staging)):
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        if isinstance(exc, Exception) and disk_full_error(exc):
            raise _disk_full(path, exc, had_previous) from exc
        raise
    crash_point("committed")
    if max_to_keep is not None:
        for _, old in list_versions(path)[max_to_keep:]:
            remove_entry(old)
            crash_point("pruned")
    return final


class CorruptVersion(ValueError):
    """One version of a versioned directory does not match its manifest."""


def verify_version(version_dir: str) -> dict:
    """Reads ``version_dir``'s manifest and checks every file's size and CRC-32.

    Returns:
      The manifest (its payload entries included).

    Raises:
      CorruptVersion: naming the first problem (manifest missing or garbled, a file
        missing, cut short or changed).
    """
    mpath = os.path.join(version_dir, MANIFEST_NAME)
    try:
        with open(mpath) as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise CorruptVersion(f"its manifest {MANIFEST_NAME} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptVersion(f"its manifest {MANIFEST_NAME} is garbled ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptVersion(f"its manifest {MANIFEST_NAME} is garbled (no file list)")
    if manifest.get("format") != _FORMAT:
        raise CorruptVersion(f"its manifest has format {manifest.get('format')!r}; this "
                             f"taskvec_jax reads format {_FORMAT}")
    for rel, (size, crc) in sorted(manifest["files"].items()):
        full = os.path.join(version_dir, rel)
        if not os.path.isfile(full):
            raise CorruptVersion(f"file {rel} is missing")
        actual = os.path.getsize(full)
        if actual != size:
            how = "cut short" if actual < size else "longer than written"
            raise CorruptVersion(f"file {rel} is {actual} bytes, {size} were written "
                                 f"({how})")
        if _crc32(full) != crc:
            raise CorruptVersion(f"file {rel} does not match its checksum (its contents "
                                 "changed after it was written)")
    return manifest


def read_version(path: str, what: str, read: Callable[[str, dict], Any]) -> Any:
    """``read(version_dir, manifest)`` of the newest intact version of ``path``.

    A damaged newest version is skipped with a ``RuntimeWarning`` naming it and what is
    wrong, and the previous intact one is read instead.

    Raises:
      ValueError: ``path`` has versions but none is intact (every problem named).
    """
    problems = []
    for _, version_dir in list_versions(path):
        try:
            manifest = verify_version(version_dir)
        except CorruptVersion as e:
            problems.append(f"{os.path.basename(version_dir)}: {e}")
            continue
        if problems:
            warnings.warn(f"{what} {path}: the newest version is damaged ("
                          + "; ".join(problems) + f"); restored the previous complete "
                          f"version {os.path.basename(version_dir)} instead",
                          RuntimeWarning, stacklevel=3)
        return read(version_dir, manifest)
    raise ValueError(f"{what} {path} is corrupt, no complete version is left: "
                     + "; ".join(problems))


# ---------------------------------------------------------------------------- swaps


def swap_in(staged: str, final: str, trash: str) -> None:
    """Replaces directory ``final`` (if any) by the complete directory ``staged``.

    Two renames: ``final`` -> ``trash`` (a leftover name of the caller's), then ``staged``
    -> ``final``; a crash between them leaves no ``final`` (the old data in ``trash``),
    never a mix. ``trash`` is deleted at the end.
    """
    old = None
    if os.path.lexists(final):
        os.rename(final, trash)
        old = trash
        crash_point("moved-away")
    os.rename(staged, final)
    fsync_dir(os.path.dirname(final))
    crash_point("swapped")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
