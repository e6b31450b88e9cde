"""Scratch buffers that each thread keeps: the chunked reductions' temporaries, reused.

The statistics and histograms of every snapshot work chunk by chunk through a few
temporaries of at most a few MB. Allocated afresh, each one is a new memory mapping
whose pages the kernel faults in again at every snapshot (on a virtual machine a
page touched for the first time is far dearer than the copy that fills it). Kept per
thread, they are allocated once and stay resident and in cache; a thread never
shares them, so the worker and the dashboard's threads cannot overwrite each
other's.
"""

from __future__ import annotations

import threading

import numpy as np

_LOCAL = threading.local()


def scratch(name: str, n: int, dtype: np.dtype | type = np.float64) -> np.ndarray:
    """A 1-d array of `n` elements of `dtype`, this thread's buffer called `name`.

    The contents are whatever the last use left: write before reading. Two names
    never alias each other; one name is one buffer, so a caller that needs two
    buffers at once asks for two names. The buffer grows to the largest `n` asked
    for and is kept for the thread's life.

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
        buf = buffers[key] = np.empty(max(n, 1), dt)
    return buf[:n]
