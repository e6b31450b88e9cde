"""Writing a run: `RunWriter`, its lock, and retention.

Every file is written under a temporary name and renamed into place. Tensor
files are written before the snapshot file that names them, so a snapshot is
visible only once all its tensors are stored: a process killed at any moment
leaves a run whose listed snapshots all load and verify. Tensor files are
content-addressed, so a tensor that did not change since an earlier snapshot
(a frozen layer) is stored once.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..errors import RunBusyError, WeightWatchError
from ..stats import Partial
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_FILE,
    LOCK_FILE,
    MAX_SAMPLE_BYTES,
    SHARD_DIR,
    SNAPSHOT_DIR,
    TENSOR_DIR,
    TENSOR_FILE_RE,
    TMP_PREFIX,
    UNSHARDED_FORMAT_VERSION,
    WRITE_HASH,
    Encoded,
    ModelInfo,
    PartRecord,
    ResponseLayer,
    Samples,
    ShardRecord,
    SnapshotRecord,
    StoredSample,
    TensorRecord,
    WeightSpec,
    architecture_mismatch,
    check_tiling,
    encode_tensor,
    json_bytes,
    npy_header,
    parts_digest,
    raw_bytes,
    sample_rows,
    shard_record_name,
    snapshot_file_name,
    stored_as,
)
from .index import INDEX_FILE, entry_line, index_bytes
from .reader import is_run, open_run, read_json, read_tensor
from .storage import LocalStorage, LockHandle, LockHeld, Storage

if TYPE_CHECKING:
    from ..capture import Snapshot


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunLock:
    """The exclusive lock a writer holds on a run from `RunWriter.open` to `close`.

    Args:
        storage: Where the run is; the lock is its `.weightwatch.lock` file,
            which exists only while the lock is held (a local run's release
            removes it).

    Example: hold a run the way a writer does, so that another writer is refused.

    >>> lock = RunLock(LocalStorage("runs/exp1"))  # doctest: +SKIP
    >>> lock.acquire()                              # doctest: +SKIP
    >>> lock.release()                              # doctest: +SKIP
    """

    def __init__(self, storage: Storage):
        self.storage = storage
        self._handle: LockHandle | None = None

    def acquire(self) -> None:
        """Take the lock. Raises `RunBusyError` naming the holder when another has it."""
        try:
            self._handle = self.storage.lock(LOCK_FILE, f"pid {os.getpid()}")
        except LockHeld as e:
            raise RunBusyError(
                f"{self.storage.path}: the run is being written by another WeightWatch "
                f"({e.holder}); give each writer its own log_dir, or pass if_exists='new'"
            ) from None

    def release(self) -> None:
        """Let go of the lock. Safe to call twice."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.release()


def retained_steps(
    snapshots: Sequence[SnapshotRecord], keep_last: int, keep_every: int | None = None
) -> set[int]:
    """The steps a retention policy keeps: the initial snapshot, the last `keep_last`
    epoch (or batch) snapshots, and every one whose step is a multiple of `keep_every`."""
    epochs = sorted(s.step for s in snapshots if s.label != "initial")
    keep = {s.step for s in snapshots if s.label == "initial"}
    keep.update(epochs[-keep_last:] if keep_last > 0 else [])
    if keep_every:
        keep.update(step for step in epochs if step % keep_every == 0)
    return keep


_PREFIX = 1 << 12
"""Bytes of a tensor compared from a short read before its file is mapped (`_holds`)."""


def same_bytes(a: memoryview, b: memoryview, first: int = 1 << 16, chunk: int = 1 << 24
               ) -> bool:
    """True when two byte buffers are equal; compares a short prefix first, then in chunks,
    so buffers that differ (a weight that trained) are told apart after a few bytes."""
    if a.nbytes != b.nbytes:
        return False
    x = np.frombuffer(a, np.uint8)
    y = np.frombuffer(b, np.uint8)
    whole = x.size - x.size % 8  # the bulk compared 8 bytes at a time: 2.5x faster
    if not np.array_equal(x[whole:], y[whole:]):
        return False
    x, y = x[:whole].view(np.uint64), y[:whole].view(np.uint64)
    start, first, chunk = 0, first // 8, max(1, chunk // 8)
    for stop in [first, *range(first + chunk, x.size + chunk, chunk)]:
        if not np.array_equal(x[start:stop], y[start:stop]):
            return False
        start = stop
    return True


