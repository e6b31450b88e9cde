"""The plan of a diff: pure data, made from the runs' records before any tensor is read.

`make_plan` decides, for two snapshots, which tensors are compared and how: the
tensors grouped by layer in the model's order, each one's status (compared, or
only in one snapshot, or of another shape; a LoRA or quantized kernel by the shape
of its effective kernel, and the rule that derives it on each side), the stored
weights an effective kernel derives from (its LoRA adapters, its scale), which are
compared under that kernel rather than as tensors of their own, the axis of its units where a
matching of units applies, and which layers feed each layer (along the model's
recorded graph), and which layers keep their units in order (`fixed`: the
model's outputs and the layers a user names, whose unit order means something
outside the network). `diff_runs` then executes the plan layer by layer.
"""

from __future__ import annotations

import dataclasses
import re

from ..errors import WeightWatchError
from ..naming import conv_kind, key_layer, key_name
from ..run import Run, SnapshotRecord
from .inputs import Chains, chains, input_roles, label, ordered_keys, rule_of, shape_of
from .records import STATUS_ONLY_A, STATUS_ONLY_B, STATUS_SHAPE

COMPARE = "compare"
"""The plan status of a tensor in both snapshots with the same shape."""
INPUT = "<input>"
"""The name `feeds` gives to a model input (nothing to carry from)."""
FIXED_OUTPUT = "a model output"
"""Why a layer's units keep their order: its output is (or feeds, through layers
without a kernel) an output of the model: class k is class k."""
FIXED_NAMED = "fixed by the caller"
"""Why a layer's units keep their order: it was named in `fixed_units` (or feeds
such a layer through layers without a kernel)."""
_DENSE = "Dense"


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One weight key of A or B, and how it is compared."""

    key: str
    status: str
    """`COMPARE`, or the diff status `only_a`, `only_b` or `shape_changed`."""
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    units_axis: int | None = None
    """The axis of its units (-1 or -2) when a matching of units applies to it."""
    rule_a: str | None = None
    """The rules that derive A's tensor (an effective kernel: `"lora"`, `"int8"`), or None
    where A's is the stored weight itself; shapes and comparison are the effective kernel's."""
    rule_b: str | None = None
    """The same for B."""
    part_of: str | None = None
    """For a stored weight an effective kernel derives from (a LoRA adapter, a scale): that
    kernel's key; it is compared under the kernel, not counted with the layer's tensors."""
    role: str | None = None
    """Its role in the derivation (`"a"`, `"b"`, `"scale"`), where `part_of` is set."""


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """The tensors of one layer, in the model's weight order."""

    name: str
    tensors: tuple[TensorPlan, ...]
    feeds: tuple[str, ...] | None
    """The layers with weights that feed this one (through layers without weights), or
    None where the run records no graph: the matching then follows the weight order."""
    fixed: str | None = None
    """Why its units keep their order (`FIXED_OUTPUT`, `FIXED_NAMED`), or None when a
    matching may permute them."""

    @property
    def compared(self) -> tuple[TensorPlan, ...]:
        """The layer's own tensors compared (not the inputs of its effective kernels)."""
        return tuple(t for t in self.tensors if t.status == COMPARE and t.part_of is None)

    @property
    def parts(self) -> tuple[TensorPlan, ...]:
        """The stored inputs of its effective kernels (adapters, scales), in weight order."""
        return tuple(t for t in self.tensors if t.part_of is not None)

    @property
    def kernel(self) -> TensorPlan | None:
        """The tensor whose units are matched: the layer's first with a units axis."""
        return next((t for t in self.compared if t.units_axis is not None), None)

    def order(self) -> tuple[TensorPlan, ...]:
        """The compared tensors, kernel first: its matching also orders the layer's bias."""
        kernel = self.kernel
        first = () if kernel is None else (kernel,)
        return first + tuple(t for t in self.compared if t is not kernel)


@dataclasses.dataclass(frozen=True)
class DiffPlan:
    """Every layer of a diff of snapshot A with snapshot B, in the model's order."""

    a: str
    b: str
    layers: tuple[LayerPlan, ...]


def make_plan(run_a: Run, snap_a: SnapshotRecord, run_b: Run, snap_b: SnapshotRecord,
              pattern: re.Pattern | None = None,
              fixed_units: tuple[str, ...] = ()) -> DiffPlan:
    """Plan the diff of two snapshots; `pattern` keeps only the keys it matches.

    `fixed_units` names layers whose units must keep their order, besides the
    model's outputs (which always do).
    """
    label_a, label_b = label(run_a, snap_a), label(run_b, snap_b)
    keys = ordered_keys(run_a, snap_a, run_b, snap_b)
    if pattern is not None:
        keys = [k for k in keys if pattern.search(k)]
        if not keys:
            raise WeightWatchError(
                f"no weight of {label_a} or {label_b} matches {pattern.pattern!r}"
            )
    if not any(k in snap_a.tensors and k in snap_b.tensors for k in keys):
        raise WeightWatchError(f"{label_a} and {label_b} have no weight tensor in common")
    classes = {layer.name: layer.class_name for layer in run_a.layers}
    layer_of = _layer_lookup(run_a, run_b)
    sides = (_Side(snap_a, chains(run_a)), _Side(snap_b, chains(run_b)))
    roles = {k: kr for k, kr in input_roles(run_a, run_b).items() if kr[0] in keys}
    groups: dict[str, list[TensorPlan]] = {}
    for k in keys:
        lname = layer_of.get(roles[k][0] if k in roles else k, key_layer(k))
        t = _tensor_plan(k, sides, classes.get(lname))
        if k in roles:
            t = dataclasses.replace(t, part_of=roles[k][0], role=roles[k][1], units_axis=None)
        groups.setdefault(lname, []).append(t)
    feeds = weighted_feeds(run_a)
    fixed = fixed_layers(run_a, list(dict.fromkeys(s.layer for s in run_a.specs)), fixed_units)
    layers = tuple(
        LayerPlan(name, tuple(tensors), None if feeds is None else feeds.get(name, ()),
                  fixed.get(name))
        for name, tensors in groups.items()
    )
    return DiffPlan(a=label_a, b=label_b, layers=layers)


