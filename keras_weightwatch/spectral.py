"""Spectral metrics of Dense and convolution kernels, as weightwatcher computes them: pure numpy.

For each weight matrix W the empirical spectral density (ESD) is the set of eigenvalues
λ of WᵀW (the squared singular values of W, no normalisation). From it come the norms
(`spectral_norm` = λ_max, `norm` = Σλ = ‖W‖²_F, `stable_rank` = Σλ / λ_max), the exponent
`alpha` of a power law fitted to the ESD's tail, and the number of eigenvalues above the
Marchenko–Pastur bulk edge of a random matrix of that shape.

Which matrices a tensor holds (`kernel_matrices`):

- a Dense kernel `(in, out)` is one matrix;
- a convolution kernel `(*window, a, b)` (Conv1D/2D/3D `(..., in, out)`, transposed
  convolutions `(..., out, in)`, the pointwise kernel of a separable convolution) is one
  `a x b` matrix per kernel position, prod(window) matrices, whose eigenvalues are pooled
  into one ESD. This is what weightwatcher 0.7.7 does by default for Conv2D
  (`analyze(pool=True)`: `conv2D_Wmats` takes `W[i, j, :, :]` for every position (i, j)
  and `combined_eigenvalues` concatenates their squared singular values);
- depthwise kernels are not matrices of the layer's linear map and get no metrics.

Where this differs from weightwatcher 0.7.7's defaults (docs/SPECTRAL.md has the measurements):

- weightwatcher multiplies a Conv2D matrix by sqrt(1/2) before its SVD (`conv2d_norm=True`
  with pooling sets the factor sqrt(conv2d_count / 2) with conv2d_count = 1), so its Conv2D
  `spectral_norm` and `norm` are half of λ_max and Σλ here (`log_norm` 0.30103 lower,
  `alpha_weighted` accordingly); `alpha`, `xmin`/λ_max ratios and `stable_rank` are
  unaffected by that scale. `analyze(conv2d_norm=False)` gives the numbers here.
- weightwatcher treats a Conv1D kernel `(k, in, out)` as one "dense" 3-d array and keeps only
  its top min(k, in, out) singular values, so it skips Conv1D layers with k < 8; here Conv1D
  and Conv3D are treated as Conv2D is.
- weightwatcher fits alpha down to 8 eigenvalues (a bias-corrected estimator below 20);
  here alpha needs `min_evals` eigenvalues (50 by default), fewer give the norms only, with
  the reason in `SpectralMetrics.reason`.

The power-law fit reproduces weightwatcher 0.7.7's default (`pl_package="ww"`, `xmax=None`,
its own `WWFit`, not the `powerlaw` package): the eigenvalues above 1e-5 (an absolute
threshold, `EVALS_THRESHOLD`) are sorted; each one but the largest is a candidate x_min;
alpha is the continuous maximum-likelihood estimate 1 + n / Σ log(x_j / x_min) over the n
eigenvalues >= x_min, and the candidate with the smallest Kolmogorov–Smirnov distance between
the fitted CDF 1 - (x / x_min)^(1 - alpha) and the empirical CDF 0, 1/n, ..., (n-1)/n is
chosen (Clauset, Shalizi & Newman 2009). Here all candidates are fitted at once from suffix
sums of the logs, and the KS distances in blocks of candidates (no Python loop per
candidate), exactly only for the candidates that a coarse pass at 128 points leaves in the
running for the smallest.

Correlation traps (`traps=True`; off by default, as weightwatcher's `randomize=False`): as
weightwatcher's `analyze(randomize=True)` defines them (`num_traps`, its `rand_num_spikes`),
the entries of each matrix are shuffled (a random permutation of all its elements, which
keeps their values and destroys every correlation between them), and the eigenvalues of the
shuffled matrix above its Marchenko–Pastur bulk edge are counted. Shuffled i.i.d. noise is
i.i.d. noise again, with none; a few entries of unusually large magnitude stay large after
the shuffle and make singular values the bulk cannot hold. The edge is the one of
`mp_spikes` (σ² the mean square, the Tracy–Widom 99% margin), not weightwatcher's fitted
σ_mp (a kernel-density fit of the bulk), and the permutation is seeded, so the count is
reproducible; weightwatcher pools 5 shuffles of layers with fewer than 100 eigenvalues, here
one. The cost is a second set of eigenvalues per matrix: about twice the metrics alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from .derive import effective_shapes as derive_shapes
from .errors import received
from .naming import conv_kind, parse_key

MIN_EVALS = 50
"""Fewest eigenvalues above `EVALS_THRESHOLD` for which alpha is fitted."""
MAX_EVALS = 15_000
"""Most eigenvalues per tensor (weightwatcher's `max_evals` default); larger tensors get the
Frobenius norm only, since their eigenvalues cost O(M³) per matrix."""
EVALS_THRESHOLD = 1e-5
"""Eigenvalues at or below this (absolute) value are left out of the fit, as weightwatcher does."""
TRACY_WIDOM_99 = 2.0234
"""The 99th percentile of the Tracy–Widom (β=1) law: the margin above the Marchenko–Pastur
edge, in units of the largest eigenvalue's fluctuation, that a spike must clear."""
ALPHA_RANGE = (2.0, 6.0)
"""Where the alpha of a well-trained layer usually lies (weightwatcher's rule of thumb)."""
_BLOCK = 1 << 20  # elements of one block of KS distances (two buffers of 8 MB of float64)


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """A power law fitted to the tail of an ESD (see the module docstring)."""

    alpha: float
    xmin: float
    ks_distance: float
    sigma: float
    """The fit's standard error, (alpha - 1) / sqrt(tail_size) (Clauset et al., eq. 3.2)."""
    tail_size: int
    """How many eigenvalues are >= xmin (weightwatcher's `num_pl_spikes`)."""


@dataclasses.dataclass(frozen=True)
class SpectralMetrics:
    """The spectral metrics of one kernel, as weightwatcher's `analyze()` names them.

    Fields that cannot be computed are NaN (alpha and its companions when the fit was not
    made; every eigenvalue metric of a tensor over `MAX_EVALS`), and `reason` says why.
    """

    matrices: int
    """How many matrices the tensor holds (1 for Dense, prod(window) for a convolution)."""
    matrix_shape: tuple[int, int]
    """The shape (rows, columns) of each matrix."""
    num_eigenvalues: int
    spectral_norm: float
    """λ_max, the largest squared singular value."""
    log_spectral_norm: float
    norm: float
    """Σλ, the squared Frobenius norm."""
    log_norm: float
    stable_rank: float
    """Σλ / λ_max."""
    alpha: float
    alpha_weighted: float
    """alpha · log10 λ_max."""
    xmin: float
    ks_distance: float
    sigma: float
    """The standard error of alpha."""
    tail_size: int
    num_spikes: int
    """Eigenvalues above the Marchenko–Pastur bulk edge of each matrix (see `mp_spikes`)."""
    reason: str | None = None
    """Why alpha (or more) is NaN; None when everything was computed."""
    num_traps: int | None = None
    """Correlation traps: eigenvalues of the element-wise shuffled matrices above their
    Marchenko–Pastur edge (see the module docstring); None when not computed (`traps=False`,
    or no eigenvalues)."""

    @property
    def has_traps(self) -> bool:
        """Whether correlation traps were found (False when not computed)."""
        return bool(self.num_traps)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite numbers become `None`."""
        d = dataclasses.asdict(self)
        d["matrix_shape"] = list(self.matrix_shape)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in d.items()}


    def to_stats(self) -> dict[str, float]:
        """The numbers as the snapshot statistics store them (`STAT_NAMES`; NaN kept), and
        `num_traps` where it was computed."""
        out = {k: float(getattr(self, k)) for k in STAT_NAMES}
        if self.num_traps is not None:
            out["num_traps"] = float(self.num_traps)
        return out


STAT_NAMES = ("spectral_norm", "log_spectral_norm", "norm", "log_norm", "stable_rank", "alpha",
              "alpha_weighted", "xmin", "ks_distance", "sigma", "tail_size", "num_spikes",
              "num_eigenvalues", "matrices")
"""The `SpectralMetrics` fields stored beside a tensor's statistics in a snapshot file (when
the callback's `spectral_freq` computed them), under these names; `num_traps` too where the
traps were computed (`spectral_traps`)."""


def stored_metric(stats: Mapping[str, Any], name: str) -> float:
    """One spectral statistic of a snapshot's stored stats of a tensor; NaN when absent (not
    computed at that snapshot) or null."""
    v = stats.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def alpha_note(alpha: float, reason: str | None = None) -> str | None:
    """Why a kernel's alpha deserves a look: outside `ALPHA_RANGE`, or not fitted (`reason`).

    None when alpha lies in the range.

    >>> alpha_note(3.0) is None, alpha_note(1.6)
    (True, 'alpha < 2: heavy-tailed ESD, possibly over-trained')
    """
    low, high = ALPHA_RANGE
    if not math.isfinite(alpha):
        return reason or "no alpha"
    if alpha < low:
        return f"alpha < {low:g}: heavy-tailed ESD, possibly over-trained"
    if alpha > high:
        return f"alpha > {high:g}: random-like ESD, possibly under-trained"
    return None


class ESD(NamedTuple):
    """A tensor's metrics and its eigenvalues (pooled over its matrices, unsorted)."""

    metrics: SpectralMetrics
    eigenvalues: np.ndarray | None