def store_samples(storage: Storage, inputs: Mapping[str, np.ndarray | None],
                  responses: Sequence[ResponseLayer], durable: bool,
                  max_bytes: int = MAX_SAMPLE_BYTES) -> Samples:
    """Write the input samples (`sample_images`, `feature_data`) as tensor files; their record.

    Each is stored as its first rows within `MAX_SAMPLE_BYTES`, content-addressed in
    `tensors/` like a weight (a sample stored before is not written again).
    """
    stored: dict[str, StoredSample | None] = {}
    for name in ("sample_images", "feature_data"):
        arr = inputs.get(name)
        rows = None if arr is None else sample_rows(arr, max_bytes)
        if arr is None or rows is None or rows.shape[0] == 0:
            stored[name] = None
            continue
        enc = encode_tensor(rows, rows.dtype.name)
        digest = enc.digest(WRITE_HASH)
        rec = TensorRecord(file=f"{TENSOR_DIR}/{digest}.npy", digest=digest, hash=WRITE_HASH,
                           shape=tuple(rows.shape), dtype=rows.dtype.name,
                           stored_dtype=enc.stored_dtype, lossy=False, bytes=enc.nbytes)
        if not storage.isfile(rec.file):
            storage.write_atomic(rec.file, [enc.header, enc.data], durable)
        stored[name] = StoredSample(rec, int(np.shape(arr)[0]))
    if durable and any(stored.values()):
        storage.sync_dir(TENSOR_DIR)
    return Samples(stored["sample_images"], stored["feature_data"], tuple(responses))


class Change(NamedTuple):
    """How a model's weights differ from those of a run (see `architecture_change`)."""

    extends: bool
    """Every weight of the run is one of the model's, by key, with its shape and dtype, and
    the model adds weights (LoRA adapters): the run can go on with them from a step on."""
    what: str
    """The difference in words, for a warning or an error."""


def _spec_text(s: WeightSpec) -> str:
    return f"{s.key} {s.dtype}{list(s.shape)}"


def _listed(specs: Sequence[WeightSpec], most: int = 3) -> str:
    more = f", ... ({len(specs) - most} more)" if len(specs) > most else ""
    return ", ".join(_spec_text(s) for s in specs[:most]) + more


def architecture_change(old: Sequence[WeightSpec], new: Sequence[WeightSpec]) -> Change | None:
    """None when a model's weights `new` are of the architecture of a run's `old` (same
    count, shapes and dtypes, keys matched by position); else how they differ."""
    if architecture_mismatch(old, new) is None:
        return None
    by_key = {s.key: s for s in new}
    kept = {s.key for s in old}
    added = [s for s in new if s.key not in kept]
    lacks = [s for s in old if s.key not in by_key]
    changed = [(s, by_key[s.key]) for s in old
               if s.key in by_key and (by_key[s.key].shape, by_key[s.key].dtype)
               != (s.shape, s.dtype)]
    if len(old) == len(new):  # nothing added: told weight by weight, as keys match by position
        return Change(False, str(architecture_mismatch(old, new)))
    parts = [f"the run has {len(old)} weight tensors, the model has {len(new)}"]
    if added:
        parts.append(f"the model adds {_listed(added)}")
    if lacks:
        parts.append(f"the model lacks {_listed(lacks)}")
    for a, b in changed[:3]:
        parts.append(f"{a.key} is {a.dtype}{list(a.shape)} in the run but "
                     f"{b.dtype}{list(b.shape)} in the model")
    return Change(bool(added) and not lacks and not changed, "; ".join(parts))


def other_architecture_refusal(path: str, what: str) -> str:
    """The words that refuse to write a model into a run of another architecture (`what`:
    `Change.what`)."""
    return (f"{path}: holds a run of another architecture ({what}); pass if_exists='new' to "
            "start a new run beside it, or choose another log_dir")


