"""derive.detect on real Keras layers: the effective kernel derived from the captured variables
equals what the layer computes with (`layer.kernel` for LoRA; Keras's own dequantization, from
the layer's own variables and Keras's functions, for a quantized layer)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from derive_helpers import (
    dense_reference,
    einsum_reference,
    embedding_reference,
    reverse_embedding_reference,
)
from keras import ops

from keras_weightwatch.capture import capture_arrays, describe_model
from keras_weightwatch.derive import effective

Int4Config = keras.quantizers.Int4QuantizationConfig


@pytest.fixture(autouse=True)
def _no_full_collection_per_quantize(monkeypatch):
    """Keras runs a full `gc.collect()` each time quantizing deletes a float kernel (about half
    a second in a test process, most of these tests' time); the values under test do not
    depend on when memory is collected."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)


def _by_key(model):
    info = describe_model(model)
    arrays = dict(zip([s.key for s in info.weights], capture_arrays(model)))
    return info, arrays


def _effective(model):
    info, arrays = _by_key(model)
    return info, arrays, effective(arrays, info.derived)


def _key(model, variable):
    info = describe_model(model)
    return {id(v): s.key for v, s in zip(model.weights, info.weights)}[id(variable)]


def _randomize(*variables, seed=0):
    rng = np.random.default_rng(seed)
    for v in variables:
        v.assign(rng.normal(size=tuple(v.shape)).astype("float32"))


def _model(layer, input_shape, dtype="float32"):
    model = keras.Sequential([keras.Input(input_shape, dtype=dtype), layer])
    model.build((None, *input_shape))
    return model


# -- LoRA


_LORA = {
    "dense": (lambda: keras.layers.Dense(5, name="l"), (6,)),
    "einsum-2d": (lambda: keras.layers.EinsumDense("ab,bc->ac", 5, name="l"), (6,)),
    "einsum-3d": (lambda: keras.layers.EinsumDense("abc,cde->abde", (2, 3, 4), name="l"), (2, 6)),
    "einsum-attention": (lambda: keras.layers.EinsumDense("btd,ndh->btnh", (3, 2, 4), name="l"),
                         (3, 6)),
    "conv1d": (lambda: keras.layers.Conv1D(4, 3, name="l"), (8, 2)),
    "conv2d": (lambda: keras.layers.Conv2D(4, 3, name="l"), (6, 6, 2)),
    "conv3d": (lambda: keras.layers.Conv3D(4, 2, name="l"), (4, 4, 4, 2)),
}


@pytest.mark.parametrize("alpha", [None, 6.0])
@pytest.mark.parametrize("case", sorted(_LORA))
def test_lora_effective_kernel_is_layer_kernel(case, alpha):
    make, shape = _LORA[case]
    layer = make()
    model = _model(layer, shape)
    layer.enable_lora(2, lora_alpha=alpha)
    _randomize(layer.lora_kernel_a, layer.lora_kernel_b)
    info, arrays, out = _effective(model)
    key = _key(model, layer._kernel)
    (d,) = info.derived
    assert (d.key, d.rule) == (key, "lora")
    assert d.inputs == {"base": key, "a": _key(model, layer.lora_kernel_a),
                        "b": _key(model, layer.lora_kernel_b)}
    assert d.params["scale"] == (alpha or 2) / 2
    want = np.asarray(layer.kernel)
    assert not np.allclose(want, arrays[key])  # the adapters move it
    np.testing.assert_allclose(out[key], want, rtol=1e-6, atol=1e-6)


def test_lora_embedding_is_layer_embeddings():
    layer = keras.layers.Embedding(11, 4, name="emb")
    model = _model(layer, (3,), dtype="int32")
    layer.enable_lora(3)
    _randomize(layer.lora_embeddings_a, layer.lora_embeddings_b)
    info, arrays, out = _effective(model)
    key = _key(model, layer._embeddings)
    (d,) = info.derived
    assert d.inputs["a"] == _key(model, layer.lora_embeddings_a)
    np.testing.assert_allclose(out[key], np.asarray(layer.embeddings), rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[key], arrays[key])


def test_lora_in_a_nested_model_is_found():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="inner_d")],
                             name="inner")
    model = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2, name="top")])
    model.build((None, 4))
    layer = inner.get_layer("inner_d")
    layer.enable_lora(1)
    _randomize(layer.lora_kernel_b)
    info, _, out = _effective(model)
    assert [d.key for d in info.derived] == [_key(model, layer._kernel)]
    np.testing.assert_allclose(out[_key(model, layer._kernel)], np.asarray(layer.kernel),
                               rtol=1e-6, atol=1e-6)


