"""The health rules: small pure functions over what a run's snapshots store.

Each rule reads a `Context` (the model's facts and the snapshots so far, the one judged
last) and returns the findings that hold at that snapshot. `monitor.Monitor` runs them on
each snapshot as it is written, `monitor.diagnose` on every snapshot of a stored run; both
merge a finding that holds at several snapshots into one (`Finding.step`, `since`, `last`).
docs/HEALTH.md gives each rule's definition, threshold, the reason for the threshold and its
blind spots; `Thresholds` holds every threshold, in one place.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from ..spectral import stored_metric
from .measures import GRAD_DEAD_UNITS, UNITS, UNITS_COLLAPSED, UNITS_DUPLICATE, is_unit_kernel

ERROR = "error"
WARNING = "warning"
SEVERITIES = (ERROR, WARNING)

Stats = Mapping[str, Mapping[str, Any]]
_MOVING = ("moving_mean", "moving_variance")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Every threshold of the rules (docs/HEALTH.md says why each has its value)."""

    growth: float = 1.5
    """exploding_weights: a kernel's norm grows by at least this factor per snapshot..."""
    growth_snapshots: int = 3
    """...at this many snapshots in a row..."""
    grown_from_start: float = 10.0
    """...and has reached this multiple of its norm at the run's first snapshot."""
    large_update: float = 1.0
    """large_update: an update ratio ||W_t - W_(t-1)|| / ||W_(t-1)|| of at least this..."""
    above_median: float = 10.0
    """...and this multiple of the median update ratio of the model's other kernels."""
    still: float = 1e-7
    """not_learning: an update ratio at most this (float32 rounding of nothing) ..."""
    still_snapshots: int = 2
    """...at this many snapshots in a row..."""
    moving: float = 1e-4
    """...while the median update ratio of the other kernels is at least this."""
    gradient_span: float = 1e-3
    """vanishing/exploding_gradients: ||g||/||W|| of the input-most kernel below this times
    (or above its inverse times) that of the output-most kernel, on the probe batch."""
    min_depth: int = 3
    """...in a model of at least this many trainable kernels."""
    dead_fraction: float = 0.5
    """dead_units: at least this fraction of a layer's units dead or collapsed."""
    alpha_low: float = 2.0
    alpha_high: float = 6.0
    alpha_trained: float = 5.0
    """spectral_alpha: a fitted alpha below `alpha_low`, or above `alpha_high` for a layer
    whose alpha at the run's first snapshot was at most `alpha_trained` (it started
    trained, well inside the range, and lost its structure)."""


DEFAULTS = Thresholds()


