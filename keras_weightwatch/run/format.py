"""The run directory's format: its names, its records, their JSON, and their checks.

Layout (see docs/FORMAT.md for the full description)::

    RUN/
      weightwatch.json          run header: format version, versions, model, weights, settings
      snapshots/initial.json    one file per complete snapshot: step, logs, tensors, statistics
      snapshots/epoch_000003.json
      tensors/<digest>.npy      plain .npy files named by the BLAKE3 (or, format 1,
                                SHA-256) digest of their bytes
      .weightwatch.lock         only while a writer holds the run (flock); removed at close

Each JSON record has one declarative table of its fields (`Field`: name, kind,
required or its default) and one function, `check_fields`, reads a JSON object
against such a table; every refusal names the file, the field, what was
expected and what was received. Nothing here touches a file: `reader` and
`writer` do, through `storage`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..errors import WeightWatchError, received

FORMAT_NAME = "keras-weightwatch-run"
# 2: tensors hashed with BLAKE3 (a record's digest is named by its hash); 1: SHA-256 only.
FORMAT_VERSION = 2
HASHES = ("sha256", "blake3")
WRITE_HASH = "blake3"
HEADER_FILE = "weightwatch.json"
SNAPSHOT_DIR = "snapshots"
TENSOR_DIR = "tensors"
LOCK_FILE = ".weightwatch.lock"
TMP_PREFIX = ".tmp-"

TENSOR_FILE_RE = re.compile(r"^tensors/([0-9a-f]{64})\.npy$")
SNAPSHOT_FILE_RE = re.compile(r"^(initial|epoch_-?\d{6,})\.json$")
# Header and snapshot files are small; anything larger is not one of ours.
MAX_JSON_BYTES = 256 * 1024 * 1024
# Refuse shapes that claim more elements than any real weight tensor holds.
MAX_ELEMENTS = 1 << 40
MAX_RANK = 32

# dtypes numpy stores natively in .npy, and the ml_dtypes ones stored as raw bits.
NATIVE_DTYPES = frozenset(
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
BITS_DTYPES = {
    "bfloat16": "uint16",
    "float8_e4m3fn": "uint8",
    "float8_e5m2": "uint8",
    "float8_e4m3fnuz": "uint8",
    "float8_e5m2fnuz": "uint8",
}
STORED_DTYPES = NATIVE_DTYPES | frozenset(BITS_DTYPES)


# --------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a JSON value must be.

    Attributes:
        expected: Completes "FIELD must ...", e.g. `"be an integer"`.
        problem: None when a value is of this kind, else what it falls short of
            (also completing "FIELD ...").
    """

    expected: str
    problem: Callable[[Any], str | None]


