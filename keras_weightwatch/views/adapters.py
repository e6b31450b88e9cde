"""`AdapterView`: each LoRA layer's update size, and the adapters that do not train.

A LoRA layer computes with `base + (alpha / rank) * A @ B`. At each snapshot, on the worker
and from the host copy, the view measures per LoRA layer:

- `lora_update`: the size of the update the adapter applies, `||(alpha/rank) A @ B|| /
  ||base||` (Frobenius norms), computed from the rank-r Gram matrices (`update_norm`)
  without forming `A @ B`; `||base||` is read from the stored base kernel (the statistics
  under the kernel's key describe the effective kernel) and computed once per fit for a
  frozen (non-trainable) base;
- `lora_idle`: for how many snapshots in a row the adapter has not moved (its B all zeros,
  or A and B both equal to the previous snapshot's: update ratios of exactly 0);
- `lora_stalled`: 1 once `lora_idle` reaches `IDLE_SNAPSHOTS`, else 0.

The run stores them beside the kernel's statistics (`show`, the tab read them). The update
ratios of A and B are the `update_ratio` statistics of the adapters' own keys. The view
writes `<kernel key>/lora_update` as a scalar and a Markdown table `adapters/summary`
(`adapters_markdown`), and tells once per layer, through the callback's warnings, that an
adapter has stalled (`pop_notices`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence, Set
from typing import Any, NamedTuple

import numpy as np

from ..capture import ModelInfo, Snapshot
from ..derive import effective
from ..reductions import sumsq
from ..scratch import scratch
from .base import Stats, View

IDLE_SNAPSHOTS = 3
"""Snapshots in a row at which an adapter has not moved before it is marked as not training
(`lora_stalled`), counting the one it starts from: with the initial snapshot, a B still all
zeros after two epochs."""
SUMMARY_TAG = "adapters/summary"
STAT_UPDATE = "lora_update"
STAT_IDLE = "lora_idle"
STAT_STALLED = "lora_stalled"
_CHUNK = 1 << 18  # elements converted to float64 at a time for a norm


class Adapter(NamedTuple):
    """One LoRA layer: its kernel's key, its adapters' keys, the rule's scale, the layer,
    whether its base is frozen, and the derivations applied to the kernel before the LoRA one
    (a LoRA on a quantized kernel adapts the dequantized kernel)."""

    key: str
    a: str
    b: str
    scale: float
    layer: str
    frozen: bool
    before: tuple[Any, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every stored key the view reads for this layer."""
        return (self.key, self.a, self.b, *(k for d in self.before for k in d.inputs.values()))


def lora_adapters(info: ModelInfo) -> list[Adapter]:
    """The model's LoRA layers, in the order of `info.derived`."""
    trainable = {w.key: w.trainable for w in info.weights}
    out = []
    for i, d in enumerate(info.derived):
        if d.rule != "lora":
            continue
        before = tuple(p for p in info.derived[:i] if p.key == d.key)
        base = d.inputs["base"]
        frozen = not trainable.get(base, True) and all(
            not trainable.get(k, True) for p in before for k in p.inputs.values())
        out.append(Adapter(d.key, d.inputs["a"], d.inputs["b"], float(d.params["scale"]),
                           d.layer, frozen, before))
    return out


def norm(x: np.ndarray) -> float:
    """The Frobenius norm of `x`, summed in float64 a chunk at a time through the thread's
    reused scratch buffer (no float64 copy of the whole tensor)."""
    flat = np.asarray(x).reshape(-1)
    buf = scratch("adapters.norm", min(flat.size, _CHUNK))
    total = 0.0
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK]
        chunk = buf[:part.size]
        np.copyto(chunk, part, casting="unsafe")
        total += sumsq(chunk)
    return math.sqrt(total)


