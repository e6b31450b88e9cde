"""Compare the weights of two runs, or of two snapshots of one run: pure numpy.

`diff_runs(a, b)` compares every weight tensor of snapshot A with the tensor
of the same key in snapshot B: relative change ||B - A|| / ||A||, cosine
similarity, max |B - A|, RMS difference, and whether it is unchanged
(bit-identical, or within a tolerance). `drift(run)` follows each layer
through the snapshots of one run.

Two runs that learned the same thing can hold it in another order: the
kernels of a convolution, the units of a Dense layer. For those layers the
diff also reports the similarity after the best one-to-one matching of B's
units to A's (Hungarian assignment on the cosine similarity of the units,
`scipy.optimize.linear_sum_assignment`), so a layer whose units are the same
but permuted shows as the same. The matching found for a layer is carried
to the inputs of the next layer (and to per-channel layers such as
BatchNormalization in between), as a Sequential chain of layers would need.

Memory: tensors are memory-mapped and reduced in chunks with float64
accumulation, one pair at a time, so diffing two runs of a large model holds
at most a few tensors (and, for matched layers, a units x units matrix).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import WeightWatchError, received
from .run import Run, SnapshotRecord, load_run

__all__ = [
    "DiffResult",
    "DriftResult",
    "FeatureDiff",
    "FeatureMove",
    "LayerDiff",
    "LayerDrift",
    "TensorDiff",
    "diff_runs",
    "drift",
    "split_target",
    "write_diff_images",
]

EXTRA_HINT = "pip install 'keras-weightwatch[diff]'"
# Elements per chunk of the float64 reductions (8 MiB per operand).
CHUNK_ELEMENTS = 1 << 20
# Layers with more units than this are not matched (the units x units matrix and
# the O(n^3) assignment grow quickly; 2048 units take about 0.3 s).
DEFAULT_MAX_MATCH_UNITS = 2048

STATUS_CHANGED = "changed"
STATUS_UNCHANGED = "unchanged"
STATUS_ONLY_A = "only_a"
STATUS_ONLY_B = "only_b"
STATUS_SHAPE = "shape_changed"
_STRUCTURAL = (STATUS_ONLY_A, STATUS_ONLY_B, STATUS_SHAPE)

_STEP_RE = re.compile(r"^(initial|last|-?\d+)$")
_CONV_CLASSES = frozenset({"Conv1D", "Conv2D", "Conv3D", "Convolution1D", "Convolution2D",
                           "Convolution3D"})
_TRANSPOSE_CLASSES = frozenset({"Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
                                "Convolution2DTranspose", "Convolution3DTranspose"})
_SEPARABLE_CLASSES = frozenset({"SeparableConv1D", "SeparableConv2D", "SeparableConvolution1D",
                                "SeparableConvolution2D"})


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class TensorDiff:
    """How one weight tensor differs between snapshot A and snapshot B.

    Attributes:
        name: The weight key (`conv1/kernel`).
        layer: The layer it belongs to (`conv1`).
        status: `"changed"`, `"unchanged"`, `"only_a"`, `"only_b"` or
            `"shape_changed"`.
        shape_a: Its shape in A (None when only in B).
        shape_b: Its shape in B (None when only in A).
        size: Number of elements compared (0 unless both shapes agree).
        identical: Bit-identical in both snapshots.
        norm_a: ||A|| (None unless compared).
        norm_b: ||B||.
        rel_l2: ||B - A|| / ||A|| (0 when both are zero, inf when only A is).
        cosine: <A, B> / (||A|| ||B||) (1 when both are zero, 0 when one is).
        max_abs: max |B - A|.
        rms: sqrt(mean((B - A)^2)).
        matched_cosine: The cosine after B's units were matched one-to-one to
            A's (and B's inputs aligned with the previous layer's matching);
            None where no matching applies.
        matched_rel_l2: ||B_matched - A|| / ||A||, or None.
        units_moved: How many units the best matching moves (None where no
            matching was computed for this tensor's own units).
        nonfinite_a: How many NaN/Inf values the tensor holds in A.
        nonfinite_b: How many NaN/Inf values it holds in B.

    Example (the README's quickstart runs, exp1 and exp2 from two seeds):

    >>> from keras_weightwatch import diff_runs
    >>> t = diff_runs("runs/exp1@initial", "runs/exp1").tensor("hidden/kernel")
    >>> t.status, t.shape_a, t.identical, t.rel_l2 > 0, -1 <= t.cosine <= 1
    ('changed', (4, 8), False, True, True)
    >>> diff_runs("runs/exp1", "runs/exp1").tensor("hidden/kernel").rel_l2
    0.0
    """

    name: str
    layer: str
    status: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    size: int = 0
    identical: bool = False
    norm_a: float | None = None
    norm_b: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    max_abs: float | None = None
    rms: float | None = None
    matched_cosine: float | None = None
    matched_rel_l2: float | None = None
    units_moved: int | None = None
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    @property
    def compared(self) -> bool:
        """True when the tensor is in both snapshots with the same shape."""
        return self.status not in _STRUCTURAL

    @property
    def unchanged(self) -> bool:
        return self.status == STATUS_UNCHANGED

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("shape_a", "shape_b"):
            d[k] = None if d[k] is None else list(d[k])
        d["unchanged"] = self.unchanged
        return {k: _json_num(v) for k, v in d.items()}


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    """The tensors of one layer, with the change of the layer as a whole.

    Attributes:
        name: The layer path (`conv1`, `block/dense_2`).
        tensors: Its tensors, in the model's weight order.
        rel_l2: ||B - A|| / ||A|| over all compared tensors of the layer.
        cosine: Cosine similarity over all compared tensors.
        matched_cosine: The same after matching units, or None.

    Example (the README's quickstart runs, exp1 and exp2 from two seeds):

    >>> from keras_weightwatch import diff_runs
    >>> layer = next(x for x in diff_runs("runs/exp1", "runs/exp2").layers if x.name == "hidden")
    >>> [t.name for t in layer.tensors], layer.matched_cosine >= layer.cosine
    (['hidden/kernel', 'hidden/bias'], True)
    """

    name: str
    tensors: tuple[TensorDiff, ...]
    rel_l2: float | None
    cosine: float | None
    matched_cosine: float | None

    @property
    def unchanged(self) -> bool:
        return all(t.unchanged for t in self.tensors)

    @property
    def structural(self) -> bool:
        """True when a tensor is only in one snapshot or changed shape."""
        return any(not t.compared for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rel_l2": _json_num(self.rel_l2),
            "cosine": _json_num(self.cosine),
            "matched_cosine": _json_num(self.matched_cosine),
            "unchanged": self.unchanged,
            "tensors": [t.name for t in self.tensors],
        }


@dataclasses.dataclass(frozen=True)
class FeatureMove:
    """One named input feature in the top-k rankings of A and B.

    Attributes:
        name: The feature's name.
        rank_a: Its rank by |weight| in A (1 = largest).
        rank_b: Its rank in B.
        weight_a: Its weight in A (signed for a one-unit layer, else the L2
            norm of its kernel row).
        weight_b: Its weight in B.
        sign_flips: How many units' weights for this feature changed sign.

    Example (the README's quickstart runs, exp1 and exp2 from two seeds):

    >>> from keras_weightwatch import diff_runs
    >>> move = diff_runs("runs/exp1", "runs/exp2").features.rows[0]
    >>> move.rank_b, move.move == move.rank_a - move.rank_b, 0 <= move.sign_flips <= 8
    (1, True, True)
    """

    name: str
    rank_a: int
    rank_b: int
    weight_a: float
    weight_b: float
    sign_flips: int

    @property
    def move(self) -> int:
        """Places gained from A to B (positive: it rose)."""
        return self.rank_a - self.rank_b


@dataclasses.dataclass(frozen=True)
class FeatureDiff:
    """The top-k named input features of A and B side by side.

    Attributes:
        key_a: The kernel read in A (`dense/kernel`).
        key_b: The kernel read in B.
        k: How many features each top-k holds.
        units: The layer's number of units.
        rows: B's top-k in order, then features that left A's top-k.

    Example (the README's quickstart runs, exp1 and exp2 from two seeds):

    >>> from keras_weightwatch import diff_runs
    >>> f = diff_runs("runs/exp1", "runs/exp2").features
    >>> f.key_a, f.k, f.units, sorted(m.name for m in f.rows)
    ('hidden/kernel', 4, 8, ['age', 'distance', 'noise', 'rooms'])
    """

    key_a: str
    key_b: str
    k: int
    units: int
    rows: tuple[FeatureMove, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "key_a": self.key_a,
            "key_b": self.key_b,
            "k": self.k,
            "units": self.units,
            "rows": [
                {**{k: _json_num(v) for k, v in dataclasses.asdict(r).items()}, "move": r.move}
                for r in self.rows
            ],
        }


@dataclasses.dataclass(frozen=True)
class DiffResult:
    """What `diff_runs` found.

    Attributes:
        a: Snapshot A as `path@step`.
        b: Snapshot B as `path@step`.
        tolerance: A tensor with max |B - A| <= tolerance is unchanged.
        layers: Every layer, most changed first (layers with a tensor only
            in one snapshot or of another shape come first, unchanged
            layers last).
        features: The named input features side by side, or None.

    Example (the README's quickstart runs, exp1 and exp2 from two seeds):

    >>> from keras_weightwatch import diff_runs
    >>> result = diff_runs("runs/exp1", "runs/exp2")
    >>> result.counts()["changed"], sorted(layer.name for layer in result.layers)
    (4, ['hidden', 'out'])
    >>> sorted(result.to_json()["tensors"][0])[:4]
    ['cosine', 'identical', 'layer', 'matched_cosine']
    """

    a: str
    b: str
    tolerance: float
    layers: tuple[LayerDiff, ...]
    features: FeatureDiff | None = None

    @property
    def tensors(self) -> tuple[TensorDiff, ...]:
        """Every tensor of either snapshot, layer by layer."""
        return tuple(t for layer in self.layers for t in layer.tensors)

    def tensor(self, name: str) -> TensorDiff:
        """The diff of the tensor with key `name`."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        """How many tensors have each status."""
        out = dict.fromkeys(
            (STATUS_CHANGED, STATUS_UNCHANGED, STATUS_ONLY_A, STATUS_ONLY_B, STATUS_SHAPE), 0
        )
        for t in self.tensors:
            out[t.status] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers become the strings `"inf"`, `"-inf"`, `"nan"`."""
        return {
            "a": self.a,
            "b": self.b,
            "tolerance": self.tolerance,
            "counts": self.counts(),
            "layers": [layer.to_json() for layer in self.layers],
            "tensors": [t.to_json() for t in self.tensors],
            "features": None if self.features is None else self.features.to_json(),
        }


@dataclasses.dataclass(frozen=True)
class LayerDrift:
    """How one layer moved through the snapshots of a run.

    Attributes:
        name: The layer path.
        step_change: For each snapshot after the first, ||W_t - W_prev|| /
            ||W_prev|| over the layer's tensors.
        from_initial: For each snapshot after the first, ||W_t - W_0|| /
            ||W_0||, W_0 being the first snapshot (the initial weights when
            the run has them).

    Example (the README's quickstart run):

    >>> from keras_weightwatch import drift
    >>> hidden = drift("runs/exp1").layers[0]
    >>> hidden.name, len(hidden.step_change), len(hidden.from_initial)
    ('hidden', 20, 20)
    >>> hidden.step_change[0] == hidden.from_initial[0]
    True
    """

    name: str
    step_change: tuple[float, ...]
    from_initial: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class DriftResult:
    """What `drift` found.

    Attributes:
        path: The run directory.
        steps: The snapshot names in order (`"initial"`, `"0"`, `"1"`, ...).
        layers: Every layer with weights, in the model's order.

    Example (the README's quickstart run):

    >>> from keras_weightwatch import drift
    >>> d = drift("runs/exp1")
    >>> d.steps[:3], [layer.name for layer in d.layers]
    (('initial', '0', '1'), ['hidden', 'out'])
    """

    path: str
    steps: tuple[str, ...]
    layers: tuple[LayerDrift, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "steps": list(self.steps),
            "layers": [
                {
                    "name": layer.name,
                    "step_change": [_json_num(v) for v in layer.step_change],
                    "from_initial": [_json_num(v) for v in layer.from_initial],
                }
                for layer in self.layers
            ],
        }


# --------------------------------------------------------------------------- helpers


def _json_num(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def split_target(target: str | os.PathLike) -> tuple[str, str]:
    """Split `RUN@STEP` into the run directory and the step (`"last"` when absent).

    STEP is an epoch step, `initial` or `last`. A directory whose own name
    holds `@` is taken whole when it exists.

    Example:

    >>> split_target("runs/exp1@3")
    ('runs/exp1', '3')
    >>> split_target("runs/exp1")
    ('runs/exp1', 'last')
    """
    text = os.fspath(target)
    if "@" in text and not os.path.isdir(text):
        path, step = text.rsplit("@", 1)
        if not _STEP_RE.match(step):
            raise WeightWatchError(
                f"{text}: {step!r} is not a step; use RUN@EPOCH, RUN@initial or RUN@last"
            )
        return path, step
    return text, "last"


def _step_value(step: str | int) -> str | int:
    if isinstance(step, str) and step not in ("initial", "last"):
        return int(step)
    return step


def _open(target: str | os.PathLike | Run, step: str | int | None) -> tuple[Run, SnapshotRecord]:
    if isinstance(target, Run):
        run, text_step = target, "last"
    elif isinstance(target, (str, os.PathLike)):
        path, text_step = split_target(target)
        run = load_run(path)
    else:
        raise TypeError(
            f"a run must be a path, 'path@step' or a Run. {received('run', target)}"
        )
    snap = run.snapshot(_step_value(text_step) if step is None else step)
    return run, snap


def _as_2d(arr: np.ndarray) -> np.ndarray:
    """The tensor as (rows, last axis); complex values as their real and imaginary parts."""
    if arr.dtype.kind == "c":
        flat = np.ascontiguousarray(arr).reshape(-1)
        return flat.view(flat.real.dtype).reshape(-1, 1)
    if arr.ndim == 0:
        return arr.reshape(1, 1)
    if arr.ndim == 1:
        return arr.reshape(-1, 1)
    return arr.reshape(-1, arr.shape[-1])


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


@dataclasses.dataclass
class _Sums:
    """Float64 accumulators of one tensor pair."""

    saa: float = 0.0
    sbb: float = 0.0
    sab: float = 0.0
    sdd: float = 0.0
    maxd: float = 0.0
    size: int = 0
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    def add(self, other: _Sums) -> None:
        self.saa += other.saa
        self.sbb += other.sbb
        self.sab += other.sab
        self.sdd += other.sdd
        self.maxd = float(np.maximum(self.maxd, other.maxd))  # NaN wins
        self.size += other.size
        self.nonfinite_a += other.nonfinite_a
        self.nonfinite_b += other.nonfinite_b

    def rel_l2(self) -> float:
        if self.saa > 0:
            return math.sqrt(self.sdd) / math.sqrt(self.saa)
        if math.isnan(self.saa) or math.isnan(self.sdd):
            return math.nan
        return 0.0 if self.sdd == 0 else math.inf

    def cosine(self) -> float:
        if math.isnan(self.saa) or math.isnan(self.sbb) or math.isnan(self.sab):
            return math.nan
        if self.saa > 0 and self.sbb > 0:
            if self.saa == self.sbb:
                c = self.sab / self.saa  # exact for a tensor compared with itself
            else:
                c = self.sab / (math.sqrt(self.saa) * math.sqrt(self.sbb))
            return min(1.0, max(-1.0, c))
        return 1.0 if self.saa == 0 and self.sbb == 0 else 0.0

    def rms(self) -> float:
        return math.sqrt(self.sdd / self.size) if self.size else 0.0


def _sums(*args: Any, **kwargs: Any):
    """`_chunk_sums` with NaN/Inf arithmetic kept quiet: it yields NaN/Inf results, counted."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _chunk_sums(*args, **kwargs)


def _chunk_sums(
    a2: np.ndarray,
    b2: np.ndarray,
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
    gram: bool = False,
) -> tuple[_Sums, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Reduce a pair of (rows, units) arrays in chunks: sums, and optionally the units' Gram.

    `rows` and `cols` reorder B (rows: its inputs, cols: its units) chunk by
    chunk, so B is never copied whole. Returns the sums, and with `gram` the
    units x units matrix A^T B and the squared norms of A's and B's units.
    """
    n_rows, units = a2.shape
    step = max(1, CHUNK_ELEMENTS // max(units, 1))
    s = _Sums(size=int(a2.size))
    g = np.zeros((units, units)) if gram else None
    na = np.zeros(units) if gram else None
    nb = np.zeros(units) if gram else None
    maxd = 0.0
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        ca = _f64(a2[r0:r1])
        cb = b2[r0:r1] if rows is None else b2[rows[r0:r1]]
        if cols is not None:
            cb = cb[:, cols]
        cb = _f64(cb)
        fa, fb = ca.reshape(-1), cb.reshape(-1)
        d = fb - fa
        s.saa += float(np.dot(fa, fa))
        s.sbb += float(np.dot(fb, fb))
        s.sab += float(np.dot(fa, fb))
        s.sdd += float(np.dot(d, d))
        if d.size:
            maxd = float(np.maximum(maxd, np.max(np.abs(d))))  # NaN wins
            if not math.isfinite(maxd) or not math.isfinite(s.saa + s.sbb):
                s.nonfinite_a += int(fa.size - np.count_nonzero(np.isfinite(fa)))
                s.nonfinite_b += int(fb.size - np.count_nonzero(np.isfinite(fb)))
        if gram:
            if not (math.isfinite(maxd) and math.isfinite(s.saa + s.sbb)):
                # NaN/Inf would poison the whole matching: match on the finite values.
                ca, cb = _finite(ca), _finite(cb)
            # float32 products are ample to rank units; the matched sums are exact float64.
            g += ca.T.astype(np.float32) @ cb.astype(np.float32)
            na += np.einsum("ij,ij->j", ca, ca)
            nb += np.einsum("ij,ij->j", cb, cb)
    s.maxd = maxd
    return s, g, na, nb


def _finite(x: np.ndarray) -> np.ndarray:
    """`x` with NaN and +-Inf replaced by 0."""
    return np.where(np.isfinite(x), x, 0.0)


def _self_sums(a2: np.ndarray) -> _Sums:
    """The sums of a tensor compared with itself (bit-identical files)."""
    n_rows, units = a2.shape
    step = max(1, CHUNK_ELEMENTS // max(units, 1))
    saa = 0.0
    nonfinite = 0
    for r0 in range(0, n_rows, step):
        fa = _f64(a2[r0 : r0 + step]).reshape(-1)
        saa += float(np.dot(fa, fa))
        if not math.isfinite(saa):
            nonfinite += int(fa.size - np.count_nonzero(np.isfinite(fa)))
    return _Sums(saa=saa, sbb=saa, sab=saa, sdd=0.0, maxd=0.0, size=int(a2.size),
                 nonfinite_a=nonfinite, nonfinite_b=nonfinite)


def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:
        raise ImportError(
            f"matching units needs scipy: {EXTRA_HINT} (or pass match=False)"
        ) from e
    return linear_sum_assignment


def _best_matching(g: np.ndarray, na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    """perm[i] = the unit of B matched to unit i of A, maximising the summed cosine."""
    lsa = _linear_sum_assignment()
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_a = np.where(na > 0, 1.0 / np.sqrt(na), 0.0)
        inv_b = np.where(nb > 0, 1.0 / np.sqrt(nb), 0.0)
    cos = g  # scaled in place: one units x units matrix
    cos *= inv_a[:, None]
    cos *= inv_b[None, :]
    np.nan_to_num(cos, copy=False, nan=-2.0, posinf=-2.0, neginf=-2.0)
    # Prefer keeping a unit in place when matchings tie (identical units).
    cos[np.diag_indices_from(cos)] += 1e-9
    rows, cols = lsa(cos, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def _input_rows(shape: tuple[int, ...], carry: np.ndarray) -> np.ndarray | None:
    """Row order of a units-last kernel's (rows, units) view with its input axis permuted."""
    n = len(carry)
    if len(shape) >= 3 and shape[-2] != n:
        return None
    n_rows = math.prod(shape[:-1])
    if len(shape) < 2 or n_rows % n:
        return None
    ar = np.arange(n_rows, dtype=np.int64)
    return (ar // n) * n + carry[ar % n]


def _units_axis(layer_class: str | None, key: str, shape: tuple[int, ...]) -> int | None:
    """The axis of a kernel's units (-1 or -2), or None when its units are not matched."""
    last = key.split("#", 1)[0].rsplit("/", 1)[-1]
    if layer_class is None:
        return -1 if last == "kernel" and 2 <= len(shape) <= 5 else None
    if layer_class == "Dense" or layer_class in _CONV_CLASSES:
        return -1 if last == "kernel" and 2 <= len(shape) <= 5 else None
    if layer_class in _TRANSPOSE_CLASSES:
        return -2 if last == "kernel" and 3 <= len(shape) <= 5 else None
    if layer_class in _SEPARABLE_CLASSES:
        return -1 if last == "pointwise_kernel" else None
    return None


def _layer_classes(run: Run) -> dict[str, str]:
    return {layer.name: layer.class_name for layer in run.layers}


def _ordered_keys(run_a: Run, snap_a: SnapshotRecord, run_b: Run, snap_b: SnapshotRecord):
    """Keys of A in A's weight order, then keys only in B in B's order."""
    def order(run: Run, snap: SnapshotRecord) -> list[str]:
        keys = [s.key for s in run.specs if s.key in snap.tensors]
        return keys + sorted(k for k in snap.tensors if k not in set(keys))

    ka = order(run_a, snap_a)
    kb = order(run_b, snap_b)
    seen = set(ka)
    return ka + [k for k in kb if k not in seen]


def _layer_of(run_a: Run, run_b: Run, key: str) -> str:
    for run in (run_a, run_b):
        for s in run.specs:
            if s.key == key:
                return s.layer
    base = key.split("#", 1)[0]
    return base.rsplit("/", 1)[0] if "/" in base else ""


def _compile_layer(layer: str | re.Pattern | None) -> re.Pattern | None:
    if layer is None or isinstance(layer, re.Pattern):
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"`layer` must be a regular expression string. {received('layer', layer)}")
    try:
        return re.compile(layer)
    except re.error as e:
        raise ValueError(
            f"`layer` is not a valid regular expression ({e}). {received('layer', layer)}"
        ) from None


def _check_tolerance(tolerance: Any) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)):
        raise TypeError(f"`tolerance` must be a number >= 0. {received('tolerance', tolerance)}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"`tolerance` must be a number >= 0. {received('tolerance', tolerance)}")
    return float(tolerance)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer >= 1. {received(name, value)}")
    if value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. {received(name, value)}")
    return int(value)


def _load(run: Run, snap: SnapshotRecord, key: str, verify: bool) -> np.ndarray:
    return run.weights(snap.step, keys=[key], verify=verify)[key]


# --------------------------------------------------------------------------- features


def _feature_key(run: Run, names: Sequence[str]) -> str | None:
    """The key of the kernel the run's feature table reads, from its settings and weights."""
    settings = run.settings
    recorded = settings.get("feature_key")
    if isinstance(recorded, str) and any(s.key == recorded for s in run.specs):
        return recorded
    wanted = settings.get("feature_layer")

    def is_kernel(s) -> bool:
        last = s.key.split("#", 1)[0].rsplit("/", 1)[-1]
        return last == "kernel" and len(s.shape) == 2 and s.shape[0] == len(names)

    for s in run.specs:
        if not is_kernel(s):
            continue
        if wanted is None or s.layer == wanted or s.layer.rsplit("/", 1)[-1] == wanted:
            return s.key
    return None


def _rankings(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-feature weight, rank of each feature from 1), ranked as `top_k_features` ranks."""
    from .features import feature_weights

    w = feature_weights(np.asarray(kernel, dtype=np.float64))
    mag = np.abs(w)
    mag = np.where(np.isnan(mag), -1.0, mag)
    order = np.argsort(-mag, kind="stable")
    ranks = np.empty(len(w), dtype=np.int64)
    ranks[order] = np.arange(1, len(w) + 1)
    return w, ranks


def _feature_diff(
    run_a: Run, snap_a: SnapshotRecord, run_b: Run, snap_b: SnapshotRecord,
    top_k: int | None, verify: bool,
) -> FeatureDiff | None:
    names_a = run_a.settings.get("feature_names")
    names_b = run_b.settings.get("feature_names")
    if not names_a or not names_b or sorted(names_a) != sorted(names_b):
        return None
    key_a = _feature_key(run_a, names_a)
    key_b = _feature_key(run_b, names_b)
    if key_a is None or key_b is None or key_a not in snap_a.tensors or key_b not in snap_b.tensors:
        return None
    ka = np.asarray(_load(run_a, snap_a, key_a, verify), dtype=np.float64)
    kb = np.asarray(_load(run_b, snap_b, key_b, verify), dtype=np.float64)
    if ka.shape != kb.shape:
        return None
    # Put B's rows in A's feature order (the names are the same, perhaps in another order).
    where_b = {n: i for i, n in enumerate(names_b)}
    kb = kb[[where_b[n] for n in names_a]]
    k = top_k if top_k is not None else int(run_b.settings.get("top_k") or 5)
    k = min(k, len(names_a))
    wa, ra = _rankings(ka)
    wb, rb = _rankings(kb)
    flips = np.sum((np.sign(ka) * np.sign(kb)) < 0, axis=1)
    rows_b = sorted((i for i in range(len(names_a)) if rb[i] <= k), key=lambda i: rb[i])
    rows_a = sorted((i for i in range(len(names_a)) if ra[i] <= k and rb[i] > k),
                    key=lambda i: ra[i])
    rows = tuple(
        FeatureMove(
            name=str(names_a[i]),
            rank_a=int(ra[i]),
            rank_b=int(rb[i]),
            weight_a=float(wa[i]),
            weight_b=float(wb[i]),
            sign_flips=int(flips[i]),
        )
        for i in rows_b + rows_a
    )
    return FeatureDiff(key_a=key_a, key_b=key_b, k=k, units=int(ka.shape[1]), rows=rows)


# --------------------------------------------------------------------------- diff


def _finish(
    key: str, layer: str, shape: tuple[int, ...], identical: bool, s: _Sums,
    matched: _Sums | None, moved: int | None, tolerance: float,
) -> TensorDiff:
    unchanged = identical or (not math.isnan(s.maxd) and s.maxd <= tolerance)
    return TensorDiff(
        name=key,
        layer=layer,
        status=STATUS_UNCHANGED if unchanged else STATUS_CHANGED,
        shape_a=shape,
        shape_b=shape,
        size=s.size,
        identical=identical,
        norm_a=math.sqrt(s.saa) if s.saa >= 0 else math.nan,
        norm_b=math.sqrt(s.sbb) if s.sbb >= 0 else math.nan,
        rel_l2=s.rel_l2(),
        cosine=s.cosine(),
        max_abs=s.maxd,
        rms=s.rms(),
        matched_cosine=None if matched is None else matched.cosine(),
        matched_rel_l2=None if matched is None else matched.rel_l2(),
        units_moved=moved,
        nonfinite_a=s.nonfinite_a,
        nonfinite_b=s.nonfinite_b,
    )


def diff_runs(
    a: str | os.PathLike | Run,
    b: str | os.PathLike | Run,
    *,
    step_a: int | str | None = None,
    step_b: int | str | None = None,
    tolerance: float = 0.0,
    layer: str | None = None,
    match: bool = True,
    max_match_units: int = DEFAULT_MAX_MATCH_UNITS,
    top_k: int | None = None,
    verify: bool = True,
) -> DiffResult:
    """Compare every weight tensor of snapshot A with the same tensor of snapshot B.

    Each side is a run directory, optionally ending in `@STEP` (`runs/exp1@3`,
    `runs/exp1@initial`; default: the last snapshot), or an open `Run`. Two
    snapshots of one run compare epochs; two runs compare training runs.
    Tensors are matched by weight key (`conv1/kernel`), read memory-mapped
    one pair at a time and reduced in float64 chunks.

    Args:
        a: Snapshot A: a run directory, `"path@step"` or a `Run`.
        b: Snapshot B, likewise.
        step_a: A's step (an int, `"initial"` or `"last"`), instead of an
            `@STEP` suffix. Defaults to None.
        step_b: B's step. Defaults to None.
        tolerance: Tensors whose max |B - A| is at most this are unchanged.
            Defaults to 0.0 (only equal values).
        layer: A regular expression; only weights whose key it matches (with
            `re.search`) are compared. Defaults to None (all).
        match: Also compare Dense and convolution layers after the best
            one-to-one matching of their units (needs scipy). Defaults to True.
        max_match_units: Layers with more units are not matched. Defaults
            to 2048.
        top_k: Rows of the named-feature comparison. Defaults to None: the
            run's `top_k` setting.
        verify: Check each tensor file's SHA-256 before reading it. Defaults
            to True.

    Returns:
        A `DiffResult`.

    Raises:
        WeightWatchError: a run or step is missing, or the snapshots have no
            weight in common.

    Example:

    >>> result = diff_runs("runs/seed1", "runs/seed2")      # doctest: +SKIP
    >>> result.tensor("conv1/kernel").cosine                # doctest: +SKIP
    0.0213
    >>> diff_runs("runs/exp1@initial", "runs/exp1@3").layers[0].name  # doctest: +SKIP
    'dense'
    """
    tolerance = _check_tolerance(tolerance)
    pattern = _compile_layer(layer)
    max_match_units = _check_positive_int("max_match_units", max_match_units)
    if top_k is not None:
        top_k = _check_positive_int("top_k", top_k)
    run_a, snap_a = _open(a, step_a)
    run_b, snap_b = _open(b, step_b)
    label_a = f"{run_a.path}@{snap_a.name}"
    label_b = f"{run_b.path}@{snap_b.name}"
    keys = _ordered_keys(run_a, snap_a, run_b, snap_b)
    if pattern is not None:
        keys = [k for k in keys if pattern.search(k)]
        if not keys:
            raise WeightWatchError(
                f"no weight of {label_a} or {label_b} matches {pattern.pattern!r}"
            )
    common = [k for k in keys if k in snap_a.tensors and k in snap_b.tensors]
    if not common:
        raise WeightWatchError(f"{label_a} and {label_b} have no weight tensor in common")
    classes = _layer_classes(run_a)

    # Group keys by layer, in the model's order.
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(_layer_of(run_a, run_b, k), []).append(k)

    layers: list[LayerDiff] = []
    carry: np.ndarray | None = None  # the matching of this layer's input units
    feeds = _weighted_feeds(run_a)
    out_perms: dict[str, np.ndarray | None] = {}  # layer -> the matching of its outputs
    for lname, lkeys in groups.items():
        if feeds is not None:
            # Along the model's graph: the inputs follow the layer(s) that feed them, when
            # all of those were matched the same way (an Add of two matched branches).
            sources = [out_perms.get(src) for src in feeds.get(lname, ())]
            carry = None
            if sources and all(
                p is not None and np.array_equal(p, sources[0]) for p in sources
            ):
                carry = sources[0]
        diffs: dict[str, TensorDiff] = {}
        raw_total, matched_total = _Sums(), _Sums()
        any_matched = False
        compared = []
        for k in lkeys:
            ra, rb = snap_a.tensors.get(k), snap_b.tensors.get(k)
            if ra is None or rb is None:
                diffs[k] = TensorDiff(
                    name=k, layer=lname, status=STATUS_ONLY_A if rb is None else STATUS_ONLY_B,
                    shape_a=None if ra is None else ra.shape,
                    shape_b=None if rb is None else rb.shape,
                )
            elif ra.shape != rb.shape:
                diffs[k] = TensorDiff(
                    name=k, layer=lname, status=STATUS_SHAPE, shape_a=ra.shape, shape_b=rb.shape
                )
            else:
                compared.append(k)
        matchable = {
            k: _units_axis(classes.get(lname), k, snap_a.tensors[k].shape) for k in compared
        }
        kernels = [k for k in compared if matchable[k] is not None]
        perm: np.ndarray | None = None
        next_carry: np.ndarray | None = None
        # Kernels first: their matching also orders the layer's bias.
        order = kernels[:1] + [k for k in compared if k not in kernels[:1]]
        for k in order:
            rec_a, rec_b = snap_a.tensors[k], snap_b.tensors[k]
            identical = rec_a.sha256 == rec_b.sha256
            arr_a = _load(run_a, snap_a, k, verify)
            arr_b = arr_a if identical else _load(run_b, snap_b, k, verify)
            axis = matchable[k] if k in kernels[:1] else None
            matched: _Sums | None = None
            moved: int | None = None
            if axis is not None:
                if axis == -2:
                    arr_a = np.ascontiguousarray(np.moveaxis(arr_a, -2, -1))
                    arr_b = np.ascontiguousarray(np.moveaxis(arr_b, -2, -1))
                a2, b2 = _as_2d(arr_a), _as_2d(arr_b)
                units = a2.shape[1]
                rows = None if carry is None else _input_rows(arr_a.shape, carry)
                if match and units <= max_match_units and arr_a.dtype.kind != "c":
                    s, g, na, nb = _sums(a2, b2, gram=rows is None)
                    if rows is not None:
                        _, g, na, nb = _sums(a2, b2, rows=rows, gram=True)
                    perm = _best_matching(g, na, nb)
                    moved = int(np.sum(perm != np.arange(units)))
                    if moved or rows is not None:
                        matched = _sums(a2, b2, rows=rows, cols=perm)[0]
                    else:
                        matched = s
                    next_carry = perm
                else:
                    s = _self_sums(a2) if identical else _sums(a2, b2)[0]
            else:
                a2, b2 = _as_2d(arr_a), _as_2d(arr_b)
                s = _self_sums(a2) if identical else _sums(a2, b2)[0]
                # A bias (or a per-channel weight) follows its layer's units.
                align = perm if perm is not None else (carry if not kernels else None)
                if (
                    align is not None
                    and arr_a.ndim == 1
                    and arr_a.shape[0] == len(align)
                    and arr_a.dtype.kind != "c"
                ):
                    matched = _sums(a2, b2, rows=align)[0]
            del arr_a, arr_b, a2, b2
            diffs[k] = _finish(k, lname, rec_a.shape, identical, s, matched, moved, tolerance)
            raw_total.add(s)
            if matched is not None:
                any_matched = True
            matched_total.add(matched if matched is not None else s)
        # Carry the matching on: through a per-channel layer, or from this layer's kernel.
        per_channel = carry is not None and all(
            len(snap_a.tensors[k].shape) == 1 and snap_a.tensors[k].shape[0] == len(carry)
            for k in compared
        )
        if kernels or not (compared and per_channel):
            carry = next_carry if kernels else None
        out_perms[lname] = carry
        tensors = tuple(diffs[k] for k in lkeys)
        layers.append(
            LayerDiff(
                name=lname,
                tensors=tensors,
                rel_l2=raw_total.rel_l2() if compared else None,
                cosine=raw_total.cosine() if compared else None,
                matched_cosine=matched_total.cosine() if any_matched else None,
            )
        )
    features = _feature_diff(run_a, snap_a, run_b, snap_b, top_k, verify)
    return DiffResult(
        a=label_a,
        b=label_b,
        tolerance=tolerance,
        layers=tuple(sorted(layers, key=_change_order)),
        features=features,
    )


def _weighted_feeds(run: Run) -> dict[str, tuple[str, ...]] | None:
    """For each top-level layer with weights, the layers with weights that feed it,
    looking through layers without weights (Flatten, pooling, Add, activations).

    None when the run does not record its graph (older runs, subclassed models): the
    matching is then carried from each layer to the next in weight order.
    """
    layers = run.layers
    if not layers or any(layer.inbound is None for layer in layers):
        return None
    inbound = {layer.name: layer.inbound or () for layer in layers}
    weighted = {layer.name for layer in layers if layer.params}

    def sources(name: str, seen: frozenset[str]) -> tuple[str, ...]:
        out: list[str] = []
        for parent in inbound.get(name, ()):
            if parent in seen:
                continue
            if parent in weighted:
                found: tuple[str, ...] = (parent,)
            elif parent in inbound and inbound[parent]:
                found = sources(parent, seen | {parent})
            else:
                found = ("<input>",)  # a model input: nothing to carry
            out += [f for f in found if f not in out]
        return tuple(out)

    return {name: sources(name, frozenset({name})) for name in weighted}


def _change_order(layer: LayerDiff) -> tuple:
    rel = layer.rel_l2
    if rel is None or math.isnan(rel):
        rel = math.inf
    return (not layer.structural, layer.unchanged, -rel)


# --------------------------------------------------------------------------- drift


def drift(
    run: str | os.PathLike | Run, *, layer: str | None = None, verify: bool = True
) -> DriftResult:
    """How much each layer changed between successive snapshots, and since the first.

    Args:
        run: A run directory or an open `Run`.
        layer: A regular expression; only weights whose key it matches count.
            Defaults to None (all).
        verify: Check each tensor file's SHA-256 before reading it. Defaults
            to True.

    Returns:
        A `DriftResult`: per layer, ||W_t - W_prev|| / ||W_prev|| and
        ||W_t - W_0|| / ||W_0|| for every snapshot after the first.

    Raises:
        WeightWatchError: the run is missing or has fewer than two snapshots.

    Example:

    >>> d = drift("runs/exp1")             # doctest: +SKIP
    >>> d.steps                            # doctest: +SKIP
    ('initial', '0', '1')
    >>> d.layers[0].from_initial           # doctest: +SKIP
    (0.052, 0.087)
    """
    pattern = _compile_layer(layer)
    if isinstance(run, (str, os.PathLike)):
        run = load_run(run)
    elif not isinstance(run, Run):
        raise TypeError(f"`run` must be a path or a Run. {received('run', run)}")
    snaps = run.snapshots
    if len(snaps) < 2:
        raise WeightWatchError(
            f"{run.path}: drift needs at least two snapshots; the run has {len(snaps)}"
        )
    groups: dict[str, list[str]] = {}
    for spec in run.specs:
        if pattern is not None and not pattern.search(spec.key):
            continue
        if all(spec.key in s.tensors for s in snaps):
            groups.setdefault(spec.layer, []).append(spec.key)
    if not groups:
        raise WeightWatchError(f"{run.path}: no weight to follow" + (
            f" matches {pattern.pattern!r}" if pattern is not None else ""))
    out = []
    for lname, keys in groups.items():
        step = [_Sums() for _ in snaps[1:]]
        total = [_Sums() for _ in snaps[1:]]
        for key in keys:
            first = _as_2d(_load(run, snaps[0], key, verify))
            prev, prev_rec = first, snaps[0].tensors[key]
            for i, snap in enumerate(snaps[1:]):
                rec = snap.tensors[key]
                cur = _as_2d(_load(run, snap, key, verify))
                step[i].add(_self_sums(prev) if rec.sha256 == prev_rec.sha256
                            else _sums(prev, cur)[0])
                total[i].add(_self_sums(first) if rec.sha256 == snaps[0].tensors[key].sha256
                             else _sums(first, cur)[0])
                prev, prev_rec = cur, rec
            del first, prev
        out.append(
            LayerDrift(
                name=lname,
                step_change=tuple(s.rel_l2() for s in step),
                from_initial=tuple(s.rel_l2() for s in total),
            )
        )
    return DriftResult(path=run.path, steps=tuple(s.name for s in snaps), layers=tuple(out))


# --------------------------------------------------------------------------- images


def write_diff_images(
    a: str | os.PathLike | Run,
    b: str | os.PathLike | Run,
    logdir: str | os.PathLike,
    *,
    step_a: int | str | None = None,
    step_b: int | str | None = None,
    layer: str | None = None,
    max_tiles: int = 256,
    verify: bool = True,
) -> list[str]:
    """Write A's, B's and B - A's kernel grids of every convolution layer to TensorBoard.

    For each convolution kernel (3 to 5 dimensions) in both snapshots with
    the same shape, three images are written at step 0 into one event file
    in `logdir`: tags `<key>/A`, `<key>/B` and `<key>/B_minus_A`. The
    difference is drawn on its own colour scale.

    Args:
        a: Snapshot A: a run directory, `"path@step"` or a `Run`.
        b: Snapshot B, likewise.
        logdir: A new TensorBoard run directory (refused when it already holds
            event files).
        step_a: A's step, instead of an `@STEP` suffix. Defaults to None.
        step_b: B's step. Defaults to None.
        layer: A regular expression on weight keys. Defaults to None (all).
        max_tiles: The most tiles per grid. Defaults to 256.
        verify: Check each tensor file's SHA-256 before reading it. Defaults
            to True.

    Returns:
        The tags written.

    Example:

    >>> write_diff_images("runs/seed1", "runs/seed2", "tb/diff")  # doctest: +SKIP
    ['conv1/kernel/A', 'conv1/kernel/B', 'conv1/kernel/B_minus_A']
    """
    import glob

    from .images import encode_png, kernel_grid
    from .summaries import EventWriter, image, tag

    pattern = _compile_layer(layer)
    max_tiles = _check_positive_int("max_tiles", max_tiles)
    logdir = os.fspath(logdir)
    if glob.glob(os.path.join(glob.escape(logdir), "events.out.tfevents.*")):
        raise WeightWatchError(
            f"{logdir}: already holds TensorBoard event files; choose a new directory for images"
        )
    run_a, snap_a = _open(a, step_a)
    run_b, snap_b = _open(b, step_b)
    label_a, label_b = f"{run_a.path}@{snap_a.name}", f"{run_b.path}@{snap_b.name}"
    keys = [k for k in _ordered_keys(run_a, snap_a, run_b, snap_b)
            if k in snap_a.tensors and k in snap_b.tensors]
    tags: list[str] = []
    with EventWriter(logdir) as writer:
        for k in keys:
            ra, rb = snap_a.tensors[k], snap_b.tensors[k]
            last = k.split("#", 1)[0].rsplit("/", 1)[-1]
            if ra.shape != rb.shape or not 3 <= len(ra.shape) <= 5 or "kernel" not in last:
                continue
            if pattern is not None and not pattern.search(k):
                continue
            ka = np.asarray(_load(run_a, snap_a, k, verify), dtype=np.float64)
            kb = np.asarray(_load(run_b, snap_b, k, verify), dtype=np.float64)
            values = []
            for suffix, arr, what in (
                ("A", ka, label_a), ("B", kb, label_b), ("B_minus_A", kb - ka, "B - A")
            ):
                grid = kernel_grid(arr, max_tiles=max_tiles)
                h, w = grid.image.shape[:2]
                t = tag(k, suffix)
                values.append(image(t, [encode_png(grid.image)], w, h,
                                    description=f"`{k}`: {what}"))
                tags.append(t)
            writer.write(0, values)
    return tags
