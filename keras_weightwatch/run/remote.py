"""Runs in an object store (S3, GCS, `memory://`, any fsspec URL): `FsspecStorage`.

`open_storage(path, storage_options)` is how every part of the package turns a
`log_dir` into a `Storage`: a plain path (or `file://`) is a `LocalStorage`,
any other URL an `FsspecStorage` over the fsspec file system of its protocol
(`s3fs` for `s3://`). fsspec and the protocol packages are optional
(`pip install 'keras-weightwatch[s3]'`); without them the error names the
extra to install.

The promises of a local run, kept without rename or flock:

- **Whole objects only.** Every file is one PUT of its complete bytes; an
  object store lists an object only once its upload completed (a multipart
  upload stays unlisted until it is completed), so no partial object is ever
  part of a run. Tensor objects are content-addressed and written once.
- **A snapshot is visible only when its record is written, last**: the
  writer stores every tensor object first, exactly as on a local disk.
- **One writer per run: a lease.** The lock is an object
  `.weightwatch.lock` holding its owner and an expiry time. It is created
  with a conditional write (S3 `If-None-Match: *`; `mode="create"` for the
  other fsspec file systems), renewed by a daemon thread every third of its
  time to live with a conditional overwrite (S3 `If-Match` of its ETag), and
  taken over only once expired (conditionally again). A writer that could not
  renew within its time to live refuses to commit another snapshot. The exact
  guarantee: on a store with conditional writes (AWS S3, MinIO, moto), two
  writers never both hold a lease that has not expired, provided the
  machines' clocks differ by less than `LEASE_MARGIN` seconds; without
  conditional writes the lease is advisory (a race between two writers
  starting within one round trip of each other is not excluded).
- **Faults of a network store.** Every operation is retried with exponential
  backoff (`RetryPolicy`) on errors that can pass (connection refused or
  reset, timeouts, 5xx, throttling); an operation still failing after
  `RetryPolicy.total` seconds raises. Errors that cannot pass (no such
  bucket, access denied) raise at once. `on_trouble` is told of the first
  retry of an outage and of its end, so the pipeline can warn once.
- **Reading is lazy.** A run is opened by reading its header and snapshot
  records only; a tensor object is fetched (one GET) when it is read, and
  kept in a bounded in-memory cache (tensor objects never change, so the
  cache cannot go stale); nothing is written to the local disk.

Credentials and endpoints come from where the protocol's library finds them
(for S3: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`,
`~/.aws/config`, instance metadata) or from `storage_options`, which is
handed to fsspec and never written anywhere: every message this module
raises has the option values scrubbed out of it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, BinaryIO, TypeVar

import numpy as np

from .format import SNAPSHOT_DIR, TENSOR_DIR
from .storage import LocalStorage, LockHeld, Storage

T = TypeVar("T")

EXTRA = "pip install 'keras-weightwatch[s3]'"
LEASE_TTL = 60.0
"""Seconds a writer's lease lasts without renewal."""
LEASE_MARGIN = 5.0
"""Seconds of clock difference between machines the lease tolerates."""
CACHE_BYTES = 512 << 20
"""The most bytes of tensor objects one `FsspecStorage` keeps in memory."""

_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
              NotADirectoryError, ValueError, TypeError, KeyError, LockHeld)


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for a URL with a protocol other than `file` (`s3://b/r`, `memory://r`)."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return bool(sep) and head.isidentifier() and head.lower() != "file"


def local_path(path: str | os.PathLike[str]) -> str:
    """A local path, `file://` stripped."""
    text = os.fspath(path)
    return text[len("file://"):] if text.startswith("file://") else text


def open_storage(path: str | os.PathLike[str] | Storage,
                 storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The `Storage` of a run: a local directory, or an `FsspecStorage` for a URL."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    if is_url(path):
        return FsspecStorage(os.fspath(path), storage_options)
    return LocalStorage(local_path(path))


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The fsspec file system of `url`'s protocol; the error names the extra to install."""
    try:
        import fsspec
    except ImportError:
        raise ImportError(
            f"{url}: reading or writing a run at a URL needs fsspec and the package of its "
            f"protocol (s3fs for s3://); install them with {EXTRA}"
        ) from None
    protocol = url.split("://", 1)[0]
    try:
        return fsspec.filesystem(protocol, **dict(storage_options or {}))
    except ImportError as e:
        raise ImportError(
            f"{url}: the {protocol}:// protocol needs a package that is not installed "
            f"({_scrub(str(e), storage_options)}); for S3 install it with {EXTRA}"
        ) from None
    except ValueError as e:
        raise ValueError(
            f"{url}: fsspec does not know the protocol {protocol!r} "
            f"({_scrub(str(e), storage_options)}). Received: log_dir={url!r}"
        ) from None


def _secrets(options: Mapping[str, Any] | None) -> list[str]:
    out: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str) and len(value) >= 4:
            out.append(value)

    walk(options or {})
    return out


