"""Reading a run: `load_run`, `Run`, `verify_run`, and the checks every read goes through.

Only complete snapshots are listed; every tensor is checked against its
record (the .npy header's shape and dtype, the file's size, and once per
file its SHA-256) before numpy sees it, and nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

import keras_weightwatch.run.format as run_format

from ..errors import WeightWatchError
from .format import (
    HEADER_FILE,
    SNAPSHOT_DIR,
    SNAPSHOT_FILE_RE,
    TENSOR_DIR,
    Derivation,
    LayerInfo,
    Samples,
    SnapshotRecord,
    TensorRecord,
    WeightSpec,
    check_header,
    check_layout,
    content_hash,
    from_storage,
)
from .index import StatColumn, lossy_dtypes, read_index, stat_columns
from .storage import FileStamp, LocalStorage, Storage


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The result of re-checking every file of a run.

    Attributes:
        path: The run directory.
        snapshots: How many snapshots were checked.
        files: How many distinct tensor files were checked (the stored input samples' too).
        problems: One line per damaged or missing file (empty when all is well).

    Example: see `verify_run`.
    """

    path: str
    snapshots: int
    files: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when verification found no problem."""
        return not self.problems


# --------------------------------------------------------------------------- hashes


def hash_stream(f: Any, chunk: int = 1 << 22, hash: str = "sha256") -> str:
    """The digest (`"sha256"` or `"blake3"`) of everything a binary file object has left.

    A local file read from its start is memory-mapped and hashed in one call (no copies;
    BLAKE3 on every core); any other stream in chunks of `chunk` bytes."""
    h = content_hash(hash, threads=True)
    mapped = _mapped(f)
    if mapped is not None:
        with mapped:
            h.update(mapped)
        return h.hexdigest()
    while True:
        b = f.read(chunk)
        if not b:
            break
        h.update(b)
    return h.hexdigest()


def _mapped(f: Any) -> mmap.mmap | None:
    """A read-only map of a local file object positioned at its start; None for anything
    else (an object store's stream, an empty file)."""
    try:
        if f.tell() != 0:
            return None
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def hash_file(path: str, chunk: int = 1 << 22, hash: str = "sha256") -> str:
    """The digest (`"sha256"` or `"blake3"`) of a local file."""
    with LocalStorage(os.path.dirname(path)).open_read(os.path.basename(path)) as f:
        return hash_stream(f, chunk, hash)


# --------------------------------------------------------------------------- tensor files


def tensor_name(rec: TensorRecord) -> str:
    """The run-relative name of a record's .npy file (always `tensors/<digest>.npy`)."""
    return f"{TENSOR_DIR}/{rec.digest}.npy"


def _safe_tensor_name(storage: Storage, rec: TensorRecord) -> str:
    """The record's file, refused when it is a link or resolves outside the run."""
    name = tensor_name(rec)
    if storage.is_link(name):
        raise WeightWatchError(
            f"{storage.where(name)}: tensor file is a symbolic link; refusing to follow it"
        )
    if not storage.is_inside(name):
        raise WeightWatchError(
            f"{storage.where(name)}: resolves to a place outside the run; refusing to read it"
        )
    return name


def _read_npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), dtype


def check_npy_header(storage: Storage, name: str, rec: TensorRecord) -> None:
    """Check a .npy file's header and size against its record, reading no data."""
    where = storage.where(name)
    try:
        with storage.open_read(name) as f:
            shape, dtype = _read_npy_header(f)
            offset = f.tell()
        size = storage.size(name)
    except FileNotFoundError:
        raise WeightWatchError(f"{where}: tensor file is missing") from None
    except Exception as e:  # any malformed header: numpy raises several kinds
        raise WeightWatchError(f"{where}: not a readable .npy file ({e})") from None
    check_layout(where, shape, dtype, rec)
    expected = offset + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise WeightWatchError(
            f"{where}: {size} bytes, expected {expected} for {dtype.name}{list(shape)} "
            "(truncated or replaced)"
        )


