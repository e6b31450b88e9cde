"""Spectral metrics against numpy's SVD, weightwatcher 0.7.7 itself, and planted spectra."""

from __future__ import annotations

import logging
import math
import warnings

import keras
import numpy as np
import pytest

from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.spectral import (
    EVALS_THRESHOLD,
    eigenvalues,
    fit_power_law,
    kernel_matrices,
    spectral,
    tensor_spectral,
)

# ------------------------------------------------------------------ numpy oracles


def _svd_evals(matrices) -> np.ndarray:
    return np.concatenate([np.linalg.svd(m.astype(np.float64), compute_uv=False) ** 2
                           for m in matrices])


CASES = [
    ("Dense", (80, 120), lambda a: [a]),
    ("Dense", (130, 40), lambda a: [a]),
    ("Conv2D", (3, 3, 16, 24), lambda a: [a[i, j] for i in range(3) for j in range(3)]),
    ("Conv1D", (5, 12, 7), lambda a: [a[i] for i in range(5)]),
    ("Conv3D", (2, 2, 2, 6, 9), lambda a: [a[i, j, k] for i in range(2) for j in range(2)
                                            for k in range(2)]),
    ("Conv2DTranspose", (3, 3, 8, 20), lambda a: [a[i, j] for i in range(3) for j in range(3)]),
    (None, (3, 3, 10, 4), lambda a: [a[i, j] for i in range(3) for j in range(3)]),
]


@pytest.mark.parametrize("layer_class, shape, positions", CASES)
def test_norms_equal_numpy_svd_of_each_kernel_position(layer_class, shape, positions):
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    expected = _svd_evals(positions(a))
    m = tensor_spectral(a, layer_class)
    assert m is not None
    assert m.matrices == len(positions(a))
    assert m.num_eigenvalues == expected.size
    assert m.spectral_norm == pytest.approx(expected.max(), rel=1e-10)
    assert m.norm == pytest.approx(float(np.sum(a.astype(np.float64) ** 2)), rel=1e-10)
    assert m.log_norm == pytest.approx(math.log10(expected.sum()), rel=1e-10)
    assert m.log_spectral_norm == pytest.approx(math.log10(expected.max()), rel=1e-10)
    assert m.stable_rank == pytest.approx(expected.sum() / expected.max(), rel=1e-10)
    stacked = kernel_matrices(a, layer_class)
    assert all(np.array_equal(x, y) for x, y in zip(stacked, positions(a)))
    got = np.sort(eigenvalues(stacked).reshape(-1))
    assert np.allclose(got, np.sort(expected), rtol=1e-8, atol=1e-9 * expected.max())


@pytest.mark.parametrize("layer_class, name, shape", [
    ("Dense", "bias", (5,)),
    ("Dense", "kernel", (4, 5, 6)),
    ("DepthwiseConv2D", "kernel", (3, 3, 8, 1)),
    ("SeparableConv2D", "depthwise_kernel", (3, 3, 8, 1)),
    ("Conv2D", "bias", (8,)),
    ("LSTM", "kernel", (8, 32)),
    ("Embedding", "embeddings", (100, 8)),
    (None, "gamma", (8,)),
])
def test_tensors_that_are_not_matrices_of_a_linear_map_get_no_metrics(layer_class, name, shape):
    assert tensor_spectral(np.ones(shape), layer_class, name) is None


def test_separable_pointwise_kernel_is_one_matrix():
    a = np.random.default_rng(2).standard_normal((1, 1, 8, 12))
    m = tensor_spectral(a, "SeparableConv2D", "pointwise_kernel")
    assert m is not None and m.matrices == 1 and m.matrix_shape == (8, 12)
    assert m.spectral_norm == pytest.approx(np.linalg.norm(a[0, 0], 2) ** 2, rel=1e-10)


def test_small_and_huge_tensors_say_why_alpha_is_missing():
    a = np.random.default_rng(3).standard_normal((40, 30))
    m = tensor_spectral(a, "Dense")
    assert math.isnan(m.alpha) and math.isnan(m.alpha_weighted)
    assert m.reason == f"alpha needs 50 eigenvalues above {EVALS_THRESHOLD:g}; the ESD has 30"
    assert not math.isnan(m.spectral_norm)
    big = tensor_spectral(a, "Dense", max_evals=20)
    assert math.isnan(big.spectral_norm) and math.isnan(big.alpha)
    assert big.norm == pytest.approx(float(np.sum(a * a)), rel=1e-12)
    assert "30 eigenvalues exceed max_evals=20" in big.reason
    assert big.to_json()["alpha"] is None


