"""health.rules: each rule on hand-made contexts, at its threshold and just short of it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keras_weightwatch.health.measures import (
    GRAD_DEAD_UNITS,
    UNITS,
    UNITS_COLLAPSED,
    UNITS_DUPLICATE,
)
from keras_weightwatch.health.monitor import Monitor
from keras_weightwatch.health.rules import (
    DEFAULTS,
    ERROR,
    RULE_NAMES,
    RULES,
    SUBSUMES,
    WARNING,
    Context,
    Finding,
    ModelFacts,
    Snap,
    correlation_traps,
    dead_units,
    exploding_weights,
    gradients_across_depth,
    large_update,
    lora_stalled,
    non_finite,
    not_learning,
    spectral_alpha,
    symmetry,
    value,
)

L = DEFAULTS
LAYERS = ("d1", "d2", "d3")
KERNELS = tuple(f"{n}/kernel" for n in LAYERS)
UNITS_PER_LAYER = 8


def _facts(frozen=(), extra=(), adapters=()):
    """Three Dense layers d1..d3 (kernel 8x8, bias 8) in model order, plus `extra` keys
    (key, shape, trainable)."""
    keys, layer, trainable, shape = [], {}, {}, {}
    for n in LAYERS:
        for name, shp in (("kernel", (UNITS_PER_LAYER, UNITS_PER_LAYER)),
                          ("bias", (UNITS_PER_LAYER,))):
            k = f"{n}/{name}"
            keys.append(k)
            layer[k], trainable[k], shape[k] = n, n not in frozen, shp
    for k, shp, tr in extra:
        keys.append(k)
        layer[k], trainable[k], shape[k] = k.rpartition("/")[0], tr, shp
    return ModelFacts(tuple(keys), layer, trainable, shape, frozenset(adapters))


def _ctx(stats_by_step, facts=None, limits=L, first=None):
    """A context over snapshots {step: stats}, the last one judged; the first snapshot is
    the first of them unless `first` is given."""
    history = [Snap(step, stats) for step, stats in stats_by_step.items()]
    return Context(facts or _facts(), tuple(history), first or history[0], limits)


def _stats(**per_key):
    """{key: {name: value}} from keyword groups, e.g. `_stats(d1=dict(update_ratio=1))`
    applies to `d1/kernel`."""
    return {f"{k}/kernel": dict(v) for k, v in per_key.items()}


def _only(found, rule, layer):
    assert [(f.rule, f.layer) for f in found] == [(rule, layer)]
    return found[0]


# ---------------------------------------------------------------------------- non_finite


@pytest.mark.parametrize("name", ["nan_count", "inf_count"])
def test_non_finite_names_the_first_weight_in_model_order_and_the_others(name):
    clean = {"nan_count": 0.0, "inf_count": 0.0}  # the stats view stores both counts
    stats = {"d3/kernel": {**clean, name: 1.0}, "d2/bias": {**clean, name: 4.0},
             "d1/kernel": clean}
    f = _only(non_finite(_ctx({-1: {}, 0: {}, 5: stats})), "non_finite", "d2")
    assert (f.key, f.severity, f.step, f.since, f.last) == ("d2/bias", ERROR, 5, 5, 5)
    assert f.also == ("d3/kernel@5",)
    assert "1 more weights" in f.message
    assert ("4 NaN and 0 Inf" if name == "nan_count" else "0 NaN and 4 Inf") in f.message


def test_non_finite_not_without_nan_or_inf():
    stats = {k: {"nan_count": 0.0, "inf_count": 0.0, "l2_norm": 1e30} for k in KERNELS}
    assert non_finite(_ctx({0: stats})) == []


# ---------------------------------------------------------------------- exploding_weights


def _growth_history(rates, start=1.0, first_norm=None):
    """Snapshots 0.. of d2/kernel's norm growing by `rates`; the others stay at 1."""
    norms = [start]
    for r in rates:
        norms.append(norms[-1] * r)
    steps = {}
    for i, n in enumerate(norms):
        steps[i] = {k: {"l2_norm": 1.0} for k in KERNELS}
        steps[i]["d2/kernel"] = {"l2_norm": n}
    first = Snap(-1, {"d2/kernel": {"l2_norm": first_norm if first_norm is not None else 1.0}})
    return steps, first, norms