# -- quantized: Keras's own dequantization from the layer's own variables


_MODES = {
    "int8": ("int8", None),
    "int4-default": ("int4", None),
    "int4-per-channel": ("int4", lambda: Int4Config(block_size=-1)),
    "int4-grouped": ("int4", lambda: Int4Config(block_size=4)),
    "float8": ("float8", None),
}


def _quantize(model, layer, mode_name):
    mode, config = _MODES[mode_name]
    layer.quantize(mode, config=None if config is None else config())
    assert layer.quantization_mode == mode
    if mode == "float8":  # a scale other than one, as training sets it
        layer.kernel_scale.assign(np.float32(0.0137))


def _check_quantized(model, layer, stored, reference):
    info, arrays, out = _effective(model)
    key = _key(model, stored)
    assert [d.key for d in info.derived] == [key]
    want = np.asarray(reference(layer))
    assert out[key].dtype == np.float32 and out[key].shape == want.shape
    np.testing.assert_allclose(out[key], want, rtol=1e-6, atol=1e-7)
    # the stored variables are the captured ones, dtype and all
    for v in layer.weights:
        np.testing.assert_array_equal(arrays[_key(model, v)], np.asarray(v))
        assert arrays[_key(model, v)].dtype == np.dtype(keras.backend.standardize_dtype(v.dtype))
    return info.derived[0]


def _seeded(layer, model, seed=0):
    rng = np.random.default_rng(seed)
    layer._kernel.assign(rng.normal(size=tuple(layer._kernel.shape)).astype("float32"))


@pytest.mark.parametrize("mode", sorted(_MODES))
@pytest.mark.parametrize("units", [6, 7])
def test_quantized_dense_is_kernel_keras_dequantizes(mode, units):
    layer = keras.layers.Dense(units, name="q")
    model = _model(layer, (9,))
    _seeded(layer, model)
    _quantize(model, layer, mode)
    d = _check_quantized(model, layer, layer._kernel, dense_reference)
    assert d.rule == _MODES[mode][0]


_EQUATIONS = {
    "ab,bc->ac": ((9,), 6),
    "abc,cd->abd": ((3, 9), (3, 5)),
    "abc,cde->abde": ((3, 8), (3, 2, 3)),
    "btd,ndh->btnh": ((3, 8), (3, 2, 4)),
    "btnh,nhd->btd": ((3, 2, 4), (3, 6)),
    "ab,bcd->acd": ((6,), (3, 5)),
    "abc,dc->abd": ((2, 7), (2, 4)),
    "abcd,cde->abe": ((2, 3, 4), (2, 5)),
}


@pytest.mark.parametrize("mode", sorted(_MODES))
@pytest.mark.parametrize("equation", sorted(_EQUATIONS))
def test_quantized_einsum_dense_is_kernel_keras_dequantizes(equation, mode):
    shape, out = _EQUATIONS[equation]
    layer = keras.layers.EinsumDense(equation, out, name="q")
    model = _model(layer, shape)
    _seeded(layer, model, seed=len(equation))
    _quantize(model, layer, mode)
    _check_quantized(model, layer, layer._kernel, einsum_reference)


