"""`keras_weightwatch.plot` and the notebook summaries: figures hold exactly the library's data."""

from __future__ import annotations

import html.parser

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from keras_weightwatch import diff_runs, drift, load_run, plot  # noqa: E402
from keras_weightwatch.features import top_k_features  # noqa: E402
from keras_weightwatch.images import kernel_grid, response_grid  # noqa: E402
from keras_weightwatch.notebook import diff_html, run_html  # noqa: E402

NAMES = ["a", "b", "c", "d", "e", "f"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import keras

    from keras_weightwatch import WeightWatch

    root = tmp_path_factory.mktemp("plot")
    rng = np.random.default_rng(0)
    out = {}
    for name, seed in (("one", 1), ("two", 2)):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, name="conv"),
                                  keras.layers.Flatten(), keras.layers.Dense(2, name="out")])
        model.compile(optimizer="adam", loss="mse")
        model.fit(rng.normal(size=(16, 6, 6, 1)), rng.normal(size=(16, 2)), epochs=2, verbose=0,
                  callbacks=[WeightWatch(str(root / name), histograms=False)])
        out[name] = load_run(root / name)
    lin = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, name="lin")])
    lin.compile(optimizer="sgd", loss="mse")
    lin.fit(rng.normal(size=(16, 6)), rng.normal(size=(16, 1)), epochs=2, verbose=0,
            callbacks=[WeightWatch(str(root / "lin"), histograms=False, feature_names=NAMES,
                                   top_k=4)])
    out["lin"] = load_run(root / "lin")
    return out


def _image(fig) -> np.ndarray:
    return fig.axes[0].images[0].get_array()


@pytest.mark.parametrize("step", ["initial", 0, "last"])
def test_kernels_figure_shows_the_kernel_grid_pixels(runs, step):
    run = runs["one"]
    fig = plot.kernels(run, "conv/kernel", step=step)
    grid = kernel_grid(np.asarray(run.tensor("conv/kernel", step)))
    np.testing.assert_array_equal(_image(fig), grid.image)
    bar = fig.axes[1]  # the colour scale spans the grid's symmetric limit
    assert bar.get_ylim() == pytest.approx((-grid.vmax, grid.vmax))


def test_kernels_figure_of_a_plain_array_and_its_errors():
    k = np.random.default_rng(1).normal(size=(3, 3, 1, 5))
    np.testing.assert_array_equal(_image(plot.kernels(k)), kernel_grid(k).image)
    with pytest.raises(ValueError, match="Received: key=None"):
        plot.kernels(_FakeRun(), None)


class _FakeRun(plot.Run):
    def __init__(self):
        super().__init__("x", {}, [])


def test_responses_figure_shows_the_response_grid_pixels():
    rng = np.random.default_rng(2)
    image, maps = rng.random((8, 8, 1)), rng.normal(size=(6, 6, 4))
    np.testing.assert_array_equal(_image(plot.responses(image, maps)),
                                  response_grid(image, maps).image)


def test_top_k_bars_and_table_are_the_top_k_features(runs):
    run = runs["lin"]
    fig = plot.top_k(run, step="initial")
    rows = top_k_features(np.asarray(run.tensor("lin/kernel", "initial")), NAMES, 4)
    bars = fig.axes[0].patches
    assert [b.get_width() for b in bars][::-1] == pytest.approx([r.weight for r in rows])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()][::-1]
    assert labels == [r.name for r in rows]
    with pytest.raises(ValueError, match="feature_names"):
        plot.top_k(runs["one"])


def test_drift_heatmap_holds_drift_from_initial(runs):
    d = drift(runs["one"])
    fig = plot.drift_heatmap(runs["one"])
    np.testing.assert_array_equal(_image(fig), np.array([layer.from_initial for layer in d.layers]))
    step = plot.drift_heatmap(d, since_initial=False)
    np.testing.assert_array_equal(_image(step), np.array([layer.step_change for layer in d.layers]))


def test_diff_summary_bars_are_diff_runs_numbers(runs):
    result = diff_runs(runs["one"], runs["two"])
    fig = plot.diff_summary(result)
    compared = [t for t in result.tensors if t.compared]
    assert [b.get_width() for b in fig.axes[0].patches] == pytest.approx(
        [t.rel_l2 for t in compared])
    n = len(compared)
    widths = [b.get_width() for b in fig.axes[1].patches]
    assert widths[:n] == pytest.approx([t.cosine for t in compared])
    matched = [np.nan if t.matched_cosine is None else t.matched_cosine for t in compared]
    np.testing.assert_allclose(widths[n:], matched)


class _Cells(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self._row, self._in = [], None, False

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        self._in = tag in ("td", "th")

    def handle_endtag(self, tag):
        if tag == "tr":
            self.rows.append(self._row)
        self._in = False

    def handle_data(self, data):
        if self._in and self._row is not None:
            self._row.append(data)


def _cells(text: str) -> list[list[str]]:
    p = _Cells()
    p.feed(text)
    return p.rows


def test_run_html_lists_every_weight_with_its_stored_norm(runs):
    run = runs["one"]
    rows = _cells(run_html(run))
    assert run._repr_html_() == run_html(run)  # what Jupyter shows for a Run
    assert rows[0][:2] == ["weight", "shape"]
    assert [r[0] for r in rows[1:]] == [s.key for s in run.specs]
    for r, spec in zip(rows[1:], run.specs):
        norm = float(np.linalg.norm(np.asarray(run.tensor(spec.key), np.float64)))
        assert float(r[3]) == pytest.approx(norm, rel=1e-5)


def test_diff_html_shows_diff_runs_numbers_to_six_digits(runs):
    result = diff_runs(runs["one"], runs["two"])
    rows = {r[0]: r for r in _cells(diff_html(result))[1:]}
    assert result._repr_html_() == diff_html(result)  # what Jupyter shows for a DiffResult
    assert set(rows) == {t.name for t in result.tensors}
    for t in result.tensors:
        assert rows[t.name][1] == t.status
        assert float(rows[t.name][2]) == pytest.approx(t.rel_l2, rel=1e-5)
        assert float(rows[t.name][3]) == pytest.approx(t.cosine, rel=1e-5, abs=1e-6)