class Target(NamedTuple):
    """A weight tensor that holds matrices: its key, the layer class and its own name."""

    key: str
    layer_class: str | None
    name: str


def targets(classes: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
            layers: Iterable[str] | None = None) -> list[Target]:
    """The tensors that get spectral metrics, in weight order: the one choice of `spectral`
    (a run on disk) and of the callback's spectral view.

    Args:
        classes: Top-level layer name -> its Keras class name (a nested layer is not in it,
            and is classified by its weight's name and rank, see `kernel_matrices`).
        shapes: Weight key -> shape, in weight order.
        layers: Only these layer paths. Defaults to None: every layer.
    """
    wanted = _wanted_layers(list(shapes), layers)
    out = []
    for key, shape in shapes.items():
        parts = parse_key(key)
        if wanted is not None and parts.layer not in wanted:
            continue
        layer_class = classes.get(parts.layer)
        if _holds_matrices(layer_class, parts.name, len(shape)):
            out.append(Target(key, layer_class, parts.name))
    return out


@dataclasses.dataclass(frozen=True)
class SpectralResult:
    """The spectral metrics of every Dense and convolution kernel of one snapshot."""

    path: str
    step: int
    tensors: Mapping[str, SpectralMetrics]
    """Weight key -> metrics, in the model's weight order."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the run, the step and every tensor's metrics."""
        return {"path": self.path, "step": self.step,
                "tensors": {k: m.to_json() for k, m in self.tensors.items()}}