def read_tensor(storage: Storage, rec: TensorRecord, *, mmap: bool) -> np.ndarray:
    """A stored tensor as the weight's dtype, after the checks of `check_layout`.

    The one way arrays come out of a run: the file's header is checked before
    numpy can allocate what it claims, and the loaded array once more. A tensor
    stored as parts is assembled from them (memory-mapped when one part holds it all).
    """
    if not rec.parts:
        return _read_file(storage, rec, mmap=mmap)
    pieces = rec.pieces()
    if len(pieces) == 1:
        return _read_file(storage, pieces[0], mmap=mmap)
    out = None
    for part, piece in zip(rec.parts, pieces):
        arr = _read_file(storage, piece, mmap=True)
        if out is None:
            out = np.empty(rec.shape, dtype=arr.dtype)
        out[tuple(slice(o, o + n) for o, n in zip(part.offset, part.shape))] = arr
    return np.asarray(out)


def _read_file(storage: Storage, rec: TensorRecord, *, mmap: bool) -> np.ndarray:
    name = _safe_tensor_name(storage, rec)
    where = storage.where(name)
    check_npy_header(storage, name, rec)
    try:
        arr = storage.load_npy(name, mmap=mmap)
    except FileNotFoundError:
        raise WeightWatchError(f"{where}: tensor file is missing") from None
    except (ValueError, OSError, EOFError) as e:
        raise WeightWatchError(f"{where}: not a readable .npy file ({e})") from None
    check_layout(where, arr.shape, arr.dtype, rec)
    return from_storage(arr, rec)


def check_tensor_file(storage: Storage, rec: TensorRecord) -> str | None:
    """None when the record's file is present and intact, else one line saying what is wrong."""
    try:
        name = _safe_tensor_name(storage, rec)
    except WeightWatchError as e:
        return str(e)
    where = storage.where(name)
    try:
        size = storage.size(name)
    except FileNotFoundError:
        return f"{where}: missing"
    except OSError as e:
        return f"{where}: cannot read ({e.strerror or e})"
    if rec.bytes >= 0 and size != rec.bytes:
        return f"{where}: {size} bytes, expected {rec.bytes} (truncated or replaced)"
    try:
        with storage.open_read(name) as f:
            digest = hash_stream(f, hash=rec.hash)
    except OSError as e:
        return f"{where}: cannot read ({e.strerror or e})"
    if digest != rec.sha256:
        return (
            f"{where}: checksum mismatch ({rec.hash} {digest[:12]}..., "
            f"expected {rec.digest[:12]}...)"
        )
    return None


# --------------------------------------------------------------------------- manifests