def _kind(expected: str, accepts: Callable[[Any], bool]) -> Kind:
    return Kind(f"must {expected}", lambda v: None if accepts(v) else f"must {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def optional(kind: Kind) -> Kind:
    """`kind`, or null."""
    expected = kind.expected + " or null"
    return Kind(expected, lambda v: None if v is None or kind.problem(v) is None else expected)


def map_of(kind: Kind, what: str) -> Kind:
    """An object whose every value is of `kind`; `what` completes "must map ..."."""
    return _kind(f"map {what}",
                 lambda v: isinstance(v, dict) and all(kind.problem(x) is None for x in v.values()))


def list_of(kind: Kind, what: str) -> Kind:
    return _kind(f"be a list of {what}",
                 lambda v: isinstance(v, list) and all(kind.problem(x) is None for x in v))


def _shape_problem(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > MAX_RANK:
        return f"must be a list of at most {MAX_RANK} sizes"
    if not all(_is_int(s) and s >= 0 for s in value):
        return "sizes must be integers >= 0"
    if any(s > MAX_ELEMENTS for s in value) or math.prod(value) > MAX_ELEMENTS:
        return f"must not be larger than any stored tensor can be ({MAX_ELEMENTS} elements)"
    return None


def _dtype_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if value not in STORED_DTYPES:
        return f"must be one of {sorted(STORED_DTYPES)}: unknown dtype {value!r}"
    return None


INT = _kind("be an integer", _is_int)
NUMBER = _kind("be a number", _is_number)
STR = _kind("be a string", lambda v: isinstance(v, str))
BOOL = _kind("be true or false", lambda v: isinstance(v, bool))
LIST = _kind("be a list", lambda v: isinstance(v, list))
OBJECT = _kind("be an object", lambda v: isinstance(v, dict))
SHAPE = Kind(f"must be a list of at most {MAX_RANK} sizes", _shape_problem)
DTYPE = Kind("must be the name of a stored dtype", _dtype_problem)
LABELS = ("initial", "epoch", "batch")
LABEL = _kind("be 'initial', 'epoch' or 'batch'", lambda v: isinstance(v, str) and v in LABELS)


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a JSON record: its name, its kind, and whether it must be present.

    A field that is not required takes `default` when absent.
    """

    name: str
    kind: Kind
    required: bool = True
    default: Any = None


class _Clipped:
    """A value whose repr is cut short, so a message stays one readable line."""

    def __init__(self, value: Any, limit: int = 120):
        self.text = repr(value)
        if len(self.text) > limit:
            self.text = self.text[: limit - 3] + "..."

    def __repr__(self) -> str:
        return self.text


def check_fields(data: Any, fields: Sequence[Field], where: str, what: str) -> dict[str, Any]:
    """The values of `fields` in the JSON object `data`, checked, defaults filled in.

    Args:
        data: A decoded JSON value that should be an object.
        fields: The record's table.
        where: The file (and the place in it), first in every message.
        what: What `data` is, for the message when it is not an object.

    Raises:
        WeightWatchError: `data` is not an object, a required field is missing,
            or a field holds a value of another kind.
    """
    if not isinstance(data, dict):
        raise WeightWatchError(
            f"{where}: {what} must be a JSON object. {received(what, _Clipped(data))}"
        )
    out: dict[str, Any] = {}
    for field in fields:
        if field.name not in data:
            if field.required:
                raise WeightWatchError(
                    f"{where}: {what} has no field {field.name!r} (it {field.kind.expected})"
                )
            out[field.name] = field.default
            continue
        value = data[field.name]
        problem = field.kind.problem(value)
        if problem is not None:
            raise WeightWatchError(
                f"{where}: {field.name} {problem}. {received(field.name, _Clipped(value))}"
            )
        out[field.name] = value
    return out


# --------------------------------------------------------------------------- model records


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight tensor of the model, as the run directory records it.

    Attributes:
        key: The name the run uses for the weight: `weight.path` without the
            model's own (process-numbered) name in front, e.g. `dense/kernel`.
        path: `weight.path` as Keras reported it when the run was written.
        layer: The path of the layer that owns the weight (`key` without its
            last component), used to group weights by layer.
        shape: The weight's shape.
        dtype: The weight's dtype name (`"float32"`, `"bfloat16"`, ...).
        trainable: False for non-trainable weights such as BatchNorm's
            moving statistics.
    """

    key: str
    path: str
    layer: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool

    FIELDS = (
        Field("key", STR),
        Field("path", STR),
        Field("layer", STR),
        Field("shape", SHAPE),
        Field("dtype", STR),
        Field("trainable", BOOL),
    )

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "path": self.path,
            "layer": self.layer,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "trainable": self.trainable,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WeightSpec:
        return cls(
            key=str(d["key"]),
            path=str(d["path"]),
            layer=str(d["layer"]),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d["dtype"]),
            trainable=bool(d["trainable"]),
        )


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A top-level layer with its parameter counts, as `model.summary()` lists it.

    `inbound` names the top-level layers whose outputs it takes (input layers
    included), or is None where the model does not say (a subclassed model);
    `diff` uses it to carry a matching of units only along real connections.
    """

    name: str
    class_name: str
    params: int
    trainable_params: int
    non_trainable_params: int
    inbound: tuple[str, ...] | None = None

    FIELDS = (
        Field("name", STR),
        Field("class_name", STR),
        Field("params", INT),
        Field("trainable_params", INT),
        Field("non_trainable_params", INT),
        # Runs written before `inbound` was recorded have none.
        Field("inbound", optional(list_of(STR, "layer names")), required=False),
    )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inbound"] = None if self.inbound is None else list(self.inbound)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LayerInfo:
        inbound = d.get("inbound")
        return cls(
            name=str(d["name"]),
            class_name=str(d["class_name"]),
            params=int(d["params"]),
            trainable_params=int(d["trainable_params"]),
            non_trainable_params=int(d["non_trainable_params"]),
            inbound=None if inbound is None else tuple(str(n) for n in inbound),
        )


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The architecture of a model: its layers and every weight's spec, in `model.weights` order."""

    name: str
    class_name: str
    layers: tuple[LayerInfo, ...]
    weights: tuple[WeightSpec, ...]

    FIELDS = (
        Field("name", STR, required=False, default=""),
        Field("class_name", STR, required=False, default=""),
        Field("total_params", INT, required=False, default=0),
        Field("trainable_params", INT, required=False, default=0),
        Field("non_trainable_params", INT, required=False, default=0),
        Field("layers", LIST, required=False, default=()),
    )

    @property
    def total_params(self) -> int:
        return sum(w.size for w in self.weights)

    def to_json(self) -> dict[str, Any]:
        """The header's `model` entry (the weights go in the header's `weights`)."""
        return {
            "name": self.name,
            "class_name": self.class_name,
            "total_params": self.total_params,
            "trainable_params": sum(w.size for w in self.weights if w.trainable),
            "non_trainable_params": sum(w.size for w in self.weights if not w.trainable),
            "layers": [layer.to_json() for layer in self.layers],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], weights: Sequence[Mapping[str, Any]]) -> ModelInfo:
        """The model of a header: its `model` entry and its `weights` list."""
        return cls(
            name=str(d.get("name", "")),
            class_name=str(d.get("class_name", "")),
            layers=tuple(LayerInfo.from_json(x) for x in d.get("layers", [])),
            weights=tuple(WeightSpec.from_json(w) for w in weights),
        )


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