def test_exploding_weights_at_exactly_the_growth_rate():
    n = L.growth_snapshots
    steps, _, norms = _growth_history([L.growth] * n)
    assert all(b / a == L.growth for a, b in zip(norms, norms[1:]))  # exact in binary
    first = Snap(-1, {"d2/kernel": {"l2_norm": norms[-1] / (2 * L.grown_from_start)}})
    f = _only(exploding_weights(_ctx(steps, first=first)), "exploding_weights", "d2")
    assert (f.key, f.severity, f.since, f.step) == ("d2/kernel", ERROR, 0, n)


def test_exploding_weights_not_just_below_the_growth_rate():
    n = L.growth_snapshots
    rates = [L.growth] * n
    rates[1] = np.nextafter(L.growth, 0)
    steps, _, norms = _growth_history(rates)
    first = Snap(-1, {"d2/kernel": {"l2_norm": norms[-1] / (2 * L.grown_from_start)}})
    assert exploding_weights(_ctx(steps, first=first)) == []


@pytest.mark.parametrize(("nudge", "fires"), [(1 - 1e-9, True), (1 + 1e-9, False)])
def test_exploding_weights_needs_its_multiple_of_the_first_norm(nudge, fires):
    steps, _, norms = _growth_history([L.growth] * L.growth_snapshots)
    first = Snap(-1, {"d2/kernel": {"l2_norm": norms[-1] / L.grown_from_start * nudge}})
    found = exploding_weights(_ctx(steps, first=first))
    assert [f.layer for f in found] == (["d2"] if fires else [])


def test_exploding_weights_needs_enough_snapshots():
    steps, _, norms = _growth_history([L.growth] * (L.growth_snapshots - 1))
    first = Snap(-1, {"d2/kernel": {"l2_norm": norms[-1] / 1e6}})
    assert exploding_weights(_ctx(steps, first=first)) == []


def test_exploding_weights_ignores_biases():
    steps = {i: {"d2/bias": {"l2_norm": 4.0 ** i}} for i in range(L.growth_snapshots + 1)}
    first = Snap(-1, {"d2/bias": {"l2_norm": 1e-3}})
    assert exploding_weights(_ctx(steps, first=first)) == []


# --------------------------------------------------------------------------- large_update


def test_large_update_at_exactly_large_update_where_the_median_is_small():
    others = L.large_update / (4 * L.above_median)
    stats = _stats(d1={"update_ratio": others}, d2={"update_ratio": L.large_update},
                   d3={"update_ratio": others})
    f = _only(large_update(_ctx({0: stats})), "large_update", "d2")
    assert (f.key, f.severity, f.step, f.since) == ("d2/kernel", WARNING, 0, 0)
    stats["d2/kernel"]["update_ratio"] = np.nextafter(L.large_update, 0)
    assert large_update(_ctx({0: stats})) == []


def test_large_update_at_exactly_above_median_times_the_others():
    others = 2 * L.large_update / L.above_median  # their median times above_median: 2 x large
    at = L.above_median * others
    stats = _stats(d1={"update_ratio": others}, d2={"update_ratio": others},
                   d3={"update_ratio": at})
    f = _only(large_update(_ctx({3: stats})), "large_update", "d3")
    assert f.key == "d3/kernel" and f.step == 3
    stats["d3/kernel"]["update_ratio"] = np.nextafter(at, 0)
    assert large_update(_ctx({3: stats})) == []


