"""The WeightWatch tab of TensorBoard: HTTP routes over the run directories of the log directory.

TensorBoard loads this plugin through the `tensorboard_plugins` entry point and
serves its routes under `/data/plugin/weightwatch/`; the tab is the ES module
`static/index.js`, which TensorBoard loads in an iframe. Every route only reads
(never writes, never unpickles), reads only inside the log directory, checks its
query parameters first (HTTP 400), and reports a run that cannot be read as that
run's error (HTTP 422) while the other runs go on working.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

import keras_weightwatch.tensorboard_plugin.content as content
import keras_weightwatch.tensorboard_plugin.params as params

from ..errors import WeightWatchError
from ..images import diverging_rgb, encode_png, kernel_grid
from .library import LRU, Library, RunError
from .matching import reordered, units_axis

PLUGIN_NAME = "weightwatch"
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {"index.js": "text/javascript", "style.css": "text/css"}
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
"""The largest body a route sends."""
_JSON = "application/json"
# werkzeug types `Request.application` for plain functions; here it wraps methods.
_application: Any = wrappers.Request.application


def _error(request, code: int, message: str):
    body = json.dumps({"error": message})
    return http_util.Respond(request, body, _JSON, code=code)


def route(*names: str) -> Callable:
    """A WSGI route taking the checked query parameters `names`; errors become 400 / 422."""

    def wrap(fn: Callable) -> Callable:
        @_application
        @functools.wraps(fn)
        def app(self, request):
            try:
                params.check_query(request.query_string)
                args = _args(request, names)
                return fn(self, request, args)
            except params.BadRequest as e:
                return _error(request, 400, self.library.clean(str(e)))
            except RunError as e:
                return _error(request, 422, str(e))
            except (WeightWatchError, ImportError) as e:
                return _error(request, 422, self.library.clean(str(e)))

        return app

    return wrap


def _args(request, names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in request.args:
        if name not in names:
            raise params.BadRequest(
                f"unknown parameter; this route takes {list(names)}. Received: {name}=..."
            )
        values = request.args.getlist(name)
        if len(values) > 1:
            raise params.BadRequest(f"{name} was given {len(values)} times. Received: {name}=...")
        out[name] = values[0]
    return out


def _json(request, body: Any):
    text = json.dumps(body, allow_nan=False, separators=(",", ":"))
    if len(text) > MAX_RESPONSE_BYTES:
        return _error(request, 413, f"the answer would be {len(text)} bytes; the cap is "
                                    f"{MAX_RESPONSE_BYTES}")
    return http_util.Respond(request, text, _JSON)


def _png(request, image: np.ndarray):
    return http_util.Respond(request, encode_png(image), "image/png")


class WeightWatchPlugin(base_plugin.TBPlugin):
    """The WeightWatch tab: every stored step of every run, compared with `diff_runs`.

    Args:
        context: TensorBoard's `TBContext`; only its `logdir` is used.
    """

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self.library = Library(context.logdir or "")
        self.diffs = LRU(16)  # DiffResults, per pair of snapshots
        self.columns = LRU(4096)  # change-since-initial columns, per pair of snapshots
        self.grids = LRU(64)
        self.responses = LRU(32)  # sample images' responses, per kernel file
        self.described = LRU(16)  # feature data's partners, per stored sample
        self.findings = LRU(16)  # health findings, per opened run (reopened when it changes)

    def is_active(self) -> bool:
        return bool(self.library.logdir) and bool(self.library.list_runs(limit=1)[0])

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js",
                                            tab_name="WeightWatch")

    def get_plugin_apps(self) -> dict[str, Callable]:
        return {
            "/static/*": self._static,
            "/runs": self._runs,
            "/run": self._run,
            "/heatmap": self._heatmap,
            "/health": self._health,
            "/tensor": self._tensor,
            "/tensor.png": self._tensor_png,
            "/kernel": self._kernel,
            "/kernel.png": self._kernel_png,
            "/compare": self._compare,
            "/compare_kernel": self._compare_kernel,
            "/compare_kernel.png": self._compare_kernel_png,
            "/responses": self._responses,
            "/responses.png": self._responses_png,
            "/features": self._features,
            "/colorbar.png": self._colorbar,
        }

    # -- static files: a fixed list, never a path taken from the request
    @_application
    def _static(self, request):
        name = request.path.rsplit("/static/", 1)[-1]
        if name not in STATIC_FILES:
            return _error(request, 404, "no such file")
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            return http_util.Respond(request, f.read(), STATIC_FILES[name])

    @route()
    def _runs(self, request, args):
        runs, truncated = self.library.list_runs()
        return _json(request, {"runs": [r.to_json() for r in runs], "truncated": truncated})

    @route("run")
    def _run(self, request, args):
        name = params.run_name(args)
        return _json(request, content.summary(self.library.open(name), name))

    @route("run", "metric")
    def _heatmap(self, request, args):
        name = params.run_name(args)
        metric = params.choice(args, "metric", ("update", "initial"))
        run = self.library.open(name)
        if metric == "update":
            return _json(request, content.update_heatmap(run))
        return _json(request, content.initial_heatmap(run, name, self.columns))

    @route("run")
    def _health(self, request, args):
        name = params.run_name(args)
        run = self.library.open(name)
        # The library gives the same Run until the run changes; the entry holds it, so its
        # id names no other run while the entry lives.
        _, body = self.findings.get((name, id(run)), lambda: (run, content.health(run, name)))
        return _json(request, body)

    def _one(self, args) -> tuple[Any, str, str]:
        name = params.run_name(args)
        return self.library.open(name), params.text(args, "key"), params.step(args)

    @route("run", "key", "step")
    def _tensor(self, request, args):
        run, key, step = self._one(args)
        snap = content.snapshot_of(run, step)
        _, vmax, strides = content.matrix_image(run, key, step)
        rec = snap.tensors[key]
        return _json(request, {
            "key": key, "step": snap.name, "shape": list(rec.shape), "dtype": rec.dtype,
            "stats": {k: content.num(v) for k, v in snap.stats.get(key, {}).items()},
            "conv": content.is_conv_kernel(run, key, rec.shape),
            "vmax": content.num(vmax), "strides": strides,
        })

    @route("run", "key", "step")
    def _tensor_png(self, request, args):
        img, _, _ = content.matrix_image(*self._one(args))
        return _png(request, img)

    def _grid(self, args):
        run, key, step = self._one(args)
        snap = content.snapshot_of(run, step)
        ident = content.tensor_ident(run, snap, key)
        return self.grids.get(ident, lambda: content.kernel(run, key, step)), snap

    @route("run", "key", "step")
    def _kernel(self, request, args):
        grid, snap = self._grid(args)
        h, w = grid.image.shape[:2]
        return _json(request, {
            "step": snap.name, "vmax": content.num(grid.vmax), "scale": grid.scale,
            "tiles": len(grid.tiles), "total": grid.total, "rgb": grid.rgb,
            "width": w, "height": h,
        })

    @route("run", "key", "step")
    def _kernel_png(self, request, args):
        return _png(request, self._grid(args)[0].image)

    @route("a", "sa", "b", "sb")
    def _compare(self, request, args):
        pair = params.pair(args)
        run_a, run_b = self._pair_runs(pair)
        result = content.compare(run_a, run_b, pair, self.diffs)
        return _json(request, content.compare_json(
            result, run_a, run_b, f"{pair.run_a}@{result.a.rsplit('@', 1)[-1]}",
            f"{pair.run_b}@{result.b.rsplit('@', 1)[-1]}"))

    def _pair_runs(self, pair: params.Pair):
        return self.library.open(pair.run_a), self.library.open(pair.run_b)

    def _compare_grids(self, args):
        pair = params.pair(args)
        key = params.text(args, "key")
        which = params.choice(args, "which", ("a", "b", "diff"))
        run_a, run_b = self._pair_runs(pair)
        result = content.compare(run_a, run_b, pair, self.diffs)
        diff = next((t for t in result.tensors if t.name == key), None)
        a = np.asarray(content.tensor_of(run_a, key, pair.step_a), dtype=np.float64)
        b = np.asarray(content.tensor_of(run_b, key, pair.step_b), dtype=np.float64)
        if diff is None or a.shape != b.shape or not content.is_conv_kernel(run_a, key, a.shape):
            raise params.BadRequest(
                "the tensor is not a convolution kernel of one shape in both. "
                f"Received: key={key!r}"
            )
        spec = next((s for s in run_a.specs if s.key == key), None)
        layer = None if spec is None else content.layer_class(run_a, spec.layer)
        b = reordered(b, diff, units_axis(layer))
        arr = {"a": a, "b": b, "diff": b - a}[which]
        return kernel_grid(arr, max_tiles=content.MAX_TILES), diff

    @route("a", "sa", "b", "sb", "key", "which")
    def _compare_kernel(self, request, args):
        grid, diff = self._compare_grids(args)
        return _json(request, {"vmax": content.num(grid.vmax),
                               "matched": diff.unit_order is not None,
                               "inputs_aligned": diff.input_order is not None,
                               "matched_cosine": content.num(diff.matched_cosine),
                               "tiles": len(grid.tiles), "total": grid.total})

    @route("a", "sa", "b", "sb", "key", "which")
    def _compare_kernel_png(self, request, args):
        return _png(request, self._compare_grids(args)[0].image)

    def _drawn(self, args) -> tuple[content.Responses | None, str, Any]:
        """The responses of the sample images to the kernel `key` at `step` (cached)."""
        run, key, step = self._one(args)
        snap = content.snapshot_of(run, step)
        layer, reason = content.response_layer(run, key)
        if layer is None or key not in snap.tensors:
            return None, reason or f"snapshot {snap.name} has no {key!r}", snap
        images = run.samples.sample_images
        ident = (layer, content.tensor_ident(run, snap, key),
                 images.tensor.digest if images else None,
                 run.settings.get("max_kernel_tiles"))
        return self.responses.get(ident, lambda: content.responses(run, layer, step)), "", snap

    @route("run", "key", "step")
    def _responses(self, request, args):
        drawn, reason, snap = self._drawn(args)
        if drawn is None:
            return _json(request, {"available": False, "reason": reason, "step": snap.name})
        grids = [drawn.grid(i) for i in range(len(drawn.images))]
        return _json(request, {
            "available": True, "step": snap.name, "layer": drawn.layer.layer,
            "key": drawn.layer.key, "shown": len(grids), "stored": drawn.stored,
            "total": drawn.total, "outputs": int(drawn.responses.shape[-1]),
            "samples": [{"index": i, "tiles": len(g.tiles) - 1,
                         "means": [content.num(m) for m in g.means],
                         "scales": [content.num(v) for v in g.scales]}
                        for i, g in enumerate(grids)],
        })

    @route("run", "key", "step", "sample")
    def _responses_png(self, request, args):
        drawn, reason, _ = self._drawn(args)
        i = params.index(args, "sample")
        if drawn is None or i >= len(drawn.images):
            why = reason or f"{len(drawn.images) if drawn else 0} are drawn"
            raise params.BadRequest(f"no such response image: {why}. Received: sample={i}")
        return _png(request, drawn.grid(i).image)

    @route("run")
    def _features(self, request, args):
        run = self.library.open(params.run_name(args))
        stored = run.samples.feature_data
        described = None if stored is None else self.described.get(
            (stored.tensor.digest, tuple(run.settings.get("feature_names") or ())),
            lambda: content.feature_description(run))
        return _json(request, content.features(run, described))

    @route()
    def _colorbar(self, request, args):
        ramp = np.linspace(-1.0, 1.0, 256)[None, :].repeat(12, axis=0)
        return _png(request, diverging_rgb(ramp, 1.0))