# --------------------------------------------------------------------------- snapshot records


def content_hash(name: str) -> Any:
    """A new hasher of the content hash `name` (`"sha256"` or `"blake3"`): `update`, `hexdigest`."""
    if name == "blake3":
        import blake3

        return blake3.blake3(max_threads=1)  # one thread: the other core is training's
    if name == "sha256":
        return hashlib.sha256()
    raise WeightWatchError(f"unknown content hash {name!r}; expected one of {list(HASHES)}")


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """Where a snapshot's tensor lives and how to check it.

    Attributes:
        file: The path of the `.npy` file, relative to the run directory.
        digest: The content hash of the whole file, as 64 hex digits (also its name).
        shape: The tensor's shape.
        dtype: The tensor's dtype as Keras reported it.
        stored_dtype: The dtype of the array in the `.npy` file (raw bits for
            dtypes numpy lacks, such as bfloat16; a narrower float for a lossy
            reduced-precision store).
        lossy: True when `stored_dtype` is a reduced precision of `dtype`.
        bytes: The file's size in bytes.
        hash: Which content hash `digest` is: `"blake3"` (written since format 2) or
            `"sha256"` (format 1, release 0.1.0).

    Example (the README's quickstart run):

    >>> from keras_weightwatch import load_run
    >>> rec = load_run("runs/exp1").snapshot(3).tensors["hidden/kernel"]
    >>> rec.shape, rec.dtype, rec.lossy, rec.file == f"tensors/{rec.digest}.npy"
    ((4, 8), 'float32', False, True)
    """

    file: str
    digest: str
    shape: tuple[int, ...]
    dtype: str
    stored_dtype: str
    lossy: bool
    bytes: int
    hash: str = "sha256"

    FIELDS = (
        Field("file", STR),
        # exactly one of the digests, named by its hash
        Field("sha256", STR, required=False),
        Field("blake3", STR, required=False),
        Field("shape", SHAPE),
        Field("dtype", DTYPE),
        Field("stored_dtype", DTYPE, required=False),  # absent: the same as dtype
        Field("lossy", BOOL, required=False, default=False),
        Field("bytes", INT, required=False, default=-1),  # absent: not checked
    )

    @property
    def sha256(self) -> str:
        """The digest (the name of format 1, kept for callers; see `hash` for which it is)."""
        return self.digest

    @property
    def file_dtype(self) -> str:
        """The dtype numpy finds in the file (raw bits for bfloat16 and the float8 types)."""
        return BITS_DTYPES.get(self.stored_dtype, self.stored_dtype)

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, self.hash: self.digest, "shape": list(self.shape),
                "dtype": self.dtype, "stored_dtype": self.stored_dtype, "lossy": self.lossy,
                "bytes": self.bytes}

    @classmethod
    def from_json(cls, d: Any, where: str) -> TensorRecord:
        """A snapshot's tensor entry, checked; `where` names the file and the weight."""
        v = check_fields(d, cls.FIELDS, where, "tensor entry")
        present = [h for h in HASHES if v[h] is not None]
        if len(present) != 1:
            raise WeightWatchError(
                f"{where}: a tensor entry holds one digest, 'sha256' or 'blake3'. "
                f"{received('digests', present)}"
            )
        hash_name = present[0]
        digest = v[hash_name]
        m = TENSOR_FILE_RE.match(v["file"])
        if not m:
            raise WeightWatchError(
                f"{where}: tensor file {v['file']!r} is not of the form tensors/<digest>.npy "
                "inside the run"
            )
        if digest != m.group(1):
            raise WeightWatchError(
                f"{where}: tensor file {v['file']!r} does not match its {hash_name} {digest!r}"
            )
        return cls(
            file=v["file"],
            digest=digest,
            shape=tuple(v["shape"]),
            dtype=v["dtype"],
            stored_dtype=v["stored_dtype"] or v["dtype"],
            lossy=v["lossy"],
            bytes=v["bytes"],
            hash=hash_name,
        )