def test_a_diverged_kernel_gets_nan_metrics_and_a_reason():
    a = np.random.default_rng(3).standard_normal((60, 60))
    a[5, 7] = np.nan
    m = tensor_spectral(a, "Dense")
    assert math.isnan(m.spectral_norm) and math.isnan(m.alpha) and math.isnan(m.norm)
    assert m.reason == "the tensor has NaN or Inf values"


@pytest.mark.parametrize("name, value, error", [
    ("min_evals", 10, ValueError), ("min_evals", 50.0, TypeError), ("max_evals", 0, ValueError),
])
def test_bad_limits_are_rejected(name, value, error):
    with pytest.raises(error, match=rf"`{name}` must be an integer >= \d+\. "
                                    rf"Received: {name}={value!r}"):
        tensor_spectral(np.ones((60, 60)), "Dense", **{name: value})


# ------------------------------------------------------------------ weightwatcher's own fit


def _pareto(rng, alpha: float, n: int, xmin: float = 1.0) -> np.ndarray:
    """Samples of density ∝ x^-alpha on [xmin, ∞)."""
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("sample", ["pareto", "gaussian_esd", "ties", "below_threshold"])
def test_fit_equals_weightwatchers_fit_on_the_same_eigenvalues(sample):
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    rng = np.random.default_rng(4)
    if sample == "pareto":
        x = _pareto(rng, 3.0, 700)
    elif sample == "gaussian_esd":
        x = np.linalg.svd(rng.standard_normal((300, 200)), compute_uv=False) ** 2
    elif sample == "ties":
        x = np.round(_pareto(rng, 2.5, 400), 1)
    else:
        x = np.concatenate([np.zeros(30), np.full(5, 1e-6), _pareto(rng, 4.0, 200, 0.01)])
    ours = fit_power_law(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ww_powerlaw.WWFit(x[x > EVALS_THRESHOLD])
    assert ours.xmin == theirs.xmin
    assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-9)
    assert ours.ks_distance == pytest.approx(theirs.D, rel=1e-9)
    assert ours.sigma == pytest.approx(theirs.sigma, rel=1e-9)
    assert ours.tail_size == theirs.data.size


def _brute_force_fit(x: np.ndarray) -> tuple[float, float, float]:
    """(x_min, alpha, D): every candidate fitted and its KS distance computed, one by one."""
    x = np.sort(x[x > EVALS_THRESHOLD])
    best = (math.inf, math.nan, math.nan)
    for i in range(x.size - 1):
        tail = x[i:]
        spread = np.sum(np.log(tail / tail[0]))
        if spread <= 0:
            continue
        alpha = 1.0 + tail.size / spread
        fitted = 1.0 - (tail / tail[0]) ** (1.0 - alpha)
        d = np.max(np.abs(fitted - np.arange(tail.size) / tail.size))
        if d < best[0] - 1e-12:  # the first of equal distances, as argmin
            best = (d, tail[0], alpha)
    return best[1], best[2], best[0]


@pytest.mark.parametrize("sample", ["pareto", "mp_square", "mp_tall", "ties", "heavy"])
def test_fit_equals_a_brute_force_fit_of_every_candidate(sample):
    # Above 256 eigenvalues only the candidates a coarse pass leaves in the running get
    # their exact KS distance: the choice must still be the one of all candidates.
    rng = np.random.default_rng(11)
    if sample == "pareto":
        x = _pareto(rng, 2.5, 1500)
    elif sample == "mp_square":
        x = eigenvalues(rng.standard_normal((1, 900, 900)))[0]
    elif sample == "mp_tall":
        x = eigenvalues(rng.standard_normal((1, 2000, 500)))[0]
    elif sample == "ties":
        x = np.round(_pareto(rng, 3.0, 1200), 1)
    else:
        x = eigenvalues(rng.standard_t(2.5, (1, 1200, 800)))[0]
    xmin, alpha, d = _brute_force_fit(x)
    ours = fit_power_law(x)
    assert ours.xmin == xmin
    assert ours.alpha == pytest.approx(alpha, rel=1e-9)
    assert ours.ks_distance == pytest.approx(d, rel=1e-9)


# ------------------------------------------------------------------ planted spectra


