"""Where a run's files live: the one seam through which the reader and the writer touch them.

`Storage` is what `reader` and `writer` need from a place that holds a run:
names are relative to the run (`"tensors/<sha256>.npy"`, `"snapshots"`, `""`
for the run itself). `LocalStorage` keeps them in a local directory; another
implementation (an object store) can stand behind the same methods.
"""

from __future__ import annotations

import errno
import mmap
import os
import uuid
from collections.abc import Iterable
from typing import BinaryIO, NamedTuple, Protocol

import numpy as np

from .format import BLOCK, TMP_PREFIX


class LockHeld(OSError):
    """Another process holds the lock; `holder` is what it wrote into the lock file."""

    def __init__(self, holder: str):
        super().__init__(f"held by {holder}")
        self.holder = holder


class FileStamp(NamedTuple):
    """What a listing says about a file, enough to tell that it changed.

    `size` in bytes; `version` a token that changes whenever the file is
    rewritten, replaced or touched (for a local file: its modification and
    change times in nanoseconds and its inode number).
    """

    size: int
    version: str


Chunks = Iterable[bytes | memoryview]


class LockHandle(Protocol):
    def release(self) -> None: ...


class Storage(Protocol):
    """The file operations of a run. Missing files raise `FileNotFoundError`."""

    path: str

    def where(self, name: str = "") -> str:
        """The name as messages show it."""
        ...

    def exists(self, name: str = "") -> bool: ...

    def isdir(self, name: str = "") -> bool: ...

    def isfile(self, name: str) -> bool: ...

    def is_link(self, name: str) -> bool:
        """True for a symbolic link (which a reader refuses to follow)."""
        ...

    def is_inside(self, name: str) -> bool:
        """False when the name resolves (through links) to a place outside the run."""
        ...

    def size(self, name: str) -> int: ...

    def open_read(self, name: str) -> BinaryIO: ...

    def load_npy(self, name: str, *, mmap: bool) -> np.ndarray:
        """A .npy file's array, memory-mapped read-only where `mmap` and the place allow."""
        ...

    def listdir(self, name: str) -> list[str]: ...

    def makedirs(self, name: str) -> None: ...

    def stamps(self, name: str) -> dict[str, FileStamp]:
        """Each file of a directory (not its subdirectories, not links) with its `FileStamp`."""
        ...

    def stamp(self, name: str) -> FileStamp:
        """One file's `FileStamp`."""
        ...

    def write_atomic(self, name: str, chunks: Chunks, durable: bool) -> None:
        """Write the file whole or not at all (readers never see it half written)."""
        ...

    def write_atomic_many(self, files: Iterable[tuple[str, Chunks]], durable: bool) -> None:
        """`write_atomic` for several files, with their syncs batched: every file is
        written, then (if `durable`) every one is made durable, and only then does any
        of them appear under its name. Their directories are not synced (`sync_dir`).
        `files` is consumed one at a time, so a generator holds one file's bytes at once."""
        ...

    def append(self, name: str, data: bytes, durable: bool) -> None:
        """Add bytes at the end of a file, creating it if needed (not atomic: a reader
        may see a part of `data` at the end)."""
        ...

    def remove(self, name: str) -> bool:
        """Delete a file; False when it was not there."""
        ...

    def sync_dir(self, name: str) -> None:
        """Make the directory's entries (files created, renamed, removed) durable."""
        ...

    def lock(self, name: str, owner: str) -> LockHandle:
        """Hold an exclusive lock named `name` until `release`; raises `LockHeld`."""
        ...


class _FileLock:
    """An flock(2) held on an open descriptor of the lock file `path`.

    Releasing it removes the file first, while the lock is still held, then
    closes the descriptor (which lets go of the lock): a closed run keeps no
    lock file. A writer that opened the file just before it was removed gets
    the lock of a file no longer in the run, sees that (`_same_file`) and tries
    again, so two writers never both hold the run.
    """

    def __init__(self, fd: int | None, path: str | None = None):
        self._fd = fd
        self._path = path

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if self._path is not None and _same_file(fd, self._path):
                    os.unlink(self._path)
            except OSError:
                pass
            os.close(fd)


def _write_all(f: BinaryIO, chunks: Iterable[bytes | memoryview]) -> None:
    """Write every chunk to an unbuffered file: one `write` call each (no copy of a large
    array's bytes), repeated only for what the kernel did not take."""
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while len(view):
            n = f.write(view)
            view = view[n if n is not None else len(view):]


_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; 0 where there is none


def _write_direct(path: str, chunks: list[bytes | memoryview]) -> bool:
    """Write a file of a `BLOCK`-byte header and page-aligned data past the page cache
    (`O_DIRECT`): the data goes from its buffer to the disk with no copy and no page
    cache pages to take, which were most of the CPU of a buffered write (16 ms for
    6.5 MB on a 2-core virtual machine, against 0.4 ms). The header and a tail shorter
    than a block go through a page-aligned `BLOCK`-byte buffer; the file is then cut
    to its size. False, leaving no file, where the chunks are not so laid out or the
    file system refuses (`EINVAL`): the caller then writes the file the usual way."""
    if not _O_DIRECT or len(chunks) != 2:
        return False
    head, data = (memoryview(c).cast("B") for c in chunks)
    if head.nbytes != BLOCK or data.nbytes < BLOCK or \
            np.frombuffer(data, np.uint8).ctypes.data % BLOCK:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT, 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        _unlink_quietly(path)  # refused after it was created
        return False
    try:
        block = mmap.mmap(-1, BLOCK)  # page-aligned; unmapped when dropped
        block[:] = head
        _write_blocks(fd, memoryview(block))
        bulk = data.nbytes - data.nbytes % BLOCK
        _write_blocks(fd, data[:bulk])
        if bulk < data.nbytes:
            block[:] = bytes(BLOCK)
            block[: data.nbytes - bulk] = data[bulk:]
            _write_blocks(fd, memoryview(block))
            os.ftruncate(fd, BLOCK + data.nbytes)
    except OSError as e:
        os.close(fd)
        _unlink_quietly(path)
        if e.errno != errno.EINVAL:
            raise
        return False
    os.close(fd)
    return True


