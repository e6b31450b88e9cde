"""features: top-k order, signs and values; correlation flags; standardized weights; Markdown."""

from __future__ import annotations

import numpy as np
import pytest

from keras_weightwatch import features
from keras_weightwatch.features import (
    correlated_partners,
    feature_weights,
    markdown_table,
    top_k_features,
)

BOSTON = [
    "CRIM",
    "ZN",
    "INDUS",
    "CHAS",
    "NOX",
    "RM",
    "AGE",
    "DIS",
    "RAD",
    "TAX",
    "PTRATIO",
    "B",
    "LSTAT",
]
# The book's figure: LSTAT -3.81, DIS -3.73, RM 2.85, RAD 2.29, NOX -2.12, the rest smaller.
PLANTED = {
    "LSTAT": -3.81,
    "DIS": -3.73,
    "RM": 2.85,
    "RAD": 2.29,
    "NOX": -2.12,
    "TAX": -1.9,
    "PTRATIO": -1.5,
    "CRIM": -0.9,
    "ZN": 0.8,
    "B": 0.7,
    "INDUS": 0.1,
    "CHAS": 0.6,
    "AGE": 0.05,
}


def _boston_kernel():
    return np.array([[PLANTED[n]] for n in BOSTON], dtype=np.float32)


def test_top_k_order_signs_values_and_names():
    rows = top_k_features(_boston_kernel(), BOSTON, k=5)
    assert [(r.rank, r.name, r.weight) for r in rows] == [
        (1, "LSTAT", float(np.float32(-3.81))),
        (2, "DIS", float(np.float32(-3.73))),
        (3, "RM", float(np.float32(2.85))),
        (4, "RAD", float(np.float32(2.29))),
        (5, "NOX", float(np.float32(-2.12))),
    ]
    assert [r.index for r in rows] == [
        BOSTON.index(n) for n in ("LSTAT", "DIS", "RM", "RAD", "NOX")
    ]


def test_matches_a_numpy_argsort_oracle_for_random_kernels():
    rng = np.random.default_rng(3)
    for units in (1, 3):
        k = rng.normal(size=(20, units))
        names = [f"f{i}" for i in range(20)]
        score = np.abs(k[:, 0]) if units == 1 else np.linalg.norm(k, axis=1)
        expected = list(np.argsort(-score)[:7])
        rows = top_k_features(k, names, k=7)
        assert [r.index for r in rows] == expected
        np.testing.assert_allclose([r.weight for r in rows], feature_weights(k)[expected])
        np.testing.assert_array_equal([r.units for r in rows], k[expected])


def test_ties_keep_input_order_inf_ranks_first_and_nan_last():
    k = np.array([[1.0], [-2.0], [np.nan], [2.0], [-np.inf]])
    rows = top_k_features(k, list("abcde"), k=5)
    assert [r.name for r in rows] == ["e", "b", "d", "a", "c"]
    assert rows[0].weight == -np.inf and np.isnan(rows[-1].weight)


def test_k_larger_than_features_returns_all():
    assert len(top_k_features(np.ones((3, 1)), ["a", "b", "c"], k=10)) == 3


def test_correlation_flags_name_the_partner_and_standardized_weights():
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    data = np.stack(
        [a, -2 * a + 0.01 * rng.normal(size=500), rng.normal(size=500) * 5, np.ones(500)], axis=1
    )
    k = np.array([[1.0], [0.5], [-0.2], [3.0]])
    partners = correlated_partners(data)
    assert partners[0][0] == 1 and partners[1][0] == 0 and partners[0][1] < -0.99
    assert partners[2] is None and partners[3] is None  # independent; constant
    r = np.corrcoef(data[:, :3].T)
    assert partners[0][1] == pytest.approx(r[0, 1])
    rows = {x.name: x for x in top_k_features(k, ["a", "b", "c", "d"], k=4, data=data)}
    assert rows["a"].partner == "b" and rows["b"].partner == "a" and rows["c"].partner is None
    assert rows["c"].standardized == pytest.approx(-0.2 * data[:, 2].std())
    assert rows["d"].standardized == 0.0  # a constant feature contributes nothing


