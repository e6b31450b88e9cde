"""Memory the package reuses: each thread's scratch buffers, and arrays mapped in at once.

The statistics and histograms of every snapshot work chunk by chunk through a few
temporaries of at most a few MB. Allocated afresh, each one is a new memory mapping
whose pages the kernel faults in again at every snapshot (on a virtual machine a
page touched for the first time is far dearer than the copy that fills it). Kept per
thread, they are allocated once and stay resident and in cache; a thread never
shares them, so the worker and the dashboard's threads cannot overwrite each
other's. A thread that runs under `kept` hands its buffers on when it ends, so the
worker of the next fit starts with them already mapped.

`empty` makes the large arrays that are filled at once (the buffer sets a capture
copies into): on Linux their pages are mapped by one system call when the memory is
made, instead of by one fault per page as they are first written (and numpy asks for
huge pages on large arrays, which a busy machine may first try to compact memory for).
"""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_LOCAL = threading.local()
_SPARE: list[dict[tuple[str, str], np.ndarray]] = []  # buffers of threads that ended
_SPARE_LOCK = threading.Lock()
_MAX_SPARE = 2  # sets of buffers kept for threads to come (a few MB each)

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux
POPULATE_MIN_BYTES = 1 << 16
"""From this size on, `empty` maps the pages in when it allocates (where the system can)."""


def empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A new C-ordered array of `shape` and `dtype` whose pages are already mapped.

    The contents are zeros where the pages were mapped in (Linux, at least
    `POPULATE_MIN_BYTES`), otherwise undefined: write before reading.

    >>> a = empty((3, 4), np.float32)
    >>> a.shape, a.dtype, a.flags.c_contiguous, a.flags.writeable
    ((3, 4), dtype('float32'), True, True)
    """
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    if not _POPULATE or nbytes < POPULATE_MIN_BYTES or dt.hasobject:
        return np.empty(shape, dt)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE
    try:
        pages = mmap.mmap(-1, nbytes, flags=flags)
    except OSError:  # no room for a mapping now: let numpy try its way
        return np.empty(shape, dt)
    return np.frombuffer(pages, dt).reshape(shape)


def scratch(name: str, n: int, dtype: np.dtype | type = np.float64) -> np.ndarray:
    """A 1-d array of `n` elements of `dtype`, this thread's buffer called `name`.

    The contents are whatever the last use left: write before reading. Two names
    never alias each other; one name is one buffer, so a caller that needs two
    buffers at once asks for two names. The buffer grows to the largest `n` asked
    for and is kept for the thread's life (and beyond it, under `kept`).

    >>> a = scratch("doc", 4); a[:] = 1.0
    >>> b = scratch("doc", 2)
    >>> bool(np.shares_memory(a, b)), b.shape
    (True, (2,))
    """
    if n < 0:
        raise ValueError(f"`n` must be >= 0. Received: n={n!r}")
    dt = np.dtype(dtype)
    buffers: dict[tuple[str, str], np.ndarray] | None = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        buffers = _LOCAL.buffers = {}
    key = (name, dt.str)
    buf = buffers.get(key)
    if buf is None or buf.size < n:
        buf = buffers[key] = empty((max(n, 1),), dt)
    return buf[:n]


@contextmanager
def kept() -> Iterator[None]:
    """Run the calling thread with the scratch buffers a thread that ended under `kept` left,
    and leave its own to the next one when the block ends.

    Each set of buffers is used by one thread at a time; at most a few sets are kept.
    """
    own = getattr(_LOCAL, "buffers", None)
    if not own:
        with _SPARE_LOCK:
            own = _SPARE.pop() if _SPARE else {}
        _LOCAL.buffers = own
    try:
        yield
    finally:
        _LOCAL.buffers = None
        with _SPARE_LOCK:
            if len(_SPARE) < _MAX_SPARE:
                _SPARE.append(own)
