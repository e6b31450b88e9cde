"""The snapshot index: every snapshot record of a run in one file, so a long run opens fast.

`weightwatch-index.jsonl` holds one line per snapshot file, written by the writer. A
first line (JSON) names the index format, its version and the header's weight keys.
Each other line is two JSON lists separated by a space:

- `[name, size, version, step, label, epoch, time, logs]`: the file's name, its
  `FileStamp` (size and version) when it was indexed, and what listing a run needs.
  This half is decoded when the run is opened.
- `[statistics, tensors]`, decoded when a snapshot's statistics or tensors are first
  read (a run of 10,000 snapshots opens without building 40,000 records nobody asks
  for). When every weight has the same statistics and each is a float or None, they are
  packed: their names, the float64 rows in one base64 string, the positions of None and
  NaN. When the tensors are exactly the header's weights with its shapes and dtypes,
  they are `[hash, digests, sizes(, stored)]`, all digests' bytes in one base64 string.
  Anything else is written as it is.

The index is a cache and is never trusted over the snapshot files: the reader lists
the snapshot directory (names, sizes, versions) and takes a snapshot from the index
only when its entry has the same name and stamp and its step and label agree with the
file name; every other snapshot file is read, and entries of files that are gone are
ignored. A line that is not whole (a writer appending, a crash) is ignored too; a second
half that turns out not to be well-formed when it is read is replaced by the snapshot
file's own record. An index of another version (version 1 was one JSON list per line,
decoded whole) is not used, and the next writer of the run rebuilds it.
"""

from __future__ import annotations

import base64
import gc
import json
import re
import struct
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, Sequence, ValuesView
from contextlib import contextmanager
from typing import Any, NamedTuple, TypeVar

from .format import (
    HASHES,
    LABELS,
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
INDEX_VERSION = 2
_DIGEST_BYTES = 32
_HEX64 = re.compile(r"[0-9a-f]{64}")


class Indexed(NamedTuple):
    """One usable line of the index: the stamp its file had, and its record."""

    stamp: FileStamp
    record: SnapshotRecord


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True)


def _line(obj: Any) -> bytes:
    return (_dumps(obj) + "\n").encode()


def head_line(specs: Sequence[WeightSpec]) -> bytes:
    return _line({"format": INDEX_FORMAT, "version": INDEX_VERSION,
                  "keys": [s.key for s in specs]})


def _in_order(specs: Sequence[WeightSpec]) -> list[WeightSpec]:
    """The weights in the order of their keys: the order of a snapshot file's entries."""
    return sorted(specs, key=lambda s: s.key)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _compact_tensor(rec: TensorRecord, spec: WeightSpec | None) -> Any:
    if spec is None or rec.shape != spec.shape or rec.dtype != spec.dtype or rec.parts:
        return rec.to_json()
    if rec.stored_dtype == rec.dtype and not rec.lossy:
        return [rec.hash, rec.digest, rec.bytes]
    return [rec.hash, rec.digest, rec.bytes, rec.stored_dtype, rec.lossy]


def _tensors_json(tensors: Mapping[str, TensorRecord], specs: Sequence[WeightSpec]) -> Any:
    """A list `[hash, digests, sizes(, stored)]` when the tensors are exactly the header's
    weights, in the order of their keys (as snapshot files list them), with the header's
    shapes and dtypes: `hash` one name (or one per
    tensor), `digests` all digests' bytes in one base64 string, `stored` (only when some
    tensor is stored in another dtype) `[stored_dtype, lossy]` per tensor. Else a dict of
    each tensor's compact form."""
    specs = _in_order(specs)
    recs = list(tensors.values())
    if list(tensors) != [s.key for s in specs] or any(
            r.shape != s.shape or r.dtype != s.dtype or r.parts
            or len(r.digest) != 2 * _DIGEST_BYTES
            for r, s in zip(recs, specs)):
        by_key = {s.key: s for s in specs}
        return {k: _compact_tensor(r, by_key.get(k)) for k, r in tensors.items()}
    hashes = sorted({r.hash for r in recs})
    out: list[Any] = [hashes[0] if len(hashes) == 1 else [r.hash for r in recs],
                      _b64(bytes.fromhex("".join(r.digest for r in recs))),
                      [r.bytes for r in recs]]
    if any(r.stored_dtype != r.dtype or r.lossy for r in recs):
        out.append([[r.stored_dtype, r.lossy] for r in recs])
    return out


