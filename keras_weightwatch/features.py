"""Named top-k input features of a Dense kernel: pure numpy.

A Dense layer fed by the model input has a kernel of shape `(features,
units)`: row `i` holds the weights that multiply input feature `i`. The
features are ranked by the magnitude of their weight (for one unit) or by
the L2 norm of their row (for several units). Correlated features can trade
weight between them, so with a sample of the inputs each feature whose
absolute correlation with another is 0.9 or more is flagged with its
partner, and standardized weights (weight x the feature's standard
deviation) put features of different scales side by side. Where the callback
ranked by the measured effect on the output instead (`feature_data`, several
units), the snapshot stores each feature's effect (`effect_stats`) so that a
diff compares the ranking the table showed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .textfmt import fmt_g

CORRELATION_THRESHOLD = 0.9
# Correlations are computed this many at a time (a block of rows of the matrix).
_BLOCK_ELEMENTS = 1 << 22
# A per-unit table (one column per unit) is added when the layer has at most this many units.
MAX_UNIT_COLUMNS = 8


@dataclasses.dataclass(frozen=True)
class FeatureWeight:
    """One input feature's weight, as ranked by `top_k_features`.

    Attributes:
        rank: 1 for the feature of largest magnitude.
        index: The feature's position in the input (row of the kernel).
        name: The feature's name.
        weight: The signed weight for a single-unit layer, else the L2 norm of
            the feature's row over the units.
        units: The feature's weight for each unit (the kernel row).
        std: The feature's standard deviation in the sample, or None.
        standardized: `weight * std` (None without a sample).
        partner: The name of the feature it is most correlated with, when
            |correlation| >= the threshold; else None.
        correlation: That correlation, or None.
    """

    rank: int
    index: int
    name: str
    weight: float
    units: tuple[float, ...]
    std: float | None = None
    standardized: float | None = None
    partner: str | None = None
    correlation: float | None = None


EFFECT_STAT = "effect/{}"
"""The name under which a snapshot stores input feature i's measured effect on the output (the
feature table's ranking with `feature_data`), in the feature kernel's statistics."""


def effect_stats(scores: np.ndarray) -> dict[str, float]:
    """Each feature's effect as the snapshot statistics store it (`EFFECT_STAT`)."""
    return {EFFECT_STAT.format(i): float(v) for i, v in enumerate(np.asarray(scores).ravel())}


def stored_effects(stats: Any, features: int) -> np.ndarray | None:
    """The effects `effect_stats` stored for `features` features, or None unless all are there."""
    if not stats:
        return None
    values = [stats.get(EFFECT_STAT.format(i)) for i in range(features)]
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
        return None
    return np.asarray(values, dtype=np.float64)


def feature_weights(kernel: np.ndarray) -> np.ndarray:
    """The per-feature weight: the kernel's column for one unit, else the row L2 norms.

    Args:
        kernel: A Dense kernel of shape `(features, units)`.

    Returns:
        A float64 array of shape `(features,)`.

    Example:

    >>> feature_weights(np.array([[3.0, 4.0], [0.0, -1.0]]))
    array([5., 1.])
    """
    k = _as_kernel(kernel)
    if k.shape[1] == 1:
        return k[:, 0].astype(np.float64)
    # Squares summed in float64 without a float64 copy of the kernel (einsum casts in blocks).
    return np.sqrt(np.einsum("ij,ij->i", k, k, dtype=np.float64))


def _as_kernel(kernel: np.ndarray) -> np.ndarray:
    k = np.asarray(kernel)
    if k.ndim != 2:
        raise ValueError(
            f"a Dense kernel of shape (features, units) is needed. Received: kernel.shape={k.shape}"
        )
    return k