class Finding(NamedTuple):
    """What is wrong, in which layer, since when.

    Attributes:
        rule: The rule's name (`RULES`).
        severity: `"error"` or `"warning"`.
        layer: The layer it is about.
        key: The weight it was read from.
        step: The first snapshot at which the rule reported it.
        since: The first snapshot whose stored data shows the condition (at most `step`).
        last: The last snapshot at which it held so far.
        message: One line a person understands.
        hint: The first thing to check.
        also: Other weights involved (with a non-finite finding: each that followed, as
            `key@step`).

    Example:

    >>> f = Finding("not_learning", "warning", "hidden", "hidden/kernel", step=1, since=0,
    ...             last=3, message="hidden/kernel has not changed for 2 snapshots",
    ...             hint="is the layer frozen by mistake?")
    >>> f.to_json()["since"], f.to_json()["also"]
    (0, [])
    """

    rule: str
    severity: str
    layer: str
    key: str
    step: int
    since: int
    last: int
    message: str
    hint: str
    also: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The finding as `doctor --json` writes it."""
        d = self._asdict()
        d["also"] = list(self.also)
        return d


class Snap(NamedTuple):
    """One snapshot as the rules see it: its step and its stored statistics."""

    step: int
    stats: Stats


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the rules need to know of the model, from the run header.

    Attributes:
        keys: Every weight key, in `model.weights` order (input side first).
        layer: Key -> its layer.
        trainable: Key -> whether Keras trains it.
        shape: Key -> the shape the layer computes with (effective).
        adapters: The keys of LoRA adapters (`lora_kernel_a/b`); the lora rule judges them.
    """

    keys: tuple[str, ...]
    layer: Mapping[str, str]
    trainable: Mapping[str, bool]
    shape: Mapping[str, tuple[int, ...]]
    adapters: frozenset[str] = frozenset()

    @classmethod
    def from_specs(cls, specs: Sequence[Any], derived: Sequence[Any]) -> ModelFacts:
        """The facts of a model's `WeightSpec`s and `Derivation`s (a fit's `ModelInfo`, or a
        stored run's `specs` and `derived`)."""
        from ..derive import effective_shapes

        shapes = effective_shapes(derived, {w.key: tuple(w.shape) for w in specs})
        adapters = frozenset(k for d in derived if d.rule == "lora"
                             for name, k in d.inputs.items() if name in ("a", "b"))
        return cls(tuple(w.key for w in specs), {w.key: w.layer for w in specs},
                   {w.key: bool(w.trainable) for w in specs}, shapes, adapters)

    def kernels(self) -> list[str]:
        """The trainable weights of at least two axes that are neither biases (an attention
        layer's are 2-D) nor LoRA adapters, in order."""
        return list(self._kernels)

    @functools.cached_property
    def _kernels(self) -> tuple[str, ...]:
        return tuple(k for k in self.keys if self.trainable.get(k, False)
                     and k not in self.adapters and len(self.shape.get(k, ())) >= 2
                     and not k.endswith("bias"))

    @property
    def normalized(self) -> bool:
        """Whether the model has BatchNormalization layers (moving statistics): its gradients
        on the probe batch, taken in inference mode, are not those of training early on."""
        return any(k.rpartition("/")[2] in _MOVING for k in self.keys)

    def unit_kernels(self) -> list[str]:
        """The trainable Dense and convolution kernels whose units the rules count
        (`is_unit_kernel`): a frozen layer's units (a frozen base, a LoRA layer's base) are
        not this training's doing, and are not reduced at each snapshot."""
        return [k for k in self.keys if k not in self.adapters and self.trainable.get(k, False)
                and is_unit_kernel(k, self.shape.get(k, ()))]


class Context(NamedTuple):
    """What a rule reads: the model's facts, the snapshots so far (the judged one last; the
    monitor keeps the latest few) and the run's first snapshot."""

    model: ModelFacts
    history: Sequence[Snap]
    first: Snap
    limits: Thresholds = DEFAULTS

    @property
    def now(self) -> Snap:
        return self.history[-1]


def value(stats: Stats, key: str, name: str) -> float:
    """A stored statistic of weight `key`, NaN where absent, None or not a number (the
    reading `spectral.stored_metric` makes of one weight's statistics)."""
    return stored_metric(stats.get(key, {}), name)


def _found(ctx: Context, rule: str, severity: str, key: str, since: int, message: str,
           hint: str, also: tuple[str, ...] = ()) -> Finding:
    layer = ctx.model.layer.get(key, key.rpartition("/")[0])
    step = ctx.now.step
    return Finding(rule, severity, layer, key, step, since, step, message, hint, also)


def _median(xs: Iterable[float]) -> float:
    vals = sorted(x for x in xs if math.isfinite(x))
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])


# ----------------------------------------------------------------------------- the rules


def non_finite(ctx: Context) -> list[Finding]:
    """A weight holds NaN or Inf: the first one (in model order) at the first such snapshot;
    the monitor adds those that follow to `also`."""
    bad = [k for k in ctx.model.keys
           if value(ctx.now.stats, k, "nan_count") > 0 or value(ctx.now.stats, k, "inf_count") > 0]
    if not bad:
        return []
    k = bad[0]
    nan, inf = (value(ctx.now.stats, k, name) for name in ("nan_count", "inf_count"))
    nan, inf = (x if math.isfinite(x) else 0.0 for x in (nan, inf))
    return [_found(
        ctx, "non_finite", ERROR, k, ctx.now.step,
        f"{k} holds {int(nan)} NaN and {int(inf)} Inf values"
        + (f"; {len(bad) - 1} more weights too" if len(bad) > 1 else ""),
        "lower the learning rate, clip gradients, look for a log or division of zero in the"
        " loss or the data", tuple(f"{b}@{ctx.now.step}" for b in bad[1:]))]


