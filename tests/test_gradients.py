"""gradients.gradients against finite differences, Keras's own train step and TF's tape."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import fd_input_unit

from keras_weightwatch.gradients import Loss, Unit, gradients, split_at

F64 = "float64"


def mlp(dtype=F64):
    model = keras.Sequential(
        [
            keras.Input((4,), dtype=dtype),
            keras.layers.Dense(3, activation="tanh", name="hidden", dtype=dtype),
            keras.layers.Dense(2, name="out", dtype=dtype),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model


def data(n=5, d=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    # float32 values in float64 arrays: Keras's data adapters (predict, train_on_batch)
    # cast float64 input to float32, which then changes nothing.
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, k))
    return x.astype("float32").astype(F64), y.astype("float32").astype(F64)


def numpy_mse(model, x, y):
    return float(np.mean((np.asarray(model(x, training=False)) - y) ** 2))


def fd_weights(model, x, y, eps=1e-6):
    """Central differences of the numpy MSE of the model's output, weight by weight."""
    base = [w.copy() for w in model.get_weights()]
    grads = []
    for i, w in enumerate(base):
        g = np.zeros_like(w)
        for j in range(w.size):
            vals = []
            for sign in (1, -1):
                trial = [b.copy() for b in base]
                trial[i].flat[j] += sign * eps
                model.set_weights(trial)
                vals.append(numpy_mse(model, x, y))
            g.flat[j] = (vals[0] - vals[1]) / (2 * eps)
        grads.append(g)
    model.set_weights(base)
    return grads


def test_loss_weight_gradients_equal_finite_differences():
    model = mlp()
    x, y = data()
    g = gradients(model, x, Loss(y), weights=True)
    assert list(g.weights) == ["hidden/kernel", "hidden/bias", "out/kernel", "out/bias"]
    # Keras sums the compiled losses in floatx (float32); the gradients stay float64.
    assert g.value == pytest.approx(numpy_mse(model, x, y), rel=1e-6)
    for got, ref in zip(g.weights.values(), fd_weights(model, x, y)):
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)


def test_loss_gradients_equal_what_sgd_lr1_applies_and_the_tape_of_compute_loss():
    import tensorflow as tf

    model = mlp()
    x, y = data()
    g = gradients(model, x, Loss(y), weights=True)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=False), training=False)
    tape_grads = tape.gradient(loss, model.trainable_weights)
    before = model.get_weights()
    model.train_on_batch(x, y)  # SGD(learning_rate=1): w_after = w_before - g
    applied = [b - a for b, a in zip(before, model.get_weights())]
    for got, t, d in zip(g.weights.values(), tape_grads, applied):
        np.testing.assert_allclose(got, t.numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got, d, rtol=1e-9, atol=1e-12)


def test_unit_input_gradients_are_per_example_and_equal_finite_differences():
    model = mlp()
    x, _ = data()
    g = gradients(model, x, Unit([0, 1, 1, 0, 1]), inputs=True)
    np.testing.assert_array_equal(g.units, [0, 1, 1, 0, 1])
    np.testing.assert_allclose(g.inputs, fd_input_unit(model, x, g.units), rtol=1e-6, atol=1e-8)
    predicted = gradients(model, x, Unit(), inputs=True)
    np.testing.assert_array_equal(predicted.units, np.argmax(model.predict(x, verbose=0), -1))
    np.testing.assert_allclose(predicted.outputs[0], model(x, training=False), rtol=1e-12)


def bn_dropout_cnn():
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2), dtype=F64),
            keras.layers.Conv2D(3, 3, activation="relu", name="conv", dtype=F64),
            keras.layers.BatchNormalization(name="bn", dtype=F64),
            keras.layers.Dropout(0.5, name="drop", dtype=F64),
            keras.layers.Flatten(dtype=F64),
            keras.layers.Dense(3, name="head", dtype=F64),
        ]
    )
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(3)
    model.set_weights([rng.normal(scale=0.5, size=w.shape) + (2.0 if "variance" in v.path else 0)
                       for w, v in zip(model.get_weights(), model.weights)])
    return model


def test_inference_mode_weights_bit_identical_bn_stats_kept_dropout_off():
    model = bn_dropout_cnn()
    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2))
    y = np.array([0, 2, 1])
    before = [w.copy() for w in model.get_weights()]
    first = gradients(model, x, Loss(y), weights=True, inputs=True)
    second = gradients(model, x, Unit(), inputs=True)
    gradients(model, x, Unit(1), layer="conv")
    after = model.get_weights()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(before, after))  # incl. moving stats
    # Dropout off and BatchNorm on its moving statistics: the inference-mode forward pass
    # is what the finite differences see.
    np.testing.assert_allclose(second.inputs, fd_input_unit(model, x, second.units),
                               rtol=1e-6, atol=1e-8)
    again = gradients(model, x, Loss(y), weights=True, inputs=True)
    for k in first.weights:
        np.testing.assert_array_equal(first.weights[k], again.weights[k])
    assert "bn/moving_mean" not in first.weights  # trainable weights only
    assert {"bn/gamma", "bn/beta"} <= set(first.weights)


def test_compiled_metrics_are_left_as_they_were():
    model = bn_dropout_cnn()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(4).normal(size=(3, 6, 6, 2))
    model.evaluate(x, np.array([0, 1, 2]), verbose=0)
    before = [np.array(v.numpy()) for v in model.metrics_variables]
    gradients(model, x, Loss(np.array([0, 1, 2])), weights=True)
    for a, v in zip(before, model.metrics_variables):
        np.testing.assert_array_equal(a, v.numpy())