@dataclasses.dataclass(frozen=True)
class SnapshotRecord:
    """A complete snapshot as the run directory lists it (the arrays stay on disk).

    Attributes:
        step: TensorBoard step (epoch index; one less than the first epoch for the
            initial weights).
        label: `"initial"`, `"epoch"`, or `"batch"` (taken inside an epoch, every
            `batch_freq` training batches; its step counts batches).
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
    >>> names = sorted(snap.stats["hidden/kernel"])
    >>> names[4:]
    ['inf_count', 'l2_norm', 'max_abs', 'mean', 'nan_count', 'size', 'std', 'update_ratio']
    >>> names[:4]  # each input feature's effect on the output (the feature table's ranking)
    ['effect/0', 'effect/1', 'effect/2', 'effect/3']
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

    FIELDS = (
        Field("step", INT),
        Field("label", LABEL),
        Field("epoch", optional(INT), required=False),
        Field("time", NUMBER, required=False, default=0.0),
        Field("logs", map_of(NUMBER, "names to numbers"), required=False, default={}),
        Field("tensors", OBJECT),
        Field("stats", map_of(map_of(optional(NUMBER), "names to numbers"),
                              "weight keys to numbers"), required=False, default={}),
    )

    @property
    def name(self) -> str:
        """`"initial"` or the step as text: how the CLI and `diff` name a snapshot."""
        return "initial" if self.label == "initial" else str(self.step)

    def to_json(self) -> dict[str, Any]:
        """The snapshot file's JSON (`file` is where it goes, not part of it)."""
        return {
            "step": self.step,
            "label": self.label,
            "epoch": self.epoch,
            "time": self.time,
            "logs": dict(self.logs),
            "tensors": {k: r.to_json() for k, r in self.tensors.items()},
            "stats": {k: dict(v) for k, v in self.stats.items()},
        }

    @classmethod
    def from_json(cls, data: Any, file: str, where: str | None = None) -> SnapshotRecord:
        """A snapshot file's JSON, checked. `file` is its name inside the run; `where` the
        name messages use (defaults to `file`)."""
        where = where or file
        v = check_fields(data, cls.FIELDS, where, "snapshot")
        tensors = {
            str(k): TensorRecord.from_json(t, f"{where}: tensor {k!r}")
            for k, t in v["tensors"].items()
        }
        return cls(
            step=v["step"],
            label=v["label"],
            epoch=v["epoch"],
            time=float(v["time"]),
            logs={str(k): float(x) for k, x in v["logs"].items()},
            tensors=tensors,
            stats=dict(v["stats"]),
            file=file,
        )


def snapshot_file_name(label: str, step: int) -> str:
    return "initial.json" if label == "initial" else f"epoch_{step:06d}.json"


# --------------------------------------------------------------------------- the run header

HEADER_FIELDS = (
    Field("weights", LIST, required=False, default=()),
    Field("model", OBJECT, required=False, default={}),
    Field("versions", map_of(STR, "names to strings"), required=False, default={}),
    Field("settings", OBJECT, required=False, default={}),
)


def check_header(header: Any, where: str) -> dict[str, Any]:
    """The run header's JSON, checked field by field; `where` is the header file."""
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise WeightWatchError(f"{where}: not a keras-weightwatch run header")
    version = header.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not (
        1 <= version <= FORMAT_VERSION
    ):
        raise WeightWatchError(
            f"{where}: format version {version!r} is not supported "
            f"(this keras-weightwatch reads version {FORMAT_VERSION}); upgrade the package"
        )
    v = check_fields(header, HEADER_FIELDS, where, "run header")
    for i, w in enumerate(v["weights"]):
        check_fields(w, WeightSpec.FIELDS, f"{where}: weights[{i}]", "weight entry")
    model = check_fields(v["model"], ModelInfo.FIELDS, f"{where}: model", "model")
    for i, layer in enumerate(model["layers"]):
        check_fields(layer, LayerInfo.FIELDS, f"{where}: model layers[{i}]", "layer entry")
    return header


