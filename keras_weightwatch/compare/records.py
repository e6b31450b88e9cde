"""What a comparison finds: the records `diff_runs` and `drift` return, and the statuses.

Frozen dataclasses, each with `to_json()`; a non-finite number becomes the string
`"NaN"`, `"Inf"` or `"-Inf"` in JSON (the package's one spelling, `textfmt`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..textfmt import nonfinite_text

STATUS_CHANGED = "changed"
STATUS_UNCHANGED = "unchanged"
STATUS_ONLY_A = "only_a"
STATUS_ONLY_B = "only_b"
STATUS_SHAPE = "shape_changed"
STATUSES = (STATUS_CHANGED, STATUS_UNCHANGED, STATUS_ONLY_A, STATUS_ONLY_B, STATUS_SHAPE)

DEFAULT_MAX_MATCH_UNITS = 2048
"""Layers with more units are not matched (the units x units matrix and the O(n^3)
assignment grow quickly; 2048 units take about 0.3 s)."""
"""Every status of a `TensorDiff`, in the order `DiffResult.counts()` lists them."""
STRUCTURAL = (STATUS_ONLY_A, STATUS_ONLY_B, STATUS_SHAPE)
"""The statuses of a tensor that is not compared: only in one snapshot, or of another shape."""


def json_num(v: Any) -> Any:
    """`v`, or its text when it is a non-finite float (JSON has no NaN or Inf)."""
    if isinstance(v, float) and not math.isfinite(v):
        return nonfinite_text(v)
    return v


def _stored(stats: Any, name: str) -> float:
    """One stored number of a tensor's statistics; NaN when null (a metric not computable)."""
    v = stats.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


