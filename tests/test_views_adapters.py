"""views.adapters: each LoRA layer's update size against numpy, and the adapters that do not
move (pure numpy: synthetic snapshots through the view's own hooks)."""

from __future__ import annotations

import numpy as np
import pytest

from keras_weightwatch.capture import ModelInfo, Snapshot
from keras_weightwatch.derive import effective
from keras_weightwatch.run.format import Derivation, WeightSpec
from keras_weightwatch.views.adapters import (
    IDLE_SNAPSHOTS,
    STAT_IDLE,
    STAT_STALLED,
    STAT_UPDATE,
    AdapterView,
    adapter_rows,
    adapters_markdown,
    norm,
    update_norm,
    update_size,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _lora(layer, scale):
    key = f"{layer}/kernel"
    return Derivation(key, "lora", {"base": key, "a": f"{layer}/lora_kernel_a",
                                    "b": f"{layer}/lora_kernel_b"},
                      {"scale": scale, "rank": 2, "alpha": 2 * scale}, layer)


def _spec(key, shape, trainable):
    return WeightSpec(key, key, key.rpartition("/")[0], tuple(shape), "float32", trainable)


def _info(shapes, derived, frozen=True):
    """A model description: `shapes` key -> shape; bases non-trainable when `frozen`."""
    specs = tuple(_spec(k, s, not (frozen and k.endswith("/kernel"))) for k, s in shapes.items())
    return ModelInfo("m", "Functional", (), specs, tuple(derived))


def _snap(step, arrays):
    return Snapshot(step=step, label="epoch", epoch=step, arrays=dict(arrays), logs={})


def _view(shapes, derived, idle=IDLE_SNAPSHOTS, frozen=True):
    view = AdapterView(idle)
    view.prepare(None, _info(shapes, derived, frozen))
    view.restrict(set(shapes))
    return view


@pytest.mark.parametrize("shape", [(6, 4), (3, 3, 2, 5), (7, 2, 6)])
@pytest.mark.parametrize("scale", [1.0, 0.25, -3.0])
def test_update_size_equals_numpy_of_the_formed_product(shape, scale):
    rng = _rng()
    base = rng.normal(size=shape).astype("float32")
    a = rng.normal(size=(*shape[:-1], 2)).astype("float32")
    b = rng.normal(size=(2, shape[-1])).astype("float32")
    delta = scale * np.matmul(a.astype(np.float64), b.astype(np.float64))
    assert update_norm(a, b, scale) == pytest.approx(np.linalg.norm(delta), rel=1e-10)
    assert norm(base) == pytest.approx(np.linalg.norm(base.astype(np.float64)), rel=1e-12)
    want = np.linalg.norm(delta) / np.linalg.norm(base.astype(np.float64))
    assert update_size(a, b, scale, norm(base)) == pytest.approx(want, rel=1e-10)
    # B all zeros: no update at all; a base of norm 0: no ratio
    assert update_norm(a, np.zeros_like(b), scale) == 0.0
    assert np.isnan(update_size(a, b, scale, 0.0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_norm_of_a_tensor_larger_than_one_chunk(dtype):
    import ml_dtypes

    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x = _rng(1).normal(size=(700, 1000)).astype(dt)
    assert norm(x) == pytest.approx(np.linalg.norm(x.astype(np.float64)), rel=1e-12)
    assert norm(x[:3]) == pytest.approx(np.linalg.norm(x[:3].astype(np.float64)), rel=1e-12)


def _arrays(rng, base, b_zero=False):
    return {"d/kernel": base, "d/lora_kernel_a": rng.normal(size=(base.shape[0], 2)).astype("f4"),
            "d/lora_kernel_b": (np.zeros((2, base.shape[1]), "f4") if b_zero else
                                rng.normal(size=(2, base.shape[1])).astype("f4"))}


def test_measure_reads_the_stored_base_and_stores_the_update_size():
    rng = _rng(2)
    base = rng.normal(size=(5, 3)).astype("float32")
    shapes = {"d/kernel": (5, 3), "d/lora_kernel_a": (5, 2), "d/lora_kernel_b": (2, 3)}
    view = _view(shapes, [_lora("d", 0.5)])
    assert view.measures_stored  # the pipeline hands it the snapshot as stored
    for step in range(3):
        arrays = _arrays(rng, base)
        got = view.measure(_snap(step, arrays))
        a, b = arrays["d/lora_kernel_a"], arrays["d/lora_kernel_b"]
        want = np.linalg.norm(0.5 * a.astype(np.float64) @ b) / np.linalg.norm(base)
        assert got["d/kernel"][STAT_UPDATE] == pytest.approx(want, rel=1e-6)
        assert got["d/kernel"][STAT_IDLE] == 0 and got["d/kernel"][STAT_STALLED] == 0
    assert view.pop_notices() == []


def test_a_trainable_base_is_read_at_every_snapshot_a_frozen_one_once():
    rng = _rng(3)
    shapes = {"d/kernel": (4, 3), "d/lora_kernel_a": (4, 2), "d/lora_kernel_b": (2, 3)}
    frozen, live = _view(shapes, [_lora("d", 2.0)]), _view(shapes, [_lora("d", 2.0)],
                                                              frozen=False)
    first = _arrays(rng, rng.normal(size=(4, 3)).astype("f4"))
    second = dict(first, **{"d/kernel": 3 * first["d/kernel"]})
    for view in (frozen, live):
        view.measure(_snap(0, first))
    a, b = first["d/lora_kernel_a"].astype(np.float64), first["d/lora_kernel_b"]
    delta = np.linalg.norm(2.0 * a @ b)
    got_live = live.measure(_snap(1, second))["d/kernel"][STAT_UPDATE]
    assert got_live == pytest.approx(delta / np.linalg.norm(second["d/kernel"]), rel=1e-6)
    got_frozen = frozen.measure(_snap(1, second))["d/kernel"][STAT_UPDATE]
    assert got_frozen == pytest.approx(delta / np.linalg.norm(first["d/kernel"]), rel=1e-6)


def test_lora_on_a_quantized_kernel_measures_against_the_dequantized_base():
    rng = _rng(4)
    codes = rng.integers(-127, 128, size=(6, 4)).astype(np.int8)
    scale = rng.uniform(10, 50, size=(4,)).astype("float32")
    q = Derivation("d/kernel", "int8", {"codes": "d/kernel", "scale": "d/kernel_scale"}, {}, "d")
    shapes = {"d/kernel": (6, 4), "d/kernel_scale": (4,), "d/lora_kernel_a": (6, 2),
              "d/lora_kernel_b": (2, 4)}
    view = _view(shapes, [q, _lora("d", 1.5)])
    arrays = {"d/kernel": codes, "d/kernel_scale": scale,
              "d/lora_kernel_a": rng.normal(size=(6, 2)).astype("f4"),
              "d/lora_kernel_b": rng.normal(size=(2, 4)).astype("f4")}
    got = view.measure(_snap(0, arrays))["d/kernel"][STAT_UPDATE]
    base = codes.astype(np.float64) / scale
    delta = 1.5 * arrays["d/lora_kernel_a"].astype(np.float64) @ arrays["d/lora_kernel_b"]
    assert got == pytest.approx(np.linalg.norm(delta) / np.linalg.norm(base), rel=1e-6)
    # the effective kernel of the whole chain is base + delta (the reference's own check)
    eff = effective(arrays, [q, _lora("d", 1.5)])["d/kernel"]
    assert np.allclose(eff, base + delta, rtol=1e-5, atol=1e-5)


def _two_layers(rng):
    shapes = {}
    for layer in ("moving", "stuck"):
        shapes.update({f"{layer}/kernel": (5, 3), f"{layer}/lora_kernel_a": (5, 2),
                       f"{layer}/lora_kernel_b": (2, 3)})
    return shapes


def test_an_adapter_whose_b_stays_zero_is_flagged_once_a_moving_one_never():
    rng = _rng(5)
    shapes = _two_layers(rng)
    view = _view(shapes, [_lora("moving", 1.0), _lora("stuck", 1.0)])
    stuck_a = rng.normal(size=(5, 2)).astype("f4")
    idle, stalled, notices = [], [], []
    for step in range(IDLE_SNAPSHOTS + 3):
        arrays = {"moving/kernel": np.ones((5, 3), "f4"), "stuck/kernel": np.ones((5, 3), "f4"),
                  "moving/lora_kernel_a": rng.normal(size=(5, 2)).astype("f4"),
                  "moving/lora_kernel_b": rng.normal(size=(2, 3)).astype("f4"),
                  "stuck/lora_kernel_a": stuck_a + step,  # A moves, but B is all zeros
                  "stuck/lora_kernel_b": np.zeros((2, 3), "f4")}
        got = view.measure(_snap(step, arrays))
        assert got["moving/kernel"][STAT_IDLE] == 0 and got["moving/kernel"][STAT_STALLED] == 0
        assert got["stuck/kernel"][STAT_UPDATE] == 0.0
        idle.append(got["stuck/kernel"][STAT_IDLE])
        stalled.append(got["stuck/kernel"][STAT_STALLED])
        notices.append(view.pop_notices())
    assert idle == list(range(1, IDLE_SNAPSHOTS + 4))
    assert stalled == [0.0] * (IDLE_SNAPSHOTS - 1) + [1.0] * 4
    flat = [n for ns in notices for n in ns]
    assert len(flat) == 1 and "'stuck'" in flat[0] and "B still all zeros" in flat[0]
    assert notices[IDLE_SNAPSHOTS - 1] == flat  # told at the snapshot it stalled


def test_an_adapter_that_stops_moving_is_counted_from_its_last_move():
    rng = _rng(6)
    shapes = {"d/kernel": (5, 3), "d/lora_kernel_a": (5, 2), "d/lora_kernel_b": (2, 3)}
    view = _view(shapes, [_lora("d", 1.0)], idle=2)
    base = np.ones((5, 3), "f4")
    moving = [_arrays(rng, base) for _ in range(2)]
    frozen = _arrays(rng, base)
    seq = moving + [frozen, dict(frozen), dict(frozen), _arrays(rng, base)]
    got = [view.measure(_snap(i, s))["d/kernel"] for i, s in enumerate(seq)]
    # A and B equal to the previous snapshot's (update ratios of exactly 0) count as idle
    assert [g[STAT_IDLE] for g in got] == [0, 0, 0, 1, 2, 0]
    assert [g[STAT_STALLED] for g in got] == [0, 0, 0, 0, 1, 0]
    (notice,) = view.pop_notices()
    assert "A and B unchanged" in notice and "2 snapshots" in notice


def test_restrict_drops_layers_whose_weights_are_not_all_watched():
    shapes = _two_layers(_rng(7))
    view = _view(shapes, [_lora("moving", 1.0), _lora("stuck", 1.0)])
    view.restrict(set(shapes) - {"stuck/lora_kernel_b"})
    assert [ad.key for ad in view.adapters] == ["moving/kernel"]


def test_the_summary_table_marks_the_adapters_not_training():
    shapes = _two_layers(_rng(8))
    view = _view(shapes, [_lora("moving", 1.0), _lora("stuck", 1.0)])
    stats = {"moving/kernel": {STAT_UPDATE: 0.125, STAT_IDLE: 0.0, STAT_STALLED: 0.0},
             "stuck/kernel": {STAT_UPDATE: 0.0, STAT_IDLE: 4.0, STAT_STALLED: 1.0},
             "moving/lora_kernel_a": {"update_ratio": 0.5},
             "moving/lora_kernel_b": {"update_ratio": 0.25},
             "stuck/lora_kernel_a": {"update_ratio": 0.0},
             "stuck/lora_kernel_b": {}}
    rows = adapter_rows(view.adapters, stats)
    assert [(r.layer, r.update, r.a_ratio, r.idle, r.stalled) for r in rows] == [
        ("moving", 0.125, 0.5, 0, False), ("stuck", 0.0, 0.0, 4, True)]
    assert np.isnan(rows[1].b_ratio)
    text = adapters_markdown(7, rows)
    lines = text.splitlines()
    assert lines[0].startswith("**1 of 2 adapters NOT TRAINING** at step 7: stuck")
    assert lines[-2] == "| moving | 0.125 | 0.5 | 0.25 | training |"
    assert lines[-1] == "| stuck | 0 | 0 | - | **NOT TRAINING** (not moved for 4 snapshots) |"