def _stats_json(stats: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> Any:
    """A list `[names, weights, values, nones, nans]` when every weight has the same
    statistics and each is a float or None: `weights` null when they are `keys` in this
    order, `values` the rows' float64 bytes (little-endian) in one base64 string, `nones`
    and `nans` the positions holding None and NaN. Else the statistics as they are."""
    names = sorted({n for st in stats.values() for n in st})
    values = [st.get(n, _MISSING) for st in stats.values() for n in names]
    if any(len(st) != len(names) for st in stats.values()) or not all(
            type(v) is float or v is None for v in values):
        return {k: dict(v) for k, v in stats.items()}
    nones = [i for i, v in enumerate(values) if v is None]
    nans = [i for i, v in enumerate(values) if v != v]
    packed = struct.pack(f"<{len(values)}d",
                         *(0.0 if v is None or v != v else v for v in values))
    weights = None if list(stats) == list(keys) else list(stats)
    return [names, weights, _b64(packed), nones, nans]


def entry_line(record: SnapshotRecord, stamp: FileStamp, specs: Sequence[WeightSpec]) -> bytes:
    """The index line of a committed snapshot whose file has `stamp`: two JSON lists
    separated by a space, `[name, size, version, step, label, epoch, time, logs]` (read
    when the run is opened) and `[statistics, tensors]` (read when they are first used)."""
    head = _dumps([record.file.rsplit("/", 1)[-1], stamp.size, stamp.version, record.step,
                   record.label, record.epoch, record.time, dict(record.logs)])
    tail = _dumps([_stats_json(record.stats, [s.key for s in _in_order(specs)]),
                   _tensors_json(record.tensors, specs)])
    return f"{head} {tail}\n".encode()


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
_HASH_SET = frozenset(HASHES)
_NAN = json.loads("NaN")  # the very object parsing a snapshot file gives, so records compare equal
_STAT_TYPES = frozenset([int, float, type(None)])


def _built(cls: type[_R], **fields: Any) -> _R:
    """A frozen record from fields already checked, three times faster than its `__init__`
    (which sets each field through `object.__setattr__`); equal to the one `__init__` makes.
    Every field must be given (the records have no `__post_init__`)."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


@contextmanager
def no_collection() -> Iterator[None]:
    """The cyclic garbage collector paused while a long run's records are built: they
    form no cycles to collect, and each of the collections that 10,000 records' tens of
    thousands of new objects would start walks every object built so far."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Bad(Exception):
    """An index line that does not hold a well-formed entry."""


def _tensor(key: str, t: Any, spec: WeightSpec | None, where: str) -> TensorRecord:
    if type(t) is dict:
        return TensorRecord.from_json(t, f"{where}: tensor {key!r}")
    if spec is None or type(t) is not list or len(t) not in (3, 5):
        raise _Bad
    hash_name, digest, size = t[0], t[1], t[2]
    stored, lossy = (t[3], t[4]) if len(t) == 5 else (spec.dtype, False)
    if (type(digest) is not str or not _HEX64.fullmatch(digest)
            or not _good(hash_name, size, stored, lossy, spec)):
        raise _Bad
    return _record(spec, hash_name, digest, size, stored, lossy)


def _good(hash_name: Any, size: Any, stored: Any, lossy: Any, spec: WeightSpec) -> bool:
    return (hash_name in HASHES and type(size) is int and stored in STORED_DTYPES
            and type(lossy) is bool and spec.dtype in STORED_DTYPES)


def _record(spec: WeightSpec, hash_name: str, digest: str, size: int, stored: str,
            lossy: bool) -> TensorRecord:
    return _built(TensorRecord, file=f"tensors/{digest}.npy", digest=digest, shape=spec.shape,
                  dtype=spec.dtype, stored_dtype=stored, lossy=lossy, bytes=size,
                  hash=hash_name)


def _packed_tensors(t: Any, ctx: _Context) -> tuple[list[Any], bytes, list[int], list[Any]]:
    """A line's tensors in the packed form, checked: (hashes, digests' bytes, sizes, stored),
    `stored` being `ctx.native` when every tensor is stored as its own dtype; raises `_Bad`."""
    n = len(ctx.order)
    if type(t) is not list or len(t) not in (3, 4) or not ctx.dtypes_ok:
        raise _Bad
    hashes = [t[0]] * n if type(t[0]) is str else t[0]
    raw = base64.b64decode(t[1], validate=True)
    sizes = t[2]
    stored = t[3] if len(t) == 4 else ctx.native
    if (type(hashes) is not list or len(hashes) != n or not _HASH_SET.issuperset(hashes)
            or len(raw) != n * _DIGEST_BYTES
            or type(sizes) is not list or len(sizes) != n
            or not all(type(x) is int for x in sizes)
            or type(stored) is not list or len(stored) != n):
        raise _Bad
    if stored is not ctx.native and not all(
            type(x) is list and len(x) == 2 and x[0] in STORED_DTYPES and type(x[1]) is bool
            for x in stored):
        raise _Bad
    return hashes, raw, sizes, stored


def _tensors(t: Any, ctx: _Context) -> dict[str, TensorRecord]:
    if type(t) is dict:
        return {k: _tensor(k, v, ctx.by_key.get(k), ctx.where) for k, v in t.items()}
    order = ctx.order
    hashes, raw, sizes, stored = _packed_tensors(t, ctx)
    hexed, width, out = raw.hex(), 2 * _DIGEST_BYTES, {}
    new, setattr_ = object.__new__, object.__setattr__
    for i, fields in enumerate(ctx.templates):  # as `_built` does, from a copy of the constants
        digest = hexed[i * width:(i + 1) * width]
        d = fields.copy()
        d["file"], d["digest"], d["bytes"], d["hash"] = (
            f"tensors/{digest}.npy", digest, sizes[i], hashes[i])
        if stored is not ctx.native:
            d["stored_dtype"], d["lossy"] = stored[i]
        rec = new(TensorRecord)
        setattr_(rec, "__dict__", d)
        out[order[i].key] = rec
    return out


def _packed_stats(stats: Any, ctx: _Context) -> tuple[list[str], list[str], bytes, list[int],
                                                      list[int]]:
    """A line's statistics in the packed form, checked: (names, weights, their float64 rows'
    bytes, positions of None, positions of NaN); raises `_Bad`."""
    if type(stats) is not list or len(stats) != 5:
        raise _Bad
    names, weights, packed, nones, nans = stats
    weights = ctx.keys if weights is None else weights
    if (type(names) is not list or type(weights) is not list or type(nones) is not list
            or type(nans) is not list or not all(type(n) is str for n in names)
            or not all(type(k) is str for k in weights)):
        raise _Bad
    raw = base64.b64decode(packed, validate=True)
    size = len(names) * len(weights)
    if len(raw) != 8 * size or not all(type(i) is int and 0 <= i < size for i in nones + nans):
        raise _Bad
    return names, weights, raw, nones, nans


def _stats(stats: Any, ctx: _Context) -> dict[str, Any]:
    if type(stats) is dict:  # written whole: the weights' statistics differ in names or types
        if not all(type(st) is dict and _STAT_TYPES.issuperset(map(type, st.values()))
                   for st in stats.values()):
            raise _Bad
        return stats
    names, weights, raw, nones, nans = _packed_stats(stats, ctx)
    values: Sequence[Any] = struct.unpack(f"<{len(names) * len(weights)}d", raw)
    if nones or nans:
        values = list(values)
        for positions, value in ((nones, None), (nans, _NAN)):
            for i in positions:
                values[i] = value
    row = iter(values)  # zip takes a name first, so each dict takes exactly one row
    return {k: dict(zip(names, row)) for k in weights}


class _Context(NamedTuple):
    """What decoding an index's lines needs: the header's weights, and the way to the
    snapshot files for what a line does not hold well-formed."""

    by_key: Mapping[str, WeightSpec]
    order: Sequence[WeightSpec]
    keys: list[str]
    where: str
    from_file: Callable[[str], SnapshotRecord]
    native: list[tuple[str, bool]]  # each weight stored as its own dtype, not lossy
    dtypes_ok: bool  # every weight's dtype is one a run stores
    templates: list[dict[str, Any]]  # each weight's `TensorRecord` fields that the header gives


class _Source:
    """One index line's snapshot: the second half of its line, decoded at most once, and
    its file, read at most once and only when the line does not do."""

    __slots__ = ("ctx", "name", "_tail", "_file")

    def __init__(self, ctx: _Context, name: str, tail: str):
        self.ctx, self.name = ctx, name
        self._tail: Any = tail
        self._file: SnapshotRecord | None = None

    def part(self, i: int) -> Any:
        if type(self._tail) is str:
            self._tail = json.loads(self._tail)
        return self._tail[i]

    def file(self) -> SnapshotRecord:
        if self._file is None:
            self._file = self.ctx.from_file(self.name)
        return self._file


class _Lazy(Mapping[str, Any]):
    """A snapshot's tensors or statistics, decoded from its index line when first read
    (a long run opens without building records nobody reads). When the line does not
    hold them well-formed, they are the snapshot file's own. Equal to the dict it holds."""

    __slots__ = ("_part", "_source", "_value")

    def __init__(self, part: str, source: _Source):
        self._part, self._source = part, source
        self._value: Mapping[str, Any] | None = None

    def _get(self) -> Mapping[str, Any]:
        value = self._value
        if value is None:
            source = self._source
            try:
                value = (_stats(source.part(0), source.ctx) if self._part == "stats"
                         else _tensors(source.part(1), source.ctx))
            except Exception:  # not well-formed: the snapshot file says what it holds
                value = getattr(source.file(), self._part)
            self._value = value
        return value

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, key: object) -> bool:
        return key in self._get()

    def keys(self) -> KeysView[str]:
        return self._get().keys()

    def items(self) -> ItemsView[str, Any]:
        return self._get().items()

    def values(self) -> ValuesView[Any]:
        return self._get().values()

    def get(self, key: str, default: Any = None) -> Any:
        return self._get().get(key, default)

    def __repr__(self) -> str:
        return repr(self._get())

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (dict(self._get()),)


