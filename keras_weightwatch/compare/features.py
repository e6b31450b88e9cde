"""The named input features of two snapshots side by side: ranks, moves and sign flips.

When both runs name their input features (the callback's `feature_names`), the
kernel their feature table reads is found in each, B's rows are put in A's
feature order, and the top-k of each by |weight| are compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..naming import key_name
from ..run import Run, SnapshotRecord
from .inputs import load
from .records import FeatureDiff, FeatureMove


def _feature_key(run: Run, names: Sequence[str]) -> str | None:
    """The key of the kernel the run's feature table reads, from its settings and weights."""
    settings = run.settings
    recorded = settings.get("feature_key")
    if isinstance(recorded, str) and any(s.key == recorded for s in run.specs):
        return recorded
    wanted = settings.get("feature_layer")

    def is_kernel(s: Any) -> bool:
        return key_name(s.key) == "kernel" and len(s.shape) == 2 and s.shape[0] == len(names)

    for s in run.specs:
        if not is_kernel(s):
            continue
        if wanted is None or s.layer == wanted or s.layer.rsplit("/", 1)[-1] == wanted:
            return s.key
    return None


def _rankings(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(per-feature weight, rank of each feature from 1), ranked as `top_k_features` ranks."""
    from ..features import feature_weights

    w = feature_weights(np.asarray(kernel, dtype=np.float64))
    mag = np.abs(w)
    mag = np.where(np.isnan(mag), -1.0, mag)
    order = np.argsort(-mag, kind="stable")
    ranks = np.empty(len(w), dtype=np.int64)
    ranks[order] = np.arange(1, len(w) + 1)
    return w, ranks


def feature_diff(
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
    ka = np.asarray(load(run_a, snap_a, key_a, verify), dtype=np.float64)
    kb = np.asarray(load(run_b, snap_b, key_b, verify), dtype=np.float64)
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
