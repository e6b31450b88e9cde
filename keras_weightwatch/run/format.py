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
from ..stats import Partial

FORMAT_NAME = "keras-weightwatch-run"
# 3: a tensor may be stored as parts (the shards of a model-parallel run); 2: tensors
# hashed with BLAKE3 (a record's digest is named by its hash); 1: SHA-256 only.
FORMAT_VERSION = 3
"""The newest version this package reads, and the one it writes for a run with parts."""
UNSHARDED_FORMAT_VERSION = 2
"""The version written for a run with no tensor stored as parts: readers of format 2 read it."""
HASHES = ("sha256", "blake3")
WRITE_HASH = "blake3"
HEADER_FILE = "weightwatch.json"
SNAPSHOT_DIR = "snapshots"
SHARD_DIR = "shards"  # per-process shard records of snapshots not committed yet
TENSOR_DIR = "tensors"
LOCK_FILE = ".weightwatch.lock"
TMP_PREFIX = ".tmp-"
BLOCK = 4096
"""The header of a tensor file of at least `ALIGNED_BYTES` data bytes is padded to this
many bytes, so its data begins on a block (and page) boundary: written straight from the
capture buffer to the disk, past the page cache, and memory-mapped page-aligned."""
ALIGNED_BYTES = 1 << 20

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
        """The number of values of the weight."""
        return int(math.prod(self.shape))

    def to_json(self) -> dict[str, Any]:
        """The weight's entry in the run header's `weights`."""
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
        """A header's `weights` entry."""
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
        """The layer's entry in the run header's `model.layers`."""
        d = dataclasses.asdict(self)
        d["inbound"] = None if self.inbound is None else list(self.inbound)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LayerInfo:
        """A header's `model.layers` entry."""
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
class Derivation:
    """How the kernel a layer computes with (its *effective* kernel) is derived from stored
    weights: a LoRA layer's `base + (alpha/rank) * A @ B`, an int8 layer's codes divided by
    their scale, ... The rules themselves (`rule` names one) live in `keras_weightwatch.derive`.

    Attributes:
        key: The weight key the effective kernel replaces (the layer's stored kernel, e.g.
            `dense/kernel`): every view and analysis reads the effective kernel under it.
        rule: The rule's name (`"lora"`, `"int8"`, `"int4"`, `"float8"`, ...).
        inputs: The rule's roles -> the stored weight keys they read (`{"base":
            "dense/kernel", "a": "dense/lora_kernel_a", "b": "dense/lora_kernel_b"}`). A role
            naming `key` itself reads the value derived so far (rules apply in header order).
        params: The rule's numbers (`{"scale": 2.0}`), JSON scalars and lists.
        layer: The layer the effective kernel belongs to (its path, as in `WeightSpec.layer`).
    """

    key: str
    rule: str
    inputs: Mapping[str, str]
    params: Mapping[str, Any]
    layer: str

    FIELDS = (
        Field("key", STR),
        Field("rule", STR),
        Field("inputs", map_of(STR, "roles to weight keys")),
        Field("params", OBJECT, required=False, default={}),
        Field("layer", STR, required=False, default=""),
    )

    def to_json(self) -> dict[str, Any]:
        """The derivation's entry in the run header's `model.derived`."""
        return {"key": self.key, "rule": self.rule, "inputs": dict(self.inputs),
                "params": dict(self.params), "layer": self.layer}

    def rekeyed(self, keys: Mapping[str, str]) -> Derivation:
        """The same derivation with its weight keys renamed by `keys` (others kept)."""
        return dataclasses.replace(
            self, key=keys.get(self.key, self.key),
            inputs={role: keys.get(k, k) for role, k in self.inputs.items()})

    @classmethod
    def from_json(cls, d: Any, where: str) -> Derivation:
        """A header's derivation entry, checked; `where` names the file for messages."""
        v = check_fields(d, cls.FIELDS, where, "derived kernel")
        return cls(key=v["key"], rule=v["rule"],
                   inputs={str(k): str(x) for k, x in v["inputs"].items()},
                   params=dict(v["params"]), layer=v["layer"] or v["key"].rpartition("/")[0])


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The architecture of a model: its layers and every weight's spec, in `model.weights` order,
    and how its layers' effective kernels derive from those weights (`derived`, in the order
    they apply)."""

    name: str
    class_name: str
    layers: tuple[LayerInfo, ...]
    weights: tuple[WeightSpec, ...]
    derived: tuple[Derivation, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """What else the header's `model` entry records about the fit (`optimizer`, `trial`,
    `config`): JSON values, shown by `weightwatch show`."""

    FIELDS = (
        Field("name", STR, required=False, default=""),
        Field("class_name", STR, required=False, default=""),
        Field("total_params", INT, required=False, default=0),
        Field("trainable_params", INT, required=False, default=0),
        Field("non_trainable_params", INT, required=False, default=0),
        Field("layers", LIST, required=False, default=()),
        # Runs written before effective kernels were recorded have none.
        Field("derived", LIST, required=False, default=()),
    )
    EXTRA = ("optimizer", "trial", "config")
    """The optional entries of `extra`, in the order `show` lists them."""

    @property
    def total_params(self) -> int:
        """The number of values of every weight of the model."""
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
            "derived": [d.to_json() for d in self.derived],
            **{k: self.extra[k] for k in self.EXTRA if k in self.extra},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], weights: Sequence[Mapping[str, Any]]) -> ModelInfo:
        """The model of a header: its `model` entry and its `weights` list."""
        return cls(
            name=str(d.get("name", "")),
            class_name=str(d.get("class_name", "")),
            layers=tuple(LayerInfo.from_json(x) for x in d.get("layers", [])),
            weights=tuple(WeightSpec.from_json(w) for w in weights),
            derived=tuple(Derivation.from_json(x, f"model derived[{i}]")
                          for i, x in enumerate(d.get("derived", []))),
            extra={k: d[k] for k in cls.EXTRA if k in d},
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


def content_hash(name: str, threads: bool = False) -> Any:
    """A new hasher of the content hash `name` (`"sha256"` or `"blake3"`): `update`, `hexdigest`.

    BLAKE3 hashes on one thread (the writer's: the other core is training's), or with
    `threads` on as many as large inputs can use (a reader checking files)."""
    if name == "blake3":
        import blake3

        return blake3.blake3(max_threads=blake3.blake3.AUTO if threads else 1)
    if name == "sha256":
        return hashlib.sha256()
    raise WeightWatchError(f"unknown content hash {name!r}; expected one of {list(HASHES)}")


@dataclasses.dataclass(frozen=True)
class PartRecord:
    """One stored part of a tensor (a shard of a model-parallel weight): where it sits.

    Attributes:
        file: The part's `.npy` file, relative to the run (`tensors/<digest>.npy`).
        digest: The content hash of the file (also its name).
        hash: Which content hash `digest` is.
        offset: Where the part starts in the whole tensor, one index per axis.
        shape: The part's shape.
        bytes: The file's size in bytes.
    """

    file: str
    digest: str
    hash: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    bytes: int

    FIELDS = (
        Field("file", STR),
        Field("sha256", STR, required=False),
        Field("blake3", STR, required=False),
        Field("offset", SHAPE),
        Field("shape", SHAPE),
        Field("bytes", INT, required=False, default=-1),
    )

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, self.hash: self.digest, "offset": list(self.offset),
                "shape": list(self.shape), "bytes": self.bytes}

    @classmethod
    def from_json(cls, d: Any, where: str) -> PartRecord:
        """A tensor's part entry, checked; `where` names the file and the weight."""
        v = check_fields(d, cls.FIELDS, where, "part entry")
        hash_name, digest = _one_digest(v, where)
        _check_tensor_file(v["file"], digest, hash_name, where)
        if len(v["offset"]) != len(v["shape"]):
            raise WeightWatchError(
                f"{where}: a part's offset and shape have one entry per axis. "
                f"{received('offset', v['offset'])}, shape={v['shape']!r}")
        return cls(file=v["file"], digest=digest, hash=hash_name, offset=tuple(v["offset"]),
                   shape=tuple(v["shape"]), bytes=v["bytes"])