@dataclasses.dataclass(frozen=True)
class StoredSpectral:
    """The spectral metrics a snapshot stores beside a kernel (the callback's `spectral_freq`).

    NaN where the metric could not be computed (alpha of a kernel with too few eigenvalues).
    """

    alpha: float
    alpha_weighted: float
    stable_rank: float
    spectral_norm: float
    log_norm: float

    @classmethod
    def from_stats(cls, stats: Any) -> StoredSpectral | None:
        """From one tensor's stored statistics; None when that snapshot has no spectral metrics."""
        if not stats or "spectral_norm" not in stats:
            return None
        return cls(*(_stored(stats, f.name) for f in dataclasses.fields(cls)))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers become `"Inf"`, `"-Inf"`, `"NaN"`."""
        return {k: json_num(v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class StoredGradients:
    """The gradient statistics a snapshot stores beside a weight (the callback's
    `gradient_data`): ||g|| on the probe batch and ||g|| / ||W|| (NaN where ||W|| = 0)."""

    grad_norm: float
    grad_to_weight: float

    @classmethod
    def from_stats(cls, stats: Any) -> StoredGradients | None:
        """From one tensor's stored statistics; None when that snapshot has no gradients."""
        if not stats or "grad_norm" not in stats:
            return None
        return cls(_stored(stats, "grad_norm"), _stored(stats, "grad_to_weight"))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers become `"Inf"`, `"-Inf"`, `"NaN"`."""
        return {k: json_num(v) for k, v in dataclasses.asdict(self).items()}


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
            matching was computed for this tensor's own units; 0 for the kernel
            of a layer whose units keep their order).
        units_fixed: True for the kernel of a layer whose units keep their
            order (a model output, or a layer named in `fixed_units`): the
            matching never permutes them; its `matched_*` values, when not
            None, only align its inputs with the previous layer's matching.
        nonfinite_a: How many NaN/Inf values the tensor holds in A.
        nonfinite_b: How many NaN/Inf values it holds in B.
        unit_order: The matching of this kernel's units (`unit_order[i]` = the
            unit of B matched to unit i of A), or None where none was computed;
            not in `to_json()`.
        input_order: The order of B's inputs (the axis before the units)
            aligned with A's by the matching of the layers that feed this
            kernel, or None where none was carried; not in `to_json()`.
        spectral_a: The spectral metrics snapshot A stores for this tensor
            (`spectral_freq`), or None where it stores none.
        spectral_b: The same in snapshot B.
        gradients_a: The gradient statistics snapshot A stores for this
            tensor (`gradient_data`), or None where it stores none.
        gradients_b: The same in snapshot B.
        rule_a: For the effective kernel of a LoRA or quantized layer (what the layer
            computes with, compared under its stored kernel's key): the rules that
            derive it in A (`"lora"`, `"int8"`, `"int8+lora"`); None where A's tensor
            is the stored weight itself (a snapshot from before LoRA was enabled).
        rule_b: The same in B.
        inputs: The diffs of the stored weights its effective kernel derives from,
            besides the kernel (its LoRA adapters, its quantization scale), in weight
            order; () for a weight that is not derived.
        part_of: For one of those `inputs`: the key of the effective kernel it is
            listed under; None otherwise.
        role: Its role in that derivation (`"a"`, `"b"`, `"scale"`), where
            `part_of` is set.

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
    units_fixed: bool = False
    unit_order: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
    input_order: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
    spectral_a: StoredSpectral | None = None
    spectral_b: StoredSpectral | None = None
    gradients_a: StoredGradients | None = None
    gradients_b: StoredGradients | None = None
    rule_a: str | None = None
    rule_b: str | None = None
    inputs: tuple[TensorDiff, ...] = ()
    part_of: str | None = None
    role: str | None = None

    @property
    def effective(self) -> bool:
        """True when either side is an effective kernel derived from stored weights."""
        return self.rule_a is not None or self.rule_b is not None

    @property
    def compared(self) -> bool:
        """True when the tensor is in both snapshots with the same shape."""
        return self.status not in STRUCTURAL

    @property
    def unchanged(self) -> bool:
        """Whether the tensor is bit-identical in A and B, or within the diff's tolerance."""
        return self.status == STATUS_UNCHANGED

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers become `"Inf"`, `"-Inf"`, `"NaN"`."""
        stored = ("spectral_a", "spectral_b", "gradients_a", "gradients_b")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("unit_order", "input_order", "inputs", *stored)}
        for k in ("shape_a", "shape_b"):
            d[k] = None if d[k] is None else list(d[k])
        d["unchanged"] = self.unchanged
        out = {k: json_num(v) for k, v in d.items()}
        for k in stored:
            record = getattr(self, k)
            out[k] = None if record is None else record.to_json()
        out["inputs"] = [t.to_json() for t in self.inputs]
        return out


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    """The tensors of one layer, with the change of the layer as a whole.

    Attributes:
        name: The layer path (`conv1`, `block/dense_2`).
        tensors: Its tensors, in the model's weight order; an effective kernel's stored
            inputs (LoRA adapters, scales) are listed under it (`TensorDiff.inputs`).
        rel_l2: ||B - A|| / ||A|| over all compared tensors of the layer.
        cosine: Cosine similarity over all compared tensors.
        matched_cosine: The same after matching units, or None where no
            matching applies to any of its tensors.
        units_fixed: Why its units keep their order (`"a model output"`,
            `"fixed by the caller"`), or None when a matching may permute them.

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
    units_fixed: str | None = None

    @property
    def unchanged(self) -> bool:
        """Whether every tensor of the layer is unchanged."""
        return all(t.unchanged for t in self.tensors)

    @property
    def structural(self) -> bool:
        """True when a tensor is only in one snapshot or changed shape."""
        return any(not t.compared for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the layer's comparison and its tensors'."""
        return {
            "name": self.name,
            "rel_l2": json_num(self.rel_l2),
            "cosine": json_num(self.cosine),
            "matched_cosine": json_num(self.matched_cosine),
            "units_fixed": self.units_fixed,
            "unchanged": self.unchanged,
            "tensors": [t.name for t in self.tensors],
        }


@dataclasses.dataclass(frozen=True)
class FeatureMove:
    """One named input feature in the top-k rankings of A and B.

    Attributes:
        name: The feature's name.
        rank_a: Its rank in A (1 = largest), by what `FeatureDiff.ranked_by` says.
        rank_b: Its rank in B.
        weight_a: What it is ranked by in A: its weight for a one-unit layer, the
            L2 norm of its kernel row, or its measured effect on the output.
        weight_b: The same in B.
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


RANKED_BY = ("weight", "row_norm", "effect")
"""What a `FeatureDiff` ranks by: |weight| (a one-unit layer), the L2 norm of the feature's
kernel row, or its measured effect on the output that both snapshots store."""


@dataclasses.dataclass(frozen=True)
class FeatureDiff:
    """The top-k named input features of A and B side by side.

    Attributes:
        key_a: The kernel read in A (`dense/kernel`).
        key_b: The kernel read in B.
        k: How many features each top-k holds.
        units: The layer's number of units.
        rows: B's top-k in order, then features that left A's top-k.
        ranked_by: `"effect"` where both snapshots store each feature's measured
            effect on the output (the feature table's ranking with `feature_data`),
            else `"weight"` (one unit) or `"row_norm"` (several).
        note: Why the ranking differs from the runs' own tables, or None.

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
    ranked_by: str = "weight"
    note: str | None = None

    @property
    def entered(self) -> tuple[str, ...]:
        """Features in B's top-k that were not in A's, in B's order."""
        return tuple(r.name for r in self.rows if r.rank_b <= self.k < r.rank_a)

    @property
    def left(self) -> tuple[str, ...]:
        """Features in A's top-k that are not in B's, in A's order."""
        return tuple(r.name for r in self.rows if r.rank_a <= self.k < r.rank_b)

    @property
    def rank_changed(self) -> tuple[str, ...]:
        """Features of either top-k whose rank changed from A to B (entered and left
        included), in the order of `rows`."""
        return tuple(r.name for r in self.rows if r.move != 0)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the two rankings and their rows."""
        return {
            "key_a": self.key_a,
            "key_b": self.key_b,
            "k": self.k,
            "units": self.units,
            "ranked_by": self.ranked_by,
            "note": self.note,
            "entered": list(self.entered),
            "left": list(self.left),
            "rank_changed": list(self.rank_changed),
            "rows": [
                {**{k: json_num(v) for k, v in dataclasses.asdict(r).items()}, "move": r.move}
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
    ['cosine', 'gradients_a', 'gradients_b', 'identical']
    """

    a: str
    b: str
    tolerance: float
    layers: tuple[LayerDiff, ...]
    features: FeatureDiff | None = None

    @property
    def tensors(self) -> tuple[TensorDiff, ...]:
        """Every tensor of either snapshot, layer by layer, each LoRA or quantized kernel as
        its effective kernel (its stored inputs are in `inputs`)."""
        return tuple(t for layer in self.layers for t in layer.tensors)

    @property
    def inputs(self) -> tuple[TensorDiff, ...]:
        """The stored weights effective kernels derive from (LoRA adapters, quantization
        scales), each also listed under its kernel (`TensorDiff.inputs`)."""
        return tuple(i for t in self.tensors for i in t.inputs)

    def tensor(self, name: str) -> TensorDiff:
        """The diff of the tensor with key `name` (an effective kernel's input included)."""
        for t in (*self.tensors, *self.inputs):
            if t.name == name:
                return t
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        """How many tensors have each status (`tensors`: an effective kernel's inputs are
        counted with it, not on their own)."""
        out = dict.fromkeys(STATUSES, 0)
        for t in self.tensors:
            out[t.status] += 1
        return out

    def _repr_html_(self) -> str:
        from ..notebook import diff_html

        return diff_html(self)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers become the strings `"Inf"`, `"-Inf"`, `"NaN"`."""
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
class TensorGradients:
    """One weight's stored gradient statistics at every snapshot of a run (`drift`).

    Attributes:
        key: The weight key.
        grad_norm: ||g|| on the probe batch at each snapshot; NaN where that snapshot
            stores none (the callback's `gradient_freq` skipped it).
        grad_to_weight: ||g|| / ||W|| at each snapshot; NaN where not stored.
    """

    key: str
    grad_norm: tuple[float, ...]
    grad_to_weight: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the weight's gradient norms across the steps."""
        return {"key": self.key, "grad_norm": [json_num(v) for v in self.grad_norm],
                "grad_to_weight": [json_num(v) for v in self.grad_to_weight]}


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
        alpha: For every snapshot, the stored spectral alpha of the layer's kernel
            (NaN at snapshots without one); None when no snapshot has one (the
            callback's `spectral_freq` was off).
        gradients: The stored gradient statistics of each of its weights that has
            them at some snapshot (the callback's `gradient_data`), in weight order;
            () when none has.

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
    alpha: tuple[float, ...] | None = None
    gradients: tuple[TensorGradients, ...] = ()


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
        """A JSON-ready dict of the drift of every layer across the steps."""
        return {
            "path": self.path,
            "steps": list(self.steps),
            "layers": [
                {
                    "name": layer.name,
                    "step_change": [json_num(v) for v in layer.step_change],
                    "from_initial": [json_num(v) for v in layer.from_initial],
                    "alpha": None if layer.alpha is None else [json_num(v) for v in layer.alpha],
                    "gradients": [g.to_json() for g in layer.gradients],
                }
                for layer in self.layers
            ],
        }