# --------------------------------------------------------------------------- bytes


def json_bytes(obj: Any) -> bytes:
    """How every JSON file of a run is written."""
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()


def npy_header(arr: np.ndarray) -> bytes:
    """The .npy (version 1.0) header of a C-ordered array."""
    bio = io.BytesIO()
    np.lib.format.write_array_header_1_0(bio, np.lib.format.header_data_from_array_1_0(arr))
    return bio.getvalue()


def raw_bytes(arr: np.ndarray) -> memoryview:
    """The array's data in C order, as bytes (no copy for a C-contiguous array)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    return flat.view(np.uint8).data


def storage_array(
    arr: np.ndarray, dtype_name: str, store_dtype: str | None = None
) -> tuple[np.ndarray, str, bool]:
    """The array as it goes into the .npy file: (array, stored dtype name, lossy)."""
    lossy = store_dtype is not None and store_dtype != dtype_name
    if lossy and store_dtype is not None and dtype_name in ("float32", "float64"):
        if store_dtype in BITS_DTYPES:
            import ml_dtypes

            cast = arr.astype(getattr(ml_dtypes, store_dtype))
            return cast.view(BITS_DTYPES[store_dtype]), store_dtype, True
        return arr.astype(store_dtype), store_dtype, True
    if dtype_name in BITS_DTYPES:
        return arr.view(BITS_DTYPES[dtype_name]), dtype_name, False
    if dtype_name not in NATIVE_DTYPES:
        raise WeightWatchError(
            f"cannot store a tensor of dtype {dtype_name!r}; stored dtypes are "
            f"{sorted(STORED_DTYPES)}"
        )
    return arr, dtype_name, False


class Encoded(NamedTuple):
    """A tensor as its `.npy` file holds it: the file's bytes (header, then data)."""

    header: bytes
    data: memoryview
    stored_dtype: str
    lossy: bool

    @property
    def nbytes(self) -> int:
        return len(self.header) + self.data.nbytes

    def digest(self, hash_name: str) -> str:
        """The file's digest by the content hash `hash_name` (what names the file)."""
        h = content_hash(hash_name)
        h.update(self.header)
        h.update(self.data)
        return str(h.hexdigest())


def encode_tensor(arr: np.ndarray, dtype_name: str, store_dtype: str | None = None) -> Encoded:
    """The bytes of a tensor's `.npy` file (header, then data in C order): the one encoding
    every tensor file of a run has."""
    stored, stored_dtype, lossy = storage_array(arr, dtype_name, store_dtype)
    # The bytes are written in C order, so the header must say so too. (Not
    # np.ascontiguousarray: it turns a 0-d array, a scalar variable, into shape (1,).)
    stored = np.require(stored, requirements="C")
    return Encoded(npy_header(stored), raw_bytes(stored), stored_dtype, lossy)


def holds(rec: TensorRecord, arr: np.ndarray) -> bool:
    """Whether the tensor file of `rec` holds exactly `arr`, as it would be stored now
    (checked by the record's own digest, without reading the file)."""
    if tuple(arr.shape) != rec.shape:
        return False
    store_dtype = rec.stored_dtype if rec.lossy else None
    try:
        return encode_tensor(arr, rec.dtype, store_dtype).digest(rec.hash) == rec.digest
    except (WeightWatchError, TypeError, ValueError):
        return False


def from_storage(arr: np.ndarray, rec: TensorRecord) -> np.ndarray:
    """The array of a .npy file as the weight's own dtype (bits viewed, lossy widened)."""
    if rec.stored_dtype in BITS_DTYPES:
        import ml_dtypes

        arr = arr.view(getattr(ml_dtypes, rec.stored_dtype))
    if rec.lossy and rec.dtype != rec.stored_dtype:
        arr = np.asarray(arr, dtype=rec.dtype)
    return arr


def check_layout(where: str, shape: Sequence[int], dtype: np.dtype, rec: TensorRecord) -> None:
    """Refuse a .npy header or array whose dtype or shape is not what its record says.

    The one shape/dtype check of the format: every read applies it to the file's
    header before loading and to the array it loads.
    """
    if dtype.hasobject:
        raise WeightWatchError(f"{where}: holds Python objects; refusing to load it")
    if tuple(shape) != rec.shape or dtype.name != rec.file_dtype:
        raise WeightWatchError(
            f"{where}: holds {dtype.name}{list(shape)} but the snapshot says "
            f"{rec.file_dtype}{list(rec.shape)}"
        )