def _continued_specs(storage: Storage, specs: list[WeightSpec]) -> tuple[
        list[WeightSpec], list[SnapshotRecord], Mapping[str, Any]]:
    """The specs, snapshots and header of the run a writer continues (if any; else `{}`).

    The weight keys of an existing run are kept (matched by position), so a
    model rebuilt with other auto-generated layer names continues the same series.
    A model that extends the run's weights (`Change.extends`: LoRA adapters added)
    continues it too: the header's weights become the model's, and the new ones join
    from the next snapshot on (earlier snapshots simply lack them).
    """
    if not is_run(storage):
        return specs, [], {}
    old = open_run(storage)
    change = architecture_change(old.specs, specs)
    if change is not None and not change.extends:
        raise WeightWatchError(other_architecture_refusal(storage.path, change.what))
    if change is not None:
        return specs, list(old.snapshots), old.header
    kept = [dataclasses.replace(new, key=o.key, layer=o.layer) for o, new in zip(old.specs, specs)]
    return kept, list(old.snapshots), old.header


def format_version(snapshots: Sequence[SnapshotRecord], written: Any = None) -> int:
    """The format version of a run holding `snapshots` whose header said `written`:
    `FORMAT_VERSION` (3) once a tensor is stored as parts, else 2, which readers of
    format 2 read too. A version 3 already written is kept (never lowered)."""
    parts = any(r.parts for s in snapshots for r in s.tensors.values())
    kept = isinstance(written, int) and written >= FORMAT_VERSION
    return FORMAT_VERSION if parts or kept else UNSHARDED_FORMAT_VERSION