def read_json(storage: Storage, name: str, what: str) -> Any:
    """A run's JSON file, refused when it is a link, too large, or not JSON."""
    where = storage.where(name)
    try:
        if storage.is_link(name):
            raise WeightWatchError(f"{where}: {what} is a symbolic link; refusing to follow it")
        size = storage.size(name)
        if size > run_format.MAX_JSON_BYTES:  # read at each call, so it can be lowered
            raise WeightWatchError(f"{where}: {what} is {size} bytes, too large to be one")
        with storage.open_read(name) as f:
            data = f.read()
    except FileNotFoundError:
        raise WeightWatchError(f"{where}: {what} not found") from None
    except IsADirectoryError:
        raise WeightWatchError(f"{where}: {what} is a directory") from None
    except OSError as e:
        raise WeightWatchError(f"{where}: cannot read {what}: {e.strerror or e}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightWatchError(f"{where}: {what} is not valid JSON ({e})") from None


def read_header(storage: Storage) -> dict[str, Any]:
    return check_header(read_json(storage, HEADER_FILE, "run header"), storage.where(HEADER_FILE))


def list_snapshot_files(storage: Storage) -> list[str]:
    """The names of the snapshot files (complete snapshots), sorted."""
    if storage.exists(SNAPSHOT_DIR) and not storage.is_inside(SNAPSHOT_DIR):
        raise WeightWatchError(
            f"{storage.where(SNAPSHOT_DIR)}: resolves to a place outside the run; "
            "refusing to read it"
        )
    try:
        names = storage.listdir(SNAPSHOT_DIR)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise WeightWatchError(
            f"{storage.where(SNAPSHOT_DIR)}: cannot list snapshots ({e.strerror or e})"
        ) from None
    return sorted(n for n in names if SNAPSHOT_FILE_RE.match(n))


def _stamps(storage: Storage) -> dict[str, FileStamp]:
    try:
        return storage.stamps(SNAPSHOT_DIR)
    except OSError:
        return {}


def read_snapshots(storage: Storage, specs: Sequence[WeightSpec] | None = None, *,
                   use_index: bool = True) -> list[SnapshotRecord]:
    """Every complete snapshot's record, in file name order.

    With the run's `specs` (its header's weights), a snapshot is taken from the index
    (`index.py`) when the entry's name and stamp match the snapshot file's; every other
    snapshot file is read and checked.
    """
    names = list_snapshot_files(storage)

    def from_file(name: str) -> SnapshotRecord:
        file = f"{SNAPSHOT_DIR}/{name}"
        data = read_json(storage, file, "snapshot")
        return SnapshotRecord.from_json(data, file, where=storage.where(file))

    index = (read_index(storage, specs, from_file) if use_index and specs is not None and names
             else {})
    stamps = _stamps(storage) if index else {}
    snaps = []
    for name in names:
        entry = index.get(name)
        snaps.append(entry.record if entry is not None and stamps.get(name) == entry.stamp
                     else from_file(name))
    if len({s.step for s in snaps}) != len(snaps):
        raise WeightWatchError(f"{storage.path}: two snapshot files claim the same step")
    return snaps


# --------------------------------------------------------------------------- the run


class Run:
    """A run directory written by `WeightWatch`, opened for reading.

    Open one with `load_run(path)`. Arrays are memory-mapped from their `.npy`
    files and checked against their SHA-256 when read, so a large run opens
    instantly and a damaged file raises `WeightWatchError` instead of
    returning wrong numbers.

    Steps are TensorBoard steps: the epoch index Keras passes to callbacks
    (0 after the first epoch); the initial snapshot has the step before the
    first epoch and is also reachable as `"initial"`. `"last"` names the last
    snapshot.

    Example:

    >>> run = load_run("runs/exp1")  # the README's quickstart run
    >>> run.epochs[:3], run.epochs[-1]
    ([0, 1, 2], 19)
    >>> run.weights(2)["hidden/kernel"].shape
    (4, 8)
    """

    def __init__(self, path: str, header: Mapping[str, Any], snapshots: Sequence[SnapshotRecord],
                 storage: Storage | None = None):
        self.path = path
        self.storage: Storage = storage if storage is not None else LocalStorage(path)
        self.header = header
        self._snapshots = tuple(sorted(snapshots, key=lambda s: s.step))
        self._by_step = {s.step: s for s in self._snapshots}
        self._verified: set[str] = set()
        self._specs = tuple(WeightSpec.from_json(w) for w in header.get("weights", []))
        self._derived = tuple(Derivation.from_json(d, f"{path}: model derived[{i}]") for i, d
                              in enumerate(header.get("model", {}).get("derived", [])))

    # -- listing
    @property
    def snapshots(self) -> tuple[SnapshotRecord, ...]:
        """Every complete snapshot, ordered by step."""
        return self._snapshots

    @property
    def steps(self) -> list[int]:
        """The steps of all snapshots, the initial one included."""
        return [s.step for s in self._snapshots]

    @property
    def epochs(self) -> list[int]:
        """The steps of the snapshots taken after an epoch, in order."""
        return [s.step for s in self._snapshots if s.label == "epoch"]

    @property
    def initial(self) -> SnapshotRecord | None:
        """The snapshot of the weights before training, if the run has one."""
        for s in self._snapshots:
            if s.label == "initial":
                return s
        return None

    @property
    def specs(self) -> tuple[WeightSpec, ...]:
        """Every weight of the model, in `model.weights` order."""
        return self._specs

    @property
    def layers(self) -> tuple[LayerInfo, ...]:
        """The model's top-level layers with their parameter counts."""
        return tuple(LayerInfo.from_json(d) for d in self.model.get("layers", []))

    @property
    def model(self) -> Mapping[str, Any]:
        """The model's description as recorded in the header."""
        return self.header.get("model", {})

    @property
    def settings(self) -> Mapping[str, Any]:
        """The callback's settings when the run was last written."""
        return self.header.get("settings", {})

    @property
    def samples(self) -> Samples:
        """The inputs stored with the run (`sample_images`, `feature_data`) and the layers
        whose kernel responses the images were drawn with; empty for runs without them."""
        return Samples.from_json(self.header.get("samples"), self.storage.where(HEADER_FILE))

    def sample_images(self) -> np.ndarray | None:
        """The stored sample images, channels last `(N, H, W, C)` (memory-mapped), or None."""
        stored = self.samples.sample_images
        return None if stored is None else self._load(stored.tensor, mmap=True, verify=True)

    def feature_data(self) -> np.ndarray | None:
        """The stored sample of inputs `(samples, features)` (memory-mapped), or None."""
        stored = self.samples.feature_data
        return None if stored is None else self._load(stored.tensor, mmap=True, verify=True)

    @property
    def versions(self) -> Mapping[str, str]:
        """Package, Keras and backend versions that wrote the run."""
        return self.header.get("versions", {})

    def history(self) -> dict[str, list[tuple[int, float]]]:
        """Each recorded metric as a list of (step, value), in step order."""
        out: dict[str, list[tuple[int, float]]] = {}
        for s in self._snapshots:
            for name, value in s.logs.items():
                out.setdefault(name, []).append((s.step, value))
        return out

    def stat_columns(self, names: Sequence[str]) -> dict[str, StatColumn]:
        """Stored statistics `names` of every weight (`specs` order) across every snapshot,
        as numpy arrays (snapshots x weights; see `StatColumn`): what reading each snapshot's
        `stats` gives, decoded without a dict per weight and snapshot (a long run's `show`)."""
        return stat_columns(self._snapshots, [s.key for s in self._specs], names)

    def lossy_dtypes(self) -> set[str]:
        """The stored dtypes of tensors that any snapshot stores lossily (float weights kept
        in a narrower dtype); empty for runs that keep every weight as it is."""
        return lossy_dtypes(self._snapshots)

    # -- access
    def snapshot(self, step: int | str = "last") -> SnapshotRecord:
        """The snapshot at `step` (an int, `"initial"` or `"last"`)."""
        if not self._snapshots:
            raise WeightWatchError(f"{self.path}: the run has no complete snapshot yet")
        if step == "last":
            return self._snapshots[-1]
        if step == "initial":
            init = self.initial
            if init is None:
                raise WeightWatchError(f"{self.path}: the run has no initial snapshot")
            return init
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(
                f"step must be an int, 'initial' or 'last'. Received: step={step!r}"
            )
        try:
            return self._by_step[int(step)]
        except KeyError:
            raise WeightWatchError(
                f"{self.path}: no snapshot at step {step}; steps are {self.steps}"
            ) from None

    def logs(self, step: int | str = "last") -> dict[str, float]:
        """The loss and metrics recorded with the snapshot at `step`."""
        return dict(self.snapshot(step).logs)

    @property
    def derived(self) -> tuple[Derivation, ...]:
        """How the model's effective kernels derive from its stored weights (LoRA layers,
        quantized layers), in the order they apply; empty for a run without any."""
        return self._derived

    def weights(
        self,
        step: int | str = "last",
        *,
        keys: Iterable[str] | None = None,
        mmap: bool = True,
        verify: bool = True,
        effective: bool = False,
    ) -> dict[str, np.ndarray]:
        """Weight key -> array, as `get_weights()` returned it at `step`.

        Args:
            step: An int step, `"initial"` or `"last"`. Defaults to `"last"`.
            keys: Only these weights. Defaults to all of them.
            mmap: Memory-map the arrays (read-only) instead of reading them.
                Defaults to True.
            verify: Check each file's SHA-256 once before returning it.
                Defaults to True.
            effective: Give each derived kernel (`derived`: a LoRA layer's
                `base + (alpha/rank) A @ B`, a quantized layer's dequantized kernel) as the
                layer computes with it, in float32, instead of the stored variable.
                Defaults to False.
        """
        snap = self.snapshot(step)
        wanted = self._ordered_keys(snap) if keys is None else list(keys)
        for key in wanted:
            if key not in snap.tensors:
                raise WeightWatchError(
                    f"{self.path}: snapshot {snap.name} has no weight {key!r}"
                )
        load = self._loader(snap, mmap=mmap, verify=verify, effective=effective)
        return {key: load(key) for key in wanted}

    def _loader(self, snap: SnapshotRecord, *, mmap: bool, verify: bool,
                effective: bool) -> Callable[[str], np.ndarray]:
        """key -> its array in `snap` (effective kernels derived from the inputs they need)."""

        def stored(key: str) -> Any:
            rec = snap.tensors.get(key)
            return None if rec is None else self._load(rec, mmap=mmap, verify=verify)

        if not effective or not self._derived:
            return stored
        from ..derive import effective_lookup

        return effective_lookup(stored, self._derived)  # type: ignore[return-value]

    def tensor(self, key: str, step: int | str = "last", *, mmap: bool = True,
               effective: bool = False) -> np.ndarray:
        """One weight's array at `step` (see `weights` for `effective`)."""
        return self.weights(step, keys=[key], mmap=mmap, effective=effective)[key]

    def iter_tensors(
        self, step: int | str = "last", *, verify: bool = True, effective: bool = False
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (key, memory-mapped array) one at a time, for runs too large to hold (see
        `weights` for `effective`)."""
        snap = self.snapshot(step)
        load = self._loader(snap, mmap=True, verify=verify, effective=effective)
        for key in self._ordered_keys(snap):
            yield key, load(key)

    def _ordered_keys(self, snap: SnapshotRecord) -> list[str]:
        """The snapshot's keys in `model.weights` order (the order `get_weights()` uses)."""
        order = [s.key for s in self.specs if s.key in snap.tensors]
        seen = set(order)
        return order + sorted(k for k in snap.tensors if k not in seen)

    def _load(self, rec: TensorRecord, *, mmap: bool, verify: bool) -> np.ndarray:
        for piece in rec.pieces() if verify else ():
            if piece.file not in self._verified:
                problem = check_tensor_file(self.storage, piece)
                if problem:
                    raise WeightWatchError(problem)
                self._verified.add(piece.file)
        return read_tensor(self.storage, rec, mmap=mmap)

    def verify(self) -> VerifyReport:
        """Re-check every snapshot's every tensor file: present, intact, as described.

        The run is listed again first, so snapshots written since it was opened count too,
        and every snapshot file is read (the index is not used).
        """
        return _verify(open_run(self.storage, use_index=False))

    def spectral(self, step: int | str = "last", layers: Any = None, traps: bool = False) -> Any:
        """The spectral metrics of every Dense and convolution kernel of a snapshot, computed
        from its tensors: `keras_weightwatch.spectral.spectral(self, step, layers,
        traps=traps)`, which returns a `SpectralResult` (works on runs written without
        `spectral_freq` too)."""
        from ..spectral import spectral

        return spectral(self, step, layers, traps=traps)

    def __repr__(self) -> str:
        return f"Run({self.path!r}, steps={self.steps})"

    def _repr_html_(self) -> str:
        from ..notebook import run_html

        return run_html(self)


def open_run(storage: Storage, *, use_index: bool = True) -> Run:
    """The run a storage holds (what `load_run` does for a local directory).

    `use_index=False` reads every snapshot file, as for a run without an index.
    """
    if not storage.isdir():
        raise WeightWatchError(f"{storage.path}: no such run directory")
    header = read_header(storage)
    specs = [WeightSpec.from_json(w) for w in header.get("weights", [])]
    return Run(storage.path, header, read_snapshots(storage, specs, use_index=use_index), storage)


def load_run(path: str | os.PathLike[str],
             storage_options: Mapping[str, Any] | None = None) -> Run:
    """Open a run directory written by `WeightWatch`.

    Only complete snapshots are listed: a snapshot whose writing was
    interrupted is invisible. Nothing is unpickled, ever.

    Args:
        path: The run directory (the callback's `log_dir`): a local path or
            an fsspec URL such as `s3://bucket/runs/exp1` (needs
            `pip install 'keras-weightwatch[s3]'`). A run in an object store
            is read lazily: opening it reads its header and snapshot records,
            each tensor object is fetched when it is read.
        storage_options: For a URL, options of its fsspec file system
            (credentials, `endpoint_url`, ...); never stored or shown.
            Defaults to None (the protocol's own configuration: for S3 the
            `AWS_*` environment variables and `~/.aws` files).

    Returns:
        A `Run`.

    Raises:
        WeightWatchError: the directory is missing, is not a run, or its
            header or a snapshot file is malformed.

    Example:

    >>> run = load_run("runs/exp1")   # doctest: +SKIP
    >>> run.weights("initial")        # doctest: +SKIP
    {'dense/kernel': memmap(...), 'dense/bias': memmap(...)}
    """
    from .remote import open_storage

    return open_run(open_storage(path, storage_options))


def is_run(path: str | os.PathLike[str] | Storage,
           storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when `path` (a directory, a URL, or a storage) holds a run header."""
    from .remote import open_storage

    return open_storage(path, storage_options).isfile(HEADER_FILE)


def _verify(run: Run) -> VerifyReport:
    problems: list[str] = []
    checked: dict[str, str | None] = {}
    for snap in run.snapshots:
        for key, rec in snap.tensors.items():
            for piece in rec.pieces():
                if piece.file not in checked:
                    checked[piece.file] = check_tensor_file(run.storage, piece)
                problem = checked[piece.file]
                if problem:
                    problems.append(f"snapshot {snap.name}, weight {key}: {problem}")
    samples = run.samples
    for name, stored in (("sample_images", samples.sample_images),
                         ("feature_data", samples.feature_data)):
        if stored is not None:
            problem = check_tensor_file(run.storage, stored.tensor)
            checked[stored.tensor.file] = problem
            if problem:
                problems.append(f"stored {name}: {problem}")
    return VerifyReport(
        path=run.path, snapshots=len(run.snapshots), files=len(checked), problems=tuple(problems)
    )


def verify_run(path: str | os.PathLike[str],
               storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Re-check every checksum of a run; see `Run.verify`.

    Raises `WeightWatchError` only when the run cannot be opened at all; each
    damaged or missing tensor file is a line of the report's `problems`.

    Example (the README's quickstart run: 21 snapshots of 4 tensors, and its stored
    `feature_data`):

    >>> from keras_weightwatch import verify_run
    >>> report = verify_run("runs/exp1")
    >>> report.ok, report.snapshots, report.files, report.problems
    (True, 21, 85, ())
    """
    from .remote import open_storage

    return _verify(open_run(open_storage(path, storage_options), use_index=False))