def test_negative_correlation_is_flagged_and_threshold_applies():
    x = np.array([[0.0, 0.0, 1.0], [1.0, -1.1, 0.0], [2.0, -1.9, 1.0], [3.0, -3.0, 0.0]])
    r = np.corrcoef(x.T)
    got = correlated_partners(x, threshold=0.9)
    assert got[0] == (1, pytest.approx(r[0, 1])) and got[1] == (0, pytest.approx(r[0, 1]))
    assert got[2] is None  # |r| with the others is about 0.2-0.4
    assert correlated_partners(x, threshold=float(abs(r[0, 1])) + 1e-9)[0] is None


def test_markdown_table_single_unit():
    md = markdown_table(top_k_features(_boston_kernel(), BOSTON, k=3), title="Top 3")
    assert md.splitlines() == [
        "Top 3",
        "",
        "| rank | feature | weight |",
        "|---:|:---|---:|",
        "| 1 | LSTAT | -3.81 |",
        "| 2 | DIS | -3.73 |",
        "| 3 | RM | 2.85 |",
    ]


def test_markdown_table_several_units_and_data():
    k = np.array([[3.0, 4.0], [0.0, 1.0]])
    data = np.array([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]])
    md = markdown_table(top_k_features(k, ["x|y", "z"], k=2, data=data), units=2)
    lines = md.splitlines()
    assert (
        lines[0] == "| rank | feature | L2 norm over units | standardized | correlated with (r) |"
    )
    assert lines[2] == "| 1 | x\\|y | 5 | 4.082 | **z** (1) |"
    assert "| x\\|y | 3 | 4 |" in lines
    assert "| feature | unit 0 | unit 1 |" in lines


def test_many_units_have_no_per_unit_table():
    md = markdown_table(top_k_features(np.ones((2, 9)), ["a", "b"], k=2), units=9)
    assert "unit 0" not in md


def test_errors():
    with pytest.raises(ValueError, match=r"2 feature names for a kernel of 3 input features"):
        top_k_features(np.ones((3, 1)), ["a", "b"])
    with pytest.raises(ValueError, match=r"Received: kernel.shape=\(3,\)"):
        top_k_features(np.ones(3), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"Received: data.shape=\(4, 2\)"):
        top_k_features(np.ones((3, 1)), ["a", "b", "c"], data=np.ones((4, 2)))


def test_correlated_partners_in_blocks_equal_the_full_matrix(monkeypatch):
    # a block of one row at a time gives what the whole correlation matrix gives
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 12))
    x[:, 3] = 2 * x[:, 7] + 0.01 * rng.normal(size=40)
    x[:, 9] = -x[:, 1]
    x[:, 5] = 1.0  # constant: never flagged, never a partner
    with np.errstate(invalid="ignore", divide="ignore"):  # the constant column
        r = np.corrcoef(x.T)
    np.fill_diagonal(r, 0)
    r[:, 5] = r[5, :] = 0
    expected = [(int(np.argmax(np.abs(row))), row[np.argmax(np.abs(row))])
                if np.max(np.abs(row)) >= 0.9 else None for row in r]
    for block in (1, 5, 1 << 22):
        monkeypatch.setattr(features, "_BLOCK_ELEMENTS", block * x.shape[1])
        got = correlated_partners(x)
        assert [g if g is None else g[0] for g in got] == [e if e is None else e[0]
                                                           for e in expected]
        for g, e in zip(got, expected):
            if g is not None:
                assert g[1] == pytest.approx(e[1], abs=1e-12)
    fd = features.FeatureData.from_sample(x)
    np.testing.assert_allclose(fd.stds, x.std(axis=0))
    kernel = rng.normal(size=(12, 1))
    names = [f"f{i}" for i in range(12)]
    assert top_k_features(kernel, names, 4, fd) == top_k_features(kernel, names, 4, x)
