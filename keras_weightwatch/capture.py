"""Model -> Snapshot: the only module that reads Keras state.

Everything here runs on the training thread, so it does as little as it can:
it walks the model once at train begin (`describe_model`) and, at each
snapshot, copies every weight to host memory (`capture_arrays`), exactly as
`layer.get_weights()` would return it. All further work happens elsewhere,
on numpy arrays.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .derive.detect import derivations
from .naming import key_layer, strip_model_prefix, unique_keys
from .run.format import LayerInfo, ModelInfo, WeightSpec
from .scratch import empty


def _dtype_name(variable: Any) -> str:
    dtype = getattr(variable, "dtype", None)
    name = getattr(dtype, "name", None) or str(dtype)
    return str(name)


def _count(weights: Sequence[Any]) -> int:
    return int(sum(math.prod(tuple(w.shape)) for w in weights))


def _inbound(layer: Any) -> tuple[str, ...] | None:
    """The names of the layers whose outputs `layer` takes, from its graph nodes."""
    try:
        nodes = list(layer._inbound_nodes)
        if not nodes:
            return None
        names: list[str] = []
        for node in nodes:
            for parent in node.parent_nodes:
                name = str(parent.operation.name)
                if name not in names:
                    names.append(name)
        return tuple(names)
    except (AttributeError, TypeError):  # no graph to read: a subclassed model's layers
        return None


def describe_model(model: Any) -> ModelInfo:
    """Read the model's architecture: top-level layers and the spec of every weight.

    The model must be built (it is, by the time `fit` calls `on_train_begin`).
    """
    variables = list(model.weights)
    trainable_ids = {id(v) for v in model.trainable_weights}
    paths = [str(getattr(v, "path", None) or v.name) for v in variables]
    keys = unique_keys([strip_model_prefix(p, model.name) for p in paths])
    specs = []
    for v, path, key in zip(variables, paths, keys):
        specs.append(
            WeightSpec(
                key=key,
                path=path,
                layer=key_layer(key),
                shape=tuple(int(s) for s in v.shape),
                dtype=_dtype_name(v),
                trainable=id(v) in trainable_ids,
            )
        )
    layers = []
    for layer in getattr(model, "layers", []):
        layers.append(
            LayerInfo(
                name=layer.name,
                class_name=type(layer).__name__,
                params=_count(layer.weights),
                trainable_params=_count(layer.trainable_weights),
                non_trainable_params=_count(layer.non_trainable_weights),
                inbound=_inbound(layer),
            )
        )
    return ModelInfo(
        name=model.name,
        class_name=type(model).__name__,
        layers=tuple(layers),
        weights=tuple(specs),
        derived=derivations(model, {id(v): s.key for v, s in zip(variables, specs)}),
        extra=fit_extra(model),
    )


MAX_CONFIG_BYTES = 1 << 16
"""The most bytes of JSON the header's `model.config` lists layers in (past it, the layers
that fit, the digest of them all, and how many were left out)."""


def json_safe(value: Any, depth: int = 0) -> Any:
    """`value` as JSON: numbers (numpy's as Python's; NaN and Inf as text), strings, bools and
    None as they are; mappings and sequences entry by entry; anything else as its text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else str(float(value))
    if isinstance(value, np.bool_):
        return bool(value)
    if depth < 8 and isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    return str(value)[:200]


def _compact(value: Any) -> Any:
    """A layer option in few bytes: scalars and short lists of them as they are, a serialized
    Keras object (initializer, regularizer, dtype policy) as its class or policy name; None
    for anything else (left out)."""
    if value is None or isinstance(value, (bool, int, float, str, np.generic)):
        return json_safe(value)
    if isinstance(value, (list, tuple)) and len(value) <= 16 and all(
            x is None or isinstance(x, (bool, int, float, str)) for x in value):
        return json_safe(value)
    if isinstance(value, Mapping) and "class_name" in value:
        inner = value.get("config")
        name = inner.get("name") if isinstance(inner, Mapping) else None
        return str(name if value["class_name"].endswith("DTypePolicy") and name
                   else value["class_name"])
    return None


_NOT_OPTIONS = frozenset({"built", "autocast", "supports_jit", "call_signature_parameters"})
"""Public attributes of Keras layers and optimizers that are state, not configuration."""


