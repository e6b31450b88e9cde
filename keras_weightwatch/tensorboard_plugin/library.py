"""The runs under a log directory, found and opened safely, with bounded caches.

The dashboard reads run directories (their header, snapshot files and tensor
files), never TensorBoard's event files, so it sees every stored step. Runs are
found by listing directories only (no tensor is read for the list); an opened
`Run` is kept until its header or its snapshot directory changes, so a run that
is being written shows its new complete snapshots on the next request.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import Run, load_run
from ..errors import WeightWatchError
from .params import BadRequest

HEADER_FILE = "weightwatch.json"  # the run header (see docs/FORMAT.md)
SNAPSHOT_DIR = "snapshots"
ROOT_RUN = "."
"""The name of a run that is the log directory itself."""
MAX_RUNS = 2000
"""The most runs the dashboard lists."""
MAX_DEPTH = 8
"""How deep below the log directory runs are looked for."""
_SKIP_DIRS = frozenset({SNAPSHOT_DIR, "tensors"})

T = TypeVar("T")


class RunError(Exception):
    """A run that cannot be read (damaged, half-deleted): shown as that run's error (HTTP 422)."""


@dataclass(frozen=True)
class RunEntry:
    """One run of the list: its name (path relative to the log directory) and snapshot count."""

    name: str
    snapshots: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "snapshots": self.snapshots}


class LRU:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def peek(self, key: Hashable) -> Any:
        """The cached value, or None (not counted as a hit or a miss)."""
        with self._lock:
            return self._items.get(key)

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = make()  # outside the lock: other requests go on meanwhile
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value


def _count_snapshots(path: str) -> int:
    try:
        return sum(1 for n in os.listdir(os.path.join(path, SNAPSHOT_DIR)) if n.endswith(".json"))
    except OSError:
        return 0


class Library:
    """The runs below one log directory.

    Args:
        logdir: The directory TensorBoard was started on.
    """

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.root = os.path.realpath(logdir)
        self._runs: dict[str, tuple[tuple, Run]] = {}
        self._lock = threading.Lock()

    # -- listing
    def list_runs(self, limit: int = MAX_RUNS) -> tuple[list[RunEntry], bool]:
        """Every run below the log directory (names sorted) and whether the list was cut."""
        out: list[RunEntry] = []
        stack = [(self.root, "", 0)]
        while stack:
            path, rel, depth = stack.pop()
            try:
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except OSError:
                continue
            if any(e.name == HEADER_FILE and e.is_file(follow_symlinks=False) for e in entries):
                out.append(RunEntry(rel or ROOT_RUN, _count_snapshots(path)))
                if len(out) >= limit:
                    return sorted(out, key=lambda r: r.name), True
            if depth >= MAX_DEPTH:
                continue
            for e in reversed(entries):
                if e.is_dir(follow_symlinks=False) and e.name not in _SKIP_DIRS:
                    stack.append((e.path, f"{rel}/{e.name}" if rel else e.name, depth + 1))
        return sorted(out, key=lambda r: r.name), False

    # -- opening
    def path_of(self, name: str) -> str:
        """The run directory of `name`, refused unless it is a run inside the log directory."""
        parts = [] if name == ROOT_RUN else name.split("/")
        path = os.path.realpath(os.path.join(self.root, *parts))
        if os.path.commonpath([self.root, path]) != self.root:
            raise BadRequest(f"the run is outside the log directory. Received: run={name!r}")
        header = os.path.join(path, HEADER_FILE)
        if os.path.islink(header) or not os.path.isfile(header):
            raise BadRequest(f"no run of that name in the log directory. Received: run={name!r}")
        return path

    def open(self, name: str) -> Run:
        """The run `name`, reopened when its header or snapshot directory changed."""
        path = self.path_of(name)
        signature = _signature(path)
        with self._lock:
            cached = self._runs.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            run = load_run(path)
        except WeightWatchError as e:
            raise RunError(self.clean(str(e))) from None
        with self._lock:
            self._runs[name] = (signature, run)
        return run

    def clean(self, message: str) -> str:
        """An error message without the server's absolute path of the log directory."""
        return message.replace(self.root + os.sep, "").replace(self.logdir.rstrip("/") + "/", "")


def _signature(path: str) -> tuple:
    """What changes when a run gains, loses or rewrites a snapshot."""
    out: list[Any] = []
    for p in (os.path.join(path, HEADER_FILE), os.path.join(path, SNAPSHOT_DIR)):
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)