def _scrub(text: str, options: Mapping[str, Any] | None) -> str:
    """`text` with every string value of `options` replaced by `***`."""
    for secret in sorted(_secrets(options), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long an operation on a network store is retried.

    Attributes:
        total: Seconds after which an operation that keeps failing raises.
        first: The first wait, in seconds; each next wait doubles.
        cap: The longest wait between two tries, in seconds.
    """

    total: float = 600.0
    first: float = 0.2
    cap: float = 5.0

    def waits(self) -> Iterable[float]:
        wait = self.first
        while True:
            yield wait
            wait = min(self.cap, wait * 2)


def transient(exc: BaseException) -> bool:
    """Whether an error of a store can pass by itself (a network or server fault)."""
    if isinstance(exc, _PERMANENT):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or any(
        type(c).__module__.split(".")[0] in ("botocore", "aiohttp", "aiobotocore", "urllib3")
        for c in _chain(exc)
    )


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


class _Lease:
    """A writer's lease object, renewed by a daemon thread until `release`."""

    def __init__(self, storage: FsspecStorage, name: str, owner: str, ttl: float):
        self.storage, self.name, self.owner, self.ttl = storage, name, owner, ttl
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.renewed = 0.0  # time.monotonic() of the last successful write of the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        return json.dumps({"owner": self.owner, "token": self.token,
                           "expires": time.time() + self.ttl}).encode()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="weightwatch-lease",
                                        daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.etag = self.storage._put_lease(self.name, self.body(), match=self.etag)
                self.renewed = time.monotonic()
            except Exception:  # noqa: S112 - tried again; `valid` stops commits meanwhile
                continue

    def valid(self) -> bool:
        return time.monotonic() - self.renewed < self.ttl - LEASE_MARGIN

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.storage._read_lease(self.name).get("token") == self.token:
                self.storage.remove(self.name)
        except Exception:  # noqa: S110 - it expires by itself
            pass


