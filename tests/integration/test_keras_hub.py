"""A KerasHub backbone fine-tuned with LoRA, watched with WeightWatch's defaults.

A GPT-2 backbone built from a tiny config (random weights, nothing downloaded),
`backbone.enable_lora(2)` (LoRA on every attention layer's query and value projections, every
other weight frozen), two epochs on random tokens. Checked against the model itself:
`get_weights()` for the snapshots, numpy of `layer.kernel` (what Keras computes as
`base + (alpha/rank) A @ B`) for the statistics of each adapted projection and for what `diff`
reports about it.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_same_arrays

from keras_weightwatch import WeightWatch, diff_runs, load_run, verify_run

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")

EPOCHS = 2


class _Kernels(keras.callbacks.Callback):
    """`get_weights()` and each adapted layer's `layer.kernel` at train begin and epoch ends."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers
        self.kernels: dict[int, list[np.ndarray]] = {}
        self.weights: dict[int, list[np.ndarray]] = {}

    def _record(self, step):
        self.kernels[step] = [np.array(np.asarray(lyr.kernel), copy=True) for lyr in self.layers]
        self.weights[step] = [np.array(w, copy=True) for w in self.model.get_weights()]

    def on_train_begin(self, logs=None):
        self._record(-1)

    def on_epoch_end(self, epoch, logs=None):
        self._record(epoch)


def _backbone():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=8)
    backbone.enable_lora(2)
    return backbone


def _data(n=16, seq=8, hidden=16):
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 50, size=(n, seq)).astype("int32"),
         "padding_mask": np.ones((n, seq), "int32")}
    return x, rng.normal(size=(n, seq, hidden)).astype("float32")


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    backbone = _backbone()
    adapted = [lyr for lyr in backbone._flatten_layers(include_self=False)
               if getattr(lyr, "lora_enabled", False)]
    recorder = _Kernels(adapted)
    run_dir = str(tmp_path_factory.mktemp("hub") / "run")
    x, y = _data()
    backbone.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    history = backbone.fit(x, y, epochs=EPOCHS, batch_size=8, verbose=0,
                           callbacks=[WeightWatch(run_dir), recorder])
    keys = {id(v): s.key for v, s in zip(backbone.weights, load_run(run_dir).specs)}
    kernel_keys = [keys[id(lyr._kernel)] for lyr in adapted]
    return backbone, adapted, kernel_keys, recorder, run_dir, history


def test_fit_completes_and_every_query_and_value_projection_is_adapted(fine_tuned):
    backbone, adapted, kernel_keys, _, run_dir, history = fine_tuned
    assert len(history.history["loss"]) == EPOCHS
    assert sorted(lyr.name for lyr in adapted) == ["query", "query", "value", "value"]
    run = load_run(run_dir)
    assert [d.key for d in run.derived] == kernel_keys
    assert all(d.rule == "lora" and d.params["rank"] == 2 for d in run.derived)


def test_snapshots_are_bit_exact_and_the_run_verifies(fine_tuned):
    _, _, _, recorder, run_dir, _ = fine_tuned
    run = load_run(run_dir)
    assert [s.step for s in run.snapshots] == [-1, *range(EPOCHS)]
    for snap in run.snapshots:
        assert_same_arrays(run.weights(snap.step), recorder.weights[snap.step])
    report = verify_run(run_dir)
    assert report.ok and report.problems == () and report.snapshots == EPOCHS + 1


def test_frozen_weights_are_stored_once(fine_tuned):
    backbone, _, kernel_keys, _, run_dir, _ = fine_tuned
    run = load_run(run_dir)
    frozen = [s.key for s in run.specs if not s.trainable]
    assert set(kernel_keys) <= set(frozen)  # the bases of the adapted projections
    assert len(frozen) > len(backbone.trainable_weights)
    for key in frozen:
        assert len({s.tensors[key].digest for s in run.snapshots}) == 1, key
    adapters = [k for d in run.derived for k in (d.inputs["a"], d.inputs["b"])]
    for key in adapters:  # the adapters train: a new tensor at every snapshot
        assert len({s.tensors[key].digest for s in run.snapshots}) == EPOCHS + 1, key


def test_stored_statistics_are_those_of_layer_kernel(fine_tuned):
    _, _, kernel_keys, recorder, run_dir, _ = fine_tuned
    run = load_run(run_dir)
    for snap in run.snapshots:
        for key, kernel in zip(kernel_keys, recorder.kernels[snap.step]):
            k = kernel.astype(np.float64)
            stats = snap.stats[key]
            assert stats["l2_norm"] == pytest.approx(np.linalg.norm(k), rel=1e-5)
            assert stats["mean"] == pytest.approx(k.mean(), rel=1e-4, abs=1e-7)
            assert stats["std"] == pytest.approx(k.std(), rel=1e-5)
            assert stats["max_abs"] == pytest.approx(np.abs(k).max(), rel=1e-6)