def exploding_weights(ctx: Context) -> list[Finding]:
    """A kernel's norm grows geometrically: by `growth` or more at each of the last
    `growth_snapshots` snapshots, to `grown_from_start` times its first norm."""
    lim, n = ctx.limits, ctx.limits.growth_snapshots
    if len(ctx.history) < n + 1:
        return []
    out = []
    for k in ctx.model.kernels():
        norms = [value(s.stats, k, "l2_norm") for s in ctx.history[-n - 1:]]
        start = value(ctx.first.stats, k, "l2_norm")
        if not all(math.isfinite(x) and x > 0 for x in norms) or not start > 0:
            continue
        rates = [b / a for a, b in zip(norms, norms[1:])]
        if min(rates) >= lim.growth and norms[-1] >= lim.grown_from_start * start:
            out.append(_found(
                ctx, "exploding_weights", ERROR, k, ctx.history[-n - 1].step,
                f"{k}: norm grew x{min(rates):.3g} or more per snapshot for {n} snapshots,"
                f" to {norms[-1]:.3g} ({norms[-1] / start:.3g} x its first norm)",
                "lower the learning rate, add weight decay or gradient clipping; check the"
                " loss scale and the targets' scale"))
    return _one_per_layer(out)


def large_update(ctx: Context) -> list[Finding]:
    """A kernel's update ratio is at least `large_update` and `above_median` times the median
    of the model's other kernels: the learning rate is too large for that layer."""
    lim = ctx.limits
    kernels = ctx.model.kernels()
    ratios = {k: value(ctx.now.stats, k, "update_ratio") for k in kernels}
    out = []
    for k, r in ratios.items():
        if not (math.isfinite(r) and r >= lim.large_update):
            continue
        med = _median(v for j, v in ratios.items() if j != k)
        if math.isfinite(med) and r >= lim.above_median * med:
            out.append(_found(
                ctx, "large_update", WARNING, k, ctx.now.step,
                f"{k}: update ratio {r:.3g} in one snapshot, {r / med:.3g} x the median of"
                f" the other kernels ({med:.3g})" if med > 0 else
                f"{k}: update ratio {r:.3g} in one snapshot while the other kernels hardly move",
                "the learning rate is too large for this layer's weight scale: check its"
                " initialisation (a tiny scale?) and the learning rate"))
    return _one_per_layer(out)


def not_learning(ctx: Context) -> list[Finding]:
    """A trainable kernel has not moved (`update_ratio` at most `still`) at each of the last
    `still_snapshots` snapshots while the other kernels' median is at least `moving`."""
    lim, n = ctx.limits, ctx.limits.still_snapshots
    if len(ctx.history) < n + 1:
        return []
    kernels = ctx.model.kernels()
    out = []
    for k in kernels:
        if not all(value(s.stats, k, "update_ratio") <= lim.still for s in ctx.history[-n:]):
            continue
        if all(_median(value(s.stats, j, "update_ratio") for j in kernels if j != k)
               >= lim.moving for s in ctx.history[-n:]):
            g = value(ctx.now.stats, k, "grad_norm")
            why = " (its gradient on the probe batch is exactly 0)" if g == 0 else ""
            out.append(_found(
                ctx, "not_learning", WARNING, k, ctx.history[-n].step,
                f"{k} has not changed for {n} snapshots while the rest of the model trains{why}",
                "is the layer frozen by mistake (trainable changed after compile), detached"
                " (stop_gradient, an output not in the loss) or given a zero learning rate?"))
    return _one_per_layer(out)


def _gradient_ratio(ctx: Context) -> tuple[str, str, float] | None:
    """The input-most and output-most kernels with a non-zero gradient on the probe batch,
    and the ratio of their ||g||/||W||; None without gradients or depth."""
    ks = [k for k in ctx.model.kernels() if value(ctx.now.stats, k, "grad_to_weight") > 0]
    if len(ks) < ctx.limits.min_depth:
        return None
    first, last = ks[0], ks[-1]
    return first, last, (value(ctx.now.stats, first, "grad_to_weight")
                         / value(ctx.now.stats, last, "grad_to_weight"))


