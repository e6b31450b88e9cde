"""The snapshot index: every snapshot record of a run in one file, so a long run opens fast.

`weightwatch-index.jsonl` holds one line of JSON per snapshot file, written by the
writer: the file's name, its `FileStamp` (size and version) when it was indexed, and
its record in a compact form (each tensor as `[hash, digest, bytes]` in the order of the
header's weights, its shape and dtype taken from the header). A first line names the
index format and the weight keys the tensors are listed by.

The index is a cache and is never trusted over the snapshot files: the reader lists
the snapshot directory (names, sizes, versions) and takes a snapshot from the index
only when its entry has the same name and stamp and its step and label agree with the
file name; every other snapshot file is read, and entries of files that are gone are
ignored. A line that is not whole (a writer appending, a crash) is ignored too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from .format import (
    HASHES,
    SNAPSHOT_DIR,
    STORED_DTYPES,
    SnapshotRecord,
    TensorRecord,
    WeightSpec,
    snapshot_file_name,
)
from .storage import FileStamp, Storage

INDEX_FILE = "weightwatch-index.jsonl"
INDEX_FORMAT = "keras-weightwatch-index"
INDEX_VERSION = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Indexed(NamedTuple):
    """One usable line of the index: the stamp its file had, and its record."""

    stamp: FileStamp
    record: SnapshotRecord


def _line(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=True) + "\n").encode()


def head_line(specs: Sequence[WeightSpec]) -> bytes:
    return _line({"format": INDEX_FORMAT, "version": INDEX_VERSION,
                  "keys": [s.key for s in specs]})


def _compact_tensor(rec: TensorRecord, spec: WeightSpec | None) -> Any:
    if spec is None or rec.shape != spec.shape or rec.dtype != spec.dtype or rec.parts:
        return rec.to_json()
    if rec.stored_dtype == rec.dtype and not rec.lossy:
        return [rec.hash, rec.digest, rec.bytes]
    return [rec.hash, rec.digest, rec.bytes, rec.stored_dtype, rec.lossy]


def entry_line(record: SnapshotRecord, stamp: FileStamp, specs: Sequence[WeightSpec]) -> bytes:
    """The index line of a committed snapshot whose file has `stamp`: a JSON list of
    name, size, version, step, label, epoch, time, logs, statistics (their names once,
    then a row of values per weight) and tensors."""
    by_key = {s.key: s for s in specs}
    names = sorted({n for st in record.stats.values() for n in st})
    rows = {k: [st.get(n, _MISSING) for n in names] for k, st in record.stats.items()}
    if any(_MISSING in row for row in rows.values()):
        stats: Any = {k: dict(v) for k, v in record.stats.items()}
    else:
        stats = [names, rows]
    return _line([
        record.file.rsplit("/", 1)[-1], stamp.size, stamp.version, record.step, record.label,
        record.epoch, record.time, dict(record.logs), stats,
        {k: _compact_tensor(r, by_key.get(k)) for k, r in record.tensors.items()},
    ])


def index_bytes(records: Sequence[SnapshotRecord], stamps: Mapping[str, FileStamp],
                specs: Sequence[WeightSpec]) -> list[bytes]:
    """The whole index of `records` (those whose files have a stamp), as lines."""
    lines = [head_line(specs)]
    for r in records:
        stamp = stamps.get(r.file.rsplit("/", 1)[-1])
        if stamp is not None:
            lines.append(entry_line(r, stamp, specs))
    return lines


_R = TypeVar("_R")
_MISSING = "\0missing"
_NUMBERS = frozenset([int, float])
_STAT_TYPES = frozenset([int, float, type(None)])


def _built(cls: type[_R], **fields: Any) -> _R:
    """A frozen record from fields already checked, three times faster than its `__init__`
    (which sets each field through `object.__setattr__`); equal to the one `__init__` makes.
    Every field must be given (the records have no `__post_init__`)."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