def correlated_partners(
    data: np.ndarray, threshold: float = CORRELATION_THRESHOLD
) -> list[tuple[int, float] | None]:
    """For each feature, the other feature it is most correlated with, if |r| >= threshold.

    Constant features (and features with non-finite values in the sample)
    have no correlation and are never flagged.

    Args:
        data: A sample of inputs, shape `(samples, features)`.
        threshold: The smallest |correlation| that is flagged. Defaults to 0.9.

    Returns:
        One entry per feature: `(partner index, correlation)` or None.

    Example:

    >>> x = np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 0.0], [2.0, 4.1, 1.0]])
    >>> [p if p is None else p[0] for p in correlated_partners(x)]
    [1, 0, None]
    """
    x = np.asarray(data, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"`data` must be 2-D (samples, features). Received: data.shape={x.shape}")
    n = x.shape[1]
    out: list[tuple[int, float] | None] = [None] * n
    if x.shape[0] < 2 or n < 2:
        return out
    ok = np.all(np.isfinite(x), axis=0)
    xc = x - x.mean(axis=0)
    norm = np.sqrt(np.sum(xc * xc, axis=0))
    ok &= norm > 0
    safe = np.where(ok, norm, 1.0)
    z = np.where(ok, xc / safe, 0.0)
    # Rows of the correlation matrix a block at a time: memory stays at about
    # _BLOCK_ELEMENTS floats however many features there are.
    block = max(1, _BLOCK_ELEMENTS // n)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        r = np.clip(z[:, i0:i1].T @ z, -1.0, 1.0)
        r[np.arange(i1 - i0), np.arange(i0, i1)] = 0.0  # a feature is not its own partner
        r[:, ~ok] = 0.0
        best = np.argmax(np.abs(r), axis=1)
        for row, i in enumerate(range(i0, i1)):
            j = int(best[row])
            if ok[i] and abs(r[row, j]) >= threshold:
                out[i] = (j, float(r[row, j]))
    return out


@dataclasses.dataclass(frozen=True)
class FeatureData:
    """What a sample of inputs says about each feature, computed once per sample.

    Attributes:
        stds: Each feature's standard deviation in the sample.
        partners: For each feature, `(partner index, correlation)` of the
            other feature it is most correlated with, if |r| >= the threshold,
            else None (see `correlated_partners`).
    """

    stds: np.ndarray
    partners: list[tuple[int, float] | None]

    @classmethod
    def from_sample(
        cls, data: np.ndarray, threshold: float = CORRELATION_THRESHOLD
    ) -> FeatureData:
        """Standard deviations and correlated partners of a `(samples, features)` sample.

        Example:

        >>> x = np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 0.0], [2.0, 4.1, 1.0]])
        >>> fd = FeatureData.from_sample(x)
        >>> [round(float(s), 3) for s in fd.stds], [p if p is None else p[0] for p in fd.partners]
        ([0.816, 1.674, 0.471], [1, 0, None])
        """
        x = np.asarray(data, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(
                f"`data` must be 2-D (samples, features). Received: data.shape={x.shape}"
            )
        return cls(stds=x.std(axis=0), partners=correlated_partners(x, threshold))


def top_k_features(
    kernel: np.ndarray,
    names: Sequence[str],
    k: int = 5,
    data: np.ndarray | None = None,
    threshold: float = CORRELATION_THRESHOLD,
    *,
    weights: np.ndarray | None = None,
) -> list[FeatureWeight]:
    """The `k` features of largest weight magnitude, largest first.

    Ties keep input order. An infinite weight ranks as the largest, NaN last.

    Args:
        kernel: A Dense kernel of shape `(features, units)`.
        names: One name per feature.
        k: How many features to return. Defaults to 5.
        data: A sample of inputs `(samples, features)` for the correlation
            flags and standardized weights, or its `FeatureData` computed
            once for many calls. Defaults to None.
        threshold: The smallest |correlation| that is flagged. Defaults to 0.9.
        weights: `feature_weights(kernel)`, when the caller has it already
            (it is not computed again). Defaults to None.

    Returns:
        A list of `FeatureWeight`, at most `k` long.

    Example:

    >>> top = top_k_features(np.array([[0.5], [-3.0], [2.0]]), ["a", "b", "c"], k=2)
    >>> [(f.name, f.weight) for f in top]
    [('b', -3.0), ('c', 2.0)]
    """
    kern = _as_kernel(kernel)
    names = list(names)
    if len(names) != kern.shape[0]:
        raise ValueError(
            f"{len(names)} feature names for a kernel of {kern.shape[0]} input features. "
            f"Received: names={names!r}"
        )
    if weights is None:
        weights = feature_weights(kern)
    elif np.shape(weights) != (kern.shape[0],):
        raise ValueError(
            f"`weights` must have shape ({kern.shape[0]},). "
            f"Received: weights.shape={np.shape(weights)}"
        )
    mag = np.abs(weights)
    mag = np.where(np.isnan(mag), -1.0, mag)
    k = max(int(k), 0)
    if k < mag.size // 4:
        # Only the k largest need sorting: preselect them (ties at the cut all come along).
        cut = np.partition(mag, mag.size - k)[mag.size - k] if k else np.inf
        candidates = np.flatnonzero(mag >= cut)
        order = candidates[np.argsort(-mag[candidates], kind="stable")][:k]
    else:
        order = np.argsort(-mag, kind="stable")[:k]
    stds = partners = None
    if data is not None:
        if not isinstance(data, FeatureData):
            x = np.asarray(data, dtype=np.float64)
            if x.ndim != 2 or x.shape[1] != kern.shape[0]:
                raise ValueError(
                    f"`data` must have shape (samples, {kern.shape[0]}). "
                    f"Received: data.shape={x.shape}"
                )
            described = FeatureData.from_sample(x, threshold)
        elif len(data.partners) != kern.shape[0]:
            raise ValueError(
                f"`data` describes {len(data.partners)} features for a kernel of "
                f"{kern.shape[0]}. Received: data={data!r}"
            )
        else:
            described = data
        stds, partners = described.stds, described.partners
    out = []
    for rank, i in enumerate(order, start=1):
        i = int(i)
        std = None if stds is None else float(stds[i])
        pair = None if partners is None else partners[i]
        out.append(
            FeatureWeight(
                rank=rank,
                index=i,
                name=names[i],
                weight=float(weights[i]),
                units=tuple(float(v) for v in kern[i].tolist()),
                std=std,
                standardized=None if std is None else float(weights[i]) * std,
                partner=None if pair is None else names[pair[0]],
                correlation=None if pair is None else pair[1],
            )
        )
    return out


def _num(v: float | None) -> str:
    return fmt_g(v)


def _cell(s: str) -> str:
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[FeatureWeight], units: int = 1, title: str | None = None,
                   column: str | None = None) -> str:
    """The top-k table as Markdown: rank, feature, weight (and the sample's columns).

    For a layer with several units the weight column is the L2 norm over the
    units; up to `MAX_UNIT_COLUMNS` units get a second table with the
    per-unit weights. Numbers show 4 significant digits.

    Args:
        rows: The features, as `top_k_features` returns them.
        units: The layer's number of units. Defaults to 1.
        title: A line shown above the table. Defaults to None.
        column: The heading of the ranked column. Defaults to None: "weight"
            for one unit, else "L2 norm over units".

    Returns:
        Markdown text.

    Example:

    >>> print(markdown_table(top_k_features(np.array([[-3.81], [2.85]]), ["LSTAT", "RM"])))
    | rank | feature | weight |
    |---:|:---|---:|
    | 1 | LSTAT | -3.81 |
    | 2 | RM | 2.85 |
    """
    with_data = any(r.std is not None for r in rows)
    if column is None:
        column = "weight" if units == 1 else "L2 norm over units"
    head = ["rank", "feature", column]
    align = ["---:", ":---", "---:"]
    with_std = any(r.standardized is not None for r in rows)
    if with_data:
        head += ["standardized"] * with_std + ["correlated with (r)"]
        align += ["---:"] * with_std + [":---"]
    lines = []
    if title:
        lines += [title, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [str(r.rank), _cell(r.name), _num(r.weight)]
        if with_data:
            flag = "" if r.partner is None else f"**{_cell(r.partner)}** ({_num(r.correlation)})"
            cells += [_num(r.standardized)] * with_std + [flag]
        lines.append("| " + " | ".join(cells) + " |")
    if 1 < units <= MAX_UNIT_COLUMNS and rows:
        lines += ["", "Weight per unit:", ""]
        lines.append("| feature | " + " | ".join(f"unit {u}" for u in range(units)) + " |")
        lines.append("|:---|" + "|".join(["---:"] * units) + "|")
        for r in rows:
            lines.append(f"| {_cell(r.name)} | " + " | ".join(_num(v) for v in r.units) + " |")
    return "\n".join(lines)
