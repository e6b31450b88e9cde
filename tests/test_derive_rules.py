"""derive.rules: each rule against an independent reference (numpy, Keras's own quantizers)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras.src.quantizers.quantizers import dequantize_with_sz_map

from keras_weightwatch.derive import (
    RULES,
    adapters,
    applies,
    effective,
    effective_lookup,
    effective_shape,
    lora_delta,
)
from keras_weightwatch.derive.rules import unpack_int4
from keras_weightwatch.errors import WeightWatchError
from keras_weightwatch.run.format import Derivation


def _rng(seed=0):
    return np.random.default_rng(seed)


def _lora(key="d/kernel", scale=0.5):
    return Derivation(key, "lora", {"base": key, "a": "d/lora_kernel_a", "b": "d/lora_kernel_b"},
                      {"scale": scale, "rank": 2, "alpha": 2 * scale}, "d")


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 2, 4), (7, 2, 6)])
@pytest.mark.parametrize("scale", [1.0, 0.25, 8.0])
def test_lora_is_base_plus_scaled_a_times_b(shape, scale):
    rng = _rng()
    base = rng.normal(size=shape).astype("float32")
    a = rng.normal(size=(*shape[:-1], 2)).astype("float32")
    b = rng.normal(size=(2, shape[-1])).astype("float32")
    arrays = {"d/kernel": base, "d/lora_kernel_a": a, "d/lora_kernel_b": b, "d/bias": b[0]}
    out = effective(arrays, [_lora(scale=scale)])
    want = base.astype(np.float64) + scale * np.einsum("...r,ro->...o", a.astype(np.float64), b)
    assert out["d/kernel"].dtype == np.float32 and out["d/kernel"].shape == shape
    np.testing.assert_allclose(out["d/kernel"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora_delta({"a": a, "b": b}, {"scale": scale}),
                               want - base, rtol=1e-5, atol=1e-5)
    # the stored arrays are passed through untouched, the input mapping is not changed
    assert out["d/lora_kernel_a"] is a and out["d/bias"] is arrays["d/bias"]
    assert arrays["d/kernel"] is base


@pytest.mark.parametrize("length", [1, 2, 5, 6, 9])
@pytest.mark.parametrize("rows", [1, 4])
def test_unpack_int4_matches_keras_and_round_trips_pack_int4(length, rows):
    codes = _rng(length).integers(-8, 8, size=(rows, length)).astype("int8")
    packed, _, _ = keras.quantizers.pack_int4(codes, axis=-1)
    packed = np.asarray(packed)
    assert packed.shape == (rows, (length + 1) // 2)
    ours = unpack_int4(packed, length)
    np.testing.assert_array_equal(ours, codes)
    theirs = np.asarray(keras.quantizers.unpack_int4(packed, length, axis=-1))
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("length", [3, 4])
def test_unpack_int4_along_the_first_axis_matches_keras(length):
    codes = _rng(length).integers(-8, 8, size=(length, 5)).astype("int8")
    packed = np.asarray(keras.quantizers.pack_int4(codes, axis=0)[0])
    assert packed.shape == ((length + 1) // 2, 5)
    np.testing.assert_array_equal(unpack_int4(packed, length, axis=0), codes)
    theirs = np.asarray(keras.quantizers.unpack_int4(packed, length, axis=0))
    np.testing.assert_array_equal(unpack_int4(packed, length, axis=0), theirs)
    d = Derivation("k", "int4", {"codes": "k", "scale": "s"}, {"length": length, "axis": 0}, "")
    assert effective_shape(d, {"k": packed.shape}) == (length, 5)


def test_unpack_int4_matches_keras_on_every_byte():
    every = np.arange(-128, 128, dtype=np.int16).astype(np.int8).reshape(1, 256)
    theirs = np.asarray(keras.quantizers.unpack_int4(every, 512, axis=-1))
    np.testing.assert_array_equal(unpack_int4(every, 512), theirs)
    np.testing.assert_array_equal(unpack_int4(every, 511), theirs[:, :511])


@pytest.mark.parametrize("shape", [(4, 6), (3, 5)])
def test_int8_is_codes_over_scale(shape):
    rng = _rng(1)
    codes = rng.integers(-127, 128, size=shape).astype("int8")
    scale = rng.uniform(0.5, 50.0, size=(shape[-1],)).astype("float32")
    d = Derivation("d/kernel", "int8", {"codes": "d/kernel", "scale": "d/kernel_scale"},
                   {"scale_ops": []}, "d")
    out = effective({"d/kernel": codes, "d/kernel_scale": scale}, [d])["d/kernel"]
    np.testing.assert_allclose(out, codes.astype(np.float64) / scale, rtol=1e-6)


@pytest.mark.parametrize(
    ("ops", "scale_shape", "kernel_shape", "reference"),
    [
        ([["expand_dims", [-1]]], (4,), (4, 6), lambda s: s[:, None]),
        ([["squeeze", [0]]], (1, 6), (4, 6), lambda s: s[0]),
        ([["transpose", [1, 0]]], (6, 4), (4, 6), lambda s: s.T),
        ([["expand_dims", [0]], ["transpose", [0, 2, 1]]], (6, 4), (1, 4, 6),
         lambda s: s[None].transpose(0, 2, 1)),
    ],
)
def test_int8_scale_layout_operations(ops, scale_shape, kernel_shape, reference):
    rng = _rng(2)
    codes = rng.integers(-127, 128, size=kernel_shape).astype("int8")
    scale = rng.uniform(1.0, 9.0, size=scale_shape).astype("float32")
    d = Derivation("k", "int8", {"codes": "k", "scale": "s"}, {"scale_ops": ops}, "")
    out = effective({"k": codes, "s": scale}, [d])["k"]
    np.testing.assert_allclose(out, codes / reference(scale), rtol=1e-6)


@pytest.mark.parametrize("length", [5, 6])
def test_int4_per_channel_and_grouped(length):
    rng = _rng(3)
    codes = rng.integers(-8, 8, size=(8, length)).astype("int8")
    packed = np.asarray(keras.quantizers.pack_int4(codes, axis=-1)[0])
    scale = rng.uniform(1.0, 4.0, size=(length,)).astype("float32")
    per_channel = Derivation("k", "int4", {"codes": "k", "scale": "s"},
                             {"length": length, "scale_ops": []}, "")
    out = effective({"k": packed, "s": scale}, [per_channel])["k"]
    np.testing.assert_allclose(out, codes / scale, rtol=1e-6)

    g_idx = (np.arange(8) // 3).astype("float32")  # three groups of rows
    gscale = rng.uniform(0.1, 1.0, size=(3, length)).astype("float32")
    zero = rng.integers(-3, 4, size=(3, length)).astype("int8")
    grouped = Derivation("k", "int4", {"codes": "k", "scale": "s", "zero": "z", "g_idx": "g"},
                         {"length": length, "group_axis": 0, "shape": [2, 4, length]}, "")
    out = effective({"k": packed, "s": gscale, "z": zero, "g": g_idx}, [grouped])["k"]
    want = dequantize_with_sz_map(codes.astype("float32"), gscale, zero, g_idx,
                                                   group_axis=0)
    np.testing.assert_allclose(out, np.asarray(want).reshape(2, 4, length), rtol=1e-6)
    assert effective_shape(grouped, {"k": packed.shape}) == (2, 4, length)
    assert effective_shape(per_channel, {"k": packed.shape}) == (8, length)


@pytest.mark.parametrize("scale", [1.0, 0.01, 3.7])
def test_float8_matches_keras_quantize_and_dequantize(scale):
    kernel = (_rng(4).normal(size=(16, 8)) * 300).astype("float32")  # some past e4m3's max
    s = np.float32(scale)
    d = Derivation("k", "float8", {"kernel": "k", "scale": "s"}, {"dtype": "float8_e4m3fn"}, "")
    out = effective({"k": kernel, "s": np.asarray(s)}, [d])["k"]
    want = keras.quantizers.quantize_and_dequantize(kernel, s, "float8_e4m3fn", "float32")
    np.testing.assert_array_equal(out, np.asarray(want))
    assert not np.array_equal(out, kernel)  # the rounding is real


@pytest.mark.parametrize("missing", ["d/lora_kernel_a", "d/lora_kernel_b"])
def test_effective_skips_a_derivation_whose_inputs_are_missing(missing):
    """A snapshot taken before LoRA was enabled keeps its stored kernel."""
    rng = _rng(5)
    arrays = {"d/kernel": rng.normal(size=(3, 2)).astype("float32"),
              "d/lora_kernel_a": np.ones((3, 1), "float32"),
              "d/lora_kernel_b": np.ones((1, 2), "float32")}
    del arrays[missing]
    out = effective(arrays, [_lora()])
    assert out["d/kernel"] is arrays["d/kernel"]
    assert not applies(_lora(), out)
    assert applies(_lora(), {"d/kernel", "d/lora_kernel_a", "d/lora_kernel_b"})


def test_unknown_rule_is_not_applied():
    d = Derivation("k", "no-such-rule", {"x": "k"}, {}, "")
    arrays = {"k": np.ones(2)}
    assert not applies(d, arrays)
    assert effective(arrays, [d])["k"] is arrays["k"]


def test_int8_then_lora_on_the_same_key_composes():
    """A LoRA on a quantized kernel adds its update to the dequantized kernel."""
    rng = _rng(6)
    codes = rng.integers(-127, 128, size=(4, 3)).astype("int8")
    scale = rng.uniform(1, 5, size=(3,)).astype("float32")
    a = rng.normal(size=(4, 2)).astype("float32")
    b = rng.normal(size=(2, 3)).astype("float32")
    chain = [Derivation("d/kernel", "int8", {"codes": "d/kernel", "scale": "d/kernel_scale"},
                        {"scale_ops": []}, "d"), _lora(scale=2.0)]
    arrays = {"d/kernel": codes, "d/kernel_scale": scale, "d/lora_kernel_a": a,
              "d/lora_kernel_b": b}
    out = effective(arrays, chain)["d/kernel"]
    np.testing.assert_allclose(out, codes / scale + 2.0 * a @ b, rtol=1e-5, atol=1e-5)
    # the other order gives another kernel: the order in the header matters
    reversed_out = effective({**arrays, "d/kernel": codes.astype("float32")}, chain[::-1])
    assert not np.allclose(reversed_out["d/kernel"], out)
    assert adapters(chain) == {"d/kernel": ("d/lora_kernel_a", "d/lora_kernel_b")}


def test_effective_lookup_reads_only_the_inputs_it_needs():
    rng = _rng(7)
    store = {"d/kernel": rng.normal(size=(3, 2)).astype("float32"),
             "d/lora_kernel_a": rng.normal(size=(3, 1)).astype("float32"),
             "d/lora_kernel_b": rng.normal(size=(1, 2)).astype("float32"),
             "d/bias": np.zeros(2, "float32"),
             "e/kernel": np.ones((2, 2), "float32")}
    reads: list[str] = []

    def get(key):
        reads.append(key)
        return store.get(key)

    lookup = effective_lookup(get, [_lora()])
    got = lookup("d/kernel")
    assert sorted(reads) == ["d/kernel", "d/lora_kernel_a", "d/lora_kernel_b"]
    np.testing.assert_allclose(got, effective(store, [_lora()])["d/kernel"])
    reads.clear()
    assert lookup("e/kernel") is store["e/kernel"] and reads == ["e/kernel"]
    reads.clear()
    assert lookup("nothing") is None and reads == ["nothing"]


def test_effective_lookup_without_adapters_gives_the_stored_kernel():
    base = np.ones((3, 2), "float32")
    lookup = effective_lookup({"d/kernel": base}.get, [_lora()])
    assert lookup("d/kernel") is base


@pytest.mark.parametrize(
    ("d", "arrays"),
    [
        (_lora(), {"d/kernel": np.ones((3, 2)), "d/lora_kernel_a": np.ones((4, 1)),
                   "d/lora_kernel_b": np.ones((1, 2))}),
        (Derivation("k", "int8", {"codes": "k", "scale": "s"},
                    {"scale_ops": [["transpose", [1, 0]]]}, ""),
         {"k": np.ones((2, 3)), "s": np.ones(3)}),
        (Derivation("k", "int4", {"codes": "k", "scale": "s"}, {"length": 4, "shape": [9, 9]},
                    ""), {"k": np.ones((2, 2), "int8"), "s": np.ones(4)}),
        (Derivation("k", "int8", {"codes": "k", "scale": "s"}, {"scale_ops": [["roll", [1]]]},
                    ""), {"k": np.ones((2, 3)), "s": np.ones(3)}),
    ],
    ids=["lora-shapes", "int8-layout", "int4-shape", "unknown-op"],
)
def test_bad_params_raise_with_received(d, arrays):
    with pytest.raises(WeightWatchError) as e:
        effective(arrays, [d])
    message = str(e.value)
    assert message.startswith(f"the effective kernel {d.key!r} ({d.rule}) cannot be derived")
    assert message.endswith(f"Received: params={dict(d.params)!r}")


def test_every_rule_names_its_roles():
    assert set(RULES) == {"lora", "int8", "int4", "float8"}
    for rule in RULES.values():
        assert rule.roles and callable(rule.apply)


@pytest.mark.parametrize("kernel_shape", [(37, 11), (5, 3, 7), (3, 3, 4, 6)])
def test_lora_in_blocks_of_rows_equals_the_whole_product(monkeypatch, kernel_shape):
    from keras_weightwatch.derive import rules

    rng = np.random.default_rng(0)
    base = rng.standard_normal(kernel_shape).astype(np.float32)
    a = rng.standard_normal((*kernel_shape[:-1], 4)).astype(np.float32)
    b = rng.standard_normal((4, kernel_shape[-1])).astype(np.float32)
    want = base + np.float32(0.5) * np.matmul(a, b)  # Keras's own arithmetic, in numpy
    monkeypatch.setattr(rules, "LORA_BLOCK", 3 * b.size)  # 3 rows a block, a short last one
    got = rules.RULES["lora"].apply({"base": base, "a": a, "b": b}, {"scale": 0.5})
    assert got.dtype == np.float32 and got.shape == kernel_shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compute_dtype_rounds_a_lora_kernel_as_keras_casts_it(dtype):
    rng = _rng(8)
    base = rng.normal(size=(6, 5)).astype("float32")
    a = rng.normal(size=(6, 2)).astype("float32")
    b = rng.normal(size=(2, 5)).astype("float32")
    d = Derivation("d/kernel", "lora", _lora().inputs, {"scale": 0.5, "compute_dtype": dtype},
                   "d")
    out = effective({"d/kernel": base, "d/lora_kernel_a": a, "d/lora_kernel_b": b}, [d])
    want = keras.ops.cast(keras.ops.add(base, 0.5 * keras.ops.matmul(a, b)), dtype)
    assert out["d/kernel"].dtype == np.float32
    np.testing.assert_array_equal(out["d/kernel"], np.asarray(want).astype(np.float32))


def test_int8_divides_in_its_scales_dtype():
    """A bfloat16 layer's scale is bfloat16: Keras divides in bfloat16; a mixed-precision
    layer's is float32: it divides in float32."""
    import ml_dtypes

    rng = _rng(9)
    codes = rng.integers(-127, 128, size=(6, 5)).astype("int8")
    scale32 = rng.uniform(1, 90, size=(5,)).astype("float32")
    d = Derivation("k", "int8", {"codes": "k", "scale": "s"}, {}, "")
    for scale, dtype in ((scale32.astype(ml_dtypes.bfloat16), "bfloat16"), (scale32, "float32")):
        out = effective({"k": codes, "s": scale}, [d])["k"]
        want = keras.ops.divide(keras.ops.cast(codes, dtype), keras.ops.convert_to_tensor(scale))
        np.testing.assert_array_equal(out, np.asarray(want).astype(np.float32))