# ------------------------------------------------------------------ which matrices


def kernel_matrices(array: np.ndarray, layer_class: str | None = None,
                    name: str = "kernel") -> np.ndarray | None:
    """The matrices of a weight tensor as a `(P, rows, cols)` view, or None if it holds none.

    Args:
        array: The weight tensor.
        layer_class: The Keras class name of the layer that owns it (`"Dense"`, `"Conv2D"`,
            ...). None when not known (a layer nested in another): then a `kernel` of rank 2
            is taken for a Dense kernel and one of rank 3 to 5 for a convolution kernel.
        name: The weight's own name (`kernel`, `pointwise_kernel`, `bias`, ...).
    """
    a = np.asarray(array)
    if not _holds_matrices(layer_class, name, a.ndim):
        return None
    return a.reshape((-1,) + a.shape[-2:])


def _holds_matrices(layer_class: str | None, name: str, ndim: int) -> bool:
    if layer_class is None:
        return name == "kernel" and 2 <= ndim <= 5
    if layer_class == "Dense":
        return name == "kernel" and ndim == 2
    kind = conv_kind(layer_class)
    if kind is None or kind.units_axis is None:  # not a convolution, or a depthwise one
        return False
    return name == kind.matched_kernel and 3 <= ndim <= 5


# ------------------------------------------------------------------ eigenvalues


def gram_matrices(matrices: np.ndarray) -> np.ndarray:
    """The smaller Gram matrix (WᵀW or WWᵀ) of each matrix of a `(P, rows, cols)` stack, float64."""
    w = np.asarray(matrices, dtype=np.float64)
    if w.shape[1] < w.shape[2]:
        w = w.transpose(0, 2, 1)
    if w.shape[0] == 1:
        m = w[0]
        return (m.T @ m)[None]  # numpy computes `A.T @ A` with one symmetric product (syrk)
    return np.matmul(w.transpose(0, 2, 1), w)