class _Bad(Exception):
    """An index line that does not hold a well-formed entry."""


def _tensor(key: str, t: Any, spec: WeightSpec | None, where: str) -> TensorRecord:
    if type(t) is dict:
        return TensorRecord.from_json(t, f"{where}: tensor {key!r}")
    if spec is None or type(t) is not list or len(t) not in (3, 5):
        raise _Bad
    hash_name, digest, size = t[0], t[1], t[2]
    stored, lossy = (t[3], t[4]) if len(t) == 5 else (spec.dtype, False)
    if (hash_name not in HASHES or type(digest) is not str or not _HEX64.fullmatch(digest)
            or type(size) is not int
            or stored not in STORED_DTYPES or type(lossy) is not bool
            or spec.dtype not in STORED_DTYPES):
        raise _Bad
    return _built(TensorRecord, file=f"tensors/{digest}.npy", digest=digest, shape=spec.shape,
                  dtype=spec.dtype, stored_dtype=stored, lossy=lossy, bytes=size,
                  hash=hash_name)


def _stats(stats: Any) -> dict[str, Any]:
    if type(stats) is dict:  # written whole: the weights' statistics have different names
        if not all(type(st) is dict and _STAT_TYPES.issuperset(map(type, st.values()))
                   for st in stats.values()):
            raise _Bad
        return stats
    names, rows = stats
    if type(names) is not list or type(rows) is not dict or not all(
            type(n) is str for n in names):
        raise _Bad
    out = {}
    for key, row in rows.items():
        if type(row) is not list or len(row) != len(names) or not _STAT_TYPES.issuperset(
                map(type, row)):
            raise _Bad
        out[key] = dict(zip(names, row))
    return out


def _entry(d: Any, specs: Mapping[str, WeightSpec], where: str) -> tuple[str, Indexed]:
    """A decoded line as (file name, `Indexed`); raises `_Bad` for anything malformed."""
    name, size, version, step, label, epoch, t, logs, stats, tensors = d
    if (type(step) is not int or label not in ("initial", "epoch")
            or name != snapshot_file_name(label, step)
            or not (epoch is None or type(epoch) is int) or type(t) not in _NUMBERS
            or type(size) is not int or type(version) is not str
            or type(logs) is not dict or not _NUMBERS.issuperset(map(type, logs.values()))
            or type(tensors) is not dict):
        raise _Bad
    record = _built(
        SnapshotRecord, step=step, label=label, epoch=epoch, time=float(t),
        logs={k: float(v) for k, v in logs.items()},
        tensors={k: _tensor(k, v, specs.get(k), where) for k, v in tensors.items()},
        stats=_stats(stats), file=f"{SNAPSHOT_DIR}/{name}")
    return name, Indexed(FileStamp(size, version), record)


def read_index(storage: Storage, specs: Sequence[WeightSpec]) -> dict[str, Indexed]:
    """The usable entries of a run's index by file name; {} when there is none to use.

    Nothing here is checked against the snapshot files yet: that is the reader's job.
    """
    try:
        if storage.is_link(INDEX_FILE):
            return {}
        with storage.open_read(INDEX_FILE) as f:
            lines = f.read().split(b"\n")
    except OSError:
        return {}
    try:
        head = json.loads(lines[0])
    except ValueError:
        return {}
    if not isinstance(head, dict) or head.get("format") != INDEX_FORMAT or head.get(
            "version") != INDEX_VERSION or head.get("keys") != [s.key for s in specs]:
        return {}
    by_key = {s.key: s for s in specs}
    out: dict[str, Indexed] = {}
    where = storage.where(INDEX_FILE)
    for line in lines[1:-1]:  # the last piece is what follows the last newline
        try:
            name, entry = _entry(json.loads(line), by_key, where)
        except Exception:  # noqa: S112 - a damaged entry is one the reader does not use
            continue
        out[name] = entry
    return out