class RunWriter:
    """Writes snapshots into a run directory; the only code that creates its files.

    Use `RunWriter.open(...)`, then for each snapshot `store_tensors(snapshot)`
    (its arrays) and `commit_snapshot(snapshot, records, stats)` (its snapshot
    file, which makes it visible), optionally `apply_retention(...)`, then
    `close()`. One writer holds the run's lock from `open` to `close`.

    Example (no Keras needed: a `ModelInfo` and a `Snapshot` of numpy arrays):

    >>> writer = RunWriter.open("runs/x", info, settings={}, versions={})  # doctest: +SKIP
    >>> records = writer.store_tensors(snapshot)                         # doctest: +SKIP
    >>> writer.commit_snapshot(snapshot, records).name                   # doctest: +SKIP
    '0'
    >>> writer.close()                                                   # doctest: +SKIP
    """

    def __init__(self, path: str, header: dict[str, Any], specs: Sequence[WeightSpec],
                 snapshots: Sequence[SnapshotRecord], durable: bool, store_dtype: str | None,
                 storage: Storage | None = None):
        self.path = path
        self.storage: Storage = storage if storage is not None else LocalStorage(path)
        self.header = header
        self.specs = tuple(specs)
        self.durable = durable
        self.store_dtype = store_dtype
        self._snapshots = {s.step: s for s in snapshots}
        self._files: set[str] = {
            p.file for s in snapshots for rec in s.tensors.values() for p in rec.pieces()
        }
        self._shard_files: list[str] = []
        self._lock = RunLock(self.storage)
        self._indexed = False
        self._kept: set[str] = set()  # the header's sample files: never garbage

    @classmethod
    def open(
        cls,
        path: str,
        model: ModelInfo,
        *,
        settings: Mapping[str, Any],
        versions: Mapping[str, str],
        durable: bool = True,
        store_dtype: str | None = None,
        weights: Sequence[WeightSpec] | None = None,
        storage: Storage | None = None,
        samples: Mapping[str, np.ndarray | None] | None = None,
        responses: Sequence[ResponseLayer] = (),
    ) -> RunWriter:
        """Create the run, or open an existing one of the same architecture to continue it.

        The weight keys of an existing run are kept (matched by position), so a
        model rebuilt in another process with other auto-generated layer names
        continues the same series. A model that holds every weight of the run (by
        key, same shape and dtype) and more (LoRA adapters) continues it too: the
        header lists the model's weights, the new ones stored from the next snapshot on.
        `weights` is the subset of `model.weights` the run stores (an include/exclude
        filter); defaults to all of them.
        `storage` is where the run's files go; defaults to the local directory
        `path`. `samples` (`sample_images`, channels last, and `feature_data`) are
        stored with the run and recorded in the header's `samples`, with the
        `responses` layers their kernel responses are computed for; defaults to none.

        Raises:
            WeightWatchError: the run was written by a model of another
                architecture (one that neither matches nor extends it, see
                `architecture_change`), or another writer holds it.
        """
        storage = storage if storage is not None else LocalStorage(path)
        storage.makedirs(TENSOR_DIR)
        storage.makedirs(SNAPSHOT_DIR)
        lock = RunLock(storage)
        lock.acquire()
        try:
            given = list(model.weights if weights is None else weights)
            specs, snapshots, old = _continued_specs(storage, given)
            renamed = {g.key: kept.key for g, kept in zip(given, specs)}
            model = dataclasses.replace(
                model, derived=tuple(d.rekeyed(renamed) for d in model.derived))
            stored = store_samples(storage, samples or {}, responses, durable)
            header = {
                "format": FORMAT_NAME,
                "format_version": format_version(snapshots, old.get("format_version")),
                "created": old.get("created") or _now_iso(),
                "updated": _now_iso(),
                "versions": dict(versions),
                "model": model.to_json(),
                "weights": [s.to_json() for s in specs],
                "settings": dict(settings),
                "samples": stored.to_json(),
            }
            writer = cls(path, header, specs, snapshots, durable, store_dtype, storage)
            writer._kept = {rec.file for rec in stored.records}
            writer._lock = lock
            storage.write_atomic(HEADER_FILE, [json_bytes(header)], durable)
            writer.rebuild_index()
            return writer
        except BaseException:
            lock.release()
            raise

    @property
    def snapshots(self) -> list[SnapshotRecord]:
        return [self._snapshots[k] for k in sorted(self._snapshots)]

    @property
    def last_step(self) -> int | None:
        return max(self._snapshots) if self._snapshots else None

    def has_initial(self) -> bool:
        return any(s.label == "initial" for s in self._snapshots.values())

    def previous(self, step: int) -> SnapshotRecord | None:
        """The latest snapshot strictly before `step`."""
        earlier = [k for k in self._snapshots if k < step]
        return self._snapshots[max(earlier)] if earlier else None

    def read(self, rec: TensorRecord) -> np.ndarray:
        """A stored tensor, memory-mapped (used for update ratios against an earlier snapshot).

        Goes through the same checks as every read of a run (`reader.read_tensor`).
        """
        return read_tensor(self.storage, rec, mmap=True)

    def store_tensors(self, snapshot: Snapshot) -> dict[str, TensorRecord]:
        """Write the snapshot's arrays that are not stored yet; return every tensor's record.

        A tensor byte-identical to the previous snapshot's is neither hashed nor written
        (its bytes are compared with the stored file, which stops at the first difference).
        The others are written (one `write` of each array's bytes), then synced together,
        then renamed into place, then the tensor directory is synced once: every file a
        snapshot file will name is durable before `commit_snapshot` writes it.
        """
        prev = self.previous(snapshot.step)
        records: dict[str, TensorRecord] = {}
        wrote: list[str] = []

        def files() -> Iterator[tuple[str, list[Any]]]:
            for spec in self.specs:
                if spec.key in snapshot.shards:
                    continue  # stored as parts: `store_shards`
                rec, chunks = self._encode(snapshot.arrays[spec.key], spec,
                                           prev.tensors.get(spec.key) if prev else None)
                records[spec.key] = rec
                # Only a file a committed snapshot names is known to be whole and durable.
                if rec.file not in self._files:
                    wrote.append(rec.file)
                    self._files.add(rec.file)
                    yield rec.file, chunks

        try:
            self.storage.write_atomic_many(files(), self.durable)
        except BaseException:
            self._files.difference_update(wrote)
            raise
        if wrote and self.durable:
            self.storage.sync_dir(TENSOR_DIR)
        return records

    def _encode(self, arr: np.ndarray, spec: WeightSpec, prev: TensorRecord | None
                ) -> tuple[TensorRecord, list[Any]]:
        """A tensor's record and the bytes of its .npy file (header, then data).

        `prev` is the weight's record in the previous snapshot: when the file it names
        holds these very bytes, its digest is reused instead of hashing them again.
        """
        enc = encode_tensor(arr, spec.dtype, self.store_dtype)
        if prev is not None and self._holds(prev, enc):
            digest, hash_name = prev.digest, prev.hash
        else:
            digest, hash_name = enc.digest(WRITE_HASH), WRITE_HASH
        rec = TensorRecord(
            file=f"{TENSOR_DIR}/{digest}.npy",
            digest=digest,
            hash=hash_name,
            shape=tuple(arr.shape),
            dtype=spec.dtype,
            stored_dtype=enc.stored_dtype,
            lossy=enc.lossy,
            bytes=enc.nbytes,
        )
        return rec, [enc.header, enc.data]

    def _holds(self, rec: TensorRecord, enc: Encoded) -> bool:
        """True when the stored file of `rec` holds exactly `enc` (same header and bytes)."""
        if rec.bytes != enc.nbytes or rec.file not in self._files:
            return False
        try:
            # A weight that trained differs within its first bytes: told from a short read,
            # without mapping the file and parsing its header.
            head = enc.header + bytes(enc.data[:_PREFIX])
            with self.storage.open_read(rec.file) as f:
                if f.read(len(head)) != head:
                    return False
            old = self.storage.load_npy(rec.file, mmap=True)
        except (OSError, ValueError, EOFError):
            return False
        if not old.flags.c_contiguous or npy_header(old) != enc.header:
            return False
        return same_bytes(raw_bytes(old), enc.data)

    def commit_snapshot(
        self,
        snapshot: Snapshot,
        records: Mapping[str, TensorRecord],
        stats: Mapping[str, Mapping[str, float]] | None = None,
    ) -> SnapshotRecord:
        """Make the snapshot visible by writing its snapshot file, last (after the header
        says format 3, when this is the run's first snapshot with a tensor stored as parts)."""
        if any(r.parts for r in records.values()) and \
                self.header["format_version"] < FORMAT_VERSION:
            self.header = {**self.header, "format_version": FORMAT_VERSION, "updated": _now_iso()}
            self.storage.write_atomic(HEADER_FILE, [json_bytes(self.header)], self.durable)
        file = f"{SNAPSHOT_DIR}/{snapshot_file_name(snapshot.label, snapshot.step)}"
        draft = SnapshotRecord(
            step=snapshot.step,
            label=snapshot.label,
            epoch=snapshot.epoch,
            time=snapshot.time,
            logs=dict(snapshot.logs),
            tensors=dict(records),
            stats={k: dict(v) for k, v in (stats or {}).items()},
            file=file,
        )
        body = json_bytes(draft.to_json())
        self.storage.write_atomic(file, [body], self.durable)
        if self.durable:
            self.storage.sync_dir(SNAPSHOT_DIR)
        # What a reader will find: the record parsed back from the bytes just written.
        record = SnapshotRecord.from_json(json.loads(body), file, where=self.storage.where(file))
        self._snapshots[snapshot.step] = record
        self._index_append(record)
        shard_files, self._shard_files = self._shard_files, []
        for name in shard_files:  # merged into the snapshot file: no longer needed
            self.storage.remove(name)
        return record

    def store_shards(self, snapshot: Snapshot, processes: int, *, attempt: str,
                     timeout: float) -> StoredShards:
        """Store this process's parts of the sharded weights, wait for every other process's
        shard record of the step and `attempt`, and return the merged record of each
        sharded weight with the other processes' partial sums. `timeout` is
        `Settings.shard_timeout`.

        Raises:
            WeightWatchError: a process's record did not come within `timeout` seconds,
                or the parts do not cover a weight exactly.
        """
        mine = ShardWriter(self.storage, self.specs, self.durable, self.store_dtype)
        parts = {k: list(v) for k, v in mine.store_parts(snapshot).items()}
        sums: dict[str, list[Partial]] = {}
        for process in range(1, processes):
            name = shard_record_name(snapshot.label, snapshot.step, process)
            record = wait_for_shard_record(self.storage, name, attempt, timeout)
            self._shard_files.append(name)
            for key, more in record.tensors.items():
                parts.setdefault(key, []).extend(more)
            for key, partial in record.stats.items():
                sums.setdefault(key, []).append(partial)
        records = {}
        for spec in self.specs:
            if spec.key not in snapshot.shards:
                continue
            found = sorted(parts.get(spec.key, []), key=lambda p: p.offset)
            where = f"{self.storage.where(SHARD_DIR)}: step {snapshot.step}, weight {spec.key!r}"
            check_tiling(spec.shape, found, where)
            self._files.update(p.file for p in found)
            stored_dtype, lossy = stored_as(spec.dtype, self.store_dtype)
            records[spec.key] = TensorRecord(
                file="", digest=parts_digest(found), hash=WRITE_HASH, shape=spec.shape,
                dtype=spec.dtype, stored_dtype=stored_dtype, lossy=lossy,
                bytes=sum(p.bytes for p in found), parts=tuple(found))
        return StoredShards(records, sums)

    def rebuild_index(self) -> None:
        """Write the snapshot index (`index.py`) of every snapshot anew, atomically.

        The index is a cache: when it cannot be written, it is removed, and readers
        read the snapshot files.
        """
        try:
            stamps = self.storage.stamps(SNAPSHOT_DIR)
            lines = index_bytes(self.snapshots, stamps, self.specs)
            self.storage.write_atomic(INDEX_FILE, lines, durable=False)
            self._indexed = True
        except OSError:
            self._drop_index()

    def _index_append(self, record: SnapshotRecord) -> None:
        """Add the snapshot just committed to the index (not synced: a torn line is ignored)."""
        if not self._indexed:
            return
        try:
            stamp = self.storage.stamp(record.file)
            self.storage.append(INDEX_FILE, entry_line(record, stamp, self.specs), durable=False)
        except OSError:
            self._drop_index()

    def _drop_index(self) -> None:
        self._indexed = False
        try:
            self.storage.remove(INDEX_FILE)
        except OSError:
            pass

    def apply_retention(self, keep_last: int, keep_every: int | None = None) -> list[str]:
        """Remove the snapshots `retained_steps` does not keep, then their unreferenced tensors.

        Crash-safe in this order: each removed snapshot's file goes first (the
        run then no longer lists it), then every tensor file that no remaining
        snapshot references. A process killed at any moment leaves a run whose
        listed snapshots all load and verify; a leftover unreferenced tensor
        file is removed by the next pass.

        Returns:
            The removed snapshot files, relative to the run directory.
        """
        keep = retained_steps(self.snapshots, keep_last, keep_every)
        removed = []
        for step in sorted(self._snapshots):
            if step in keep:
                continue
            record = self._snapshots.pop(step)
            self.storage.remove(record.file)
            removed.append(record.file)
        if removed and self.durable:
            self.storage.sync_dir(SNAPSHOT_DIR)
        if removed:
            self.rebuild_index()
        self.collect_garbage()
        return removed

    def collect_garbage(self) -> list[str]:
        """Delete tensor files that no snapshot of the run references; return their names.

        Only files named like tensors (`<digest>.npy`) and leftover temporary
        files (`.tmp-*`) are touched. Call it only between snapshots: the
        tensors of a snapshot being written are not referenced yet.
        """
        referenced = {p.file for s in self._snapshots.values() for rec in s.tensors.values()
                      for p in rec.pieces()}
        referenced |= self._kept
        deleted = []
        try:
            names = self.storage.listdir(TENSOR_DIR)
        except FileNotFoundError:
            names = []
        for name in sorted(names):
            file = f"{TENSOR_DIR}/{name}"
            if not (TENSOR_FILE_RE.match(file) or name.startswith(TMP_PREFIX)):
                continue
            if file in referenced:
                continue
            if self.storage.remove(file):
                deleted.append(file)
        self._files &= referenced - self._kept
        if deleted and self.durable:
            self.storage.sync_dir(TENSOR_DIR)
        return deleted

    def close(self) -> None:
        """Release the run's lock. Safe to call twice."""
        self._lock.release()