def _one_digest(v: Mapping[str, Any], where: str) -> tuple[str, str]:
    present = [h for h in HASHES if v[h] is not None]
    if len(present) != 1:
        raise WeightWatchError(
            f"{where}: a tensor entry holds one digest, 'sha256' or 'blake3'. "
            f"{received('digests', present)}"
        )
    return present[0], v[present[0]]


def _check_tensor_file(file: str, digest: str, hash_name: str, where: str) -> None:
    m = TENSOR_FILE_RE.match(file)
    if not m:
        raise WeightWatchError(
            f"{where}: tensor file {file!r} is not of the form tensors/<digest>.npy "
            "inside the run"
        )
    if digest != m.group(1):
        raise WeightWatchError(
            f"{where}: tensor file {file!r} does not match its {hash_name} {digest!r}"
        )


def parts_digest(parts: Sequence[PartRecord], hash_name: str = WRITE_HASH) -> str:
    """The digest of a tensor stored as parts: of its parts' offsets, shapes and digests,
    taken in the order of their offsets (the order a record lists them in does not count).

    What it promises: two tensors with the same digest have the same parts, hence the
    same values. It names the stored layout, not the values alone: the same values split
    into other parts (another mesh) have another digest, as do parts stored with another
    hash; compare such tensors by their values."""
    h = content_hash(hash_name)
    for p in sorted(parts, key=lambda p: p.offset):
        h.update(json.dumps([list(p.offset), list(p.shape), p.hash, p.digest]).encode())
    return str(h.hexdigest())