def update_norm(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """`||scale * A @ B||` (Frobenius) without forming `A @ B`: `|scale| *
    sqrt(trace((A^T A)(B B^T)))`, A as (inputs, r) and B as (r, outputs), in float64."""
    r = a.shape[-1]
    a2 = np.asarray(a, dtype=np.float64).reshape(-1, r)
    b2 = np.asarray(b, dtype=np.float64).reshape(r, -1)
    gram = float(np.sum((a2.T @ a2) * (b2 @ b2.T)))
    return abs(scale) * math.sqrt(max(gram, 0.0))


def update_size(a: np.ndarray, b: np.ndarray, scale: float, base_norm: float) -> float:
    """`||scale * A @ B|| / ||base||`; NaN for a base of norm 0 (or not finite)."""
    if not (math.isfinite(base_norm) and base_norm > 0):
        return math.nan
    return update_norm(a, b, scale) / base_norm


class _Track:
    """What the view keeps of one adapter across the snapshots of a fit."""

    def __init__(self) -> None:
        self.base_norm: float | None = None
        self.prev: tuple[np.ndarray, np.ndarray] | None = None
        self.idle = 0
        self.warned = False

    def still(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Whether the adapter has not moved at this snapshot (B all zeros, or A and B as at
        the previous one); keeps a copy of both for the next."""
        same = (self.prev is not None and np.array_equal(self.prev[0], a)
                and np.array_equal(self.prev[1], b))
        if self.prev is None or self.prev[0].shape != a.shape or self.prev[1].shape != b.shape:
            self.prev = (np.array(a, copy=True), np.array(b, copy=True))
        else:
            np.copyto(self.prev[0], a)
            np.copyto(self.prev[1], b)
        return same or not np.any(b)


class AdapterView(View):
    """Per LoRA layer: its update size, and a mark on adapters that do not train (see the
    module docstring).

    Args:
        idle_snapshots: Snapshots in a row without a move before an adapter is marked as
            not training. Defaults to `IDLE_SNAPSHOTS`.
        warn: Tell the callback once per stalled adapter (`pop_notices`). Defaults to True;
            off where the health rules run, whose `lora_stalled` finding says it instead.
    """

    name = "adapters"
    measures_stored = True

    def __init__(self, idle_snapshots: int = IDLE_SNAPSHOTS, warn: bool = True):
        self.idle_snapshots = idle_snapshots
        self.warn = warn
        self.adapters: list[Adapter] = []
        self._tracks: dict[str, _Track] = {}
        self._notices: list[str] = []

    def prepare(self, model: Any, info: ModelInfo) -> None:
        self.adapters = lora_adapters(info)
        self._tracks = {ad.key: _Track() for ad in self.adapters}
        self._notices = []

    def restrict(self, keys: Set[str]) -> None:
        self.adapters = [ad for ad in self.adapters if all(k in keys for k in ad.keys)]

    def measure(self, snapshot: Snapshot) -> Stats | None:
        """The numbers of every LoRA layer, from the snapshot *as stored* (`measures_stored`:
        the base kernel under the kernel's key)."""
        out: dict[str, dict[str, float]] = {}
        for ad in self.adapters:
            if not all(k in snapshot.arrays for k in ad.keys):
                continue
            out[ad.key] = self._measure_one(ad, snapshot.arrays)
        return out

    def _measure_one(self, ad: Adapter, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        track = self._tracks.setdefault(ad.key, _Track())
        if track.base_norm is None or not ad.frozen:
            track.base_norm = norm(_base(ad, arrays))
        a, b = arrays[ad.a], arrays[ad.b]
        track.idle = track.idle + 1 if track.still(a, b) else 0
        stalled = track.idle >= self.idle_snapshots
        if stalled and not track.warned and self.warn:
            track.warned = True
            self._notices.append(stalled_text(ad.layer, track.idle, bool(np.any(b))))
        return {STAT_UPDATE: update_size(a, b, ad.scale, track.base_norm),
                STAT_IDLE: float(track.idle), STAT_STALLED: float(stalled)}

    def pop_notices(self) -> list[str]:
        out, self._notices = self._notices, []
        return out

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        from ..summaries import scalar, tag, text

        rows = adapter_rows(self.adapters, stats)
        if not rows:
            return
        values = [scalar(tag(r.key, STAT_UPDATE), r.update) for r in rows
                  if math.isfinite(r.update)]
        values.append(text(SUMMARY_TAG, adapters_markdown(snapshot.step, rows)))
        events.write(snapshot.step, values, wall_time=snapshot.time)

    def close(self) -> None:
        self._tracks = {}


def _base(ad: Adapter, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The kernel the adapter adds to: the stored base, or the kernel the derivations before
    the LoRA one make of it (a quantized base, dequantized)."""
    if not ad.before:
        return arrays[ad.key]
    return effective({k: arrays[k] for k in ad.keys}, ad.before)[ad.key]


def stalled_text(layer: str, idle: int, b_moves: bool) -> str:
    """The one warning about an adapter that does not train."""
    why = "A and B unchanged" if b_moves else "its B still all zeros"
    return (f"the LoRA adapter of layer {layer!r} has not moved for {idle} snapshots ({why}):"
            " it is not training; check that lora_kernel_a/b (lora_embeddings_a/b) are"
            " trainable and that their learning rate is not zero")


class AdapterRow(NamedTuple):
    """One LoRA layer's numbers at one snapshot (NaN where not stored)."""

    layer: str
    key: str
    update: float
    a_ratio: float
    b_ratio: float
    idle: int
    stalled: bool


def _get(st: Mapping[str, Any] | None, name: str) -> float:
    v = None if st is None else st.get(name)
    return float(v) if isinstance(v, (int, float)) else math.nan


def adapter_rows(adapters: Sequence[Adapter], stats: Stats) -> list[AdapterRow]:
    """The rows of the LoRA layers whose numbers `stats` holds."""
    rows = []
    for ad in adapters:
        st = stats.get(ad.key)
        if st is None or STAT_UPDATE not in st:
            continue
        idle = _get(st, STAT_IDLE)
        rows.append(AdapterRow(ad.layer, ad.key, _get(st, STAT_UPDATE),
                               _get(stats.get(ad.a), "update_ratio"),
                               _get(stats.get(ad.b), "update_ratio"),
                               int(idle) if math.isfinite(idle) else 0,
                               _get(st, STAT_STALLED) == 1))
    return rows


def adapters_markdown(step: int, rows: Sequence[AdapterRow]) -> str:
    """The `adapters/summary` table: each LoRA layer's update size, the update ratios of A and
    B, and a mark on those not training."""
    from ..textfmt import fmt_g

    def cell(x: float) -> str:
        return "-" if math.isnan(x) else fmt_g(x)

    stalled = [r.layer for r in rows if r.stalled]
    head = (f"**{len(stalled)} of {len(rows)} adapters NOT TRAINING** at step {step}: "
            + ", ".join(stalled) if stalled else
            f"{len(rows)} LoRA adapters at step {step}, all moving")
    lines = [head, "",
             "| layer | update ‖(α/r)·A·B‖/‖base‖ | A update ratio | B update ratio | status |",
             "|---|---|---|---|---|"]
    for r in rows:
        status = f"**NOT TRAINING** (not moved for {r.idle} snapshots)" if r.stalled else (
            "training" if r.idle == 0 else f"not moved for {r.idle} snapshots")
        lines.append(f"| {r.layer} | {cell(r.update)} | {cell(r.a_ratio)} | {cell(r.b_ratio)}"
                     f" | {status} |")
    return "\n".join(lines)