def eigenvalues(matrices: np.ndarray) -> np.ndarray:
    """Eigenvalues of WᵀW for each matrix of a `(P, rows, cols)` stack, ascending, `(P, min)`.

    From the smaller Gram matrix in float64 (negative rounding residues clipped to 0).
    """
    return np.maximum(np.linalg.eigvalsh(gram_matrices(matrices)), 0.0)


def mp_spikes(evals: np.ndarray, shape: tuple[int, int]) -> int:
    """How many eigenvalues of each matrix lie above its Marchenko–Pastur bulk edge.

    `evals` is `(P, min(shape))` as `eigenvalues` returns it. For an N x M matrix (N >= M)
    of i.i.d. entries of variance σ², the eigenvalues of WᵀW lie below
    λ+ = σ²(√N + √M)², and the largest fluctuates about it on the scale
    s = σ²(√N + √M)(1/√N + 1/√M)^(1/3) (Johnstone 2001). σ² is estimated as the matrix's
    mean square (Σλ / (N·M)), which spikes inflate, so the count errs low. An eigenvalue
    counts as a spike above λ+ + `TRACY_WIDOM_99` · s + 3 · sqrt(2 / (N·M)) · λ+: the
    99th percentile of the largest eigenvalue of pure noise, plus three standard errors
    of the estimate of σ² (a matrix of Gaussian noise reports a spike in well under 1% of
    draws).
    """
    n, m = max(shape), min(shape)
    if n * m == 0:
        return 0
    sigma2 = evals.sum(axis=1, keepdims=True) / (n * m)
    root = math.sqrt(n) + math.sqrt(m)
    scale = root * (1 / math.sqrt(n) + 1 / math.sqrt(m)) ** (1 / 3)
    edge = root * root * (1.0 + 3.0 * math.sqrt(2.0 / (n * m))) + TRACY_WIDOM_99 * scale
    return int(np.count_nonzero(evals > sigma2 * edge))


TRAPS_SEED = 0
"""The seed of the permutation that shuffles a matrix for its correlation traps."""


def correlation_traps(matrices: np.ndarray, seed: int = TRAPS_SEED) -> int:
    """How many eigenvalues of the element-wise shuffled matrices of a `(P, rows, cols)` stack
    lie above their Marchenko–Pastur edge (`mp_spikes`): weightwatcher's correlation traps.

    Each matrix's entries are permuted at random (seeded: the same count every time), as
    weightwatcher's `random_eigenvalues` shuffles each of a layer's matrices.
    """
    mats = np.asarray(matrices)
    p, rows, cols = mats.shape
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(m.reshape(-1)) for m in mats])
    return mp_spikes(eigenvalues(shuffled.reshape(p, rows, cols)), (rows, cols))


# ------------------------------------------------------------------ the power-law fit


def fit_power_law(evals: np.ndarray, threshold: float = EVALS_THRESHOLD) -> PowerLawFit | None:
    """Fit a power law to the tail of an ESD, x_min by the smallest KS distance.

    Reproduces weightwatcher 0.7.7's default fit (module docstring), vectorised over the
    candidate x_min values. Returns None when fewer than 2 eigenvalues exceed `threshold`.
    """
    x = np.sort(np.asarray(evals, dtype=np.float64).reshape(-1))
    x = x[x > threshold]
    if x.size < 2:
        return None
    logs = np.log(x)
    logs -= logs[-1]  # shifts cancel in every difference below; keeps the sums small
    count = x.size - np.arange(x.size - 1, dtype=np.float64)  # tail sizes n_i
    suffix = np.cumsum(logs[::-1])[::-1][:-1]  # Σ_{j >= i} log x_j
    spread = suffix - count * logs[:-1]  # Σ_{j >= i} log(x_j / x_i)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + count / spread
    ds = _ks_distances(logs, alphas, spread > 0)
    i = int(np.argmin(ds))
    alpha = float(alphas[i])
    return PowerLawFit(alpha=alpha, xmin=float(x[i]), ks_distance=float(ds[i]),
                       sigma=(alpha - 1.0) / math.sqrt(count[i]), tail_size=int(count[i]))


_GRID = 128
"""Columns of the coarse pass of the KS distances (see `_ks_distances`)."""