def _write_blocks(fd: int, view: memoryview) -> None:
    """Write whole blocks from `fd`'s position; a short write must end on a block too."""
    while len(view):
        n = os.write(fd, view)
        if n <= 0 or n % BLOCK:
            raise OSError(errno.EINVAL, f"a direct write took {n} bytes")
        view = view[n:]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _stamp(st: os.stat_result) -> FileStamp:
    return FileStamp(st.st_size, f"{st.st_mtime_ns}-{st.st_ctime_ns}-{st.st_ino}")


def _fsync_path(path: str) -> None:
    """fsync a written file, then let its pages leave the page cache.

    A run's files are written once and read back rarely, so once they are on disk
    their cached pages are handed back (`POSIX_FADV_DONTNEED`, a hint that changes
    nothing the file holds): the next snapshot's writes then reuse those pages
    instead of taking fresh ones. Fresh pages are what writing costs: on a 2-core
    virtual machine, 8 MB written into a new file took 50-65 ms of CPU when the page
    cache grew and 2 ms when it reused the pages of a file written before.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):  # POSIX; not on Windows or macOS
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
def _same_file(fd: int, path: str) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st, here = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


class LocalStorage:
    """A run in a local directory.

    Args:
        path: The run directory. Files are found from its absolute path, so a
            later `os.chdir` does not lose the run; messages show `path` as given.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.root = os.path.abspath(self.path)

    def _full(self, name: str) -> str:
        return os.path.join(self.root, name) if name else self.root

    def where(self, name: str = "") -> str:
        return os.path.join(self.path, name) if name else self.path

    def exists(self, name: str = "") -> bool:
        return os.path.exists(self._full(name))

    def isdir(self, name: str = "") -> bool:
        return os.path.isdir(self._full(name))

    def isfile(self, name: str) -> bool:
        return os.path.isfile(self._full(name))

    def is_link(self, name: str) -> bool:
        return os.path.islink(self._full(name))

    def is_inside(self, name: str) -> bool:
        root = os.path.realpath(self.root)
        return os.path.commonpath([root, os.path.realpath(self._full(name))]) == root

    def size(self, name: str) -> int:
        return os.path.getsize(self._full(name))

    def open_read(self, name: str) -> BinaryIO:
        return open(self._full(name), "rb")

    def load_npy(self, name: str, *, mmap: bool) -> np.ndarray:
        arr = np.load(self._full(name), mmap_mode="r" if mmap else None, allow_pickle=False)
        return arr if isinstance(arr, np.ndarray) else np.asarray(arr)

    def listdir(self, name: str) -> list[str]:
        return os.listdir(self._full(name))

    def makedirs(self, name: str) -> None:
        os.makedirs(self._full(name), exist_ok=True)

    def stamps(self, name: str) -> dict[str, FileStamp]:
        out = {}
        with os.scandir(self._full(name)) as entries:
            for e in entries:
                if not e.is_file(follow_symlinks=False):
                    continue
                out[e.name] = _stamp(e.stat(follow_symlinks=False))
        return out

    def stamp(self, name: str) -> FileStamp:
        return _stamp(os.stat(self._full(name), follow_symlinks=False))

    def write_atomic(self, name: str, chunks: Chunks, durable: bool) -> None:
        """Write via a temporary file in the same directory, then rename it into place."""
        self.write_atomic_many([(name, chunks)], durable)

    def write_atomic_many(self, files: Iterable[tuple[str, Chunks]], durable: bool) -> None:
        """Each file goes to a temporary name in its directory (its array's bytes in one
        `write`, no copy); then each is fsynced; then each is renamed into place."""
        staged: list[tuple[str, str]] = []
        try:
            for name, chunks in files:
                path = self._full(name)
                tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}")
                staged.append((tmp, path))
                chunks = list(chunks)
                if not _write_direct(tmp, chunks):
                    with open(tmp, "xb", buffering=0) as f:
                        _write_all(f, chunks)
            if durable:
                for tmp, _ in staged:
                    _fsync_path(tmp)
            while staged:
                tmp, path = staged[0]
                os.replace(tmp, path)
                staged.pop(0)
        except BaseException:
            for tmp, _ in staged:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            raise

    def append(self, name: str, data: bytes, durable: bool) -> None:
        with open(self._full(name), "ab", buffering=0) as f:
            _write_all(f, [data])
            if durable:
                os.fsync(f.fileno())

    def remove(self, name: str) -> bool:
        try:
            os.unlink(self._full(name))
        except FileNotFoundError:
            return False
        return True

    def sync_dir(self, name: str) -> None:
        try:
            fd = os.open(self._full(name), os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def lock(self, name: str, owner: str) -> LockHandle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return _FileLock(None)
        path = self._full(name)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                except OSError:
                    holder = "unknown"
                os.close(fd)
                raise LockHeld(holder) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # its holder removed it as we opened it: take the run's current one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner}\n".encode(), 0)
        return _FileLock(fd, path)