class StoredShards(NamedTuple):
    """What `RunWriter.store_shards` gathered of one snapshot's sharded weights."""

    records: dict[str, TensorRecord]
    """Weight key -> its merged record (every part, of every process)."""
    stats: dict[str, list[Partial]]
    """Weight key -> the partial sums the other processes recorded of their parts."""


def wait_for_shard_record(storage: Storage, name: str, attempt: str, timeout: float,
                          poll: float = 0.05) -> ShardRecord:
    """The shard record `name` of `attempt` once it exists (polled, up to `timeout` seconds).

    A record of another attempt (left by an earlier fit that stopped at this step) is not
    merged: it is waited past, until this attempt's record replaces it.
    """
    deadline = time.monotonic() + timeout
    stale: str | None = None
    while True:
        if storage.isfile(name):
            record = ShardRecord.from_json(read_json(storage, name, "shard record"),
                                           storage.where(name))
            if record.attempt == attempt:
                return record
            stale = record.attempt
        if time.monotonic() > deadline:
            found = "none" if stale is None else f"only one of another attempt ({stale!r})"
            raise WeightWatchError(
                f"{storage.where(name)}: a process of the model-parallel run did not record "
                f"its shards of this attempt within {timeout:g} s (found {found}; did it "
                f"stop, or write another log_dir?). Received: shard_timeout={timeout:g}, "
                f"attempt={attempt!r}")
        time.sleep(poll)
        poll = min(poll * 1.5, 1.0)


