"""naming: the group name of a model's views, against the names Keras itself gives."""

from __future__ import annotations

import keras
import pytest

from keras_weightwatch.capture import describe_model
from keras_weightwatch.naming import model_group


class MyNet(keras.Model):
    def call(self, x):
        return x


def _functional():
    inp = keras.Input((2,))
    return keras.Model(inp, keras.layers.Dense(1)(inp))


@pytest.mark.parametrize("make, stem", [
    (keras.Sequential, "sequential"),
    (_functional, "functional"),
    (MyNet, "my_net"),
])
def test_default_names_lose_keras_counter(make, stem):
    # Keras numbers the default name of each new model in a process: x, x_1, x_2, ...
    first, second = make(), make()
    assert first.name != second.name
    for model in (first, second):
        assert model_group(model.name, type(model).__name__) == stem
        info = describe_model(model) if model.built else None
        if info is not None:  # the name and class the run's header records
            assert model_group(info.name, info.class_name) == stem


@pytest.mark.parametrize("name, class_name", [
    ("digits_cnn", "Sequential"),
    ("encoder_2", "Functional"),  # a counter on a name the user chose is theirs
    ("sequential_head", "Sequential"),
    ("my_net_v2", "MyNet"),
    ("sequential_1", "Functional"),  # another class's default name
])
def test_names_the_user_chose_are_kept(name, class_name):
    assert model_group(name, class_name) == name


def test_a_run_without_a_recorded_model_name_gets_a_group():
    assert model_group("", "") == "model"
    assert model_group("cnn", "") == "cnn"