def check_tiling(shape: Sequence[int], parts: Sequence[PartRecord], where: str) -> None:
    """Refuse parts that do not cover the tensor of `shape` exactly once (a part outside
    it, two parts that overlap, or a gap)."""
    boxes = [(p.offset, p.shape) for p in parts]
    for off, sh in boxes:
        if len(off) != len(shape) or len(sh) != len(shape) or any(
                o < 0 or o + n > s for o, n, s in zip(off, sh, shape)):
            raise WeightWatchError(
                f"{where}: a part lies outside the tensor of shape {list(shape)}. "
                f"{received('offset', list(off))}, shape={list(sh)!r}")
    for i, (a, ash) in enumerate(boxes):
        for b, bsh in boxes[i + 1:]:
            if all(x < y + m and y < x + n for x, n, y, m in zip(a, ash, b, bsh)):
                raise WeightWatchError(
                    f"{where}: two parts overlap. {received('offsets', [list(a), list(b)])}, "
                    f"shapes={[list(ash), list(bsh)]!r}")
    covered = sum(math.prod(sh) for _, sh in boxes)
    if covered != math.prod(shape):  # inside and disjoint: only a gap is left
        raise WeightWatchError(
            f"{where}: the parts leave a gap in the tensor of shape {list(shape)} "
            f"({covered} of its {math.prod(shape)} elements covered). "
            f"{received('offsets', sorted(list(o) for o, _ in boxes))}")


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
        parts: Empty for a tensor in one file. For a tensor stored as parts (format 3:
            the shards of a model-parallel run), where each part is; `file` is then
            empty, `digest` is `parts_digest(parts)` and `bytes` the parts' sum.

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
    parts: tuple[PartRecord, ...] = ()

    FIELDS = (
        Field("file", STR, required=False),  # absent for a tensor stored as parts
        Field("parts", LIST, required=False),
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

    def pieces(self) -> tuple[TensorRecord, ...]:
        """The records of the files that hold the tensor: itself, or one per part (each
        with the part's file, digest, shape and size, and this tensor's dtypes)."""
        if not self.parts:
            return (self,)
        return tuple(dataclasses.replace(self, file=p.file, digest=p.digest, hash=p.hash,
                                         shape=p.shape, bytes=p.bytes, parts=())
                     for p in self.parts)

    def to_json(self) -> dict[str, Any]:
        """The tensor's entry in a snapshot file."""
        out = {self.hash: self.digest, "shape": list(self.shape), "dtype": self.dtype,
               "stored_dtype": self.stored_dtype, "lossy": self.lossy, "bytes": self.bytes}
        if self.parts:
            out["parts"] = [p.to_json() for p in self.parts]
        else:
            out["file"] = self.file
        return out

    @classmethod
    def from_json(cls, d: Any, where: str) -> TensorRecord:
        """A snapshot's tensor entry, checked; `where` names the file and the weight."""
        v = check_fields(d, cls.FIELDS, where, "tensor entry")
        hash_name, digest = _one_digest(v, where)
        parts = _parts(v, digest, hash_name, where)
        if not parts:
            if v["file"] is None:
                raise WeightWatchError(f"{where}: a tensor entry has a 'file' or 'parts'. "
                                       "Received: file=None, parts=None")
            _check_tensor_file(v["file"], digest, hash_name, where)
        return cls(
            parts=parts,
            file=v["file"] or "",
            digest=digest,
            shape=tuple(v["shape"]),
            dtype=v["dtype"],
            stored_dtype=v["stored_dtype"] or v["dtype"],
            lossy=v["lossy"],
            bytes=v["bytes"],
            hash=hash_name,
        )


def _parts(v: Mapping[str, Any], digest: str, hash_name: str, where: str
           ) -> tuple[PartRecord, ...]:
    """The parts of a tensor entry, checked: they tile its shape, and its digest is theirs."""
    if v["parts"] is None:
        return ()
    if v["file"] is not None or not v["parts"]:
        raise WeightWatchError(
            f"{where}: a tensor entry has either a 'file' or a non-empty list of 'parts'. "
            f"{received('file', v['file'])}, parts={v['parts']!r}")
    parts = tuple(PartRecord.from_json(p, f"{where} part {i}") for i, p in enumerate(v["parts"]))
    check_tiling(v["shape"], parts, where)
    if parts_digest(parts, hash_name) != digest:
        raise WeightWatchError(f"{where}: the {hash_name} digest is not that of its parts. "
                               f"{received(hash_name, digest)}")
    return parts


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
    >>> names[4:12]
    ['inf_count', 'l2_norm', 'max_abs', 'mean', 'nan_count', 'size', 'std', 'units']
    >>> names[12:]  # the health rules' per-unit numbers, and the change since the last snapshot
    ['units_collapsed', 'units_duplicate', 'update_ratio']
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


def shard_record_name(label: str, step: int, process: int) -> str:
    """Where process `process` records the parts it stored of the snapshot at `step`."""
    stem = snapshot_file_name(label, step)[: -len(".json")]
    return f"{SHARD_DIR}/{stem}.process_{process:05d}.json"


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """What one process of a model-parallel run stored of a snapshot: its parts per weight.

    Written by each process after its part files, read (then removed) by process 0, which
    commits the snapshot once every process's record of the same attempt is there.

    Attributes:
        step: The snapshot's step.
        label: The snapshot's label.
        process: The index of the process that wrote it.
        attempt: The token every process of one fit shares (drawn by process 0 at train
            begin): a record of another attempt, left by a crashed earlier fit at the same
            step, is not this snapshot's and is never merged.
        tensors: Weight key -> the parts this process stored.
        stats: Weight key -> the partial sums of those parts (`stats.Partial`), from which
            process 0 combines the weight's statistics; absent in records of older writers.
    """

    step: int
    label: str
    process: int
    attempt: str
    tensors: Mapping[str, tuple[PartRecord, ...]]
    stats: Mapping[str, Partial] = dataclasses.field(default_factory=dict)

    FIELDS = (
        Field("step", INT),
        Field("label", LABEL),
        Field("process", INT),
        Field("attempt", STR),
        Field("tensors", map_of(LIST, "weight keys to lists of parts")),
        Field("stats", map_of(OBJECT, "weight keys to partial sums"), required=False,
              default={}),
    )

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "label": self.label, "process": self.process,
                "attempt": self.attempt,
                "tensors": {k: [p.to_json() for p in v] for k, v in self.tensors.items()},
                "stats": {k: dataclasses.asdict(p) for k, p in self.stats.items()}}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ShardRecord:
        v = check_fields(data, cls.FIELDS, where, "shard record")
        tensors = {str(k): tuple(PartRecord.from_json(p, f"{where}: {k!r} part {i}")
                                 for i, p in enumerate(ps)) for k, ps in v["tensors"].items()}
        sums = {str(k): partial_from_json(p, f"{where}: {k!r} stats")
                for k, p in v["stats"].items()}
        return cls(step=v["step"], label=v["label"], process=v["process"],
                   attempt=v["attempt"], tensors=tensors, stats=sums)