class FsspecStorage:
    """A run at an fsspec URL (an object store): see the module docstring for its promises.

    Args:
        url: The run's URL, such as `s3://bucket/runs/exp1`.
        storage_options: Passed to the fsspec file system (credentials, an
            endpoint); never written into the run or shown in a message.
            Defaults to None (the protocol's own configuration).
        retry: How long failing operations are retried. Defaults to `RetryPolicy()`.
        on_trouble: Called with a message at the first retry of an outage and
            with None when an operation succeeds again. Defaults to None.
    """

    lease_ttl = LEASE_TTL

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 retry: RetryPolicy | None = None,
                 on_trouble: Callable[[str | None], None] | None = None):
        self.path = url.rstrip("/")
        self.protocol = url.split("://", 1)[0].lower()
        self._options = dict(storage_options or {})
        self.fs = filesystem(url, self._options)
        self.root = self.fs._strip_protocol(self.path).rstrip("/")
        self.retry = retry or RetryPolicy()
        self.on_trouble = on_trouble
        self._troubled = False
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._lease: _Lease | None = None

    def __repr__(self) -> str:
        return f"FsspecStorage({self.path!r})"

    def _full(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def where(self, name: str = "") -> str:
        return f"{self.path}/{name}" if name else self.path

    # ------------------------------------------------------------ retries

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one store operation, retried with backoff while its errors can pass."""
        deadline = time.monotonic() + self.retry.total
        waits = iter(self.retry.waits())
        while True:
            try:
                out = fn()
            except BaseException as e:
                if not transient(e) or time.monotonic() >= deadline:
                    raise self._clean(e, what) from None
                if not self._troubled and self.on_trouble is not None:
                    self.on_trouble(f"{self.path}: {what} failed ({self._cause(e)}); retrying")
                self._troubled = True
                time.sleep(min(next(waits), max(0.0, deadline - time.monotonic())))
                continue
            if self._troubled:
                self._troubled = False
                if self.on_trouble is not None:
                    self.on_trouble(None)
            return out

    def _cause(self, exc: BaseException) -> str:
        return _scrub(f"{type(exc).__name__}: {exc}", self._options)

    def _clean(self, exc: BaseException, what: str) -> BaseException:
        """The error with option values scrubbed from its message (same type where possible)."""
        if isinstance(exc, LockHeld):
            return exc
        msg = f"{self.path}: {what} failed: {self._cause(exc)}"
        for kind in (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError):
            if isinstance(exc, kind):
                return kind(msg)
        return OSError(msg)

    # ------------------------------------------------------------ reading

    def exists(self, name: str = "") -> bool:
        return bool(self._call("exists", lambda: self.fs.exists(self._full(name))))

    def isdir(self, name: str = "") -> bool:
        path = self._full(name)
        self.fs.invalidate_cache(path)
        return bool(self._call("list", lambda: self.fs.isdir(path)))

    def isfile(self, name: str) -> bool:
        return bool(self._call("stat", lambda: self.fs.isfile(self._full(name))))

    def is_link(self, name: str) -> bool:
        return False  # object stores have no links

    def is_inside(self, name: str) -> bool:
        return ".." not in name.split("/")

    def size(self, name: str) -> int:
        cached = self._cached(name)
        if cached is not None:
            return len(cached)
        return int(self._call("stat", lambda: self.fs.size(self._full(name))))

    def read_bytes(self, name: str) -> bytes:
        """A whole object (one GET); tensor objects come from, and go to, the cache."""
        cached = self._cached(name)
        if cached is not None:
            return cached
        data = bytes(self._call("read", lambda: self.fs.cat_file(self._full(name))))
        if name.startswith(f"{TENSOR_DIR}/") and len(data) <= CACHE_BYTES:
            with self._cache_lock:
                self._cache[name] = data
                while sum(len(v) for v in self._cache.values()) > CACHE_BYTES:
                    self._cache.popitem(last=False)
        return data

    def _cached(self, name: str) -> bytes | None:
        with self._cache_lock:
            data = self._cache.get(name)
            if data is not None:
                self._cache.move_to_end(name)
            return data

    def open_read(self, name: str) -> BinaryIO:
        return io.BytesIO(self.read_bytes(name))

    def load_npy(self, name: str, *, mmap: bool) -> np.ndarray:
        """The array of a .npy object, read-only as a memory map would be (`mmap` cannot map)."""
        arr = np.load(io.BytesIO(self.read_bytes(name)), allow_pickle=False)
        arr = arr if isinstance(arr, np.ndarray) else np.asarray(arr)
        if mmap:
            arr.flags.writeable = False
        return arr

    def listdir(self, name: str) -> list[str]:
        path = self._full(name)
        self.fs.invalidate_cache(path)
        try:
            entries = self._call("list", lambda: self.fs.ls(path, detail=False))
        except FileNotFoundError:
            raise FileNotFoundError(self.where(name)) from None
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                if e.rstrip("/") != path]

    def stamps(self, name: str) -> dict[str, Any]:
        """Each object of a prefix with its size and a version token (ETag or mtime)."""
        from .storage import FileStamp

        path = self._full(name)
        self.fs.invalidate_cache(path)
        entries = self._call("list", lambda: self.fs.ls(path, detail=True))
        out = {}
        for e in entries:
            if e.get("type") == "file":
                version = str(e.get("ETag") or e.get("etag") or e.get("mtime")
                              or e.get("LastModified") or "")
                out[e["name"].rsplit("/", 1)[-1]] = FileStamp(int(e.get("size", 0)), version)
        return out

    def stamp(self, name: str) -> Any:
        """One object's size and version token, as `stamps` lists them."""
        folder, _, base = name.rpartition("/")
        found = self.stamps(folder).get(base)
        if found is None:
            raise FileNotFoundError(self.where(name))
        return found

    # ------------------------------------------------------------ writing

    def makedirs(self, name: str) -> None:
        """Nothing to do: an object store has no directories (and a bucket is never created)."""

    def write_atomic(self, name: str, chunks: Iterable[bytes | memoryview], durable: bool) -> None:
        """One PUT of the whole object: listed only once complete. A snapshot record is
        refused while this writer's lease is not known to be valid."""
        if name.startswith(f"{SNAPSHOT_DIR}/") and self._lease is not None:
            if not self._lease.valid():
                raise OSError(
                    f"{self.where(name)}: the writer's lease on the run could not be renewed "
                    f"for {self.lease_ttl:.0f} s; not committing a snapshot another writer "
                    "might now hold the run for"
                )
        data = b"".join(bytes(c) for c in chunks)
        path = self._full(name)
        self._call("write", lambda: self.fs.pipe_file(path, data))
        self.fs.invalidate_cache(path)
        if name.startswith(f"{TENSOR_DIR}/") and len(data) <= CACHE_BYTES // 4:
            with self._cache_lock:
                self._cache[name] = data

    def write_atomic_many(self, files: Iterable[tuple[str, Iterable[bytes | memoryview]]],
                          durable: bool) -> None:
        for name, chunks in files:
            self.write_atomic(name, chunks, durable)

    def append(self, name: str, data: bytes, durable: bool) -> None:
        """Objects cannot be appended to: the object is read and written again whole
        (atomic for readers; one writer per run holds the lease)."""
        try:
            old = bytes(self._call("read", lambda: self.fs.cat_file(self._full(name))))
        except FileNotFoundError:
            old = b""
        self.write_atomic(name, [old, data], durable)

    def remove(self, name: str) -> bool:
        path = self._full(name)
        with self._cache_lock:
            self._cache.pop(name, None)
        try:
            self._call("delete", lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            return False
        finally:
            self.fs.invalidate_cache(path)
        return True

    def sync_dir(self, name: str) -> None:
        """Nothing to do: an object is durable once its PUT is acknowledged."""

    # ------------------------------------------------------------ the lease

    def _read_lease(self, name: str) -> dict[str, Any]:
        try:
            data = bytes(self._call("read", lambda: self.fs.cat_file(self._full(name))))
            out = json.loads(data.decode())
        except FileNotFoundError:
            return {}
        except ValueError:
            return {"owner": "unknown", "expires": 0}
        return out if isinstance(out, dict) else {"owner": "unknown", "expires": 0}

    def _put_lease(self, name: str, body: bytes, *, match: str | None = None,
                   create: bool = False) -> str | None:
        """Write the lease conditionally; return its new ETag (None where the store has none).

        Raises `FileExistsError` when the condition failed (another writer got there first).
        """
        path = self._full(name)
        s3 = self.protocol in ("s3", "s3a")
        try:
            if s3:
                cond = {"IfNoneMatch": "*"} if create else ({"IfMatch": match} if match else {})
                out = self._call("write lease", lambda: self.fs.pipe_file(path, body, **cond))
            else:
                mode = "create" if create else "overwrite"
                out = self._call("write lease", lambda: self.fs.pipe_file(path, body, mode=mode))
        except OSError as e:
            if isinstance(e, FileExistsError) or "Precondition" in str(e):
                raise FileExistsError(self.where(name)) from None
            raise
        finally:
            self.fs.invalidate_cache(path)
        return out.get("ETag") if isinstance(out, dict) else None

    def lock(self, name: str, owner: str) -> _Lease:
        """Take the run's lease (see the module docstring); raises `LockHeld` while another
        writer's lease has not expired."""
        lease = _Lease(self, name, f"{owner} on {socket.gethostname()}", self.lease_ttl)
        try:
            lease.etag = self._put_lease(name, lease.body(), create=True)
        except FileExistsError:
            held = self._read_lease(name)
            if float(held.get("expires", 0)) + LEASE_MARGIN > time.time():
                raise LockHeld(str(held.get("owner", "unknown"))) from None
            etag = self._etag(name)
            try:  # expired: take it over, unless another writer just did
                lease.etag = self._put_lease(name, lease.body(), match=etag or None)
            except FileExistsError:
                raise LockHeld(str(self._read_lease(name).get("owner", "unknown"))) from None
        lease.renewed = time.monotonic()
        lease.start()
        self._lease = lease
        return lease

    def _etag(self, name: str) -> str | None:
        try:
            info = self._call("stat", lambda: self.fs.info(self._full(name)))
        except FileNotFoundError:
            return None
        return info.get("ETag") if isinstance(info, dict) else None