@pytest.mark.parametrize("mode", ["int8", "int4-default", "int4-per-channel", "int4-grouped"])
@pytest.mark.parametrize("dim", [6, 7])
def test_quantized_embedding_is_embeddings_keras_dequantizes(mode, dim):
    layer = keras.layers.Embedding(10, dim, name="emb")
    model = _model(layer, (3,), dtype="int32")
    rng = np.random.default_rng(1)
    layer._embeddings.assign(rng.normal(size=(10, dim)).astype("float32"))
    _quantize(model, layer, mode)
    _check_quantized(model, layer, layer._embeddings, embedding_reference)


@pytest.mark.parametrize("mode", ["int8", "int4-per-channel", "int4-grouped"])
@pytest.mark.parametrize("dim", [6, 7])
def test_untied_reversible_embedding_has_both_effective_kernels(mode, dim):
    layer = keras.layers.ReversibleEmbedding(10, dim, tie_weights=False, name="emb")
    model = _model(layer, (3,), dtype="int32")
    rng = np.random.default_rng(2)
    layer._embeddings.assign(rng.normal(size=(10, dim)).astype("float32"))
    layer.reverse_embeddings.assign(rng.normal(size=(dim, 10)).astype("float32"))
    _quantize(model, layer, mode)
    info, arrays, out = _effective(model)
    keys = [_key(model, layer._embeddings), _key(model, layer.reverse_embeddings)]
    assert [d.key for d in info.derived] == keys
    np.testing.assert_allclose(out[keys[0]], np.asarray(embedding_reference(layer)),
                               rtol=1e-6, atol=1e-7)
    want = np.asarray(reverse_embedding_reference(layer))
    assert out[keys[1]].shape == want.shape == (dim, 10)
    np.testing.assert_allclose(out[keys[1]], want, rtol=1e-6, atol=1e-7)
    # the logits the layer computes, without its input quantizer, from the effective kernel
    layer.inputs_quantizer = None
    x = rng.normal(size=(2, dim)).astype("float32")
    np.testing.assert_allclose(np.asarray(layer(x, reverse=True)), x @ out[keys[1]],
                               rtol=1e-5, atol=1e-5)