def _layer_lookup(run_a: Run, run_b: Run) -> dict[str, str]:
    """Key -> layer path, from A's specs first, then B's."""
    out = {s.key: s.layer for s in run_b.specs}
    out.update({s.key: s.layer for s in run_a.specs})
    return out


@dataclasses.dataclass(frozen=True)
class _Side:
    """One snapshot of a diff, with its run's derivations by key."""

    snap: SnapshotRecord
    chains: Chains

    def describe(self, key: str) -> tuple[tuple[int, ...] | None, str | None]:
        """(the shape of the tensor compared, the rules deriving it) of `key`."""
        chain = self.chains.get(key, ())
        return shape_of(self.snap, key, chain), rule_of(self.snap, chain) if chain else None


def _tensor_plan(key: str, sides: tuple[_Side, _Side], layer_class: str | None) -> TensorPlan:
    (shape_a, rule_a), (shape_b, rule_b) = (side.describe(key) for side in sides)
    if shape_a is None or shape_b is None:
        status = STATUS_ONLY_A if shape_b is None else STATUS_ONLY_B
        return TensorPlan(key, status, shape_a, shape_b, rule_a=rule_a, rule_b=rule_b)
    if shape_a != shape_b:
        return TensorPlan(key, STATUS_SHAPE, shape_a, shape_b, rule_a=rule_a, rule_b=rule_b)
    return TensorPlan(key, COMPARE, shape_a, shape_b, units_axis(layer_class, key, shape_a),
                      rule_a=rule_a, rule_b=rule_b)


def units_axis(layer_class: str | None, key: str, shape: tuple[int, ...]) -> int | None:
    """The axis of a kernel's units (-1 or -2), or None when its units are not matched.

    Dense and convolution layers (and weights of an unknown layer class named
    `kernel`) match the units of their kernel: the last axis, the one before it
    for a transposed convolution, the pointwise kernel's for a separable one.
    """
    if layer_class is None or layer_class == _DENSE:
        axis, kernel = -1, "kernel"
    else:
        kind = conv_kind(layer_class)
        if kind is None or kind.units_axis is None:
            return None
        axis, kernel = kind.units_axis, kind.matched_kernel
    if key_name(key) != kernel or not 1 - axis <= len(shape) <= 5:
        return None
    return axis


def weighted_feeds(run: Run) -> dict[str, tuple[str, ...]] | None:
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
                found = (INPUT,)  # a model input: nothing to carry
            out += [f for f in found if f not in out]
        return tuple(out)

    return {name: sources(name, frozenset({name})) for name in weighted}


def kernel_layers(run: Run) -> set[str]:
    """The layers with a kernel whose units a matching would permute (`units_axis`)."""
    classes = {layer.name: layer.class_name for layer in run.layers}
    return {s.layer for s in run.specs
            if units_axis(classes.get(s.layer), s.key, tuple(s.shape)) is not None}


def fixed_layers(run: Run, order: list[str], named: tuple[str, ...] = ()) -> dict[str, str]:
    """Layer -> why its units keep their order: the model's outputs, and the `named` layers.

    Along the recorded graph, an output is a layer no other layer consumes; from
    each output (and each named layer) the walk goes back through layers without
    a kernel (activations, Flatten, BatchNormalization), whose units are their
    feeders' units, to the first layers with a kernel. Without a graph (older
    runs, subclassed models) the model is taken as a chain in weight order
    (`order`): its last layer with a kernel, and every layer after it, is the output.
    """
    kernels = kernel_layers(run)
    layers = run.layers
    inbound: dict[str, tuple[str, ...]]
    if not layers or any(layer.inbound is None for layer in layers):
        inbound = {name: (order[i - 1],) if i else () for i, name in enumerate(order)}
    else:
        inbound = {layer.name: layer.inbound or () for layer in layers}
    consumed = {parent for parents in inbound.values() for parent in parents}
    out: dict[str, str] = {}
    for name in inbound:
        if name not in consumed:
            _walk_back(name, inbound, kernels, FIXED_OUTPUT, out)
    for name in named:
        _walk_back(name, inbound, kernels, FIXED_NAMED, out)
    return out


def _walk_back(name: str, inbound: dict[str, tuple[str, ...]], kernels: set[str], why: str,
               out: dict[str, str]) -> None:
    """Mark `name`, and its feeders back to (and including) the first layers with a kernel."""
    todo, seen = [name], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        out.setdefault(current, why)
        if current not in kernels:
            todo += inbound.get(current, ())