PARTIAL_FIELDS = (
    Field("size", INT),
    Field("count", INT),
    Field("mean", NUMBER),
    Field("m2", NUMBER),
    Field("sumsq", NUMBER),
    Field("max_abs", NUMBER),
    Field("nan", INT),
    Field("inf", INT),
    Field("diff_sq", optional(NUMBER), required=False),
    Field("prev_sq", optional(NUMBER), required=False),
)


def partial_from_json(data: Any, where: str) -> Partial:
    """A shard record's partial sums of one weight (`stats.Partial`), checked."""
    v = check_fields(data, PARTIAL_FIELDS, where, "partial sums")
    if not 0 <= v["count"] <= v["size"] or min(v["nan"], v["inf"]) < 0:
        raise WeightWatchError(
            f"{where}: partial sums count at most `size` finite values and no negative "
            f"number of NaN or Inf. Received: size={v['size']!r}, count={v['count']!r}, "
            f"nan={v['nan']!r}, inf={v['inf']!r}")
    def number(name: str) -> float | None:
        return None if v[name] is None else float(v[name])

    return Partial(size=v["size"], count=v["count"], mean=float(v["mean"]), m2=float(v["m2"]),
                   sumsq=float(v["sumsq"]), max_abs=float(v["max_abs"]), nan=v["nan"],
                   inf=v["inf"], diff_sq=number("diff_sq"), prev_sq=number("prev_sq"))