def test_large_update_ignores_biases():
    stats = _stats(d1={"update_ratio": 1e-3}, d2={"update_ratio": 1e-3},
                   d3={"update_ratio": 1e-3})
    stats["d2/bias"] = {"update_ratio": 1e3}
    assert large_update(_ctx({0: stats})) == []


def test_large_update_ignores_two_dimensional_biases():
    facts = _facts(extra=[("att/query/bias", (4, 8), True)])
    assert "att/query/bias" not in facts.kernels()
    stats = _stats(d1={"update_ratio": 1e-3}, d2={"update_ratio": 1e-3},
                   d3={"update_ratio": 1e-3})
    stats["att/query/bias"] = {"update_ratio": 1e3}
    assert large_update(_ctx({0: stats}, facts)) == []


# --------------------------------------------------------------------------- not_learning


def _still_history(mine=L.still, others=L.moving, grad=None):
    """still_snapshots + 1 snapshots; d2/kernel's update ratio `mine` at the last
    still_snapshots, the other kernels' `others`."""
    steps = {}
    for i in range(L.still_snapshots + 1):
        s = _stats(d1={"update_ratio": others}, d2={"update_ratio": 1.0 if i == 0 else mine},
                   d3={"update_ratio": others})
        if grad is not None:
            s["d2/kernel"]["grad_norm"] = grad
        steps[10 * i] = s
    return steps


def test_not_learning_at_exactly_still_while_the_others_move_at_exactly_moving():
    f = _only(not_learning(_ctx(_still_history())), "not_learning", "d2")
    last = 10 * L.still_snapshots
    assert (f.key, f.severity, f.since, f.step) == ("d2/kernel", WARNING, 10, last)
    assert "exactly 0" not in f.message


def test_not_learning_says_when_the_gradient_is_zero():
    f = _only(not_learning(_ctx(_still_history(mine=0.0, grad=0.0))), "not_learning", "d2")
    assert "gradient on the probe batch is exactly 0" in f.message


@pytest.mark.parametrize("history", [
    _still_history(mine=np.nextafter(L.still, 1)),  # moves a little
    _still_history(others=np.nextafter(L.moving, 0)),  # the rest hardly moves either
])
def test_not_learning_not_just_short_of_its_thresholds(history):
    assert not_learning(_ctx(history)) == []


def test_not_learning_needs_still_snapshots_in_a_row():
    steps = _still_history()
    steps[10]["d2/kernel"]["update_ratio"] = 0.5
    assert not_learning(_ctx(steps)) == []
    short = dict(list(_still_history().items())[1:])  # still_snapshots snapshots only
    assert not_learning(_ctx(short)) == []


def test_frozen_weights_are_never_not_learning():
    facts = _facts(frozen=("d2",))
    assert not_learning(_ctx(_still_history(mine=0.0, grad=0.0), facts)) == []


def test_lora_adapters_are_neither_not_learning_nor_large_updates():
    a, b = "d2/lora_kernel_a", "d2/lora_kernel_b"
    facts = _facts(extra=[(a, (8, 2), True), (b, (2, 8), True)], adapters=(a, b))
    assert a not in facts.kernels() and b not in facts.unit_kernels()
    steps = _still_history(mine=L.moving)  # d2/kernel moves: only the adapters stand still
    for s in steps.values():
        s[a] = {"update_ratio": 0.0}
        s[b] = {"update_ratio": 0.0}
    assert not_learning(_ctx(steps, facts)) == []
    last = steps[max(steps)]
    last[a]["update_ratio"] = 1e3
    assert large_update(_ctx(steps, facts)) == []


# ---------------------------------------------------------------- gradients across depth


def _grads(first, last=1.0, middle=0.5):
    return _stats(d1={"grad_to_weight": first}, d2={"grad_to_weight": middle},
                  d3={"grad_to_weight": last})


