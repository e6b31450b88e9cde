"""health.monitor: merging findings over snapshots, non-finite stickiness, notes, and
`diagnose` on runs a real fit wrote."""

from __future__ import annotations

import pytest
from health_helpers import constant_fit, diverging_fit, healthy_fit

from keras_weightwatch import WeightWatchWarning, load_run
from keras_weightwatch.health import Diagnosis, Monitor, diagnose
from keras_weightwatch.health.measures import UNIT_STAT_NAMES, UNITS_DUPLICATE
from keras_weightwatch.health.monitor import NEEDS, NORMALIZED
from keras_weightwatch.health.rules import ERROR, WARNING, ModelFacts


def _facts(extra=()):
    keys = ("d1/kernel", "d1/bias", "d2/kernel", "d2/bias", "d3/kernel", *extra)
    layer = {k: k.partition("/")[0] for k in keys}
    shape = {k: (8,) if k.endswith(("bias", "mean")) else (8, 8) for k in keys}
    trainable = {k: not k.endswith("moving_mean") for k in keys}
    return ModelFacts(keys, layer, trainable, shape)


CLEAN = {"nan_count": 0.0, "inf_count": 0.0}


def _snap(traps=(), nan=()):
    """Stats of every weight: `traps` hold a correlation trap, `nan` NaN values."""
    keys = _facts().keys
    return {k: {**CLEAN, "num_traps": float(k in traps), "nan_count": float(4 * (k in nan))}
            for k in keys}


def test_a_finding_is_reported_once_and_kept_with_its_last_step():
    m = Monitor(_facts())
    new = m.observe(0, _snap(traps=["d2/kernel"]))
    assert [(f.rule, f.layer, f.step, f.last) for f in new] == [("correlation_traps", "d2", 0, 0)]
    assert m.observe(1, _snap(traps=["d2/kernel"])) == []
    assert [(f.step, f.last) for f in m.all()] == [(0, 1)]
    assert [f.layer for f in m.open()] == ["d2"]


def test_open_holds_only_findings_of_the_latest_step():
    m = Monitor(_facts())
    m.observe(0, _snap(traps=["d2/kernel"]))
    m.observe(1, _snap(traps=["d3/kernel"]))
    assert [(f.layer, f.last) for f in m.all()] == [("d2", 0), ("d3", 1)]
    assert [f.layer for f in m.open()] == ["d3"]
    m.observe(2, _snap())
    assert m.open() == [] and len(m.all()) == 2
    assert m.observe(3, _snap(traps=["d2/kernel"])) == []  # back again: the same finding
    assert [(f.layer, f.step, f.last) for f in m.open()] == [("d2", 0, 3)]


def test_one_finding_per_rule_and_layer():
    m = Monitor(_facts())
    new = m.observe(0, _snap(traps=["d1/kernel", "d1/bias", "d2/kernel"]))
    assert [(f.layer, f.key) for f in new] == [("d1", "d1/kernel"), ("d2", "d2/kernel")]
    assert len(m.all()) == 2


def test_non_finite_is_sticky_and_collects_the_weights_that_follow():
    m = Monitor(_facts())
    m.observe(-1, _snap())
    new = m.observe(0, _snap(traps=["d3/kernel"], nan=["d2/kernel"]))
    assert [(f.rule, f.layer, f.key, f.since) for f in new] == [
        ("non_finite", "d2", "d2/kernel", 0)]  # the trap at the same step is not reported
    assert m.observe(1, _snap(traps=["d3/kernel"], nan=["d2/kernel", "d1/kernel"])) == []
    assert m.observe(2, _snap(nan=["d2/kernel", "d1/kernel", "d3/kernel", "d1/bias"])) == []
    (f,) = m.all()
    assert f.also == ("d1/kernel@1", "d1/bias@2", "d3/kernel@2")
    assert (f.step, f.last) == (0, 2)
    assert m.open() == [f] and m.stop()


def test_non_finite_names_the_weights_that_were_bad_at_once():
    m = Monitor(_facts())
    (f,) = m.observe(0, _snap(nan=["d3/kernel", "d1/bias"]))
    assert (f.key, f.also) == ("d1/bias", ("d3/kernel@0",))
    m.observe(1, _snap(nan=["d3/kernel", "d1/bias", "d2/bias"]))
    assert m.all()[0].also == ("d3/kernel@0", "d2/bias@1")