def test_lora_written_into_the_callers_array_each_time():
    d, rng = _lora(), _rng(3)
    reuse: dict[str, np.ndarray] = {}
    made = []
    for _ in range(3):  # the adapters change; the base stays
        arrays = {"d/kernel": rng.standard_normal((6, 5)).astype(np.float32),
                  "d/lora_kernel_a": rng.standard_normal((6, 2)).astype(np.float32),
                  "d/lora_kernel_b": rng.standard_normal((2, 5)).astype(np.float32)}
        got = effective(arrays, [d], reuse)["d/kernel"]
        want = arrays["d/kernel"] + np.float32(0.5) * (
            arrays["d/lora_kernel_a"] @ arrays["d/lora_kernel_b"])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert reuse["d/kernel"] is got
        made.append(got)
    assert made[0] is made[1] is made[2]  # one array, overwritten: no new memory per call
    # an array of another shape, or the base itself, is not written into
    base = np.ones((6, 5), np.float32)
    for kept in (np.zeros((5, 6), np.float32), base):
        reuse = {"d/kernel": kept}
        arrays = {"d/kernel": base, "d/lora_kernel_a": np.ones((6, 2), np.float32),
                  "d/lora_kernel_b": np.ones((2, 5), np.float32)}
        got = effective(arrays, [d], reuse)["d/kernel"]
        assert got is not kept and np.all(got == 2.0) and np.all(base == 1.0)