def test_quantized_embedding_lookup_uses_the_effective_table():
    """The effective table is what the layer's forward pass reads, row by row."""
    layer = keras.layers.Embedding(10, 6, name="emb")
    model = _model(layer, (4,), dtype="int32")
    layer.quantize("int8")
    _, _, out = _effective(model)
    ids = np.array([[0, 3, 9, 3]], "int32")
    np.testing.assert_allclose(np.asarray(model(ids))[0], out[_key(model, layer._embeddings)][
        ids[0]], rtol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4-per-channel", "int4-grouped"])
@pytest.mark.parametrize("kind", ["dense", "einsum", "embedding"])
def test_lora_on_a_quantized_kernel_adds_to_the_dequantized_kernel(mode, kind):
    dtype = "float32"
    if kind == "dense":
        layer, shape, reference = keras.layers.Dense(6, name="q"), (8,), dense_reference
    elif kind == "einsum":
        layer = keras.layers.EinsumDense("abc,cde->abde", (2, 2, 3), name="q")
        shape, reference = (2, 8), einsum_reference
    else:
        layer, shape, dtype = keras.layers.Embedding(9, 7, name="q"), (3,), "int32"
        reference = embedding_reference
    model = _model(layer, shape, dtype=dtype)
    stored = layer._embeddings if kind == "embedding" else layer._kernel
    stored.assign(np.random.default_rng(0).normal(size=tuple(stored.shape)).astype("float32"))
    _quantize(model, layer, mode)
    layer.enable_lora(2, lora_alpha=3.0)
    a, b = (layer.lora_embeddings_a, layer.lora_embeddings_b) if kind == "embedding" else (
        layer.lora_kernel_a, layer.lora_kernel_b)
    _randomize(a, b, seed=4)
    info, _, out = _effective(model)
    key = _key(model, layer._embeddings if kind == "embedding" else layer._kernel)
    assert [d.rule for d in info.derived] == [_MODES[mode][0], "lora"]
    delta = 1.5 * ops.matmul(a, b)
    np.testing.assert_allclose(out[key], np.asarray(reference(layer) + delta),
                               rtol=1e-5, atol=1e-5)
    if kind == "embedding":  # the rows the layer looks up, adapters and all
        ids = np.array([[0, 8, 4]], "int32")
        np.testing.assert_allclose(np.asarray(model(ids))[0], out[key][ids[0]],
                                   rtol=1e-5, atol=1e-5)


def test_plain_gptq_and_awq_layers_have_no_derivation():
    from keras.quantizers import AWQConfig, GPTQConfig

    plain = keras.layers.Dense(4, name="plain")
    gptq = keras.layers.Dense(4, name="gptq")
    awq = keras.layers.Dense(4, name="awq")
    model = keras.Sequential([keras.Input((8,)), plain, gptq, awq])
    model.build((None, 8))
    gptq.quantize("gptq", config=GPTQConfig(dataset=["a"], tokenizer=lambda s: [0],
                                            weight_bits=4, group_size=4))
    awq.quantize("awq", config=AWQConfig(dataset=["a"], tokenizer=lambda s: [0],
                                         group_size=4))
    assert (gptq.quantization_mode, awq.quantization_mode) == ("gptq", "awq")
    info, arrays, out = _effective(model)
    assert info.derived == ()
    assert all(out[k] is arrays[k] for k in arrays)


# -- layers that compute in 16 bits: the effective kernel is rounded as the layer rounds it

_POLICIES = ["bfloat16", "mixed_bfloat16", "float16", "mixed_float16"]


@pytest.mark.parametrize("policy", _POLICIES)
def test_lora_in_a_16_bit_compute_dtype_is_layer_kernel_exactly(policy):
    layer = keras.layers.Dense(5, name="l", dtype=policy)
    model = _model(layer, (6,))
    layer.enable_lora(2)
    _randomize(layer.lora_kernel_b)
    info, _, out = _effective(model)
    (d,) = info.derived
    assert d.params["compute_dtype"] == layer.compute_dtype
    want = np.asarray(layer.kernel)
    assert want.dtype.itemsize == 2
    np.testing.assert_array_equal(out[_key(model, layer._kernel)], want.astype(np.float32))


@pytest.mark.parametrize("policy", _POLICIES)
@pytest.mark.parametrize("mode", ["int8", "int4-grouped", "int4-per-channel", "float8"])
@pytest.mark.parametrize("kind", ["dense", "einsum", "embedding"])
def test_quantized_in_a_16_bit_compute_dtype_is_kerass_dequantization(kind, mode, policy):
    if kind == "embedding" and mode == "float8":
        pytest.skip("Keras has no float8 Embedding")
    if policy in ("float16", "mixed_float16") and mode != "float8":
        pytest.skip("Keras refuses int8 and int4 with a float16 compute dtype")
    if kind == "dense":
        layer, shape, dtype, ref = keras.layers.Dense(7, dtype=policy), (9,), "float32", \
            dense_reference
    elif kind == "einsum":
        layer = keras.layers.EinsumDense("btd,ndh->btnh", (3, 2, 4), dtype=policy)
        shape, dtype, ref = (3, 8), "float32", einsum_reference
    else:
        layer, shape, dtype = keras.layers.Embedding(10, 7, dtype=policy), (3,), "int32"
        ref = embedding_reference
    model = _model(layer, shape, dtype=dtype)
    stored = layer._embeddings if kind == "embedding" else layer._kernel
    stored.assign(np.random.default_rng(0).normal(size=tuple(stored.shape)))
    _quantize(model, layer, mode)
    _, _, out = _effective(model)
    want = np.asarray(ref(layer))
    stored = layer._embeddings if kind == "embedding" else layer._kernel
    np.testing.assert_array_equal(out[_key(model, stored)], want.astype(np.float32))