def test_vanishing_gradients_just_below_the_span_not_at_it():
    f = _only(gradients_across_depth(_ctx({-1: _grads(np.nextafter(L.gradient_span, 0))})),
              "vanishing_gradients", "d1")
    assert (f.key, f.severity, f.step, f.since) == ("d1/kernel", WARNING, -1, -1)
    assert gradients_across_depth(_ctx({-1: _grads(L.gradient_span)})) == []


def test_exploding_gradients_just_above_the_inverse_span_not_at_it():
    at = 1 / L.gradient_span
    f = _only(gradients_across_depth(_ctx({0: _grads(np.nextafter(at, math.inf))})),
              "exploding_gradients", "d1")
    assert f.key == "d1/kernel"
    assert gradients_across_depth(_ctx({0: _grads(at)})) == []


def test_gradient_rules_read_the_input_most_kernel_with_a_gradient():
    stats = _grads(0.0, middle=L.gradient_span / 10)
    facts = _facts(extra=[("d4/kernel", (8, 8), True)])
    stats["d4/kernel"] = {"grad_to_weight": 1.0}
    f = _only(gradients_across_depth(_ctx({0: stats}, facts)), "vanishing_gradients", "d2")
    assert "d4/kernel" in f.message


def test_gradient_rules_need_min_depth_kernels_with_a_gradient():
    stats = _grads(L.gradient_span / 10)
    stats["d2/kernel"]["grad_to_weight"] = 0.0
    assert L.min_depth == 3  # two kernels with a gradient are too few
    assert gradients_across_depth(_ctx({0: stats})) == []


def test_gradient_rules_skip_batch_normalization_models():
    facts = _facts(extra=[("bn/gamma", (8,), True), ("bn/moving_mean", (8,), False)])
    assert facts.normalized
    assert gradients_across_depth(_ctx({0: _grads(L.gradient_span / 10)}, facts)) == []
    assert not _facts().normalized


# ----------------------------------------------------------------------------- dead_units


DEAD_AT = math.ceil(L.dead_fraction * UNITS_PER_LAYER)


@pytest.mark.parametrize("name", [GRAD_DEAD_UNITS, UNITS_COLLAPSED])
def test_dead_units_at_exactly_dead_fraction(name):
    stats = _stats(d2={UNITS: UNITS_PER_LAYER, name: DEAD_AT})
    f = _only(dead_units(_ctx({0: stats})), "dead_units", "d2")
    assert (f.key, f.severity, f.step) == ("d2/kernel", WARNING, 0)
    assert f"{DEAD_AT} of {UNITS_PER_LAYER} units" in f.message


@pytest.mark.parametrize("name", [GRAD_DEAD_UNITS, UNITS_COLLAPSED])
@pytest.mark.parametrize("count", [DEAD_AT - 1, UNITS_PER_LAYER])  # below; all: not "some"
def test_dead_units_not_below_the_fraction_nor_when_every_unit_is(name, count):
    stats = _stats(d2={UNITS: UNITS_PER_LAYER, name: count})
    assert dead_units(_ctx({0: stats})) == []


def test_dead_units_without_stored_units_reads_the_shape():
    stats = _stats(d3={GRAD_DEAD_UNITS: DEAD_AT})
    assert _only(dead_units(_ctx({0: stats})), "dead_units", "d3").key == "d3/kernel"


def test_dead_units_by_gradient_not_judged_with_batch_normalization():
    facts = _facts(extra=[("bn/moving_mean", (8,), False)])
    stats = _stats(d2={UNITS: UNITS_PER_LAYER, GRAD_DEAD_UNITS: DEAD_AT})
    assert dead_units(_ctx({0: stats}, facts)) == []
    stats = _stats(d2={UNITS: UNITS_PER_LAYER, UNITS_COLLAPSED: DEAD_AT})
    assert [f.layer for f in dead_units(_ctx({0: stats}, facts))] == ["d2"]