def _entry(d: Any, tail: str, ctx: _Context) -> tuple[str, Indexed]:
    """A line's decoded first half as (file name, `Indexed`); raises `_Bad` for a malformed
    name, stamp, step, label, epoch, time or logs. The second half (tensors, statistics) is
    decoded when they are first read."""
    name, size, version, step, label, epoch, t, logs = d
    if (type(step) is not int or label not in LABELS
            or name != snapshot_file_name(label, step)
            or not (epoch is None or type(epoch) is int) or type(t) not in _NUMBERS
            or type(size) is not int or type(version) is not str
            or type(logs) is not dict or not _NUMBERS.issuperset(map(type, logs.values()))):
        raise _Bad
    source = _Source(ctx, name, tail)
    record = _built(
        SnapshotRecord, step=step, label=label, epoch=epoch, time=float(t),
        logs={k: float(v) for k, v in logs.items()},
        tensors=_Lazy("tensors", source), stats=_Lazy("stats", source),
        file=f"{SNAPSHOT_DIR}/{name}")
    return name, Indexed(FileStamp(size, version), record)


def read_index(storage: Storage, specs: Sequence[WeightSpec],
               from_file: Callable[[str], SnapshotRecord]) -> dict[str, Indexed]:
    """The usable entries of a run's index by file name; {} when there is none to use.

    Nothing here is checked against the snapshot files yet: that is the reader's job.
    `from_file` reads a snapshot file's record by its name, for the tensors or statistics
    of an entry that turn out not to be well-formed when they are first read.
    """
    try:
        if storage.is_link(INDEX_FILE):
            return {}
        with storage.open_read(INDEX_FILE) as f:
            lines = f.read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return {}
    decoder = json.JSONDecoder()
    try:
        head = decoder.decode(lines[0])
    except ValueError:
        return {}
    if not isinstance(head, dict) or head.get("format") != INDEX_FORMAT or head.get(
            "version") != INDEX_VERSION or head.get("keys") != [s.key for s in specs]:
        return {}
    order = _in_order(specs)
    ctx = _Context({s.key: s for s in specs}, order, [s.key for s in order],
                   storage.where(INDEX_FILE), from_file, [(s.dtype, False) for s in order],
                   all(s.dtype in STORED_DTYPES for s in order),
                   [{"shape": s.shape, "dtype": s.dtype, "stored_dtype": s.dtype, "lossy": False}
                    for s in order])
    with no_collection():
        return _entries(lines[1:-1], decoder, ctx)  # the last piece follows the last newline


