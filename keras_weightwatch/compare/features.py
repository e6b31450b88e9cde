"""The named input features of two snapshots side by side: ranks, moves and sign flips.

When both runs have a feature table with the same features (the callback's
`feature_names`, or its default names `feature_0`, ... for a table asked for by
`feature_layer` or `feature_data`), the kernel the table reads is found in each,
B's rows are put in A's feature order, and the two rankings are compared: by the
measured effect on the output where both snapshots store it (the table's own
ranking with `feature_data`), else by |weight| (one unit) or the row norm.
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


def _names(run: Run) -> tuple[str, list[str]] | None:
    """(the kernel its feature table reads, the feature names) of a run with a feature table.

    A table without `feature_names` (one asked for by `feature_layer` or `feature_data`) names
    its features `feature_0`, `feature_1`, ... as the callback does.
    """
    names = run.settings.get("feature_names")
    if names:
        key = _feature_key(run, names)
        return None if key is None else (key, [str(n) for n in names])
    recorded = run.settings.get("feature_key")
    spec = next((s for s in run.specs if s.key == recorded and len(s.shape) == 2), None)
    if spec is None:
        return None
    return spec.key, [f"feature_{i}" for i in range(spec.shape[0])]


def _ranks(values: np.ndarray) -> np.ndarray:
    """The rank of each feature from 1 by |value| (NaN last), as `top_k_features` ranks."""
    mag = np.abs(values)
    mag = np.where(np.isnan(mag), -1.0, mag)
    order = np.argsort(-mag, kind="stable")
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def _effect_note(run_a: Run, run_b: Run, units: int) -> str | None:
    """Why the ranking is by the kernel although a run's own table ranked by effect."""
    if units > 1 and any(r.settings.get("feature_data") is not None for r in (run_a, run_b)):
        return ("the runs' own tables rank by the measured effect (feature_data), which these "
                "snapshots do not both store; ranked here by the kernel's row norms")
    return None


def feature_diff(
    run_a: Run, snap_a: SnapshotRecord, run_b: Run, snap_b: SnapshotRecord,
    top_k: int | None, verify: bool,
) -> FeatureDiff | None:
    """The top-k features of A and B side by side, ranked as the runs' tables rank them: by
    the stored effect where both snapshots store it, else by the kernel."""
    from ..features import feature_weights, stored_effects

    table_a, table_b = _names(run_a), _names(run_b)
    if table_a is None or table_b is None or sorted(table_a[1]) != sorted(table_b[1]):
        return None
    (key_a, names_a), (key_b, names_b) = table_a, table_b
    if key_a not in snap_a.tensors or key_b not in snap_b.tensors:
        return None
    ka = np.asarray(load(run_a, snap_a, key_a, verify), dtype=np.float64)
    kb = np.asarray(load(run_b, snap_b, key_b, verify), dtype=np.float64)
    if ka.shape != kb.shape:
        return None
    # Put B's rows in A's feature order (the names are the same, perhaps in another order).
    where_b = {n: i for i, n in enumerate(names_b)}
    order_b = [where_b[n] for n in names_a]
    kb = kb[order_b]
    n = len(names_a)
    ea, eb = (stored_effects(snap.stats.get(key), n) for snap, key in
              ((snap_a, key_a), (snap_b, key_b)))
    if ea is not None and eb is not None:
        wa, wb, ranked_by, note = ea, eb[order_b], "effect", None
    else:
        wa, wb = feature_weights(ka), feature_weights(kb)
        ranked_by = "weight" if ka.shape[1] == 1 else "row_norm"
        note = _effect_note(run_a, run_b, int(ka.shape[1]))
    k = min(top_k if top_k is not None else int(run_b.settings.get("top_k") or 5), n)
    ra, rb = _ranks(wa), _ranks(wb)
    flips = np.sum((np.sign(ka) * np.sign(kb)) < 0, axis=1)
    rows_b = sorted((i for i in range(n) if rb[i] <= k), key=lambda i: rb[i])
    rows_a = sorted((i for i in range(n) if ra[i] <= k and rb[i] > k), key=lambda i: ra[i])
    rows = tuple(
        FeatureMove(name=str(names_a[i]), rank_a=int(ra[i]), rank_b=int(rb[i]),
                    weight_a=float(wa[i]), weight_b=float(wb[i]), sign_flips=int(flips[i]))
        for i in rows_b + rows_a
    )
    return FeatureDiff(key_a=key_a, key_b=key_b, k=k, units=int(ka.shape[1]), rows=rows,
                       ranked_by=ranked_by, note=note)
