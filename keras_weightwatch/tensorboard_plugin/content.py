"""What each route of the dashboard returns, computed from a run with the library's functions.

The numbers come from the package's public functions (`diff_runs`, `kernel_grid`,
`top_k_features`) and the statistics stored with each snapshot; this module only
selects, bounds and caches. Every tensor it draws or ranks is the one the layer
computes with: a LoRA or quantized layer's effective kernel (`Run.tensor(...,
effective=True)`), as the callback's views draw it. Work per request is bounded:
tensor images refuse tensors over `MAX_IMAGE_TENSOR_BYTES`, the change-since-initial
heatmap reads at most `HEATMAP_BUDGET_BYTES` per request (the rest follows on the
next request, from the cache), the health findings read at most `HEALTH_BUDGET_BYTES`
of tensors (an old run's per-unit numbers; past it, the rules that need them are left
out and a note says so), and lists are cut at `MAX_ROWS` / `MAX_COLUMNS`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import DiffResult, Run, diff_runs
from ..compare.inputs import content
from ..features import CORRELATION_THRESHOLD, FeatureData, feature_weights, top_k_features
from ..health import ModelFacts, diagnose
from ..health.measures import UNITS
from ..images import Grid, diverging_rgb, kernel_grid, response_grid, symmetric_limit
from ..naming import conv_kind, key_name
from ..report import fit_lines
from ..responses import Geometry, correlate
from ..run import ResponseLayer
from ..textfmt import nonfinite_text
from .params import BadRequest, Pair

MAX_ROWS = 2000
"""The most tensors a table or heatmap lists."""
MAX_COLUMNS = 1000
"""The most snapshots a heatmap or line chart shows (evenly spaced, first and last kept)."""
MAX_IMAGE_TENSOR_BYTES = 256 * 1024 * 1024
"""The largest tensor drawn as an image."""
HEATMAP_BUDGET_BYTES = 1 << 30
"""Bytes of tensors one change-since-initial request may read."""
HEALTH_BUDGET_BYTES = 1 << 30
"""Bytes of tensors the health findings of one run may read (the per-unit numbers of a run
written before they were stored with the statistics)."""
MAX_TILES = 256
"""The most tiles a kernel grid holds (the callback's default)."""
MAX_MATRIX_SIDE = 256
"""A tensor drawn as a matrix is sampled to at most this many rows and columns."""
MAX_FEATURES = 200
"""The most features whose weights are sent for every step."""
MAX_RESPONSE_SAMPLES = 16
"""The most sample images whose responses one request draws."""
MAX_RESPONSE_OPS = 1 << 30
"""Multiply-adds the responses of one request may take (fewer samples are drawn past it)."""


def num(x: float | None) -> float | str | None:
    """A JSON-ready number: non-finite values spelled as the diff's JSON spells them."""
    if x is None:
        return None
    x = float(x)
    text = nonfinite_text(x)
    return x if text is None else text


def snapshot_of(run: Run, step: str):
    """The snapshot named `step` (`initial`, `last` or an integer), or BadRequest."""
    for s in run.snapshots:
        if step == s.name or step == str(s.step) or (step == "last" and s is run.snapshots[-1]):
            return s
    raise BadRequest(
        f"the run has no snapshot {step!r}; it has {[s.name for s in run.snapshots][:20]}. "
        f"Received: step={step!r}"
    )


def step_arg(snap) -> int | str:
    """The snapshot as the library's functions take a step: `"initial"` or the int step."""
    return "initial" if snap.label == "initial" else snap.step


def spaced(n: int, most: int) -> list[int]:
    """At most `most` indices of `range(n)`, evenly spaced, first and last included."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _classes(run: Run) -> dict[str, str]:
    return {layer.name: layer.class_name for layer in run.layers}


def layer_class(run: Run, layer: str) -> str | None:
    """The class name of the run's top-level layer `layer`, or None."""
    return _classes(run).get(layer)


def is_conv_kernel(run: Run, key: str, shape: Sequence[int]) -> bool:
    """Whether the tensor is a convolution kernel drawn as a grid (3-D to 5-D)."""
    if not 3 <= len(shape) <= 5:
        return False
    spec = next((s for s in run.specs if s.key == key), None)
    kind = conv_kind(_classes(run).get(spec.layer)) if spec is not None else None
    if kind is not None:
        return key_name(key) == kind.kernel
    return key_name(key) == "kernel"


def conv_keys(run: Run) -> list[str]:
    return [s.key for s in run.specs if is_conv_kernel(run, s.key, s.shape)]


def summary(run: Run, name: str) -> dict[str, Any]:
    """The run's snapshots, weights, layers, metric history, feature settings and what tells
    its fit from others (`fit`: the search trial, the optimizer; `report.fit_lines`); each weight
    with the rules that derive its effective kernel (`derived`: `"lora"`, `"int8"`, ...) or
    the kernel it is an input of (`part_of`: a LoRA adapter's, a scale's)."""
    settings = run.settings
    rules: dict[str, str] = {}
    for d in run.derived:
        rules[d.key] = f"{rules[d.key]}+{d.rule}" if d.key in rules else d.rule
    parts = {k: d.key for d in run.derived for k in d.inputs.values() if k != d.key}
    return {
        "name": name,
        "steps": [{"name": s.name, "step": s.step, "label": s.label} for s in run.snapshots],
        "layers": [{"name": layer.name, "class_name": layer.class_name} for layer in run.layers],
        "weights": [
            {"key": s.key, "layer": s.layer, "shape": list(s.shape), "dtype": s.dtype,
             "conv": is_conv_kernel(run, s.key, s.shape), "derived": rules.get(s.key),
             "part_of": parts.get(s.key)}
            for s in run.specs[:MAX_ROWS]
        ],
        "weights_total": len(run.specs),
        "fit": [[label, text] for label, text in fit_lines(run.model)],
        "adapters": adapters(run),
        "history": {k: [[st, num(v)] for st, v in pts] for k, pts in run.history().items()},
        "features": {
            "key": settings.get("feature_key"),
            "names": settings.get("feature_names"),
            "top_k": settings.get("top_k"),
        },
    }


def adapters(run: Run) -> list[dict[str, Any]]:
    """Each LoRA layer's update size ||(alpha/r) A@B|| / ||base|| at the snapshots (`[name,
    value]`), the update ratios of its A and B at the last one that stores it, and whether
    its adapter is marked as not training (`stalled`, after `idle` snapshots without a move):
    the statistics the adapters view stores; [] for a run without them."""
    snaps = [run.snapshots[i] for i in _columns(run)]
    out = []
    for d in [d for d in run.derived if d.rule == "lora"][:MAX_ROWS]:
        last = next((s.stats for s in reversed(snaps) if "lora_update" in s.stats.get(d.key, {})),
                    None)
        if last is None:
            continue
        st = last[d.key]
        out.append({
            "layer": d.layer, "key": d.key,
            "update": [[s.name, num(s.stats[d.key]["lora_update"])] for s in snaps
                       if "lora_update" in s.stats.get(d.key, {})],
            "a_ratio": num(last.get(d.inputs["a"], {}).get("update_ratio")),
            "b_ratio": num(last.get(d.inputs["b"], {}).get("update_ratio")),
            "idle": int(st.get("lora_idle") or 0), "stalled": st.get("lora_stalled") == 1})
    return out


def _columns(run: Run) -> list[int]:
    return spaced(len(run.snapshots), MAX_COLUMNS)


def update_heatmap(run: Run) -> dict[str, Any]:
    """Each tensor's update ratio at each snapshot, from the statistics stored with it."""
    snaps = [run.snapshots[i] for i in _columns(run)]
    keys = [s.key for s in run.specs[:MAX_ROWS]]
    values = [[num(snap.stats.get(key, {}).get("update_ratio")) for snap in snaps]
              for key in keys]
    return {"metric": "update", "keys": keys, "steps": [s.name for s in snaps],
            "values": values, "nonfinite": _nonfinite(snaps, keys), "complete": True}


def _nonfinite(snaps, keys: list[str]) -> list[list[int]]:
    """[row, column] of each tensor that held NaN or Inf at a snapshot (its stored counts)."""
    out = []
    for r, key in enumerate(keys):
        for c, snap in enumerate(snaps):
            st = snap.stats.get(key, {})
            if st.get("nan_count", 0) or st.get("inf_count", 0):
                out.append([r, c])
    return out


def health(run: Run, name: str) -> dict[str, Any]:
    """`health.diagnose(run)`: every finding (errors first, at most `MAX_ROWS`) with the
    snapshot names of its steps and `column`, the heatmap column it is marked in (the shown
    snapshot at or after the one that reported it), and the notes.

    A run that stores no per-unit numbers (written before they were stored) has them
    computed from its tensors, unless that reads more than `HEALTH_BUDGET_BYTES`: then
    the rules see the stored statistics alone and a note says which findings need more.
    """
    unit_bytes = _unit_bytes(run)
    read = unit_bytes <= HEALTH_BUDGET_BYTES
    d = diagnose(run, read_tensors=read)
    notes = list(d.notes)
    if not read:
        notes.append(f"dead units by collapsed weights and identical units need the per-unit "
                     f"numbers of {unit_bytes / 2**30:.1f} GiB of stored kernels: not read "
                     f"here; `weightwatch doctor` reads them")
    names = {s.step: s.name for s in run.snapshots}
    shown = [run.snapshots[i] for i in _columns(run)]
    findings = []
    for f in d.findings[:MAX_ROWS]:
        out = f.to_json()
        out["step_name"] = names.get(f.step, str(f.step))
        out["since_name"] = names.get(f.since, str(f.since))
        out["last_name"] = names.get(f.last, str(f.last))
        out["column"] = next((s.name for s in shown if s.step >= f.step), None)
        findings.append(out)
    return {"run": name, "snapshots": d.snapshots, "healthy": not d.findings,
            "errors": len(d.errors), "warnings": len(d.findings) - len(d.errors),
            "findings": findings, "findings_total": len(d.findings), "notes": notes}


def _unit_bytes(run: Run) -> int:
    """Bytes of the kernels whose per-unit numbers `diagnose` would compute from tensors."""
    facts = ModelFacts.from_specs(run.specs, run.derived)
    keys = facts.unit_kernels()
    return sum(s.tensors[k].bytes for s in run.snapshots for k in keys
               if k in s.tensors and UNITS not in s.stats.get(k, {}))


@dataclass(frozen=True)
class _Column:
    """The change since the first snapshot of every tensor at one snapshot."""

    rel_l2: dict[str, float | None]


def pair_digest(*snaps) -> str:
    """A digest of the snapshots' tensor files: a cache key that changes if a run is rewritten."""
    h = hashlib.sha256()
    for snap in snaps:
        for key in sorted(snap.tensors):
            h.update(key.encode() + b"\0" + snap.tensors[key].sha256.encode())
    return h.hexdigest()


def initial_heatmap(run: Run, name: str, cache) -> dict[str, Any]:
    """||W_t - W_0|| / ||W_0|| of each tensor at each snapshot (`diff_runs`, no matching).

    At most `HEATMAP_BUDGET_BYTES` of tensors are read per call; the columns not
    reached are null and `complete` is False (the next call continues from the cache).
    """
    snaps = [run.snapshots[i] for i in _columns(run)]
    first = run.initial or run.snapshots[0]
    keys = [s.key for s in run.specs[:MAX_ROWS]]
    spent, complete = 0, True
    columns = []
    for snap in snaps:
        ckey = ("initial", name, first.file, snap.file, pair_digest(first, snap))
        cost = sum(r.bytes for r in snap.tensors.values()) * 2
        col = cache.peek(ckey)
        if col is None and spent + cost <= max(HEATMAP_BUDGET_BYTES, cost if not spent else 0):
            spent += cost
            col = cache.get(ckey, lambda snap=snap: _initial_column(run, first, snap))
        complete = complete and col is not None
        columns.append(col)
    values = [[None if col is None else num(col.rel_l2.get(key)) for col in columns]
              for key in keys]
    return {"metric": "initial", "keys": keys, "steps": [s.name for s in snaps],
            "values": values, "nonfinite": _nonfinite(snaps, keys), "complete": complete}


def _initial_column(run: Run, first, snap) -> _Column:
    if snap is first:
        return _Column({k: 0.0 for k in snap.tensors})
    result = diff_runs(run, run, step_a=step_arg(first), step_b=step_arg(snap),
                       match=False)
    return _Column({t.name: t.rel_l2 for t in (*result.tensors, *result.inputs)})


def compare(run_a: Run, run_b: Run, pair: Pair, cache) -> DiffResult:
    """`diff_runs` of the two snapshots, cached per pair of snapshots."""
    snap_a, snap_b = snapshot_of(run_a, pair.step_a), snapshot_of(run_b, pair.step_b)
    key = ("diff", pair.run_a, snap_a.file, pair.run_b, snap_b.file, pair_digest(snap_a, snap_b))
    return cache.get(key, lambda: diff_runs(run_a, run_b, step_a=step_arg(snap_a),
                                            step_b=step_arg(snap_b)))


def compare_json(
    result: DiffResult, run_a: Run, run_b: Run, name_a: str, name_b: str
) -> dict[str, Any]:
    """The library's own JSON of the diff, cut at `MAX_ROWS` tensors, with the conv kernels
    drawn side by side (those of one shape in both: runs of two widths compare the rest)."""
    out = result.to_json()
    out["a"], out["b"] = name_a, name_b  # the names the page uses, not the server's paths
    out["tensors_total"] = len(out["tensors"])
    out["tensors"] = out["tensors"][:MAX_ROWS]
    convs_a = set(conv_keys(run_a))
    compared = {t.name for t in result.tensors if t.compared}
    out["conv"] = [k for k in conv_keys(run_b) if k in convs_a and k in compared]
    return out


def tensor_ident(run: Run, snap, key: str) -> tuple[Any, ...]:
    """What the tensor `tensor_of` gives depends on, for caches: its file's SHA-256 and, for
    an effective kernel, those of the adapters and scales it derives from (a LoRA conv's
    frozen base keeps its file while its effective kernel moves)."""
    if key not in snap.tensors:
        return (key, None)
    return (key, *content(snap, key, tuple(d for d in run.derived if d.key == key)))


def _check_size(rec) -> None:
    if rec.bytes > MAX_IMAGE_TENSOR_BYTES:
        raise BadRequest(
            f"the tensor holds {rec.bytes} bytes; images are drawn of tensors up to "
            f"{MAX_IMAGE_TENSOR_BYTES} bytes. Received: shape={list(rec.shape)}"
        )


def tensor_of(run: Run, key: str, step: str) -> np.ndarray:
    """One tensor (memory-mapped; a derived kernel's effective kernel, computed), refused with
    BadRequest when the run has no such key."""
    snap = snapshot_of(run, step)
    rec = snap.tensors.get(key)
    if rec is None:
        raise BadRequest(f"snapshot {snap.name} has no tensor of that name. Received: key={key!r}")
    _check_size(rec)
    return run.tensor(key, step_arg(snap), effective=True)


def kernel(run: Run, key: str, step: str) -> Grid:
    """A convolution kernel's grid at one snapshot, exactly as `kernel_grid` draws it."""
    arr = tensor_of(run, key, step)
    if not is_conv_kernel(run, key, arr.shape):
        raise BadRequest(f"the tensor is not a convolution kernel. Received: key={key!r}")
    return kernel_grid(np.asarray(arr), max_tiles=MAX_TILES)


def matrix_image(run: Run, key: str, step: str) -> tuple[np.ndarray, float, list[int]]:
    """Any tensor as a (rows, last axis) matrix picture, sampled to `MAX_MATRIX_SIDE`.

    Returns the RGB image, the |value| at full colour and the sampling strides.
    """
    arr = tensor_of(run, key, step)
    a = np.asarray(arr)  # still memory-mapped: only the sampled values are read
    a = a.reshape(1, -1) if a.ndim < 2 else a.reshape(-1, a.shape[-1])
    if a.dtype.kind not in "fiub":
        raise BadRequest(f"the tensor is not real-valued. Received: dtype={a.dtype.name}")
    strides = [max(1, math.ceil(n / MAX_MATRIX_SIDE)) for n in a.shape]
    shown = np.asarray(a[:: strides[0], :: strides[1]], dtype=np.float64)
    vmax = symmetric_limit(shown)
    img = diverging_rgb(shown, vmax)
    scale = max(1, min(8, 256 // max(shown.shape)))
    img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    return img, vmax, strides


def feature_description(run: Run) -> FeatureData | None:
    """The stored `feature_data`'s standard deviations and correlated partners, as the
    top-k table's `correlated with` column has them (None: the run stores none)."""
    data = run.feature_data()
    names = run.settings.get("feature_names")
    if data is None or not names or data.ndim != 2 or data.shape[1] != len(names):
        return None
    return FeatureData.from_sample(np.asarray(data))


def _row(r) -> dict[str, Any]:
    return {"rank": r.rank, "name": r.name, "index": r.index, "weight": num(r.weight),
            "partner": r.partner, "correlation": num(r.correlation)}


def _partners(run: Run, names: Sequence[str], described: FeatureData | None) -> dict[str, Any]:
    """Each feature's correlated partner (name -> [partner, r]) and where they come from."""
    if described is None:
        return {"partners": None, "partners_from": None}
    stored = run.samples.feature_data
    pairs = {names[i]: [names[p[0]], num(p[1])] for i, p in enumerate(described.partners)
             if p is not None}
    return {"partners": pairs, "partners_from": None if stored is None else
            {"rows": stored.rows, "rows_total": stored.rows_total,
             "threshold": CORRELATION_THRESHOLD}}


def features(run: Run, described: FeatureData | None = None) -> dict[str, Any]:
    """The feature layer's per-feature weights at every snapshot, and each snapshot's table.

    `described` is `feature_description(run)` (the caller caches it): with it, each
    table row names its correlated partner and `partners` maps every feature to its own.
    """
    settings = run.settings
    key, names = settings.get("feature_key"), settings.get("feature_names")
    if not key or not names:
        return {"available": False, "reason": "the run was written without feature_names"}
    k = int(settings.get("top_k") or 5)
    snaps = [run.snapshots[i] for i in _columns(run) if key in run.snapshots[i].tensors]
    if not snaps:
        return {"available": False, "reason": "no snapshot holds the feature layer's kernel"}
    _check_size(snaps[-1].tensors[key])
    kernels = [run.tensor(key, step_arg(s), effective=True) for s in snaps]  # memory-mapped
    weights = np.stack([feature_weights(kr) for kr in kernels])
    last_top = np.argsort(-np.abs(np.nan_to_num(weights[-1], nan=-np.inf)), kind="stable")
    sent = sorted(int(i) for i in last_top[:MAX_FEATURES])
    tables = []
    data: Any = described  # top_k_features takes the sample or its FeatureData
    for i in range(len(snaps)):
        rows = top_k_features(kernels[i], names, k, data, weights=weights[i])
        tables.append([_row(r) for r in rows])
    return {
        "available": True, "key": key, "top_k": k,
        "steps": [s.name for s in snaps],
        "names": [names[i] for i in sent],
        "weights": [[num(weights[t, i]) for t in range(len(snaps))] for i in sent],
        "tables": tables,
        **_partners(run, names, described),
    }


@dataclass(frozen=True)
class Responses:
    """The sample images' kernel responses at one snapshot, as the responses view makes them."""

    layer: ResponseLayer
    images: np.ndarray
    """The images drawn (channels last): the first `len(images)` stored ones."""
    responses: np.ndarray
    """`(n, h, w, outputs)`: `responses.correlate` of the images with the snapshot's kernel."""
    stored: int
    total: int
    max_tiles: int = MAX_TILES
    geometry: Geometry | None = None
    """Where the layer's output pixels sit on the images (the layer is fed by the input)."""

    def grid(self, i: int) -> Grid:
        """Sample `i` and its responses, drawn by `images.response_grid` (the view's tiles:
        at the image's size, each on its own contrast)."""
        return response_grid(self.images[i], self.responses[i], self.max_tiles, self.geometry)


def response_layer(run: Run, key: str) -> tuple[ResponseLayer | None, str]:
    """The stored layer whose kernel responses `key` has, or None and why there is none."""
    samples = run.samples
    if samples.sample_images is None:
        return None, "the run stores no sample images (written without sample_images)"
    layer = next((r for r in samples.responses if r.key == key), None)
    if layer is not None:
        return layer, ""
    if run.settings.get("response_mode") == "activation":
        return None, "the run's responses are activations (response_mode='activation'): " \
                     "they need the model, not only its weights"
    spec = next((s for s in run.specs if s.key == key), None)
    if spec is not None and spec.layer in (run.settings.get("response_layers") or ()):
        return None, f"{spec.layer!r} is not fed by the model input: its input, and so its " \
                     "responses, need the model, not only its weights"
    shown = [r.key for r in samples.responses]
    return None, f"the run draws the responses of {shown or 'no layer'} (response_layers)"


def responses(run: Run, layer: ResponseLayer, step: str) -> Responses:
    """`correlate` of the stored sample images with the layer's kernel at `step` (bounded:
    at most `MAX_RESPONSE_SAMPLES` images and `MAX_RESPONSE_OPS` multiply-adds)."""
    kernel = np.asarray(tensor_of(run, layer.key, step))
    images = run.sample_images()
    stored = run.samples.sample_images
    if images is None or stored is None or kernel.ndim != 4 or images.ndim != 4:
        raise BadRequest(f"no responses to draw for this kernel. Received: key={layer.key!r}")
    per_image = math.prod(images.shape[1:3]) * math.prod(kernel.shape)
    n = min(len(images), MAX_RESPONSE_SAMPLES, MAX_RESPONSE_OPS // max(per_image, 1))
    if n < 1:
        raise BadRequest(
            f"the responses of one image take {per_image} multiply-adds; the cap is "
            f"{MAX_RESPONSE_OPS}. Received: key={layer.key!r}"
        )
    shown = np.asarray(images[:n])
    out = correlate(shown, kernel, layer.strides, layer.padding, layer.dilation)
    tiles = min(int(run.settings.get("max_kernel_tiles") or MAX_TILES), MAX_TILES)
    geometry = Geometry((int(kernel.shape[0]), int(kernel.shape[1])),
                        (layer.strides[0], layer.strides[1]), layer.padding,
                        (layer.dilation[0], layer.dilation[1]))
    return Responses(layer, shown, out, stored.rows, stored.rows_total, tiles, geometry)