def test_biases_are_not_unit_kernels():
    stats = {"d2/bias": {UNITS: 8.0, GRAD_DEAD_UNITS: 6.0, UNITS_DUPLICATE: 8.0,
                         "update_ratio": 1.0}}
    assert "d2/bias" not in _facts().unit_kernels()
    assert dead_units(_ctx({-1: {}, 0: stats})) == []
    assert symmetry(_ctx({-1: {}, 0: stats})) == []


# ------------------------------------------------------------------------------- symmetry


def test_symmetry_since_initialisation():
    first = _stats(d1={UNITS: 8, UNITS_DUPLICATE: 8})
    now = _stats(d1={UNITS: 8, UNITS_DUPLICATE: 8, "update_ratio": 0.1})
    f = _only(symmetry(_ctx({-1: first, 0: {}, 1: now})), "symmetry", "d1")
    assert (f.key, f.severity, f.step, f.since) == ("d1/kernel", WARNING, 1, -1)
    assert "8 of 8 units are identical since initialisation" in f.message


def test_symmetry_that_appears_later_is_dated_now():
    now = _stats(d1={UNITS: 8, UNITS_DUPLICATE: 2, "update_ratio": 0.1})
    f = _only(symmetry(_ctx({-1: {}, 4: now})), "symmetry", "d1")
    assert (f.step, f.since) == (4, 4)


@pytest.mark.parametrize(("dup", "ratio", "frozen"), [
    (1, 0.1, False),  # below two identical units
    (8, 0.0, False),  # the layer did not move
    (8, 0.1, True),  # frozen on purpose
])
def test_symmetry_not_short_of_its_conditions(dup, ratio, frozen):
    now = _stats(d1={UNITS: 8, UNITS_DUPLICATE: dup, "update_ratio": ratio})
    facts = _facts(frozen=("d1",) if frozen else ())
    assert symmetry(_ctx({-1: now, 0: now}, facts)) == []


def test_symmetry_not_at_the_first_snapshot():
    now = _stats(d1={UNITS: 8, UNITS_DUPLICATE: 8, "update_ratio": 0.1})
    assert symmetry(_ctx({-1: now})) == []


# ---------------------------------------------------------------------------- lora_stalled


def test_lora_stalled_dates_its_start_back_by_the_idle_snapshots():
    a = "d2/lora_kernel_a"
    facts = _facts(extra=[(a, (8, 2), True)], adapters=(a,))
    steps = {s: {} for s in range(0, 6)}
    steps[5] = {a: {"lora_stalled": 1.0, "lora_idle": 3.0}}
    f = _only(lora_stalled(_ctx(steps, facts)), "lora_stalled", "d2")
    assert (f.key, f.step, f.since) == (a, 5, 3)
    steps[5] = {a: {"lora_stalled": 1.0, "lora_idle": 9.0}}  # longer than the history
    assert lora_stalled(_ctx(steps, facts))[0].since == 0
    steps[5] = {a: {"lora_stalled": 0.0, "lora_idle": 9.0}}
    assert lora_stalled(_ctx(steps, facts)) == []


# -------------------------------------------------------------------------- spectral rules


def test_spectral_alpha_low_below_alpha_low_not_at_it():
    f = _only(spectral_alpha(_ctx({0: _stats(d1={"alpha": np.nextafter(L.alpha_low, 0)})})),
              "spectral_alpha", "d1")
    assert f.key == "d1/kernel" and "heavy-tailed" in f.message
    assert spectral_alpha(_ctx({0: _stats(d1={"alpha": L.alpha_low})})) == []


def test_spectral_alpha_high_above_alpha_high_where_it_started_trained():
    start = _stats(d1={"alpha": L.alpha_trained})
    high = _stats(d1={"alpha": np.nextafter(L.alpha_high, math.inf)})
    f = _only(spectral_alpha(_ctx({-1: start, 0: high})), "spectral_alpha", "d1")
    assert "up from" in f.message
    assert spectral_alpha(_ctx({-1: start, 0: _stats(d1={"alpha": L.alpha_high})})) == []
    assert spectral_alpha(_ctx({-1: high, 0: high})) == []  # high from the start
    # Started in range but near its edge (a random layer's alpha scatters around 6): no finding.
    near = _stats(d1={"alpha": np.nextafter(L.alpha_trained, math.inf)})
    assert spectral_alpha(_ctx({-1: near, 0: high})) == []