def test_stop_only_on_an_open_error():
    m = Monitor(_facts())
    m.observe(0, _snap(traps=["d1/kernel"]))
    assert m.open()[0].severity == WARNING and not m.stop()


def test_all_lists_errors_first():
    m = Monitor(_facts())
    m.observe(0, _snap(traps=["d1/kernel"]))
    m.observe(1, _snap(nan=["d3/kernel"]))
    assert [(f.severity, f.step) for f in m.all()] == [(ERROR, 1), (WARNING, 0)]
    assert m.open()[0].severity == ERROR  # the warning did not hold at step 1


@pytest.mark.parametrize(("stored", "missing"), [
    ((), ("gradients", "spectral", "traps")),
    (("grad_norm",), ("spectral", "traps")),
    (("grad_norm", "alpha"), ("traps",)),
    (("alpha", "num_traps"), ("gradients",)),
])
def test_notes_say_once_what_the_run_lacks(stored, missing):
    m = Monitor(_facts())
    m.observe(0, {"d1/kernel": {**CLEAN, **{name: 1.0 for name in stored}}})
    m.observe(1, {"d1/kernel": CLEAN})  # what one snapshot had counts for the run
    assert m.notes() == [NEEDS[n] for n in NEEDS if n in missing]


def test_notes_say_why_batch_normalization_models_skip_the_gradient_rules():
    m = Monitor(_facts(extra=("bn/moving_mean",)))
    m.observe(0, {"d1/kernel": {"grad_norm": 1.0}})
    assert m.notes()[0] == NORMALIZED
    m = Monitor(_facts(extra=("bn/moving_mean",)))
    m.observe(0, {"d1/kernel": {}})
    assert NORMALIZED not in m.notes()  # no gradients: the note that says so is enough


# ------------------------------------------------------------------- diagnose, a real run


def test_diagnose_a_healthy_run(tmp_path):
    healthy_fit(tmp_path / "run", health=None)
    d = diagnose(str(tmp_path / "run"))
    run = load_run(tmp_path / "run")
    assert isinstance(d, Diagnosis)
    assert (d.path, d.snapshots, d.findings, d.errors) == (str(run.path), 3, [], [])
    assert d.notes == list(NEEDS.values())
    assert d.to_json() == {"run": str(run.path), "snapshots": 3, "healthy": True, "errors": 0,
                           "findings": [], "notes": list(NEEDS.values())}


def test_diagnose_a_diverged_run(tmp_path):
    diverging_fit(tmp_path / "run", epochs=2, health=None)
    d = diagnose(load_run(tmp_path / "run"))
    (f,) = d.findings
    assert (f.rule, f.layer, f.key, f.step, f.since, f.last) == (
        "non_finite", "hidden1", "hidden1/kernel", 0, 0, 1)
    assert set(f.also) == {f"{k}@0" for k in ("hidden1/bias", "hidden2/kernel", "hidden2/bias",
                                              "out/kernel", "out/bias")}
    assert d.errors == [f] and d.to_json()["errors"] == 1 and not d.to_json()["healthy"]


def test_diagnose_computes_unit_numbers_a_run_did_not_store(tmp_path):
    with pytest.warns(WeightWatchWarning, match="symmetry in layer 'constant'"):
        constant_fit(tmp_path / "live", health="warn")
    constant_fit(tmp_path / "plain", health=None)
    plain = load_run(tmp_path / "plain")
    assert all(name not in st for s in plain.snapshots for st in s.stats.values()
               for name in UNIT_STAT_NAMES)
    live = load_run(tmp_path / "live")
    assert live.snapshots[-1].stats["constant/kernel"][UNITS_DUPLICATE] == 16
    got, stored = diagnose(plain), diagnose(live)
    (f,) = got.findings
    assert (f.rule, f.layer, f.key, f.since, f.step) == ("symmetry", "constant",
                                                          "constant/kernel", -1, 0)
    assert "16 of 16 units are identical" in f.message
    assert got.findings == stored.findings


def test_diagnose_passes_its_thresholds_to_the_rules(tmp_path):
    from keras_weightwatch.health import Thresholds

    healthy_fit(tmp_path / "run", health=None)
    assert diagnose(str(tmp_path / "run")).findings == []
    found = diagnose(str(tmp_path / "run"), Thresholds(large_update=0.0, above_median=0.0))
    assert {(f.rule, f.layer) for f in found.findings} == {
        ("large_update", n) for n in ("hidden1", "hidden2", "out")}