# --------------------------------------------------------------------------- stored inputs

MAX_SAMPLE_BYTES = 64 * 1024 * 1024
"""The most bytes of one input sample (`sample_images`, `feature_data`) a run stores: the
first rows that fit (at least one row; an array whose one row is larger is not stored)."""
SAMPLE_NAMES = ("sample_images", "feature_data")


@dataclasses.dataclass(frozen=True)
class ResponseLayer:
    """A Conv2D layer whose kernel responses the run's sample images were drawn with.

    Everything `responses.correlate` needs besides the images and the kernel, so
    that a reader computes the responses of any snapshot from the run alone.
    """

    layer: str
    key: str
    """The run's key of the layer's kernel."""
    padding: str
    strides: tuple[int, ...]
    dilation: tuple[int, ...]

    FIELDS = (
        Field("layer", STR),
        Field("key", STR),
        Field("padding", _kind("be 'valid' or 'same'", lambda v: v in ("valid", "same"))),
        Field("strides", list_of(INT, "integers")),
        Field("dilation", list_of(INT, "integers")),
    )

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "key": self.key, "padding": self.padding,
                "strides": list(self.strides), "dilation": list(self.dilation)}

    @classmethod
    def from_json(cls, d: Any, where: str) -> ResponseLayer:
        v = check_fields(d, cls.FIELDS, where, "response layer")
        return cls(str(v["layer"]), str(v["key"]), str(v["padding"]),
                   tuple(v["strides"]), tuple(v["dilation"]))


