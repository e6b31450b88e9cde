"""The run directory: the one module that knows its format.

Layout (see docs/FORMAT.md for the full description)::

    RUN/
      weightwatch.json          run header: format version, versions, model, weights, settings
      snapshots/initial.json    one file per complete snapshot: step, logs, tensors, statistics
      snapshots/epoch_000003.json
      tensors/<sha256>.npy      plain .npy files named by the SHA-256 of their bytes
      .weightwatch.lock         held (flock) while a WeightWatch callback writes the run

Every file is written under a temporary name and renamed into place. Tensor
files are written before the snapshot file that names them, so a snapshot is
visible only once all its tensors are on disk: a process killed at any moment
leaves a run whose listed snapshots all load and verify. Tensor files are
content-addressed, so a tensor that did not change since an earlier snapshot
(a frozen layer) is stored once.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .capture import LayerInfo, ModelInfo, Snapshot, WeightSpec
from .errors import RunBusyError, WeightWatchError

FORMAT_NAME = "keras-weightwatch-run"
FORMAT_VERSION = 1
HEADER_FILE = "weightwatch.json"
SNAPSHOT_DIR = "snapshots"
TENSOR_DIR = "tensors"
LOCK_FILE = ".weightwatch.lock"
TMP_PREFIX = ".tmp-"

_TENSOR_FILE_RE = re.compile(r"^tensors/([0-9a-f]{64})\.npy$")
_SNAPSHOT_FILE_RE = re.compile(r"^(initial|epoch_-?\d{6,})\.json$")
# Header and snapshot files are small; anything larger is not one of ours.
_MAX_JSON_BYTES = 256 * 1024 * 1024
# Refuse shapes that claim more elements than any real weight tensor holds.
_MAX_ELEMENTS = 1 << 40

# dtypes numpy stores natively in .npy, and the ml_dtypes ones stored as raw bits.
_NATIVE_DTYPES = frozenset(
    [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
)
_BITS_DTYPES = {
    "bfloat16": "uint16",
    "float8_e4m3fn": "uint8",
    "float8_e5m2": "uint8",
    "float8_e4m3fnuz": "uint8",
    "float8_e5m2fnuz": "uint8",
}


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """Where a snapshot's tensor lives and how to check it.

    Attributes:
        file: The path of the `.npy` file, relative to the run directory.
        sha256: SHA-256 of the whole file (also its name).
        shape: The tensor's shape.
        dtype: The tensor's dtype as Keras reported it.
        stored_dtype: The dtype of the array in the `.npy` file (raw bits for
            dtypes numpy lacks, such as bfloat16; a narrower float for a lossy
            reduced-precision store).
        lossy: True when `stored_dtype` is a reduced precision of `dtype`.
        bytes: The file's size in bytes.

    Example (the README's quickstart run):

    >>> from keras_weightwatch import load_run
    >>> rec = load_run("runs/exp1").snapshot(3).tensors["hidden/kernel"]
    >>> rec.shape, rec.dtype, rec.lossy, rec.file == f"tensors/{rec.sha256}.npy"
    ((4, 8), 'float32', False, True)
    """

    file: str
    sha256: str
    shape: tuple[int, ...]
    dtype: str
    stored_dtype: str
    lossy: bool
    bytes: int

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclasses.dataclass(frozen=True)
class SnapshotRecord:
    """A complete snapshot as the run directory lists it (the arrays stay on disk).

    Attributes:
        step: TensorBoard step (epoch index; one less than the first epoch for the
            initial weights).
        label: `"initial"` or `"epoch"`.
        epoch: The epoch index Keras reported, or None for the initial weights.
        time: When the weights were captured (seconds since the Unix epoch).
        logs: The epoch's loss and metrics.
        tensors: Weight key -> where its array is stored.
        stats: Weight key -> statistics (norm, mean, ...) computed when it was written.
        file: The snapshot file, relative to the run directory.

    Example (the README's quickstart run):

    >>> from keras_weightwatch import load_run
    >>> snap = load_run("runs/exp1").snapshot(3)
    >>> snap.step, snap.label, snap.epoch, snap.name, sorted(snap.logs)
    (3, 'epoch', 3, '3', ['loss', 'mae'])
    >>> sorted(snap.stats["hidden/kernel"])
    ['inf_count', 'l2_norm', 'max_abs', 'mean', 'nan_count', 'size', 'std', 'update_ratio']
    >>> load_run("runs/exp1").snapshot("initial").step
    -1
    """

    step: int
    label: str
    epoch: int | None
    time: float
    logs: Mapping[str, float]
    tensors: Mapping[str, TensorRecord]
    stats: Mapping[str, Mapping[str, float]]
    file: str

    @property
    def name(self) -> str:
        """`"initial"` or the step as text: how the CLI and `diff` name a snapshot."""
        return "initial" if self.label == "initial" else str(self.step)


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The result of re-checking every file of a run.

    Attributes:
        path: The run directory.
        snapshots: How many snapshots were checked.
        files: How many distinct tensor files were checked.
        problems: One line per damaged or missing file (empty when all is well).

    Example: see `verify_run`.
    """

    path: str
    snapshots: int
    files: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


# --------------------------------------------------------------------------- helpers


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, chunks: Iterable[bytes | memoryview], durable: bool) -> None:
    """Write `chunks` to `path` via a temporary file in the same directory and a rename."""
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()


def _npy_header(arr: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.lib.format.write_array_header_1_0(bio, np.lib.format.header_data_from_array_1_0(arr))
    return bio.getvalue()


def _raw_bytes(arr: np.ndarray) -> memoryview:
    flat = np.ascontiguousarray(arr).reshape(-1)
    return memoryview(flat.view(np.uint8))


def storage_array(arr: np.ndarray, dtype_name: str, store_dtype: str | None = None) -> tuple:
    """The array as it goes into the .npy file: (array, stored dtype name, lossy)."""
    lossy = store_dtype is not None and store_dtype != dtype_name
    if lossy and dtype_name in ("float32", "float64"):
        if store_dtype in _BITS_DTYPES:
            import ml_dtypes

            cast = arr.astype(getattr(ml_dtypes, store_dtype))
            return cast.view(_BITS_DTYPES[store_dtype]), store_dtype, True
        return arr.astype(store_dtype), store_dtype, True
    if dtype_name in _BITS_DTYPES:
        return arr.view(_BITS_DTYPES[dtype_name]), dtype_name, False
    if dtype_name not in _NATIVE_DTYPES:
        raise WeightWatchError(
            f"cannot store a tensor of dtype {dtype_name!r}; stored dtypes are "
            f"{sorted(_NATIVE_DTYPES | set(_BITS_DTYPES))}"
        )
    return arr, dtype_name, False


def _from_storage(arr: np.ndarray, rec: TensorRecord) -> np.ndarray:
    if rec.stored_dtype in _BITS_DTYPES:
        import ml_dtypes

        arr = arr.view(getattr(ml_dtypes, rec.stored_dtype))
    if rec.lossy and rec.dtype != rec.stored_dtype:
        arr = np.asarray(arr, dtype=rec.dtype)
    return arr


def hash_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _check_name(name: Any, what: str, where: str) -> str:
    if not isinstance(name, str):
        raise WeightWatchError(f"{where}: {what} must be a string, found {name!r}")
    return name


def _as_shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 32:
        raise WeightWatchError(
            f"{where}: shape must be a list of at most 32 sizes, found {value!r}"
        )
    shape = []
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise WeightWatchError(f"{where}: shape sizes must be integers >= 0, found {value!r}")
        shape.append(s)
    if math.prod(shape) > _MAX_ELEMENTS or any(s > _MAX_ELEMENTS for s in shape):
        raise WeightWatchError(f"{where}: shape {value!r} is larger than any stored tensor can be")
    return tuple(shape)


def _tensor_record(d: Any, where: str) -> TensorRecord:
    if not isinstance(d, dict):
        raise WeightWatchError(f"{where}: a tensor entry must be an object, found {d!r}")
    file = _check_name(d.get("file"), "file", where)
    m = _TENSOR_FILE_RE.match(file)
    if not m:
        raise WeightWatchError(
            f"{where}: tensor file {file!r} is not of the form tensors/<sha256>.npy inside the run"
        )
    sha = _check_name(d.get("sha256"), "sha256", where)
    if sha != m.group(1):
        raise WeightWatchError(f"{where}: tensor file {file!r} does not match its sha256 {sha!r}")
    dtype = _check_name(d.get("dtype"), "dtype", where)
    stored = _check_name(d.get("stored_dtype", dtype), "stored_dtype", where)
    for name in (dtype, stored):
        if name not in _NATIVE_DTYPES and name not in _BITS_DTYPES:
            raise WeightWatchError(f"{where}: unknown dtype {name!r}")
    nbytes = d.get("bytes", -1)
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise WeightWatchError(f"{where}: bytes must be an integer, found {nbytes!r}")
    return TensorRecord(
        file=file,
        sha256=sha,
        shape=_as_shape(d.get("shape"), where),
        dtype=dtype,
        stored_dtype=stored,
        lossy=bool(d.get("lossy", False)),
        bytes=nbytes,
    )


def _read_json(path: str, what: str) -> Any:
    try:
        if os.path.islink(path):
            raise WeightWatchError(f"{path}: {what} is a symbolic link; refusing to follow it")
        size = os.path.getsize(path)
        if size > _MAX_JSON_BYTES:
            raise WeightWatchError(f"{path}: {what} is {size} bytes, too large to be one")
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise WeightWatchError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise WeightWatchError(f"{path}: {what} is a directory") from None
    except OSError as e:
        raise WeightWatchError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightWatchError(f"{path}: {what} is not valid JSON ({e})") from None


def _parse_snapshot(data: Any, file: str) -> SnapshotRecord:
    where = file
    if not isinstance(data, dict):
        raise WeightWatchError(f"{where}: a snapshot must be a JSON object")
    step = data.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise WeightWatchError(f"{where}: step must be an integer, found {step!r}")
    label = data.get("label")
    if label not in ("initial", "epoch"):
        raise WeightWatchError(f"{where}: label must be 'initial' or 'epoch', found {label!r}")
    epoch = data.get("epoch")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise WeightWatchError(f"{where}: epoch must be an integer or null, found {epoch!r}")
    t = data.get("time", 0.0)
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise WeightWatchError(f"{where}: time must be a number, found {t!r}")
    logs = data.get("logs", {})
    if not isinstance(logs, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in logs.values()
    ):
        raise WeightWatchError(f"{where}: logs must map names to numbers")
    tensors_raw = data.get("tensors")
    if not isinstance(tensors_raw, dict):
        raise WeightWatchError(f"{where}: tensors must be an object")
    tensors = {
        str(k): _tensor_record(v, f"{where}: tensor {k!r}") for k, v in tensors_raw.items()
    }
    stats = data.get("stats", {})
    if not isinstance(stats, dict):
        raise WeightWatchError(f"{where}: stats must be an object")
    for values in stats.values():
        if not isinstance(values, dict) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            for v in values.values()
        ):
            raise WeightWatchError(f"{where}: stats must map weight keys to numbers")
    return SnapshotRecord(
        step=step,
        label=label,
        epoch=epoch,
        time=float(t),
        logs={str(k): float(v) for k, v in logs.items()},
        tensors=tensors,
        stats=stats,
        file=file,
    )


def snapshot_file_name(label: str, step: int) -> str:
    return "initial.json" if label == "initial" else f"epoch_{step:06d}.json"


# --------------------------------------------------------------------------- reading


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

    def __init__(self, path: str, header: Mapping[str, Any], snapshots: Sequence[SnapshotRecord]):
        self.path = path
        # Files are found from here, so a later os.chdir does not lose the run.
        self._root = os.path.abspath(path)
        self.header = header
        self._snapshots = tuple(sorted(snapshots, key=lambda s: s.step))
        self._by_step = {s.step: s for s in self._snapshots}
        self._verified: set[str] = set()
        self._specs = tuple(WeightSpec.from_json(w) for w in header.get("weights", []))

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
        return tuple(_layer_info(d) for d in self.header.get("model", {}).get("layers", []))

    @property
    def model(self) -> Mapping[str, Any]:
        """The model's description as recorded in the header."""
        return self.header.get("model", {})

    @property
    def settings(self) -> Mapping[str, Any]:
        """The callback's settings when the run was last written."""
        return self.header.get("settings", {})

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

    def weights(
        self,
        step: int | str = "last",
        *,
        keys: Iterable[str] | None = None,
        mmap: bool = True,
        verify: bool = True,
    ) -> dict[str, np.ndarray]:
        """Weight key -> array, as `get_weights()` returned it at `step`.

        Args:
            step: An int step, `"initial"` or `"last"`. Defaults to `"last"`.
            keys: Only these weights. Defaults to all of them.
            mmap: Memory-map the arrays (read-only) instead of reading them.
                Defaults to True.
            verify: Check each file's SHA-256 once before returning it.
                Defaults to True.
        """
        snap = self.snapshot(step)
        wanted = self._ordered_keys(snap) if keys is None else list(keys)
        out = {}
        for key in wanted:
            if key not in snap.tensors:
                raise WeightWatchError(
                    f"{self.path}: snapshot {snap.name} has no weight {key!r}"
                )
            out[key] = self._load(snap.tensors[key], mmap=mmap, verify=verify)
        return out

    def tensor(self, key: str, step: int | str = "last", *, mmap: bool = True) -> np.ndarray:
        """One weight's array at `step`."""
        return self.weights(step, keys=[key], mmap=mmap)[key]

    def iter_tensors(
        self, step: int | str = "last", *, verify: bool = True
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (key, memory-mapped array) one at a time, for runs too large to hold."""
        snap = self.snapshot(step)
        for key in self._ordered_keys(snap):
            yield key, self._load(snap.tensors[key], mmap=True, verify=verify)

    def _ordered_keys(self, snap: SnapshotRecord) -> list[str]:
        """The snapshot's keys in `model.weights` order (the order `get_weights()` uses)."""
        order = [s.key for s in self.specs if s.key in snap.tensors]
        seen = set(order)
        return order + sorted(k for k in snap.tensors if k not in seen)

    def _file_path(self, rec: TensorRecord) -> str:
        path = os.path.join(self._root, TENSOR_DIR, rec.sha256 + ".npy")
        if os.path.islink(path):
            raise WeightWatchError(f"{path}: tensor file is a symbolic link; refusing to follow it")
        _check_inside(self._root, path)
        return path

    def _load(self, rec: TensorRecord, *, mmap: bool, verify: bool) -> np.ndarray:
        path = self._file_path(rec)
        if verify and rec.file not in self._verified:
            problem = _check_tensor_file(path, rec)
            if problem:
                raise WeightWatchError(problem)
            self._verified.add(rec.file)
        _check_npy_header(path, rec)  # before np.load can allocate what a header claims
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except FileNotFoundError:
            raise WeightWatchError(f"{path}: tensor file is missing") from None
        except (ValueError, OSError, EOFError) as e:
            raise WeightWatchError(f"{path}: not a readable .npy file ({e})") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
            raise WeightWatchError(f"{path}: holds Python objects; refusing to load it")
        # bfloat16 and the float8 types are stored as their raw bits (uint16, uint8).
        file_dtype = _BITS_DTYPES.get(rec.stored_dtype, rec.stored_dtype)
        if tuple(arr.shape) != rec.shape or arr.dtype.name != file_dtype:
            raise WeightWatchError(
                f"{path}: holds {arr.dtype.name}{list(arr.shape)} but the snapshot says "
                f"{file_dtype}{list(rec.shape)}"
            )
        return _from_storage(arr, rec)

    def verify(self) -> VerifyReport:
        """Re-check every snapshot's every tensor file: present, intact, as described."""
        return verify_run(self._root)

    def __repr__(self) -> str:
        return f"Run({self.path!r}, steps={self.steps})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_inside(run: str, path: str) -> None:
    """Refuse a path that resolves (through a symbolic link) to somewhere outside the run."""
    root = os.path.realpath(run)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise WeightWatchError(f"{path}: resolves to a place outside the run; refusing to read it")


def _check_npy_header(path: str, rec: TensorRecord) -> None:
    """Check a .npy file's header and size against its record, reading no data."""
    file_dtype = _BITS_DTYPES.get(rec.stored_dtype, rec.stored_dtype)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise WeightWatchError(f"{path}: tensor file is missing") from None
    except Exception as e:  # any malformed header: numpy raises several kinds
        raise WeightWatchError(f"{path}: not a readable .npy file ({e})") from None
    if dtype.hasobject:
        raise WeightWatchError(f"{path}: holds Python objects; refusing to load it")
    if tuple(shape) != rec.shape or dtype.name != file_dtype:
        raise WeightWatchError(
            f"{path}: holds {dtype.name}{list(shape)} but the snapshot says "
            f"{file_dtype}{list(rec.shape)}"
        )
    expected = offset + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise WeightWatchError(
            f"{path}: {size} bytes, expected {expected} for {dtype.name}{list(shape)} "
            "(truncated or replaced)"
        )


def _check_tensor_file(path: str, rec: TensorRecord) -> str | None:
    """None when the file is present and intact, else one line saying what is wrong."""
    try:
        if os.path.islink(path):
            return f"{path}: tensor file is a symbolic link"
        size = os.path.getsize(path)
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as e:
        return f"{path}: cannot read ({e.strerror or e})"
    if rec.bytes >= 0 and size != rec.bytes:
        return f"{path}: {size} bytes, expected {rec.bytes} (truncated or replaced)"
    try:
        digest = hash_file(path)
    except OSError as e:
        return f"{path}: cannot read ({e.strerror or e})"
    if digest != rec.sha256:
        return f"{path}: checksum mismatch (sha256 {digest[:12]}..., expected {rec.sha256[:12]}...)"
    return None


def _read_header(path: str) -> dict[str, Any]:
    header = _read_json(os.path.join(path, HEADER_FILE), "run header")
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise WeightWatchError(
            f"{os.path.join(path, HEADER_FILE)}: not a keras-weightwatch run header"
        )
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise WeightWatchError(
            f"{os.path.join(path, HEADER_FILE)}: format version {version!r} is not supported "
            f"(this keras-weightwatch reads version {FORMAT_VERSION}); upgrade the package"
        )
    weights = header.get("weights", [])
    if not isinstance(weights, list):
        raise WeightWatchError(f"{os.path.join(path, HEADER_FILE)}: weights must be a list")
    try:
        for w in weights:
            WeightSpec.from_json(w)
            _as_shape(w["shape"], HEADER_FILE)
        for name in ("model", "versions", "settings"):
            if not isinstance(header.get(name, {}), dict):
                raise TypeError(f"{name} must be an object")
        model = header.get("model", {})
        for name in ("total_params", "trainable_params", "non_trainable_params"):
            if not _is_int(model.get(name, 0)):
                raise TypeError(f"model {name} must be an integer")
        for name in ("name", "class_name"):
            if not isinstance(model.get(name, ""), str):
                raise TypeError(f"model {name} must be a string")
        if not isinstance(model.get("layers", []), list):
            raise TypeError("model layers must be a list")
        for layer in model.get("layers", []):
            info = _layer_info(layer)
            if not (isinstance(info.name, str) and isinstance(info.class_name, str)) or not all(
                _is_int(n) for n in (info.params, info.trainable_params,
                                     info.non_trainable_params)
            ) or not (info.inbound is None or all(isinstance(n, str) for n in info.inbound)):
                raise TypeError(f"layer entry {layer!r} has a field of the wrong type")
        if not all(isinstance(v, str) for v in header.get("versions", {}).values()):
            raise TypeError("versions must map names to strings")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise WeightWatchError(
            f"{os.path.join(path, HEADER_FILE)}: malformed weight or layer entry ({e})"
        ) from None
    return header


def _layer_info(d: Mapping[str, Any]) -> LayerInfo:
    """A header's layer entry (runs written before `inbound` was recorded have none)."""
    d = dict(d)
    inbound = d.pop("inbound", None)
    if inbound is not None and not isinstance(inbound, list):
        raise TypeError(f"layer inbound must be a list of names, found {inbound!r}")
    return LayerInfo(**d, inbound=None if inbound is None else tuple(inbound))


def _list_snapshot_files(path: str) -> list[str]:
    snap_dir = os.path.join(path, SNAPSHOT_DIR)
    if os.path.exists(snap_dir):
        _check_inside(path, snap_dir)
    try:
        names = os.listdir(snap_dir)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise WeightWatchError(f"{snap_dir}: cannot list snapshots ({e.strerror or e})") from None
    return sorted(n for n in names if _SNAPSHOT_FILE_RE.match(n))


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory written by `WeightWatch`.

    Only complete snapshots are listed: a snapshot whose writing was
    interrupted is invisible. Nothing is unpickled, ever.

    Args:
        path: The run directory (the callback's `log_dir`).

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
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise WeightWatchError(f"{path}: no such run directory")
    header = _read_header(path)
    snaps = []
    for name in _list_snapshot_files(path):
        file = f"{SNAPSHOT_DIR}/{name}"
        data = _read_json(os.path.join(path, SNAPSHOT_DIR, name), "snapshot")
        snaps.append(_parse_snapshot(data, file))
    steps = [s.step for s in snaps]
    if len(set(steps)) != len(steps):
        raise WeightWatchError(f"{path}: two snapshot files claim the same step")
    return Run(path, header, snaps)


def is_run(path: str | os.PathLike) -> bool:
    """True when `path` holds a run header."""
    return os.path.isfile(os.path.join(os.fspath(path), HEADER_FILE))


def verify_run(path: str | os.PathLike) -> VerifyReport:
    """Re-check every checksum of a run; see `Run.verify`.

    Raises `WeightWatchError` only when the run cannot be opened at all; each
    damaged or missing tensor file is a line of the report's `problems`.

    Example (the README's quickstart run: 21 snapshots of 4 tensors):

    >>> from keras_weightwatch import verify_run
    >>> report = verify_run("runs/exp1")
    >>> report.ok, report.snapshots, report.files, report.problems
    (True, 21, 84, ())
    """
    run = load_run(path)
    problems: list[str] = []
    checked: dict[str, str | None] = {}
    for snap in run.snapshots:
        for key, rec in snap.tensors.items():
            if rec.file not in checked:
                try:
                    checked[rec.file] = _check_tensor_file(run._file_path(rec), rec)
                except WeightWatchError as e:
                    checked[rec.file] = str(e)
            problem = checked[rec.file]
            if problem:
                problems.append(f"snapshot {snap.name}, weight {key}: {problem}")
    return VerifyReport(
        path=run.path, snapshots=len(run.snapshots), files=len(checked), problems=tuple(problems)
    )


# --------------------------------------------------------------------------- writing


def _architecture(specs: Sequence[WeightSpec]) -> list[tuple[tuple[int, ...], str]]:
    return [(s.shape, s.dtype) for s in specs]


def architecture_mismatch(old: Sequence[WeightSpec], new: Sequence[WeightSpec]) -> str | None:
    """None when two weight lists describe the same architecture, else the first difference."""
    if len(old) != len(new):
        return f"the run has {len(old)} weight tensors, the model has {len(new)}"
    for i, (a, b) in enumerate(zip(old, new)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return (
                f"weight #{i} is {a.key} {a.dtype}{list(a.shape)} in the run but "
                f"{b.key} {b.dtype}{list(b.shape)} in the model"
            )
    return None


class _Lock:
    """An exclusive advisory lock on the run directory (flock), held while writing."""

    def __init__(self, path: str):
        self.path = os.path.join(path, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            os.close(fd)
            raise RunBusyError(
                f"{os.path.dirname(self.path)}: the run is being written by another WeightWatch "
                f"({holder}); give each writer its own log_dir, or pass if_exists='new'"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # closing the descriptor releases the flock


class RunWriter:
    """Writes snapshots into a run directory; the only code that creates its files.

    Use `RunWriter.open(...)`, then `write_snapshot(...)` for each snapshot, then
    `close()`. One writer holds the run's lock from `open` to `close`.
    """

    def __init__(self, path: str, header: dict[str, Any], specs: Sequence[WeightSpec],
                 snapshots: Sequence[SnapshotRecord], durable: bool, store_dtype: str | None):
        self.path = path
        self.header = header
        self.specs = tuple(specs)
        self.durable = durable
        self.store_dtype = store_dtype
        self._snapshots = {s.step: s for s in snapshots}
        self._files: set[str] = {
            rec.file for s in snapshots for rec in s.tensors.values()
        }
        self._lock = _Lock(path)

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
    ) -> RunWriter:
        """Create the run, or open an existing one of the same architecture to continue it.

        The weight keys of an existing run are kept (matched by position), so a
        model rebuilt in another process with other auto-generated layer names
        continues the same series. `weights` is the subset of `model.weights`
        the run stores (an include/exclude filter); defaults to all of them.

        Raises:
            WeightWatchError: the run was written by a model of another
                architecture, or another writer holds it.
        """
        os.makedirs(os.path.join(path, TENSOR_DIR), exist_ok=True)
        os.makedirs(os.path.join(path, SNAPSHOT_DIR), exist_ok=True)
        lock = _Lock(path)
        lock.acquire()
        try:
            specs = list(model.weights if weights is None else weights)
            snapshots: list[SnapshotRecord] = []
            created = _now_iso()
            if is_run(path):
                old = load_run(path)
                old_specs = list(old.specs)
                problem = architecture_mismatch(old_specs, specs)
                if problem:
                    raise WeightWatchError(
                        f"{path}: holds a run of another architecture ({problem}); pass "
                        "if_exists='new' to start a new run beside it, or choose another log_dir"
                    )
                specs = [
                    dataclasses.replace(new, key=o.key, layer=o.layer)
                    for o, new in zip(old_specs, specs)
                ]
                snapshots = list(old.snapshots)
                created = old.header.get("created", created)
            header = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "created": created,
                "updated": _now_iso(),
                "versions": dict(versions),
                "model": model.to_json(),
                "weights": [s.to_json() for s in specs],
                "settings": dict(settings),
            }
            writer = cls(path, header, specs, snapshots, durable, store_dtype)
            writer._lock = lock
            _atomic_write(os.path.join(path, HEADER_FILE), [_json_bytes(header)], durable)
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
        """A stored tensor, memory-mapped (used for update ratios against an earlier snapshot)."""
        arr = np.load(os.path.join(self.path, rec.file), mmap_mode="r", allow_pickle=False)
        return _from_storage(arr, rec)

    def store_tensors(self, snapshot: Snapshot) -> dict[str, TensorRecord]:
        """Write the snapshot's arrays that are not stored yet; return every tensor's record."""
        records: dict[str, TensorRecord] = {}
        tensor_dir = os.path.join(self.path, TENSOR_DIR)
        wrote = False
        for spec in self.specs:
            arr = snapshot.arrays[spec.key]
            stored, stored_dtype, lossy = storage_array(arr, spec.dtype, self.store_dtype)
            # The bytes are written in C order, so the header must say so too. (Not
            # np.ascontiguousarray: it turns a 0-d array, a scalar variable, into shape (1,).)
            stored = np.require(stored, requirements="C")
            header = _npy_header(stored)
            data = _raw_bytes(stored)
            h = hashlib.sha256(header)
            h.update(data)
            sha = h.hexdigest()
            file = f"{TENSOR_DIR}/{sha}.npy"
            nbytes = len(header) + data.nbytes
            if file not in self._files and not os.path.isfile(os.path.join(self.path, file)):
                _atomic_write(os.path.join(tensor_dir, sha + ".npy"), [header, data], self.durable)
                wrote = True
            self._files.add(file)
            records[spec.key] = TensorRecord(
                file=file,
                sha256=sha,
                shape=tuple(arr.shape),
                dtype=spec.dtype,
                stored_dtype=stored_dtype,
                lossy=lossy,
                bytes=nbytes,
            )
        if wrote and self.durable:
            _fsync_dir(tensor_dir)
        return records

    def commit_snapshot(
        self,
        snapshot: Snapshot,
        records: Mapping[str, TensorRecord],
        stats: Mapping[str, Mapping[str, float]] | None = None,
    ) -> SnapshotRecord:
        """Make the snapshot visible by writing its snapshot file, last."""
        name = snapshot_file_name(snapshot.label, snapshot.step)
        file = f"{SNAPSHOT_DIR}/{name}"
        body = {
            "step": snapshot.step,
            "label": snapshot.label,
            "epoch": snapshot.epoch,
            "time": snapshot.time,
            "logs": dict(snapshot.logs),
            "tensors": {k: r.to_json() for k, r in records.items()},
            "stats": {k: dict(v) for k, v in (stats or {}).items()},
        }
        _atomic_write(os.path.join(self.path, file), [_json_bytes(body)], self.durable)
        if self.durable:
            _fsync_dir(os.path.join(self.path, SNAPSHOT_DIR))
        record = _parse_snapshot(json.loads(_json_bytes(body)), file)
        self._snapshots[snapshot.step] = record
        return record

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
        snap_dir = os.path.join(self.path, SNAPSHOT_DIR)
        for step in sorted(self._snapshots):
            if step in keep:
                continue
            record = self._snapshots.pop(step)
            try:
                os.unlink(os.path.join(self.path, record.file))
            except FileNotFoundError:
                pass
            removed.append(record.file)
        if removed and self.durable:
            _fsync_dir(snap_dir)
        self.collect_garbage()
        return removed

    def collect_garbage(self) -> list[str]:
        """Delete tensor files that no snapshot of the run references; return their names.

        Only files named like tensors (`<sha256>.npy`) and leftover temporary
        files (`.tmp-*`) are touched. Call it only between snapshots: the
        tensors of a snapshot being written are not referenced yet.
        """
        referenced = {rec.file for s in self._snapshots.values() for rec in s.tensors.values()}
        tensor_dir = os.path.join(self.path, TENSOR_DIR)
        deleted = []
        try:
            names = os.listdir(tensor_dir)
        except FileNotFoundError:
            names = []
        for name in sorted(names):
            file = f"{TENSOR_DIR}/{name}"
            if not (_TENSOR_FILE_RE.match(file) or name.startswith(TMP_PREFIX)):
                continue
            if file in referenced:
                continue
            try:
                os.unlink(os.path.join(tensor_dir, name))
            except FileNotFoundError:
                continue
            deleted.append(file)
        self._files &= referenced
        if deleted and self.durable:
            _fsync_dir(tensor_dir)
        return deleted

    def close(self) -> None:
        """Release the run's lock. Safe to call twice."""
        self._lock.release()


def retained_steps(
    snapshots: Sequence[SnapshotRecord], keep_last: int, keep_every: int | None = None
) -> set[int]:
    """The steps a retention policy keeps: the initial snapshot, the last `keep_last`
    epoch snapshots, and every epoch snapshot whose step is a multiple of `keep_every`."""
    epochs = sorted(s.step for s in snapshots if s.label == "epoch")
    keep = {s.step for s in snapshots if s.label == "initial"}
    keep.update(epochs[-keep_last:] if keep_last > 0 else [])
    if keep_every:
        keep.update(step for step in epochs if step % keep_every == 0)
    return keep