def _with_spectrum(rng, evals: np.ndarray, rows: int) -> np.ndarray:
    """A rows x len(evals) matrix whose WᵀW has exactly these eigenvalues."""
    u, _ = np.linalg.qr(rng.standard_normal((rows, evals.size)))
    v, _ = np.linalg.qr(rng.standard_normal((evals.size, evals.size)))
    return (u * np.sqrt(evals)) @ v.T


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_planted_power_law_esd_recovers_alpha_within_the_fits_error(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    w = _with_spectrum(rng, _pareto(rng, alpha, 600), rows=800)
    m = tensor_spectral(w, "Dense")
    assert m.reason is None
    assert abs(m.alpha - alpha) < 3 * m.sigma, (m.alpha, m.sigma)
    assert m.sigma == pytest.approx((m.alpha - 1) / math.sqrt(m.tail_size))
    assert m.alpha_weighted == pytest.approx(m.alpha * math.log10(m.spectral_norm))


@pytest.mark.parametrize("layer_class, shape", [
    ("Dense", (400, 200)), ("Dense", (256, 256)), ("Dense", (64, 700)),
    ("Conv2D", (3, 3, 64, 32)),
])
def test_iid_noise_has_no_spike_outside_the_marchenko_pastur_bulk(layer_class, shape):
    for seed in range(5):
        a = np.random.default_rng(seed).standard_normal(shape) * 0.05
        assert tensor_spectral(a, layer_class).num_spikes == 0, seed


@pytest.mark.parametrize("rank", [1, 3])
def test_planted_low_rank_signal_is_counted_as_spikes(rank):
    rng = np.random.default_rng(rank)
    n, m = 400, 200
    noise = rng.standard_normal((n, m))
    u, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    theta = 3.0 * (n * m) ** 0.25  # well above the BBP threshold (n·m)^(1/4)
    w = noise + theta * (u @ v.T)
    assert tensor_spectral(w, "Dense").num_spikes == rank


# ------------------------------------------------------------------ weightwatcher's analyze()


def _ww_details(model, **kwargs):
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=model).analyze(**kwargs)
    return {row["name"]: row for _, row in details.iterrows()}


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype("float32"), y


def _trained(model, x, y, epochs=4):
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    return model


def _mlp(seed, random_weights):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(96, activation="relu"),
                              keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    if random_weights:
        rng = np.random.default_rng(seed)
        model.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.1
                           for w in model.get_weights()])
        return model
    x, y = _digits()
    return _trained(model, x, y)


def _cnn(seed, random_weights):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8, 8, 1)),
                              keras.layers.Conv2D(12, 3, padding="same", activation="relu"),
                              keras.layers.Conv2D(24, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    if random_weights:
        rng = np.random.default_rng(seed)
        model.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.1
                           for w in model.get_weights()])
        return model
    x, y = _digits()
    return _trained(model, x.reshape(-1, 8, 8, 1), y)


def _compare(model, ours_scale: float, **kwargs) -> int:
    """Assert our metrics equal analyze()'s for every layer it reports; count the alphas."""
    details = _ww_details(model, **kwargs)
    fitted = 0
    for layer in model.layers:
        if layer.name not in details:
            continue
        kind = type(layer).__name__
        ours = tensor_spectral(layer.get_weights()[0], kind)
        row = details[layer.name]
        scale = ours_scale if kind == "Conv2D" else 1.0
        assert row["spectral_norm"] == pytest.approx(ours.spectral_norm * scale, rel=1e-5)
        assert row["stable_rank"] == pytest.approx(ours.stable_rank, rel=1e-5)
        assert row["log_norm"] == pytest.approx(math.log10(ours.norm * scale), rel=1e-5)
        if ours.reason is None:
            fitted += 1
            assert row["alpha"] == pytest.approx(ours.alpha, rel=0.02), layer.name
            assert row["alpha_weighted"] == pytest.approx(
                ours.alpha * math.log10(ours.spectral_norm * scale), rel=0.02), layer.name
            assert row["xmin"] == pytest.approx(ours.xmin * scale, rel=1e-6), layer.name
        else:
            assert ours.num_eigenvalues < 50
    return fitted


@pytest.mark.parametrize("random_weights", [True, False], ids=["random", "trained"])
def test_dense_metrics_agree_with_weightwatcher_analyze(random_weights):
    model = _mlp(5, random_weights)
    assert _compare(model, 1.0) == 2  # the 64x96 and 96x64 kernels; 64x10 has 10 eigenvalues


@pytest.mark.parametrize("random_weights", [True, False], ids=["random", "trained"])
def test_conv2d_metrics_agree_with_weightwatcher_analyze(random_weights):
    model = _cnn(6, random_weights)
    # weightwatcher's defaults scale each Conv2D matrix by sqrt(1/2) (conv2d_norm=True):
    # its eigenvalues are half of ours, alpha and stable rank unchanged.
    assert _compare(model, 0.5) == 1  # conv 2: 9 x 12 = 108 eigenvalues
    assert _compare(model, 1.0, conv2d_norm=False) == 1


# ------------------------------------------------------------------ runs on disk