@dataclasses.dataclass(frozen=True)
class StoredSample:
    """One input sample stored with the run: its tensor file and how much of it is there.

    Attributes:
        tensor: The `.npy` file (in `tensors/`, checked like a snapshot's tensor).
        rows_total: The rows (samples) the callback was given; the file holds the
            first `tensor.shape[0]` of them (fewer when the whole was over
            `MAX_SAMPLE_BYTES`).
    """

    tensor: TensorRecord
    rows_total: int

    FIELDS = (Field("tensor", OBJECT), Field("rows_total", INT))

    @property
    def rows(self) -> int:
        return int(self.tensor.shape[0])

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor.to_json(), "rows_total": self.rows_total}

    @classmethod
    def from_json(cls, d: Any, where: str) -> StoredSample:
        v = check_fields(d, cls.FIELDS, where, "stored sample")
        return cls(TensorRecord.from_json(v["tensor"], where), v["rows_total"])


@dataclasses.dataclass(frozen=True)
class Samples:
    """The header's `samples`: the inputs the views were given, stored at train begin.

    Attributes:
        sample_images: The sample images, channels last `(N, H, W, C)`, or None.
        feature_data: The sample of inputs `(samples, features)` of the
            top-k feature table's correlation flags, or None.
        responses: The layers whose kernel responses the images were drawn with
            (`response_mode="kernel"`, layers fed by the model input); empty
            otherwise.
    """

    sample_images: StoredSample | None = None
    feature_data: StoredSample | None = None
    responses: tuple[ResponseLayer, ...] = ()

    FIELDS = (
        Field("sample_images", optional(OBJECT), required=False),
        Field("feature_data", optional(OBJECT), required=False),
        Field("responses", LIST, required=False, default=()),
    )

    @property
    def records(self) -> list[TensorRecord]:
        """The tensor files the samples occupy."""
        return [s.tensor for s in (self.sample_images, self.feature_data) if s is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "sample_images": None if self.sample_images is None else self.sample_images.to_json(),
            "feature_data": None if self.feature_data is None else self.feature_data.to_json(),
            "responses": [r.to_json() for r in self.responses],
        }

    @classmethod
    def from_json(cls, d: Any, where: str) -> Samples:
        """The header's `samples` (absent in runs written before it was stored: empty)."""
        v = check_fields({} if d is None else d, cls.FIELDS, f"{where}: samples", "samples")
        stored = {n: None if v[n] is None else StoredSample.from_json(v[n], f"{where}: {n}")
                  for n in SAMPLE_NAMES}
        layers = tuple(ResponseLayer.from_json(r, f"{where}: responses[{i}]")
                       for i, r in enumerate(v["responses"]))
        return cls(stored["sample_images"], stored["feature_data"], layers)