def _public_options(obj: Any) -> dict[str, Any]:
    """An object's public attributes (functions by name): what `_config` reads where calling
    `get_config()` would import TensorFlow."""
    out: dict[str, Any] = {}
    for key, value in vars(obj).items():
        if isinstance(value, types.FunctionType):  # an activation, by name
            if value.__name__ == key:
                continue  # a method Keras wrapped onto the instance (`build`, `quantize`)
            value = value.__name__
        if not key.startswith("_") and key not in _NOT_OPTIONS and (
                _compact(value) is not None and not isinstance(value, Mapping)):
            out[key] = value
    return out


def _config(obj: Any) -> Mapping[str, Any]:
    """`obj.get_config()`, where that cannot import TensorFlow; else its public attributes.

    Keras serializes the objects nested in a config (a dtype policy, an initializer, a
    learning-rate schedule) through a check that imports TensorFlow whenever it is installed
    (about 3 s): on JAX or PyTorch, where TensorFlow is not imported, WeightWatch reads the
    public attributes instead and never imports it.
    """
    if "tensorflow" not in sys.modules:
        return _public_options(obj)
    config = obj.get_config()
    return config if isinstance(config, Mapping) else {}


def _layer_config(layer: Any) -> dict[str, Any]:
    """One layer's compact configuration: its name, class and `get_config()` options."""
    out: dict[str, Any] = {"name": str(layer.name), "class_name": type(layer).__name__}
    try:
        config = _config(layer)
    except Exception:  # noqa: BLE001 - a layer without a config is listed by name
        return out
    for key, value in config.items() if isinstance(config, Mapping) else ():
        compact = None if key in ("name", "trainable") else _compact(value)
        if compact is not None:
            out[str(key)] = compact
    return out


