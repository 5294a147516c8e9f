"""Batch buffers for the model handler: images stacked into reused, aligned float32 arrays.

Why: stacking a batch into a fresh multi-megabyte array page-faults that memory in anew every
time, and TensorFlow copies an unaligned array on a slower path than a 64-byte-aligned one. In
the class-folder job (``benchmarks/bench_pipeline.py``) stacking 32 96x96 images took 4.2 ms
that way and 2.2 ms into a reused buffer.

Buffers are lent for the length of one explain call and then returned, so a worker holds as
many as it has batches in flight at once (what it would allocate anyway), not one per thread:
a Dataflow worker runs a dozen threads per process, most of them idle at any moment.

Example:
    >>> pool = BatchBuffers()
    >>> with pool.stacked([np.zeros([4, 4, 3], np.float32)] * 2) as batch:
    ...     batch.shape, batch.ctypes.data % 64
    ((2, 4, 4, 3), 0)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["ALIGNMENT", "BatchBuffers"]

#: Bytes a batch buffer is aligned to (TensorFlow's CPU allocator alignment).
ALIGNMENT = 64


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array of ``shape`` whose data starts on an ``ALIGNMENT``."""
    size = int(np.prod(shape))
    raw = np.empty(size + ALIGNMENT // 4, np.float32)
    start = (-raw.ctypes.data % ALIGNMENT) // 4
    return raw[start : start + size].reshape(shape)


class BatchBuffers:
    """A thread-safe pool of aligned float32 batch buffers, keyed by image shape.

    Example:
        >>> pool = BatchBuffers()
        >>> with pool.stacked(images) as batch:
        ...     result = model.explain(batch, targets)   # use the batch inside the block only
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stacked(self, images: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
        """Lends a buffer holding ``images`` stacked as float32 ``[len(images), ...]``.

        The array is valid inside the ``with`` block only: afterwards the buffer goes back to
        the pool and the next batch overwrites it.
        """
        count = len(images)
        shape = tuple(np.shape(images[0]))
        buffer = self._take(shape, count)
        try:
            yield np.stack([np.asarray(image, np.float32) for image in images],
                           out=buffer[:count])
        finally:
            self._give_back(shape, buffer)

    def free_buffers(self, shape: tuple[int, ...]) -> int:
        """How many buffers for images of ``shape`` wait in the pool (for tests)."""
        with self._lock:
            return len(self._free.get(tuple(shape), []))

    def _take(self, shape: tuple[int, ...], count: int) -> np.ndarray:
        with self._lock:
            free = self._free.get(shape, [])
            for index, buffer in enumerate(free):
                if buffer.shape[0] >= count:
                    return free.pop(index)
        return _aligned_empty((count, *shape))

    def _give_back(self, shape: tuple[int, ...], buffer: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(shape, [])
            # A larger batch size has come: the smaller buffers would only ever be outgrown.
            free[:] = [kept for kept in free if kept.shape[0] >= buffer.shape[0]]
            free.append(buffer)