class ShardWriter:
    """Writes one process's parts of a model-parallel run's sharded weights (no lock: the
    part files are content-addressed and written once, and process 0's `RunWriter` holds
    the run). `publish` writes the parts, then the process's shard record, last.

    Args:
        storage: Where the run is.
        specs: The run's weights.
        durable: Sync each file before the record that names it.
        store_dtype: A reduced precision to store floats in (None: their own dtype).
    """

    def __init__(self, storage: Storage, specs: Sequence[WeightSpec], durable: bool,
                 store_dtype: str | None):
        self.storage = storage
        self.specs = {s.key: s for s in specs}
        self.durable = durable
        self.store_dtype = store_dtype

    def store_parts(self, snapshot: Snapshot) -> dict[str, tuple[PartRecord, ...]]:
        """Write this process's shards of the snapshot; return their records by weight."""
        out: dict[str, tuple[PartRecord, ...]] = {}
        files: dict[str, list[Any]] = {}
        for key, shards in snapshot.shards.items():
            spec = self.specs[key]
            parts = []
            for shard in shards:
                enc = encode_tensor(shard.array, spec.dtype, self.store_dtype)
                digest = enc.digest(WRITE_HASH)
                file = f"{TENSOR_DIR}/{digest}.npy"
                parts.append(PartRecord(file=file, digest=digest, hash=WRITE_HASH,
                                        offset=shard.offset, shape=tuple(shard.array.shape),
                                        bytes=enc.nbytes))
                if not self.storage.isfile(file):
                    files[file] = [enc.header, enc.data]
            out[key] = tuple(parts)
        self.storage.write_atomic_many(iter(files.items()), self.durable)
        if files and self.durable:
            self.storage.sync_dir(TENSOR_DIR)
        return out

    def publish(self, snapshot: Snapshot, process: int, attempt: str,
                stats: Mapping[str, Partial] | None = None) -> ShardRecord:
        """Store the parts, then the shard record that tells process 0 they are there (of
        `attempt`: the token all processes of this fit share), with `stats`, the partial
        sums of this process's parts of each weight."""
        record = ShardRecord(step=snapshot.step, label=snapshot.label, process=process,
                             attempt=attempt, tensors=self.store_parts(snapshot),
                             stats=dict(stats or {}))
        self.storage.makedirs(SHARD_DIR)
        name = shard_record_name(snapshot.label, snapshot.step, process)
        self.storage.write_atomic(name, [json_bytes(record.to_json())], self.durable)
        return record
