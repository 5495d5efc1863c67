"""One split of one task as random-access examples, and the batch iterator over it.

A :class:`TaskSplit` is the same object whatever the source: ``records`` is anything
indexable whose items are ``{"image": uint8 [H, W, C], "label": int}`` (a tfds
``ArrayRecordDataSource``, or :class:`ArrayRecords` for data already in memory),
``positions`` picks this split's examples out of it, and ``preprocess`` turns images into
model inputs. Batches are dicts of numpy arrays ``{"image": float32 [B, H, W, C],
"label": int32 [B]}``, ready for ``jax.device_put`` and for :func:`taskvec_jax.finetune`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from typing import Any, Iterator, Mapping, Protocol, Sequence

import jax
import numpy as np

from taskvec_jax.data.preprocess import Preprocess
from taskvec_jax.data.registry import TaskSpec

__all__ = ["ArrayRecords", "Batch", "Records", "TaskSplit", "batches",
           "default_num_threads", "epoch_order"]

Batch = dict[str, np.ndarray]


class Records(Protocol):
    """Random access to raw examples ``{"image": uint8 [H, W, C], "label": int}``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


class ArrayRecords:
    """Examples held in memory: ``images`` ``uint8 [N, H, W, C]``, ``labels`` ``[N]``.

    Besides per-example access it has :meth:`take`, which :class:`TaskSplit` uses to read
    a whole batch with one fancy-indexing copy.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} "
                             f"{images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels have shape {labels.shape}, images have "
                             f"{images.shape[0]} examples")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": int(self.labels[index])}

    def take(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[positions], self.labels[positions]


def default_num_threads() -> int:
    """Decoding threads for file-backed sources: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True, eq=False)
class TaskSplit:
    """The examples of one split of one task, preprocessed on read.

    Attributes:
      spec: the task.
      split: the split's name (``"train"``, ``"validation"``, ``"test"``, or a raw
        source split).
      records: the source examples (see :class:`Records`).
      positions: ``int64 [N]`` positions in ``records`` that make up this split.
      preprocess: the image transform.
    """

    spec: TaskSpec
    split: str
    records: Any
    positions: np.ndarray
    preprocess: Preprocess

    @property
    def name(self) -> str:
        return f"{self.spec.name}[{self.split}]"

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def in_memory(self) -> bool:
        return isinstance(self.records, ArrayRecords)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def _labels(self, labels: Sequence[Any], where: np.ndarray) -> np.ndarray:
        if not isinstance(labels, np.ndarray):
            labels = [int(np.asarray(label)) for label in labels]
        labels = np.asarray(labels, np.int64)
        bad = (labels < 0) | (labels >= self.spec.num_classes)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{self.name}: example at position {int(where[i])} has label "
                             f"{int(labels[i])}, outside 0..{self.spec.num_classes - 1} (an "
                             "unlabelled split?)")
        return labels.astype(np.int32)

    def read(self, index: Sequence[int] | np.ndarray) -> Batch:
        """Examples ``index`` (positions within this split, ``0 <= i < len(self)``).

        Returns:
          ``{"image": float32 [B, h, w, c], "label": int32 [B]}``.
        """
        index = np.asarray(index, np.int64)
        outside = (index < 0) | (index >= len(self))
        if outside.any():
            raise IndexError(f"{self.name} has {len(self)} examples; index "
                             f"{int(index[outside][0])} is out of range")
        where = self.positions[index]
        if self.in_memory:
            images, labels = self.records.take(where)
        else:
            examples = [self.records[int(p)] for p in where]
            images = [np.asarray(ex["image"]) for ex in examples]
            labels = [ex["label"] for ex in examples]
        return {"image": self.preprocess.batch(images, task=self.name),
                "label": self._labels(labels, where)}

    def load(self, *, max_examples: int | None = None, num_threads: int | None = None,
             chunk_size: int = 512) -> Batch:
        """The whole split (or its first ``max_examples``) as one batch, in file order."""
        n = len(self) if max_examples is None else min(len(self), int(max_examples))
        if n < 1:
            raise ValueError(f"{self.name}: nothing to load (max_examples={max_examples})")
        view = dataclasses.replace(self, positions=self.positions[:n])
        out: Batch | None = None
        start = 0
        for batch in batches(view, min(chunk_size, n), num_threads=num_threads):
            if out is None:
                out = {k: np.empty((n,) + v.shape[1:], v.dtype) for k, v in batch.items()}
            b = batch["label"].shape[0]
            for k, v in batch.items():
                out[k][start:start + b] = v
            start += b
        return out


def epoch_order(n: int, key: jax.Array | None, epoch: int = 0) -> np.ndarray:
    """The example order of ``epoch``: ``permutation(fold_in(key, epoch), n)``, or
    ``0 .. n-1`` without a key."""
    if key is None:
        return np.arange(n, dtype=np.int64)
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    return np.asarray(jax.device_get(perm)).astype(np.int64)


def batches(split: TaskSplit, batch_size: int, *, key: jax.Array | None = None,
            epoch: int = 0, drop_remainder: bool = False, num_threads: int | None = None,
            prefetch: int | None = None) -> Iterator[Batch]:
    """Iterates over one epoch of ``split`` in batches of ``batch_size``.

    The order is :func:`epoch_order` (``jax.random.permutation(fold_in(key, epoch), N)``),
    so the same ``(key, epoch)`` gives the same batches and each epoch reshuffles. A
    file-backed split decodes up to ``num_threads`` batches concurrently, ``prefetch``
    batches ahead of the consumer; an in-memory split is read synchronously (a copy).

    Args:
      split: the examples.
      batch_size: examples per batch.
      key: PRNG key for shuffling; ``None`` keeps file order.
      epoch: folded into ``key``.
      drop_remainder: drop the last, smaller batch.
      num_threads: decoding threads (default :func:`default_num_threads`; 0: none).
      prefetch: batches decoded ahead (default ``2 * num_threads``).

    Yields:
      ``{"image": float32 [B, h, w, c], "label": int32 [B]}``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or \
            batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(split)
    order = epoch_order(n, key, epoch)
    stop = n - n % batch_size if drop_remainder else n
    chunks = [order[s:s + batch_size] for s in range(0, stop, batch_size)]
    threads = default_num_threads() if num_threads is None else int(num_threads)
    if split.in_memory or threads <= 0 or len(chunks) <= 1:
        for c in chunks:
            yield split.read(c)
        return
    ahead = max(1, 2 * threads if prefetch is None else int(prefetch))
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="taskvec-data")
    try:
        pending: collections.deque = collections.deque()
        it = iter(chunks)
        for c in it:
            pending.append(pool.submit(split.read, c))
            if len(pending) >= ahead:
                break
        while pending:
            batch = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(split.read, nxt))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