def gradients_across_depth(ctx: Context) -> list[Finding]:
    """On the probe batch, ||g||/||W|| of the input-most kernel is below `gradient_span`
    times (vanishing) or above its inverse times (exploding) that of the output-most one."""
    got = None if ctx.model.normalized else _gradient_ratio(ctx)
    if got is None:
        return []
    first, last, ratio = got
    span = ctx.limits.gradient_span
    if ratio < span:
        return [_found(ctx, "vanishing_gradients", WARNING, first, ctx.now.step,
                       f"{first}: gradient/weight {ratio:.3g} x that of {last} (the output"
                       " end) on the probe batch: the gradient vanishes across depth",
                       "saturating activations (sigmoid, tanh) in a deep stack? use ReLU/GELU,"
                       " normalisation layers, residual connections or a better initialiser")]
    if ratio > 1 / span:
        return [_found(ctx, "exploding_gradients", WARNING, first, ctx.now.step,
                       f"{first}: gradient/weight {ratio:.3g} x that of {last} (the output"
                       " end) on the probe batch: the gradient explodes across depth",
                       "check the initialisation's scale (gain) and add normalisation layers or"
                       " gradient clipping")]
    return []


def dead_units(ctx: Context) -> list[Finding]:
    """At least `dead_fraction` of a trainable layer's units get an exactly-zero gradient on
    the probe batch (while some do not), or have incoming weights that collapsed (not all of
    them)."""
    out = []
    frac = ctx.limits.dead_fraction
    for k in ctx.model.unit_kernels():  # trainable ones: a frozen layer's are not judged
        units = value(ctx.now.stats, k, UNITS)
        if not units >= 2:
            units = float(ctx.model.shape[k][-1])
        dead = math.nan if ctx.model.normalized else value(ctx.now.stats, k, GRAD_DEAD_UNITS)
        gone = value(ctx.now.stats, k, UNITS_COLLAPSED)
        if dead >= frac * units and dead < units:
            what = f"{int(dead)} of {int(units)} units get no gradient on the probe batch"
        elif gone >= frac * units and gone < units:
            what = f"{int(gone)} of {int(units)} units' incoming weights collapsed to ~0"
        else:
            continue
        out.append(_found(ctx, "dead_units", WARNING, k, ctx.now.step, f"{k}: {what} (dead)",
                          "ReLU units pushed off for every input (a large negative bias, too"
                          " large a learning rate)? try a smaller learning rate, LeakyReLU/GELU,"
                          " or check the biases' initialisation"))
    return out


def symmetry(ctx: Context) -> list[Finding]:
    """Units of a layer still identical after the layer moved: a constant or zero
    initialisation whose symmetry training does not break."""
    if ctx.now.step == ctx.first.step:
        return []
    out = []
    trainable = ctx.model.trainable
    for k in ctx.model.unit_kernels():
        dup = value(ctx.now.stats, k, UNITS_DUPLICATE)
        if not (trainable.get(k, False) and dup >= 2
                and value(ctx.now.stats, k, "update_ratio") > 0):
            continue
        units = value(ctx.now.stats, k, UNITS)
        at_start = value(ctx.first.stats, k, UNITS_DUPLICATE) >= 2
        out.append(_found(
            ctx, "symmetry", WARNING, k, ctx.first.step if at_start else ctx.now.step,
            f"{k}: {int(dup)} of {int(units)} units are identical"
            + (" since initialisation: training does not break the symmetry" if at_start
               else ""),
            "a constant or zero kernel initialiser? use a random one (glorot_uniform,"
            " he_normal)"))
    return out