def sample_rows(arr: np.ndarray, max_bytes: int = MAX_SAMPLE_BYTES) -> np.ndarray:
    """The first rows of `arr` that fit in `max_bytes`, in a dtype a `.npy` file stores
    (numeric dtypes numpy lacks a stored name for become float64)."""
    a = np.asarray(arr)
    if a.dtype.name not in NATIVE_DTYPES:
        a = a.astype(np.float64)
    row = max(1, a[:1].nbytes)
    return np.ascontiguousarray(a[: max_bytes // row])


# --------------------------------------------------------------------------- the run header

HEADER_FIELDS = (
    Field("weights", LIST, required=False, default=()),
    Field("model", OBJECT, required=False, default={}),
    Field("versions", map_of(STR, "names to strings"), required=False, default={}),
    Field("settings", OBJECT, required=False, default={}),
    Field("samples", optional(OBJECT), required=False),
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
    for i, d in enumerate(model["derived"]):
        Derivation.from_json(d, f"{where}: model derived[{i}]")
    Samples.from_json(v["samples"], where)
    return header


# --------------------------------------------------------------------------- bytes


def json_bytes(obj: Any) -> bytes:
    """How every JSON file of a run is written."""
    return (json.dumps(obj, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()


def npy_header(arr: np.ndarray) -> bytes:
    """The .npy (version 1.0) header of a C-ordered array: `BLOCK` bytes long when the
    array holds at least `ALIGNED_BYTES` (padded with spaces, as numpy pads it to 64),
    else numpy's own. Runs written before the padding hold numpy's header at every size
    (`plain_npy_header`); both are read alike."""
    plain = plain_npy_header(arr)
    if arr.nbytes < ALIGNED_BYTES or len(plain) >= BLOCK:
        return plain
    # magic (6) + version (2) + length (2), then the dict, spaces and a newline.
    body = plain[10:].rstrip(b" \n")
    return plain[:8] + (BLOCK - 10).to_bytes(2, "little") + body.ljust(BLOCK - 11) + b"\n"


def plain_npy_header(arr: np.ndarray) -> bytes:
    """numpy's .npy (version 1.0) header of a C-ordered array (padded to 64 bytes)."""
    bio = io.BytesIO()
    np.lib.format.write_array_header_1_0(bio, np.lib.format.header_data_from_array_1_0(arr))
    return bio.getvalue()


def raw_bytes(arr: np.ndarray) -> memoryview:
    """The array's data in C order, as bytes (no copy for a C-contiguous array)."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    return flat.view(np.uint8).data


def stored_as(dtype_name: str, store_dtype: str | None) -> tuple[str, bool]:
    """The dtype a weight of `dtype_name` is stored in, and whether that loses precision
    (only float32 and float64 weights are reduced to `store_dtype`)."""
    if store_dtype is not None and store_dtype != dtype_name and \
            dtype_name in ("float32", "float64"):
        return store_dtype, True
    return dtype_name, False


def storage_array(
    arr: np.ndarray, dtype_name: str, store_dtype: str | None = None
) -> tuple[np.ndarray, str, bool]:
    """The array as it goes into the .npy file: (array, stored dtype name, lossy)."""
    if stored_as(dtype_name, store_dtype)[1] and store_dtype is not None:
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


def encode_tensor(arr: np.ndarray, dtype_name: str, store_dtype: str | None = None,
                  plain: bool = False) -> Encoded:
    """The bytes of a tensor's `.npy` file (header, then data in C order): the one encoding
    every tensor file of a run has (`plain`: with numpy's own header at every size, as runs
    written before the padding have)."""
    stored, stored_dtype, lossy = storage_array(arr, dtype_name, store_dtype)
    # The bytes are written in C order, so the header must say so too. (Not
    # np.ascontiguousarray: it turns a 0-d array, a scalar variable, into shape (1,).)
    stored = np.require(stored, requirements="C")
    header = plain_npy_header(stored) if plain else npy_header(stored)
    return Encoded(header, raw_bytes(stored), stored_dtype, lossy)


def holds(rec: TensorRecord, arr: np.ndarray) -> bool:
    """Whether the tensor file of `rec` holds exactly `arr`, as it would be stored now
    (checked by the record's own digest, without reading the file). A large tensor's
    file with numpy's plain header (a run written before the padding) is recognised too."""
    if tuple(arr.shape) != rec.shape:
        return False
    store_dtype = rec.stored_dtype if rec.lossy else None
    try:
        enc = encode_tensor(arr, rec.dtype, store_dtype)
        if enc.digest(rec.hash) == rec.digest:
            return True
        plain = encode_tensor(arr, rec.dtype, store_dtype, plain=True)
        return plain.header != enc.header and plain.digest(rec.hash) == rec.digest
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