def _ks_distances(logs: np.ndarray, alphas: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """KS distance of each candidate's fit, max_k |1 - (x_{i+k}/x_i)^(1-α_i) - k/n_i|, exactly
    where it can be the smallest, and a lower bound (at least the smallest) elsewhere.

    The argmin equals that of the exact distances of every candidate, at a fraction of their
    cost: a coarse pass evaluates each candidate at `_GRID` points of its own tail only (a
    max over fewer terms: a lower bound, bit for bit the same terms as the exact pass, and
    exact for a tail of at most `_GRID`); then the candidate with the smallest bound, and
    every candidate whose bound does not exceed that one's exact distance, get their exact
    distance (over all their terms). Any other candidate's exact distance is at least its
    bound, which exceeds a distance already found, so it is not the first minimum.
    """
    size = logs.size
    cands = size - 1
    inv_n = 1.0 / (size - np.arange(cands, dtype=np.float64))
    terms = _KSTerms(logs, np.where(valid, 1.0 - alphas, 0.0),  # invalid rows are set to 1
                     np.arange(cands, dtype=np.float64) * inv_n, inv_n,
                     np.arange(size, dtype=np.float64))
    every = np.arange(cands)
    if size <= 2 * _GRID:  # small: exact everywhere
        return np.where(valid, terms.max_over(every), 1.0)
    out = np.where(valid, terms.max_sampled(every, _GRID), 1.0)
    first = int(np.argmin(out))
    out[first] = terms.max_over(np.array([first]))[0] if valid[first] else 1.0
    rest = np.flatnonzero((out <= out[first]) & valid & (size - every > _GRID))
    rest = rest[rest != first]
    if rest.size:
        out[rest] = terms.max_over(rest)
    return out


class _KSTerms(NamedTuple):
    """What every term |(x_j/x_i)^(1-α_i) - 1 + (j - i)/n_i| of the KS distances needs."""

    logs: np.ndarray
    slope: np.ndarray
    """1 - α_i (0 for an invalid candidate)."""
    offset: np.ndarray
    """i / n_i."""
    inv_n: np.ndarray
    cols: np.ndarray
    """0, 1, ..., size - 1 as floats."""

    def _terms(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """|term| of each row at `cols` (shape `(1, c)` or `(rows, c)`); 0 where j < i."""
        gap = np.subtract(self.logs[cols], self.logs[rows, None])
        np.maximum(gap, 0.0, out=gap)
        gap *= self.slope[rows, None]
        np.expm1(gap, out=gap)  # -(fitted CDF)
        frac = np.multiply(self.cols[cols], self.inv_n[rows, None])
        frac -= self.offset[rows, None]  # (j - i) / n_i, the empirical CDF
        np.maximum(frac, 0.0, out=frac)
        gap += frac
        return np.abs(gap, out=gap)

    def max_over(self, rows: np.ndarray) -> np.ndarray:
        """For each of `rows` (ascending), its exact distance: the largest term over j >= i.

        Rows are taken in blocks of at most `_BLOCK` terms and at most 1/8 of the rows left
        (a block's columns start at its first row; its triangle j < i is computed and gives
        0, so it is kept small).
        """
        out = np.empty(rows.size)
        size = self.logs.size
        a = 0
        while a < rows.size:
            start = int(rows[a])
            share = max(64, (rows.size - a) // 8)
            b = min(rows.size, a + max(1, min(_BLOCK // (size - start), share)))
            out[a:b] = self._terms(rows[a:b], np.arange(start, size)[None, :]).max(axis=1)
            a = b
        return out

    def max_sampled(self, rows: np.ndarray, points: int) -> np.ndarray:
        """For each of `rows`, the largest term at `points` evenly spread j of its own tail
        (its first and last included): a lower bound of its distance, exact for a tail of
        at most `points`."""
        out = np.empty(rows.size)
        steps = np.linspace(0.0, 1.0, points)
        per = max(1, _BLOCK // points)
        for a in range(0, rows.size, per):
            r = rows[a: a + per]
            last = self.logs.size - 1 - r  # the largest k of each row's tail
            cols = r[:, None] + np.rint(steps[None, :] * last[:, None]).astype(np.int64)
            out[a: a + per] = self._terms(r, cols).max(axis=1)
        return out


# ------------------------------------------------------------------ metrics


def tensor_spectral(array: np.ndarray, layer_class: str | None = None, name: str = "kernel", *,
                    min_evals: int = MIN_EVALS, max_evals: int = MAX_EVALS,
                    traps: bool = False) -> SpectralMetrics | None:
    """The spectral metrics of one weight tensor, or None if it holds no matrices.

    The one call per tensor: the callback's worker and `spectral(run)` both use it.

    Args:
        array: The weight tensor, as `get_weights()` returns it.
        layer_class: The Keras class name of the layer that owns it (see
            `kernel_matrices`). Defaults to None: decided from `name` and the rank.
        name: The weight's own name. Defaults to `"kernel"`.
        min_evals: Fewest eigenvalues above `EVALS_THRESHOLD` for a fit of alpha.
            Defaults to 50; at least 20 (below, weightwatcher switches to another
            estimator).
        max_evals: Most eigenvalues per tensor; a larger one gets only `norm` and
            `log_norm`. Defaults to 15,000 (weightwatcher's default).
        traps: Also count the correlation traps (`num_traps`, see the module docstring),
            at about the cost of the metrics again. Defaults to False.

    Example:

    >>> w = np.diag([3.0, 2.0, 1.0])
    >>> m = tensor_spectral(w, "Dense")
    >>> m.spectral_norm, m.norm, m.stable_rank, m.reason
    (9.0, 14.0, 1.5555555555555556, 'alpha needs 50 eigenvalues above 1e-05; the ESD has 3')
    """
    esd = tensor_esd(array, layer_class, name, min_evals=min_evals, max_evals=max_evals,
                     traps=traps)
    return None if esd is None else esd.metrics


def tensor_esd(array: np.ndarray, layer_class: str | None = None, name: str = "kernel", *,
               min_evals: int = MIN_EVALS, max_evals: int = MAX_EVALS,
               traps: bool = False) -> ESD | None:
    """`tensor_spectral`'s metrics together with the eigenvalues they come from.

    Arguments as for `tensor_spectral`. The eigenvalues are None where they were not
    computed (a tensor over `max_evals`, or one holding NaN or Inf).
    """
    _check_int("min_evals", min_evals, 20)
    _check_int("max_evals", max_evals, 1)
    mats = kernel_matrices(array, layer_class, name)
    if mats is None:
        return None
    shape = (int(mats.shape[1]), int(mats.shape[2]))
    total = mats.shape[0] * min(shape)
    if total == 0:
        return _esd(mats, shape, np.zeros((mats.shape[0], 0)), None, "the tensor is empty")
    if total > max_evals:
        return _esd(mats, shape, None, None,
                    f"{total} eigenvalues exceed max_evals={max_evals}; only norm computed")
    gram = gram_matrices(mats)
    # Every entry of W is squared into one diagonal entry of its Gram matrix: checking the
    # diagonal finds a NaN or Inf anywhere in W without another pass over it.
    if not np.isfinite(np.einsum("pii->p", gram)).all():
        return _esd(mats, shape, None, None, "the tensor has NaN or Inf values")
    evals = np.maximum(np.linalg.eigvalsh(gram), 0.0)
    del gram
    usable = int(np.count_nonzero(evals > EVALS_THRESHOLD))
    fit, reason = None, None
    if usable < min_evals:
        reason = (f"alpha needs {min_evals} eigenvalues above {EVALS_THRESHOLD:g}; "
                  f"the ESD has {usable}")
    else:
        fit = fit_power_law(evals)
    esd = _esd(mats, shape, evals, fit, reason)
    if traps:
        esd = esd._replace(metrics=dataclasses.replace(
            esd.metrics, num_traps=correlation_traps(mats)))
    return esd


def _esd(mats: np.ndarray, shape: tuple[int, int], evals: np.ndarray | None,
         fit: PowerLawFit | None, reason: str | None) -> ESD:
    metrics = _metrics(mats, shape, evals, fit, reason)
    return ESD(metrics, None if evals is None else evals.reshape(-1))


def _metrics(mats: np.ndarray, shape: tuple[int, int], evals: np.ndarray | None,
             fit: PowerLawFit | None, reason: str | None) -> SpectralMetrics:
    nan = math.nan
    if evals is None:  # too large: the Frobenius norm alone, exactly
        norm = float(np.einsum("pij,pij->", mats, mats, dtype=np.float64))
        lam_max, count, spikes = nan, mats.shape[0] * min(shape), 0
    else:
        norm = float(evals.sum())
        lam_max = float(evals.max()) if evals.size else nan
        count, spikes = int(evals.size), mp_spikes(evals, shape)
    log_max = _log10(lam_max)
    alpha = fit.alpha if fit is not None else nan
    return SpectralMetrics(
        matrices=int(mats.shape[0]), matrix_shape=shape, num_eigenvalues=count,
        spectral_norm=lam_max, log_spectral_norm=log_max, norm=norm, log_norm=_log10(norm),
        stable_rank=norm / lam_max if lam_max > 0 else nan,
        alpha=alpha, alpha_weighted=alpha * log_max,
        xmin=fit.xmin if fit is not None else nan,
        ks_distance=fit.ks_distance if fit is not None else nan,
        sigma=fit.sigma if fit is not None else nan,
        tail_size=fit.tail_size if fit is not None else 0,
        num_spikes=spikes, reason=reason,
    )


def _log10(x: float) -> float:
    if x > 0:
        return math.log10(x)
    return -math.inf if x == 0 else math.nan


def _check_int(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer >= {least}. {received(name, value)}")
    if value < least:
        raise ValueError(f"`{name}` must be an integer >= {least}. {received(name, value)}")


# ------------------------------------------------------------------ runs


def spectral(run: Any, step: int | str = "last", layers: Iterable[str] | None = None, *,
             min_evals: int = MIN_EVALS, max_evals: int = MAX_EVALS,
             traps: bool = False) -> SpectralResult:
    """The spectral metrics of every Dense and convolution kernel of a snapshot on disk: the
    kernel each layer computes with (a LoRA layer's `base + (alpha/rank) A @ B`, a quantized
    layer's dequantized kernel), as the callback's spectral view measures it.

    Args:
        run: A run directory (path) or a `Run` from `load_run`.
        step: An int step, `"initial"` or `"last"`. Defaults to `"last"`.
        layers: Only the kernels of these layers (layer paths as the run's weight keys
            spell them, e.g. `"dense"` or `"block/conv"`). Defaults to None: every layer.
        min_evals: As for `tensor_spectral`.
        max_evals: As for `tensor_spectral`.
        traps: As for `tensor_spectral`.

    Example: the README's quickstart run, whose kernels are too small for a fit of alpha.

    >>> result = spectral("runs/exp1", step=3)
    >>> list(result.tensors)
    ['hidden/kernel', 'out/kernel']
    >>> m = result.tensors["hidden/kernel"]
    >>> m.matrix_shape, m.num_eigenvalues, m.reason
    ((4, 8), 4, 'alpha needs 50 eigenvalues above 1e-05; the ESD has 4')
    """
    if isinstance(run, (str, os.PathLike)):
        from . import load_run

        run = load_run(run)
    classes = {layer.name: layer.class_name for layer in run.layers}
    snap = run.snapshot(step)
    chosen = targets(classes, effective_shapes(run, snap), layers)
    resolved = snap.step
    out: dict[str, SpectralMetrics] = {}
    for t in chosen:
        m = tensor_spectral(run.tensor(t.key, resolved, effective=True), t.layer_class, t.name,
                            min_evals=min_evals, max_evals=max_evals, traps=traps)
        if m is not None:
            out[t.key] = m
    return SpectralResult(path=str(run.path), step=int(resolved), tensors=out)


def effective_shapes(run: Any, snap: Any) -> dict[str, tuple[int, ...]]:
    """The shapes of the snapshot's weights in weight order, each derived kernel's the shape
    of its effective kernel (an int4 kernel unpacked), as `spectral` reads them."""
    shapes = {spec.key: tuple(spec.shape) for spec in run.specs if spec.key in snap.tensors}
    shapes.update({k: tuple(r.shape) for k, r in snap.tensors.items() if k not in shapes})
    return derive_shapes(run.derived, shapes)


def _wanted_layers(keys: list[str], layers: Iterable[str] | None) -> set[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        raise TypeError(f"`layers` must be a list of layer paths, not one string. "
                        f"{received('layers', layers)}")
    wanted = set(layers)
    known = {parse_key(k).layer for k in keys}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"`layers` names layers the run does not have (it has "
                         f"{sorted(known)}). {received('layers', unknown)}")
    return wanted