def lora_stalled(ctx: Context) -> list[Finding]:
    """A LoRA adapter has not moved for `views.adapters.IDLE_SNAPSHOTS` snapshots (the
    adapters view's `lora_stalled` mark)."""
    out = []
    for k in ctx.model.keys:
        if value(ctx.now.stats, k, "lora_stalled") != 1:
            continue
        idle = int(value(ctx.now.stats, k, "lora_idle"))
        back = min(idle, len(ctx.history))
        since = ctx.history[-back].step if back > 0 else ctx.now.step
        if idle > len(ctx.history):
            since = ctx.first.step
        why = ("its B still all zeros" if value(ctx.now.stats, k, "lora_update") == 0
               else "A and B unchanged")
        out.append(_found(ctx, "lora_stalled", WARNING, k, since,
                          f"the LoRA adapter of {k} has not moved for {idle} snapshots ({why})",
                          "are lora_kernel_a/b (lora_embeddings_a/b) trainable, and is their"
                          " learning rate above zero?"))
    return out


def spectral_alpha(ctx: Context) -> list[Finding]:
    """A kernel's fitted power-law alpha below `alpha_low` (heavy-tailed: over-trained), or
    above `alpha_high` where it was at most `alpha_trained` at the run's first snapshot."""
    lim = ctx.limits
    out = []
    for k in ctx.model.keys:
        a = value(ctx.now.stats, k, "alpha")
        if not math.isfinite(a):
            continue
        start = value(ctx.first.stats, k, "alpha")
        if a < lim.alpha_low:
            what, hint = (f"{k}: spectral alpha {a:.3g} < {lim.alpha_low:g} (heavy-tailed)",
                          "over-trained or over-fit: fewer epochs, more data, regularisation")
        elif a > lim.alpha_high and math.isfinite(start) and start <= lim.alpha_trained:
            what, hint = (f"{k}: spectral alpha {a:.3g} > {lim.alpha_high:g}, up from"
                          f" {start:.3g}", "the layer lost its structure: learning rate?")
        else:
            continue
        out.append(_found(ctx, "spectral_alpha", WARNING, k, ctx.now.step, what, hint))
    return out


def correlation_traps(ctx: Context) -> list[Finding]:
    """Correlation traps where the spectral view computed them (`spectral_traps`): a few
    very large elements that stand out of a kernel's randomized spectrum."""
    out = []
    for k in ctx.model.keys:
        n = value(ctx.now.stats, k, "num_traps")
        if n > 0:
            out.append(_found(ctx, "correlation_traps", WARNING, k, ctx.now.step,
                              f"{k}: {int(n)} correlation trap(s): a few weights far larger"
                              " than the rest", "a corrupted or badly loaded weight, or too"
                              " large a learning rate for that layer; look at its max_abs"))
    return out


def _one_per_layer(found: list[Finding]) -> list[Finding]:
    """The first finding of each layer (a layer's kernel and its other weights say one
    thing)."""
    seen: set[str] = set()
    out = []
    for f in found:
        if f.layer not in seen:
            seen.add(f.layer)
            out.append(f)
    return out


Rule = Callable[[Context], list[Finding]]


class RuleInfo(NamedTuple):
    """A rule, the names of the findings it makes, and what it needs that a run may lack
    (`"gradients"`: `gradient_data`; `"spectral"`: `spectral_freq`; `"traps"`)."""

    fn: Rule
    names: tuple[str, ...]
    needs: str | None = None


RULES: tuple[RuleInfo, ...] = (
    RuleInfo(non_finite, ("non_finite",)),
    RuleInfo(exploding_weights, ("exploding_weights",)),
    RuleInfo(large_update, ("large_update",)),
    RuleInfo(not_learning, ("not_learning",)),
    RuleInfo(gradients_across_depth, ("vanishing_gradients", "exploding_gradients"),
             "gradients"),
    RuleInfo(dead_units, ("dead_units",)),
    RuleInfo(symmetry, ("symmetry",)),
    RuleInfo(lora_stalled, ("lora_stalled",)),
    RuleInfo(spectral_alpha, ("spectral_alpha",), "spectral"),
    RuleInfo(correlation_traps, ("correlation_traps",), "traps"),
)
"""Every rule, in the order the monitor runs them."""
RULE_NAMES = tuple(n for r in RULES for n in r.names)
SUBSUMES = {"exploding_weights": ("large_update",)}
"""A finding that explains another on the same layer at the same snapshot: the other is
not reported."""