def _entries(lines: Sequence[str], decoder: json.JSONDecoder, ctx: _Context) -> dict[str, Indexed]:
    out: dict[str, Indexed] = {}
    for line in lines:
        try:
            d, end = decoder.raw_decode(line)
            if line[end:end + 1] != " ":
                continue
            name, entry = _entry(d, line[end + 1:], ctx)
        except Exception:  # noqa: S112 - a damaged entry is one the reader does not use
            continue
        out[name] = entry
    return out


# --------------------------------------------------------------------------- many at once


class StatColumn(NamedTuple):
    """One statistic of every weight across snapshots: rows are snapshots, columns weights.

    `values` is float64, NaN where the snapshot does not store the statistic or stores
    None; `stored` says where the snapshot's statistics of the weight hold the name (None
    included), `none` where they hold None.
    """

    values: Any  # np.ndarray, float64 (snapshots, weights)
    stored: Any  # np.ndarray, bool
    none: Any  # np.ndarray, bool


def _parse_tails(records: Sequence[SnapshotRecord]) -> None:
    """Decode, in one call, the second halves of the index lines of `records` that are not
    decoded yet (each line's `_Source` keeps its own; a line that does not parse is left to
    be decoded, and refused, one by one)."""
    sources = []
    for r in records:
        lazy = r.stats
        if type(lazy) is _Lazy and lazy._value is None and type(lazy._source._tail) is str:
            sources.append(lazy._source)
    if not sources:
        return
    try:
        tails = json.loads("[" + ",".join(s._tail for s in sources) + "]")
    except ValueError:
        return
    if len(tails) == len(sources):  # one value per line (a line holding "a],[b" is refused)
        for source, tail in zip(sources, tails):
            if type(tail) is list and len(tail) == 2:
                source._tail = tail