def test_correlation_traps_from_one_trap():
    f = _only(correlation_traps(_ctx({0: _stats(d3={"num_traps": 1.0})})),
              "correlation_traps", "d3")
    assert "1 correlation trap" in f.message
    assert correlation_traps(_ctx({0: _stats(d3={"num_traps": 0.0})})) == []


# ----------------------------------------------------------------------- table and helpers


def test_every_rule_name_is_unique_and_subsumes_names_rules():
    assert len(RULE_NAMES) == len(set(RULE_NAMES)) == sum(len(r.names) for r in RULES)
    assert all(k in RULE_NAMES and set(v) <= set(RULE_NAMES) for k, v in SUBSUMES.items())


@pytest.mark.parametrize(("stored", "expected"), [
    (1, 1.0), (2.5, 2.5), (None, math.nan), (True, math.nan), ("3", math.nan)])
def test_value_is_nan_unless_a_number(stored, expected):
    got = value({"k": {"x": stored}}, "k", "x")
    assert got == expected or (math.isnan(got) and math.isnan(expected))
    assert math.isnan(value({}, "k", "x"))


def test_exploding_weights_subsumes_a_large_update_on_the_same_layer():
    n = L.growth_snapshots
    steps, _, norms = _growth_history([L.growth] * n)
    for s in steps.values():
        for k in KERNELS:
            s[k]["update_ratio"] = 1e-3
    steps[n]["d2/kernel"]["update_ratio"] = 10 * L.large_update
    first = {k: {"l2_norm": 1.0} for k in KERNELS}
    first["d2/kernel"]["l2_norm"] = norms[-1] / (2 * L.grown_from_start)
    every = {-1: first, **steps}
    # Each rule alone reports d2 at the last snapshot...
    ctx = Context(_facts(), tuple(Snap(k, v) for k, v in every.items())[-(n + 1):],
                  Snap(-1, first))
    assert [f.layer for f in large_update(ctx)] == ["d2"]
    assert [f.layer for f in exploding_weights(ctx)] == ["d2"]
    # ...the monitor keeps only the one that explains the other.
    monitor = Monitor(_facts())
    for step, stats in every.items():
        monitor.observe(step, stats)
    assert [(f.rule, f.layer) for f in monitor.all()] == [("exploding_weights", "d2")]


def test_finding_to_json_is_a_plain_dict():
    f = Finding("non_finite", ERROR, "d1", "d1/kernel", 3, 3, 4, "m", "h", ("d2/kernel@4",))
    assert f.to_json() == {"rule": "non_finite", "severity": ERROR, "layer": "d1",
                           "key": "d1/kernel", "step": 3, "since": 3, "last": 4,
                           "message": "m", "hint": "h", "also": ["d2/kernel@4"]}


def test_non_finite_counts_a_missing_count_as_zero():
    f = _only(non_finite(_ctx({0: {"d1/kernel": {"nan_count": 3.0}}})), "non_finite", "d1")
    assert "3 NaN and 0 Inf" in f.message


@pytest.mark.parametrize("name", [GRAD_DEAD_UNITS, UNITS_COLLAPSED])
def test_dead_units_of_a_frozen_layer_are_not_this_trainings_doing(name):
    stats = _stats(d2={UNITS: float(UNITS_PER_LAYER), name: UNITS_PER_LAYER / 2})
    assert dead_units(_ctx({0: stats}, facts=_facts(frozen=("d2",)))) == []
    assert [f.layer for f in dead_units(_ctx({0: stats}))] == ["d2"]
