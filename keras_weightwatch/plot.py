"""The dashboard's pictures in a notebook: matplotlib figures of runs and diffs.

Needs matplotlib (`pip install 'keras-weightwatch[plot]'`). Each function returns
a `matplotlib.figure.Figure` drawn from the same data and image functions as the
TensorBoard views (`images.kernel_grid`, `images.response_grid`,
`features.top_k_features`, `drift`, `diff_runs`), so a notebook shows what the
WeightWatch tab shows.

Example:

```python
from keras_weightwatch import load_run, plot

run = load_run("runs/exp1")
plot.top_k(run)                  # the top-k features at the last step: bars and a table
plot.drift_heatmap(run)          # layers x steps, change since the initial weights
# a convolutional run: plot.kernels(run, "conv1/kernel", step="initial")
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import DiffResult, Run, drift
from .errors import received
from .features import top_k_features
from .images import Grid, diverging_rgb, kernel_grid, response_grid
from .responses import Geometry

EXTRA_HINT = "pip install 'keras-weightwatch[plot]'"


def _pyplot():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"keras_weightwatch.plot needs matplotlib: {EXTRA_HINT}") from e
    return Figure


def _figure(width: float, height: float):
    # A Figure without pyplot's global state: it shows in Jupyter and needs no backend.
    return _pyplot()(figsize=(width, height), layout="constrained")


def _colour_scale(fig, ax, vmax: float, label: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize

    ramp = diverging_rgb(np.linspace(-1.0, 1.0, 256), 1.0).astype(np.float64) / 255.0
    mappable = ScalarMappable(Normalize(-vmax, vmax), ListedColormap(ramp))
    fig.colorbar(mappable, ax=ax, shrink=0.8, label=label)


def _grid_figure(grid: Grid, title: str, scale_label: str):
    h, w = grid.image.shape[:2]
    fig = _figure(min(12.0, 2.0 + w / 40), min(10.0, 1.0 + h / 40))
    ax = fig.add_subplot()
    ax.imshow(grid.image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title + (f" (first {len(grid.tiles)} of {grid.total} tiles)"
                          if grid.truncated else ""))
    if not grid.rgb:
        _colour_scale(fig, ax, grid.vmax, scale_label)
    return fig


def _tensor(run_or_kernel: Run | np.ndarray, key: str | None, step: int | str) -> tuple:
    if isinstance(run_or_kernel, Run):
        if key is None:
            raise ValueError(f"name the weight to draw. {received('key', key)}")
        return np.asarray(run_or_kernel.tensor(key, step, effective=True)), f"{key} @ {step}"
    return np.asarray(run_or_kernel), key or "kernel"


def kernels(run_or_kernel: Run | np.ndarray, key: str | None = None, step: int | str = "last",
            max_tiles: int = 256):
    """A convolution kernel's grid (one tile per input/output pair), as the views draw it.

    Args:
        run_or_kernel: A `Run` (then name `key`) or a kernel array `(h, w, in, out)`.
        key: The weight key (`conv1/kernel`). Defaults to None.
        step: The snapshot: an int step, `"initial"` or `"last"`. Defaults to `"last"`.
        max_tiles: The most tiles drawn. Defaults to 256.
    """
    arr, title = _tensor(run_or_kernel, key, step)
    return _grid_figure(kernel_grid(arr, max_tiles=max_tiles), title, "weight")


def responses(image: np.ndarray, response_maps: np.ndarray, max_tiles: int = 256,
              geometry: Geometry | None = None):
    """A sample image followed by its response maps `(h, w, outputs)`, as the views draw them.

    Each map at the image's size, on its own scale around its own mean (see
    `images.response_grid`; `geometry` is the layer's `responses.Geometry`).
    """
    grid = response_grid(image, response_maps, max_tiles, geometry)
    return _grid_figure(grid, "responses", "(response - tile mean) / tile's max |deviation|")


def top_k(run: Run, step: int | str = "last", k: int | None = None):
    """The top-k input features of the run's feature layer: a bar chart and a table.

    Uses the run's `feature_names` and `top_k` settings (`k` overrides the latter).
    """
    settings = run.settings
    key, names = settings.get("feature_key"), settings.get("feature_names")
    if not key or not names:
        raise ValueError(
            f"the run was written without feature_names. {received('feature_names', names)}"
        )
    k = int(k or settings.get("top_k") or 5)
    rows = top_k_features(np.asarray(run.tensor(key, step, effective=True)), names, k)
    fig = _figure(9.0, 1.0 + 0.45 * len(rows))
    bars, table = fig.subplots(1, 2, width_ratios=[3, 2])
    labels = [r.name for r in rows][::-1]
    values = [r.weight for r in rows][::-1]
    bars.barh(labels, values, color=["#b2182b" if v > 0 else "#2166ac" for v in values])
    bars.axvline(0, color="#999", lw=0.8)
    bars.set_title(f"top {len(rows)} features of {key} @ {step}")
    table.set_axis_off()
    table.table(cellText=[[r.rank, r.name, f"{r.weight:.4g}"] for r in rows],
                colLabels=["rank", "feature", "weight"], loc="center")
    return fig


def drift_heatmap(run_or_drift: Any, since_initial: bool = True):
    """Layers x steps of each layer's change: since the first snapshot, or step by step."""
    d = drift(run_or_drift) if isinstance(run_or_drift, (Run, str)) else run_or_drift
    values = np.array([layer.from_initial if since_initial else layer.step_change
                       for layer in d.layers], dtype=np.float64)
    fig = _figure(min(14.0, 3.0 + 0.4 * values.shape[1]), 1.5 + 0.35 * len(d.layers))
    ax = fig.add_subplot()
    im = ax.imshow(values, aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_yticks(range(len(d.layers)), [layer.name for layer in d.layers])
    ax.set_xticks(range(values.shape[1]), list(d.steps[1:]), rotation=90)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax, label="‖W − W₀‖ / ‖W₀‖" if since_initial else "‖Wₜ − Wₜ₋₁‖ / ‖Wₜ₋₁‖")
    return fig


def diff_summary(result: DiffResult, tensors: Sequence[str] | None = None):
    """Each compared tensor's rel-L2 and cosine (raw and after matching units) as bars."""
    ts = [t for t in result.tensors if t.compared and (tensors is None or t.name in tensors)]
    fig = _figure(10.0, 1.2 + 0.3 * len(ts))
    rel, cos = fig.subplots(1, 2, sharey=True)
    names = [t.name for t in ts]
    y = np.arange(len(ts))
    rel.barh(y, [t.rel_l2 for t in ts], color="#d6604d")
    rel.set_yticks(y, names)
    rel.invert_yaxis()
    rel.set_title("rel-L2 ‖B − A‖ / ‖A‖")
    cos.barh(y - 0.2, [t.cosine for t in ts], height=0.4, label="cosine", color="#92c5de")
    cos.barh(y + 0.2, [np.nan if t.matched_cosine is None else t.matched_cosine for t in ts],
             height=0.4, label="matched cosine", color="#2166ac")
    cos.set_xlim(-1, 1)
    cos.legend(loc="lower right")
    fig.suptitle(f"{result.a} vs {result.b}")
    return fig