def _undecoded(lazy: Any, part: int) -> Any:
    """Part `part` of an index line's second half, parsed and not decoded into records yet;
    None when there is none (a mapping already built, a snapshot file's record)."""
    if type(lazy) is not _Lazy or lazy._value is not None:
        return None
    tail = lazy._source._tail
    return tail[part] if type(tail) is list else None


class _Group:
    """Consecutive snapshots whose packed statistics have the same names and weights."""

    __slots__ = ("names", "weights", "keys", "rows", "raws")

    def __init__(self, names: list[str], weights: Any, keys: list[str]):
        self.names, self.weights, self.keys = names, weights, keys
        self.rows: list[int] = []
        self.raws: list[bytes] = []


def _group_for(stats: Any, ctx: _Context, last: _Group | None) -> _Group | None:
    """The group of a line's packed statistics without None or NaN: `last` when they have
    its names and weights, a new one when they are well-formed, else None (to be read as
    the mapping they are: written whole, holding None or NaN, or not well-formed)."""
    if type(stats) is not list or len(stats) != 5 or stats[3] or stats[4]:
        return None
    if last is not None and stats[0] == last.names and stats[1] == last.weights:
        return last
    try:
        names, keys = _packed_stats(stats, ctx)[:2]
    except (_Bad, ValueError):
        return None
    if len(set(names)) != len(names) or len(set(keys)) != len(keys):
        return None  # decoded as dicts, the last of a repeated name wins: let them
    return _Group(names, stats[1], keys)


