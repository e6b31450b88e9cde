"""What each route of the dashboard returns, computed from a run with the library's functions.

The numbers come from the package's public functions (`diff_runs`, `kernel_grid`,
`top_k_features`) and the statistics stored with each snapshot; this module only
selects, bounds and caches. Work per request is bounded: tensor images refuse
tensors over `MAX_IMAGE_TENSOR_BYTES`, the change-since-initial heatmap reads at
most `HEATMAP_BUDGET_BYTES` per request (the rest follows on the next request, from
the cache), and lists are cut at `MAX_ROWS` / `MAX_COLUMNS`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import DiffResult, Run, diff_runs
from ..features import feature_weights, top_k_features
from ..images import Grid, diverging_rgb, kernel_grid, symmetric_limit
from ..naming import conv_kind, key_name
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
MAX_TILES = 256
"""The most tiles a kernel grid holds (the callback's default)."""
MAX_MATRIX_SIDE = 256
"""A tensor drawn as a matrix is sampled to at most this many rows and columns."""
MAX_FEATURES = 200
"""The most features whose weights are sent for every step."""
MAX_MATCH_UNITS = 2048
"""Kernels with more units are shown without reordering (as `diff_runs` does not match them)."""


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
    """The run's snapshots, weights, layers, metric history and feature settings."""
    settings = run.settings
    return {
        "name": name,
        "steps": [{"name": s.name, "step": s.step, "label": s.label} for s in run.snapshots],
        "layers": [{"name": layer.name, "class_name": layer.class_name} for layer in run.layers],
        "weights": [
            {"key": s.key, "layer": s.layer, "shape": list(s.shape), "dtype": s.dtype,
             "conv": is_conv_kernel(run, s.key, s.shape)}
            for s in run.specs[:MAX_ROWS]
        ],
        "weights_total": len(run.specs),
        "history": {k: [[st, num(v)] for st, v in pts] for k, pts in run.history().items()},
        "features": {
            "key": settings.get("feature_key"),
            "names": settings.get("feature_names"),
            "top_k": settings.get("top_k"),
        },
    }


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
    return _Column({t.name: t.rel_l2 for t in result.tensors})


def compare(run_a: Run, run_b: Run, pair: Pair, cache) -> DiffResult:
    """`diff_runs` of the two snapshots, cached per pair of snapshots."""
    snap_a, snap_b = snapshot_of(run_a, pair.step_a), snapshot_of(run_b, pair.step_b)
    key = ("diff", pair.run_a, snap_a.file, pair.run_b, snap_b.file, pair_digest(snap_a, snap_b))
    return cache.get(key, lambda: diff_runs(run_a, run_b, step_a=step_arg(snap_a),
                                            step_b=step_arg(snap_b)))


def compare_json(
    result: DiffResult, run_a: Run, run_b: Run, name_a: str, name_b: str
) -> dict[str, Any]:
    """The library's own JSON of the diff, cut at `MAX_ROWS` tensors, with the conv kernels."""
    out = result.to_json()
    out["a"], out["b"] = name_a, name_b  # the names the page uses, not the server's paths
    out["tensors_total"] = len(out["tensors"])
    out["tensors"] = out["tensors"][:MAX_ROWS]
    convs_a = set(conv_keys(run_a))
    out["conv"] = [k for k in conv_keys(run_b) if k in convs_a]
    return out


def _check_size(rec) -> None:
    if rec.bytes > MAX_IMAGE_TENSOR_BYTES:
        raise BadRequest(
            f"the tensor holds {rec.bytes} bytes; images are drawn of tensors up to "
            f"{MAX_IMAGE_TENSOR_BYTES} bytes. Received: shape={list(rec.shape)}"
        )


def tensor_of(run: Run, key: str, step: str) -> np.ndarray:
    """One tensor (memory-mapped), refused with BadRequest when the run has no such key."""
    snap = snapshot_of(run, step)
    rec = snap.tensors.get(key)
    if rec is None:
        raise BadRequest(f"snapshot {snap.name} has no tensor of that name. Received: key={key!r}")
    _check_size(rec)
    return run.tensor(key, step_arg(snap))


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


def features(run: Run) -> dict[str, Any]:
    """The feature layer's per-feature weights at every snapshot, and each snapshot's table."""
    settings = run.settings
    key, names = settings.get("feature_key"), settings.get("feature_names")
    if not key or not names:
        return {"available": False, "reason": "the run was written without feature_names"}
    k = int(settings.get("top_k") or 5)
    snaps = [run.snapshots[i] for i in _columns(run) if key in run.snapshots[i].tensors]
    if not snaps:
        return {"available": False, "reason": "no snapshot holds the feature layer's kernel"}
    _check_size(snaps[-1].tensors[key])
    kernels = [run.tensor(key, step_arg(s)) for s in snaps]  # memory-mapped
    weights = np.stack([feature_weights(kr) for kr in kernels])
    last_top = np.argsort(-np.abs(np.nan_to_num(weights[-1], nan=-np.inf)), kind="stable")
    sent = sorted(int(i) for i in last_top[:MAX_FEATURES])
    tables = []
    for i in range(len(snaps)):
        rows = top_k_features(kernels[i], names, k, weights=weights[i])
        tables.append([{"rank": r.rank, "name": r.name, "index": r.index, "weight": num(r.weight)}
                       for r in rows])
    return {
        "available": True, "key": key, "top_k": k,
        "steps": [s.name for s in snaps],
        "names": [names[i] for i in sent],
        "weights": [[num(weights[t, i]) for t in range(len(snaps))] for i in sent],
        "tables": tables,
    }