def model_config(model: Any) -> dict[str, Any]:
    """The header's `model.config`: each top-level layer's compact configuration and the
    SHA-256 of them all (`digest`), within `MAX_CONFIG_BYTES`."""
    import hashlib
    import json

    layers = [_layer_config(layer) for layer in getattr(model, "layers", [])]
    text = json.dumps(layers, sort_keys=True)
    out: dict[str, Any] = {"digest": hashlib.sha256(text.encode()).hexdigest(), "layers": layers}
    while len(json.dumps(out["layers"])) > MAX_CONFIG_BYTES:
        out["layers"] = out["layers"][: len(out["layers"]) // 2]
        out["layers_left_out"] = len(layers) - len(out["layers"])
    return out


def fit_extra(model: Any) -> dict[str, Any]:
    """What the header records about the fit besides the weights (`ModelInfo.extra`): the
    optimizer's configuration (learning rate and friends) and the layers' (`model_config`)."""
    out: dict[str, Any] = {"config": model_config(model)}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        try:
            config = dict(_config(optimizer))
            if "tensorflow" not in sys.modules:  # the rate as the optimizer applies it now
                config["learning_rate"] = float(np.asarray(optimizer.learning_rate))
        except Exception:  # noqa: BLE001 - an optimizer without a config is named only
            config = {}
        out["optimizer"] = {"class_name": type(optimizer).__name__, **json_safe(config)}
    return out


def _host_copy(variable: Any) -> np.ndarray:
    """The variable's value as a numpy array that training can no longer change: what
    `capture_into` stores in a new buffer set (`_host_view`, then one copy)."""
    return np.array(_host_view(variable), copy=True, order="C")


def capture_arrays(model: Any) -> list[np.ndarray]:
    """Copy every weight of the model to host memory, in `model.weights` order.

    The callback's own path (`capture_into`) with a pool of one set, used once.
    """
    return capture_into(list(model.weights), BufferPool(1))


def _host_view(variable: Any) -> np.ndarray:
    """The variable's value as host memory, without a copy where the backend allows it.

    The result may share memory with the variable (or with a copy-on-write
    read of it): copy it before training goes on. Falls back to
    `variable.numpy()` (one copy) where no zero-copy path is known.
    """
    value = getattr(variable, "value", None)
    module = type(value).__module__
    try:
        if value is not None and hasattr(value, "read_value"):  # TensorFlow ResourceVariable
            to_numpy = getattr(value.read_value(), "_numpy", None)  # EagerTensor: no copy on CPU
            if to_numpy is not None:
                arr = to_numpy()
                if isinstance(arr, np.ndarray):
                    return arr
        elif module.startswith("jax"):
            return np.asarray(value)  # a view of a CPU jax.Array; a transfer otherwise
        elif value is not None and module.startswith("torch"):
            return value.detach().cpu().numpy()  # shares storage on CPU
    except (TypeError, ValueError, AttributeError, RuntimeError):
        pass  # e.g. torch bfloat16, which numpy cannot view: take the documented path
    arr = variable.numpy()
    return arr if isinstance(arr, np.ndarray) else np.asarray(arr)


class Ticket(NamedTuple):
    """What `BufferPool.release` hands back: the set, and how often it had been acquired.

    `BufferPool.claim(ticket)` gives the set back only while no capture took it since,
    so its arrays still hold the snapshot they held when released.
    """

    buffers: list[np.ndarray]
    generation: int
def host_views(variables: Sequence[Any]) -> Iterator[np.ndarray]:
    """Each variable's value in host memory, one at a time, without a copy where the
    backend allows it (see `_host_view`): valid only until training goes on."""
    for variable in variables:
        yield _host_view(variable)


SPARE_MAX_BYTES = 64 << 20
"""The most bytes of buffer sets kept when a fit ends for the captures of a later fit
(`BufferPool.clear`): a second fit of the model, or of one with weights of the same shapes
(a sweep, a notebook), copies into memory already mapped and touched instead of faulting
fresh pages in, which cost a first fit 20-30 ms at train begin on a 2-core virtual machine
(benchmarks/bench_worker_stages.py). The sets of larger models are let go."""


class _Spares:
    """Buffer arrays of pools that were cleared, by shape and dtype, within `max_bytes`
    (the oldest are let go first); each is handed out once, to a pool's `allocate`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._by_layout: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._order: dict[int, np.ndarray] = {}  # id -> array, oldest first
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """The bytes kept now."""
        return self._bytes

    def keep(self, buffers: Sequence[np.ndarray]) -> bool:
        """Keep a whole set that nothing will use again (False: larger than `max_bytes`)."""
        if sum(a.nbytes for a in buffers) > self.max_bytes:
            return False
        with self._lock:
            for a in buffers:
                self._by_layout.setdefault((a.shape, a.dtype.str), []).append(a)
                self._order[id(a)] = a
                self._bytes += a.nbytes
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._order.values())))
        return True

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A kept array of this shape and dtype (the latest kept), or None."""
        with self._lock:
            same = self._by_layout.get((tuple(shape), np.dtype(dtype).str))
            if not same:
                return None
            a = same[-1]
            self._remove(a)
            return a

    def _remove(self, a: np.ndarray) -> None:
        same = self._by_layout[(a.shape, a.dtype.str)]
        for i in range(len(same) - 1, -1, -1):
            if same[i] is a:
                del same[i]
                break
        del self._order[id(a)]
        self._bytes -= a.nbytes

    def clear(self) -> None:
        """Let every kept array go."""
        with self._lock:
            self._by_layout.clear()
            self._order.clear()
            self._bytes = 0


SPARES = _Spares(SPARE_MAX_BYTES)


class BufferPool:
    """Sets of host arrays that captures copy into, reused from one snapshot to the next.

    Fresh memory is slow to fault in (a new 400 MB array costs far more than
    copying into one already touched), so each set is allocated and touched
    once and handed back with `release` once the worker is done with it. At
    most `max_sets` sets exist: a capture that finds none free allocates a new
    one while fewer exist, else waits for one to be released (back-pressure
    that bounds memory to `max_sets` copies of the weights). `reserve` and
    `fill` let another thread (the worker) allocate a set ahead of time, so
    that the capture that would need it finds it ready instead of allocating
    on the training thread.

    A capture takes the free set released longest ago, so the one released
    last keeps its snapshot as long as another is free: `claim` reads the
    previous snapshot back from memory instead of from disk.

    `allocate` is the one place that allocates a set (a seam for tests).
    """

    def __init__(self, max_sets: int, alive: Any = None):
        if max_sets < 1:
            raise ValueError(f"max_sets must be >= 1. Received: max_sets={max_sets}")
        self.max_sets = max_sets
        self._alive = alive  # a callable: False once nothing will ever release a set
        self._free: list[list[np.ndarray]] = []  # oldest released first
        self._generation: dict[int, int] = {}  # id(set) -> how often it was acquired
        self._created = 0
        self._cond = threading.Condition()

    @property
    def created(self) -> int:
        """How many sets exist or are being allocated (free or in use)."""
        return self._created

    @property
    def in_use(self) -> int:
        """How many sets hold a snapshot that is not released yet."""
        with self._cond:
            return self._created - len(self._free)

    def allocate(self, arrays: Iterable[np.ndarray]) -> list[np.ndarray]:
        """A new set: a C-ordered copy of each array, in memory mapped in at once
        (`scratch.empty`), taken one at a time (a generator keeps one source array alive
        at once)."""
        out = []
        for a in arrays:
            a = np.asarray(a)
            buf = SPARES.take(a.shape, a.dtype)
            if buf is None:
                buf = empty(a.shape, a.dtype)
            np.copyto(buf, a, casting="no")
            out.append(buf)
        return out

    def acquire(self) -> list[np.ndarray] | None:
        """A free set, or None when a new one may be allocated; waits while all are busy."""
        with self._cond:
            while not self._free:
                if self._created < self.max_sets:
                    self._created += 1
                    return None
                if self._alive is not None and not self._alive():
                    raise RuntimeError("the weightwatch worker thread has stopped")
                self._cond.wait(timeout=0.5)
            buffers = self._free.pop(0)
            self._generation[id(buffers)] = self._generation.get(id(buffers), 0) + 1
            return buffers

    def release(self, buffers: list[np.ndarray] | None) -> Ticket | None:
        """Give a set back for the next capture (safe to call with None); see `claim`."""
        if buffers is None:
            return None
        with self._cond:
            self._free.append(buffers)
            self._cond.notify()
            return Ticket(buffers, self._generation.get(id(buffers), 0))

    def claim(self, ticket: Ticket | None) -> list[np.ndarray] | None:
        """The released set of `ticket`, taken out of the free ones, if no capture took it
        since (its arrays unchanged); else None. Give it back with `release`."""
        if ticket is None:
            return None
        with self._cond:
            buffers = ticket.buffers
            if self._generation.get(id(buffers), 0) != ticket.generation:
                return None
            for i, free in enumerate(self._free):
                if free is buffers:
                    del self._free[i]
                    return buffers
            return None

    def reserve(self) -> bool:
        """Count one more set, to be made by `fill` (False: `max_sets` exist already)."""
        with self._cond:
            if self._created >= self.max_sets:
                return False
            self._created += 1
            return True

    def fill(self, specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> None:
        """Allocate and touch the set `reserve` counted, then offer it to the next capture."""
        try:
            # Zeros broadcast from one element: the copy is the set's only memory.
            buffers = self.allocate(np.broadcast_to(np.zeros((), dtype), shape)
                                    for shape, dtype in specs)
        except BaseException:
            self.unreserve()
            raise
        self.release(buffers)

    def unreserve(self) -> None:
        """Forget a set counted by `reserve` (or by `acquire` returning None) but never made."""
        with self._cond:
            self._created -= 1
            self._cond.notify()

    def clear(self, keep: bool = False) -> None:
        """Drop the free sets (their memory goes back once no snapshot refers to them);
        with `keep`, hand them to the next fit's pools instead (`SPARE_MAX_BYTES`): only
        once nothing will read or write them again (the pipeline closed)."""
        with self._cond:
            free, self._free = self._free, []
            self._created -= len(free)
        if keep:
            for buffers in free:  # oldest released first: the latest is let go last
                SPARES.keep(buffers)


def capture_into(variables: Sequence[Any], pool: BufferPool) -> list[np.ndarray]:
    """Copy the variables into a set of the pool's buffers (one memcpy each).

    Returns the set, which equals `[v.numpy() for v in variables]` bit for
    bit; give it back with `pool.release` when done with it.
    """
    buffers = pool.acquire()
    try:
        if buffers is None:
            return pool.allocate(_host_view(v) for v in variables)
        if len(buffers) != len(variables):
            raise ValueError("buffer set does not match the variables")
        for buf, v in zip(buffers, variables):
            src = _host_view(v)
            if src.shape != buf.shape or src.dtype != buf.dtype:
                raise ValueError(
                    f"weight {getattr(v, 'path', '?')} changed from {buf.dtype}{list(buf.shape)} "
                    f"to {src.dtype}{list(src.shape)} during fit"
                )
            np.copyto(buf, src, casting="no")
        return buffers
    except BaseException:
        if buffers is not None:
            pool.release(buffers)
        else:
            pool.unreserve()
        raise


class Shard(NamedTuple):
    """A host copy of one part of a sharded weight, and where it starts in the whole."""

    offset: tuple[int, ...]
    array: np.ndarray


def _jax_value(variable: Any) -> Any:
    value = getattr(variable, "value", None)
    return value if type(value).__module__.startswith("jax") else None


def is_sharded(variable: Any) -> bool:
    """Whether the variable is split across processes (a JAX array this process holds only
    part of: neither all of it addressable here nor replicated on every device)."""
    value = _jax_value(variable)
    if value is None:
        return False
    try:
        return not value.is_fully_addressable and not value.is_fully_replicated
    except AttributeError:
        return False


def process_index() -> tuple[int, int]:
    """(this process's index, the number of processes) of a JAX multi-process run."""
    import jax

    return int(jax.process_index()), int(jax.process_count())


def shared_token() -> str:
    """A token that every process of a JAX multi-process run gets the same: 128 random
    bits drawn by process 0 and broadcast to the others (a collective: every process must
    call it at the same point, as each does at train begin)."""
    import secrets

    from jax.experimental import multihost_utils

    words = np.frombuffer(secrets.token_bytes(16), dtype=np.uint32)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(words), dtype=np.uint32)
    return shared.tobytes().hex()


def _offsets(index: Sequence[slice], shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(sl.indices(n)[0]) for sl, n in zip(index, shape))


def owned_shards(variable: Any) -> list[Shard]:
    """Host copies of the shards of a sharded weight that this process stores.

    Each distinct shard is stored once, by the lowest-numbered process that holds it
    (a shard replicated on several devices or processes is not stored twice).
    """
    value = _jax_value(variable)
    shape = tuple(value.shape)
    owner: dict[tuple[int, ...], int] = {}
    for device, index in value.sharding.devices_indices_map(shape).items():
        off = _offsets(index, shape)
        owner[off] = min(owner.get(off, device.process_index), device.process_index)
    me = process_index()[0]
    out: dict[tuple[int, ...], Shard] = {}
    for shard in value.addressable_shards:
        off = _offsets(shard.index, shape)
        if owner.get(off) == me and off not in out:
            out[off] = Shard(off, np.array(shard.data, copy=True, order="C"))
    return [out[k] for k in sorted(out)]


@dataclasses.dataclass
class Snapshot:
    """One capture of the model's weights, with the step it belongs to.

    Attributes:
        step: The TensorBoard step: the epoch index as Keras passes it to
            callbacks (0 after the first epoch), or one less than the first
            epoch for the initial weights.
        label: `"initial"` for the weights before training, else `"epoch"`.
        epoch: The epoch index Keras reported (None for the initial snapshot).
        arrays: Weight key -> numpy array.
        logs: The epoch's logs (loss, metrics) as floats.
        time: Wall-clock time of the capture (seconds since the epoch).
        shards: Weight key -> the shards this process stores, for the weights split
            across processes (those are not in `arrays`).
    """

    step: int
    label: str
    epoch: int | None
    arrays: dict[str, np.ndarray]
    logs: dict[str, float]
    time: float = dataclasses.field(default_factory=time.time)
    shards: dict[str, list[Shard]] = dataclasses.field(default_factory=dict)


def clean_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric entries of Keras's `logs` dict as plain floats (JSON-safe names kept)."""
    out: dict[str, float] = {}
    for name, value in (logs or {}).items():
        try:
            out[str(name)] = float(np.asarray(value))
        except (TypeError, ValueError):
            continue
    return out