def _grouped(records: Sequence[SnapshotRecord]) -> tuple[list[_Group], list[int]]:
    """The records' packed statistics in groups, and the rows to read as mappings."""
    groups: list[_Group] = []
    other: list[int] = []
    last: _Group | None = None
    for i, r in enumerate(records):
        stats = _undecoded(r.stats, 0)
        group = None if stats is None else _group_for(
            stats, r.stats._source.ctx, last)  # type: ignore[attr-defined]
        if group is not None:
            try:
                raw = base64.b64decode(stats[2], validate=True)
            except (ValueError, TypeError):
                raw = b""
            if len(raw) == 8 * len(group.names) * len(group.keys):
                if group is not last:
                    groups.append(group)
                    last = group
                group.rows.append(i)
                group.raws.append(raw)
                continue
        other.append(i)
    return groups, other


@no_collection()
def stat_columns(records: Sequence[SnapshotRecord], keys: Sequence[str],
                 names: Sequence[str]) -> dict[str, StatColumn]:
    """Statistics `names` of weights `keys` across `records`, as numpy columns: equal to
    reading every record's `stats`, without building a dict per weight and snapshot (the
    packed statistics of index lines are decoded in groups straight into the arrays)."""
    import numpy as np

    shape = (len(records), len(keys))
    out = {n: StatColumn(np.full(shape, np.nan), np.zeros(shape, bool), np.zeros(shape, bool))
           for n in names}
    column = {k: j for j, k in enumerate(keys)}
    _parse_tails(records)
    groups, other = _grouped(records)
    for g in groups:
        table = np.frombuffer(b"".join(g.raws), "<f8").reshape(
            len(g.rows), len(g.keys), len(g.names))
        where = [n for n, k in enumerate(g.keys) if k in column]
        at = [column[g.keys[n]] for n in where]
        rows = np.asarray(g.rows)[:, None]
        for name in names:
            if name in g.names:
                m = g.names.index(name)
                out[name].values[rows, at] = table[:, where, m]
                out[name].stored[rows, at] = True
    for i in other:
        for k, st in records[i].stats.items():
            j = column.get(k)
            for name in names if j is not None else ():
                if name in st:
                    v = st[name]
                    out[name].stored[i, j] = True
                    if v is None:
                        out[name].none[i, j] = True
                    elif isinstance(v, (int, float)):
                        out[name].values[i, j] = float(v)
    return out


@no_collection()
def lossy_dtypes(records: Sequence[SnapshotRecord]) -> set[str]:
    """The stored dtypes of tensors stored lossily in any of `records`, equal to reading
    every record's `tensors`: an index line whose tensors are the header's weights stored
    as their own dtypes answers without a record being built."""
    _parse_tails(records)
    out: set[str] = set()
    for r in records:
        t = _undecoded(r.tensors, 1)
        if type(t) is list:
            ctx = r.tensors._source.ctx  # type: ignore[attr-defined]
            try:
                stored = _packed_tensors(t, ctx)[3]
            except (_Bad, ValueError):
                stored = None
            if stored is not None:
                if stored is not ctx.native:
                    out.update(x[0] for x in stored if x[1])
                continue
        out.update(rec.stored_dtype for rec in r.tensors.values() if rec.lossy)
    return out