def test_adapters_update_size_per_layer_is_present(fine_tuned):
    _, adapted, kernel_keys, recorder, run_dir, _ = fine_tuned
    run = load_run(run_dir)
    base = dict(zip(kernel_keys, (lyr._kernel for lyr in adapted)))
    moved = 0
    for snap in run.snapshots:
        for key, kernel in zip(kernel_keys, recorder.kernels[snap.step]):
            b = np.asarray(base[key], np.float64)
            want = np.linalg.norm(kernel.astype(np.float64) - b) / np.linalg.norm(b)
            assert snap.stats[key]["lora_update"] == pytest.approx(want, rel=1e-4, abs=1e-7)
            moved += want > 0
    assert moved == len(kernel_keys) * EPOCHS  # B starts at zero, then every adapter moves


def test_diff_reports_each_adapted_projection_as_changed(fine_tuned):
    _, _, kernel_keys, recorder, run_dir, _ = fine_tuned
    result = diff_runs(f"{run_dir}@initial", f"{run_dir}@last")
    by_name = {t.name: t for t in result.tensors}
    adapters = {d.key: {d.inputs["a"], d.inputs["b"]} for d in load_run(run_dir).derived}
    first, last = recorder.kernels[-1], recorder.kernels[EPOCHS - 1]
    for key, a, b in zip(kernel_keys, first, last):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        t = by_name[key]
        assert t.status == "changed", (key, t.status)
        assert t.rel_l2 == pytest.approx(np.linalg.norm(b64 - a64) / np.linalg.norm(a64),
                                         rel=1e-4)
        # its adapters are listed under it, not as tensors of their own
        assert adapters[key] <= {i.name for i in t.inputs}
        assert not adapters[key] & set(by_name)


@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method:UserWarning")
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_a_quantized_backbone_fine_tuned_with_lora_shows_the_kernels_it_computes_with(tmp_path):
    """QLoRA: the backbone quantized to int4 (Keras's default, grouped), then LoRA enabled.
    Every quantized kernel's stored statistics are those of Keras's own dequantization, the
    adapted ones' with the LoRA update added; the int8 codes are stored as they are."""
    from derive_helpers import dense_reference, einsum_reference, embedding_reference

    from keras_weightwatch.stats import tensor_stats

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=8)
    backbone.quantize("int4")
    backbone.enable_lora(2)
    refs = {keras.layers.Dense: dense_reference, keras.layers.EinsumDense: einsum_reference,
            keras.layers.Embedding: embedding_reference}
    layers = [lyr for lyr in backbone._flatten_layers(include_self=False)
              if getattr(lyr, "quantization_mode", None) == "int4"]

    def kernel(lyr):
        ref = next(f for cls, f in refs.items() if isinstance(lyr, cls))(lyr)
        if getattr(lyr, "lora_enabled", False):
            ref = ref + lyr.lora_alpha / lyr.lora_rank * keras.ops.matmul(lyr.lora_kernel_a,
                                                                        lyr.lora_kernel_b)
        return np.asarray(ref, np.float64)

    kernels: dict[int, list[np.ndarray]] = {}
    weights: dict[int, list[np.ndarray]] = {}
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: (
        kernels.__setitem__(epoch, [kernel(lyr) for lyr in layers]),
        weights.__setitem__(epoch, [np.array(w) for w in backbone.get_weights()])))
    run_dir = str(tmp_path / "run")
    x, y = _data()
    backbone.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    backbone.fit(x, y, epochs=EPOCHS, batch_size=8, verbose=0,
                 callbacks=[WeightWatch(run_dir), record])
    run = load_run(run_dir)
    keys = {id(v): s.key for v, s in zip(backbone.weights, run.specs)}
    stored = [keys[id(lyr._embeddings if isinstance(lyr, keras.layers.Embedding) else
                      lyr._kernel)] for lyr in layers]
    rules = {}
    for d in run.derived:
        rules.setdefault(d.key, []).append(d.rule)
    assert rules == {k: ["int4", "lora"] if getattr(lyr, "lora_enabled", False) else ["int4"]
                     for k, lyr in zip(stored, layers)}
    assert sum(r == ["int4", "lora"] for r in rules.values()) == 2  # query and value
    for epoch in range(EPOCHS):
        assert_same_arrays(run.weights(epoch), weights[epoch])
        for key, k in zip(stored, kernels[epoch]):
            assert run.tensor(key, epoch).dtype == np.int8
            want = tensor_stats(k)
            for name in ("l2_norm", "mean", "std", "max_abs"):
                assert run.snapshot(epoch).stats[key][name] == pytest.approx(
                    want[name], rel=1e-5, abs=1e-7), (key, name)