def two_inputs():
    a = keras.Input((3,), name="a", dtype=F64)
    b = keras.Input((2,), name="b", dtype=F64)
    h = keras.layers.Dense(4, activation="tanh", dtype=F64, name="mix")(
        keras.layers.Concatenate(dtype=F64)([a, b]))
    out = keras.layers.Dense(2, dtype=F64, name="out")(h)
    model = keras.Model([a, b], out)
    model.compile(loss="mse")
    return model


def test_several_inputs_give_one_gradient_per_input():
    model = two_inputs()
    rng = np.random.default_rng(5)
    xa, xb = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    g = gradients(model, [xa, xb], Unit(1), inputs=True)
    assert isinstance(g.inputs, list) and len(g.inputs) == 2
    joined = np.concatenate([xa, xb], axis=1)

    class Joined:  # the same model as a function of the joined input, for the reference
        def __call__(self, z, training=False):
            return model([z[:, :3], z[:, 3:]], training=False)

    ref = fd_input_unit(Joined(), joined, np.ones(4, int))
    np.testing.assert_allclose(np.concatenate(g.inputs, axis=1), ref, rtol=1e-6, atol=1e-8)
    d = gradients(model, {"a": xa, "b": xb}, Unit(1), inputs=True)
    np.testing.assert_allclose(d.inputs["a"], g.inputs[0], rtol=1e-12)


def test_layer_tensor_gradient_equals_the_tape_over_the_whole_graph_with_a_skip():
    import tensorflow as tf

    inp = keras.Input((6, 6, 1))
    c1 = keras.layers.Conv2D(2, 3, padding="same", name="c1")(inp)
    c2 = keras.layers.Conv2D(2, 3, padding="same", name="c2", activation="relu")(c1)
    s = keras.layers.Add()([c1, c2])  # a connection that skips c2
    out = keras.layers.Dense(3, name="out")(keras.layers.Flatten()(s))
    model = keras.Model(inp, out)
    x = np.random.default_rng(6).normal(size=(2, 6, 6, 1)).astype("float32")
    g = gradients(model, x, Unit([2, 0]), layer="c2")
    # Reference: Keras's Grad-CAM example, one tape over [conv output, model output].
    both = keras.Model(inp, [c2, out])
    with tf.GradientTape() as tape:
        a, y = both(x, training=False)
        score = tf.reduce_sum(y[:, 2][:1]) + tf.reduce_sum(y[:, 0][1:])
    np.testing.assert_allclose(g.activations, a.numpy(), rtol=1e-6)
    np.testing.assert_allclose(g.activation_gradients, tape.gradient(score, a).numpy(),
                               rtol=1e-5, atol=1e-7)
    assert split_at(model, "c2") is split_at(model, "c2")  # cached


def test_mixed_float16_gradients_follow_the_float32_model():
    x, y = data()
    ref_model = mlp("float32")
    ref = gradients(ref_model, x.astype("float32"), Loss(y), weights=True, inputs=True)
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        mixed = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"),
                                  keras.layers.Dense(2, dtype="float32")])
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    mixed.compile(loss="mse")
    mixed.set_weights(ref_model.get_weights())
    g = gradients(mixed, x.astype("float32"), Loss(y), weights=True, inputs=True)
    for a, b in zip(g.weights.values(), ref.weights.values()):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(g.inputs, ref.inputs, rtol=2e-2, atol=2e-3)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2, name="dense")

    def call(self, x):
        return self.dense(x)


def test_subclassed_model_gradients_work_but_layer_tensors_are_refused():
    model = Subclassed()
    x, _ = data(d=3)
    model(x.astype("float32"))
    g = gradients(model, x.astype("float32"), Unit(0), inputs=True)
    kernel = model.dense.kernel.numpy()
    np.testing.assert_allclose(g.inputs, np.tile(kernel[:, 0], (5, 1)), rtol=1e-6)
    with pytest.raises(ValueError, match=r"subclassed model.*Received: model=Subclassed"):
        gradients(model, x, Unit(0), layer="dense")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, x: gradients(m, x, Unit(0)), ValueError, r"Received: weights=False"),
        (lambda m, x: gradients(m, x, "loss", weights=True), TypeError,
         r"Received: target='loss'"),
        (lambda m, x: gradients(m, x, Unit(2), inputs=True), ValueError,
         r"each in \[0, 2\).*Received: Unit.index=2"),
        (lambda m, x: gradients(m, x, Unit(0, output=1), inputs=True), ValueError,
         r"1 outputs. Received: Unit.output=1"),
        (lambda m, x: gradients(m, x, Unit(0), layer="nope"), ValueError,
         r"no top-level layer named 'nope'.*Received: layer='nope'"),
        (lambda m, x: gradients(m, x, Unit(0), layer="out", inputs=True), ValueError,
         r"separate call. Received: layer='out'"),
        (lambda m, x: gradients(m, x, Unit(0), inputs=True, layer_side="in"), ValueError,
         r"Received: layer_side='in'"),
        (lambda m, x: gradients(m, [x, x], Unit(0), inputs=True), ValueError,
         r"takes 1 input\(s\); x holds 2 arrays"),
        (lambda m, x: gradients(m, x.astype("int32"), Unit(0), inputs=True), ValueError,
         r"float inputs.*Received: x dtype=int32"),
    ],
)
def test_bad_requests_say_what_was_received(call, error, message):
    model = mlp()
    x, _ = data()
    with pytest.raises(error, match=message):
        call(model, x)


def test_loss_needs_a_compiled_loss():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    x, y = data()
    with pytest.raises(ValueError, match=r"compile the model with a `loss`.*"
                                         r"Received: model.loss=None"):
        gradients(model, x, Loss(y), weights=True)
