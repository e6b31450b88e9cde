"""Keras's own dequantization of a quantized layer, from the layer's own variables and Keras's
functions (the code paths of `keras/src/layers/core/*.py`): the reference the effective kernels
are checked against."""

from __future__ import annotations

import keras
from keras import ops
from keras.src.quantizers.quantizers import dequantize_with_sz_map


def float8_reference(layer):
    """The kernel as a float8 layer's forward pass quantizes and dequantizes it: in the compute
    dtype, the kernel cast to it as Keras's autocast does inside `call`."""
    kernel = ops.cast(layer._kernel, layer.compute_dtype)
    return keras.quantizers.quantize_and_dequantize(kernel, layer.kernel_scale, "float8_e4m3fn",
                                                    layer.compute_dtype)


def dense_reference(layer):
    mode = layer.quantization_mode
    if mode == "float8":
        return float8_reference(layer)
    codes = layer._kernel
    if mode == "int4":
        codes = keras.quantizers.unpack_int4(codes, layer._orig_output_dim, axis=-1)
        if getattr(layer, "g_idx", None) is not None:
            return dequantize_with_sz_map(ops.cast(codes, layer.compute_dtype), layer.kernel_scale,
                                          layer.kernel_zero, layer.g_idx, group_axis=0)
    return ops.divide(ops.cast(codes, layer.compute_dtype), layer.kernel_scale)


def einsum_reference(layer):
    mode = layer.quantization_mode
    if mode == "float8":
        return float8_reference(layer)
    if mode == "int8":
        return ops.divide(ops.cast(layer._kernel, layer.compute_dtype),
                          layer._adjust_scale_for_dequant(layer.kernel_scale))
    codes = keras.quantizers.unpack_int4(layer._kernel, layer._int4_unpacked_column_size,
                                         axis=-1)
    if getattr(layer, "g_idx", None) is not None:
        flat = dequantize_with_sz_map(ops.cast(codes, layer.compute_dtype), layer.kernel_scale,
                                      layer.kernel_zero, layer.g_idx, group_axis=0)
    else:
        flat = ops.divide(ops.cast(codes, layer.compute_dtype), layer.kernel_scale)
    return ops.reshape(flat, layer.original_kernel_shape)


def embedding_reference(layer):
    codes = layer._embeddings
    if layer.quantization_mode == "int4":
        codes = keras.quantizers.unpack_int4(codes, layer._orig_output_dim, axis=-1)
        if getattr(layer, "g_idx", None) is not None:
            return dequantize_with_sz_map(ops.cast(codes, layer.compute_dtype),
                                          layer.embeddings_scale, layer.embeddings_zero,
                                          layer.g_idx, group_axis=-1)
    return ops.divide(ops.cast(codes, layer.compute_dtype),
                      ops.expand_dims(layer.embeddings_scale, -1))


def reverse_embedding_reference(layer):
    """The output projection of an untied quantized `ReversibleEmbedding`, as its `reverse=True`
    call dequantizes it."""
    codes = layer.reverse_embeddings
    if layer.quantization_mode == "int4":
        codes = keras.quantizers.unpack_int4(codes, layer.output_dim, axis=0)
        if getattr(layer, "reverse_embeddings_zero", None) is not None:
            return dequantize_with_sz_map(ops.cast(codes, layer.compute_dtype),
                                          layer.reverse_embeddings_scale,
                                          layer.reverse_embeddings_zero, layer.g_idx,
                                          group_axis=0)
    return ops.divide(ops.cast(codes, layer.compute_dtype), layer.reverse_embeddings_scale)