def test_spectral_of_a_run_equals_the_metrics_of_get_weights(tmp_path, recorder):
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(60, name="hidden"),
                              keras.layers.BatchNormalization(name="norm"),
                              keras.layers.Dense(3, name="out")])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).standard_normal((32, 6, 6, 2)).astype("float32")
    y = np.random.default_rng(1).standard_normal((32, 3)).astype("float32")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run"), recorder])
    result = spectral(tmp_path / "run", step=0)
    assert result.step == 0
    assert list(result.tensors) == ["conv/kernel", "hidden/kernel", "out/kernel"]
    weights = dict(zip([w.path.split("/", 1)[1] for w in model.weights], recorder.epochs[0]))
    for key, m in result.tensors.items():
        layer_class = type(model.get_layer(key.split("/")[0])).__name__
        assert m.to_json() == tensor_spectral(weights[key], layer_class).to_json()
    hidden = result.tensors["hidden/kernel"]
    assert hidden.spectral_norm == pytest.approx(
        np.linalg.norm(weights["hidden/kernel"].astype(np.float64), 2) ** 2, rel=1e-9)
    last = spectral(load_run(tmp_path / "run"), layers=["hidden"])
    assert last.step == 1 and list(last.tensors) == ["hidden/kernel"]
    assert last.to_json()["tensors"]["hidden/kernel"]["matrix_shape"] == [64, 60]


def test_spectral_rejects_unknown_layers(tmp_path):
    keras.utils.set_random_seed(8)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden")])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.zeros((8, 4)), np.zeros((8, 3)), epochs=1, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"it has \['hidden'\]\)\. Received: layers=\['nope'\]"):
        spectral(tmp_path / "run", layers=["nope"])
    with pytest.raises(TypeError, match="Received: layers='hidden'"):
        spectral(tmp_path / "run", layers="hidden")


# ------------------------------------------------------------------ correlation traps


@pytest.mark.parametrize("layer_class, shape", [
    ("Dense", (400, 200)), ("Dense", (256, 256)), ("Dense", (64, 700)),
    ("Conv2D", (3, 3, 64, 32)),
])
def test_iid_noise_has_no_correlation_trap(layer_class, shape):
    for seed in range(4):
        rng = np.random.default_rng(seed)
        for a in (rng.standard_normal(shape), rng.laplace(size=shape), rng.uniform(-1, 1, shape)):
            m = tensor_spectral(a * 0.05, layer_class, traps=True)
            assert m.num_traps == 0 and not m.has_traps, (seed, shape)


@pytest.mark.parametrize("planted", [1, 3, 5])
def test_a_few_outsized_entries_are_correlation_traps(planted):
    rng = np.random.default_rng(planted)
    w = rng.standard_normal((400, 200)) * 0.05
    where = rng.choice(w.size, planted, replace=False)
    w.flat[where] = 2.5 * rng.choice([-1.0, 1.0], planted)  # 50 sigma
    m = tensor_spectral(w, "Dense", traps=True)
    # Each outsized entry x is a rank-one spike x² of the shuffled matrix too, above the edge
    # (x > (NM)^(1/4) σ): one trap per entry. The same count from the SVD of a shuffle.
    assert m.num_traps == planted and m.has_traps
    shuffled = rng.permutation(w.reshape(-1)).reshape(w.shape)
    sv2 = np.linalg.svd(shuffled, compute_uv=False) ** 2
    sigma2 = np.mean(w * w)
    assert np.count_nonzero(sv2 > sigma2 * (math.sqrt(400) + math.sqrt(200)) ** 2) == planted
    assert m.to_stats()["num_traps"] == planted
    # Off by default: not computed, not stored.
    off = tensor_spectral(w, "Dense")
    assert off.num_traps is None and "num_traps" not in off.to_stats()


def test_a_low_rank_signal_is_a_spike_but_not_a_trap():
    rng = np.random.default_rng(7)
    noise = rng.standard_normal((400, 200))
    u, _ = np.linalg.qr(rng.standard_normal((400, 2)))
    v, _ = np.linalg.qr(rng.standard_normal((200, 2)))
    w = noise + (u * [80.0, 60.0]) @ v.T
    m = tensor_spectral(w, "Dense", traps=True)
    assert m.num_spikes == 2 and m.num_traps == 0


def test_traps_of_a_convolution_shuffle_each_kernel_position():
    rng = np.random.default_rng(3)
    k = rng.standard_normal((3, 3, 64, 32)) * 0.05
    k[1, 2, 5, 7] = 3.0  # one outsized entry at one position
    m = tensor_spectral(k, "Conv2D", traps=True)
    assert m.num_traps == 1
    assert tensor_spectral(k, "Conv2D", traps=True).num_traps == 1  # seeded: reproducible
