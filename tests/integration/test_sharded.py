"""Model parallelism: 2 JAX processes on 127.0.0.1, a Dense kernel sharded across them.

Each process stores only the shards it holds; process 0 commits a snapshot once every
process's shards are stored. The snapshots equal the weights gathered across the
processes (`process_allgather`) bit for bit, and the run verifies. The sharded kernel's
statistics, combined from each process's partial sums, equal those of the gathered kernel,
in the snapshots and in TensorBoard.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_distributed import _env, _run

from keras_weightwatch import load_run, verify_run
from keras_weightwatch.stats import tensor_stats

# argv: out, rank, coordinator port.
SCRIPT = r'''
import json, os, sys
out, rank, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import jax
try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
except Exception:
    pass
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=rank, initialization_timeout=60)
import random
import numpy as np
import keras
from jax.experimental import multihost_utils
from keras_weightwatch import WeightWatch

random.seed(0)
np.random.seed(0)
mesh = keras.distribution.DeviceMesh((2,), ["model"], devices=jax.devices())
layout = keras.distribution.LayoutMap(mesh)
layout[".*hidden/kernel"] = (None, "model")   # 6 x 8 kernel: 4 columns per process
keras.distribution.set_distribution(keras.distribution.ModelParallel(
    layout_map=layout, batch_dim_name=None, auto_shard_dataset=False))
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="hidden"),
                          keras.layers.Dense(1, name="out")])
model.compile("sgd", "mse")
x = np.random.RandomState(0).rand(16, 6).astype("float32")
y = x.sum(1, keepdims=True)
recorded = {}

class Gather(keras.callbacks.Callback):
    def _take(self, name):
        recorded[name] = [np.asarray(multihost_utils.process_allgather(w.value, tiled=True))
                          for w in self.model.weights]
    def on_train_begin(self, logs=None):
        self._take("initial")
    def on_epoch_end(self, epoch, logs=None):
        self._take(str(epoch))

sharded = [str(w.path) for w in model.weights if not w.value.is_fully_addressable
           and not w.value.is_fully_replicated]
model.fit(x, y, epochs=2, batch_size=8, verbose=0,
          callbacks=[Gather(), WeightWatch(os.path.join(out, "run"))])
np.savez(os.path.join(out, f"gathered_{rank}.npz"),
         **{f"{k}__{i}": a for k, ws in recorded.items() for i, a in enumerate(ws)})
with open(os.path.join(out, f"report_{rank}.json"), "w") as f:
    json.dump({"sharded": sharded, "processes": jax.process_count()}, f)
'''


def _can_run_jax_processes() -> str | None:
    try:
        import jax  # noqa: F401
    except ImportError:
        return "jax is not installed (`make test` does)"
    return None


@pytest.mark.skipif(_can_run_jax_processes() is not None,
                    reason=str(_can_run_jax_processes()))
def test_two_processes_sharded_kernel(tmp_path):
    out = str(tmp_path)
    reports = _run(SCRIPT, out, _env("jax", XLA_FLAGS="--xla_force_host_platform_device_count=1"),
                   ranks=2)
    assert all(r["processes"] == 2 for r in reports)
    assert reports[0]["sharded"] == ["sequential/hidden/kernel"]
    data = np.load(os.path.join(out, "gathered_0.npz"))
    run = load_run(os.path.join(out, "run"))
    assert run.steps == [-1, 0, 1]
    kernel = run.snapshot(1).tensors["hidden/kernel"]
    assert [p.offset for p in kernel.parts] == [(0, 0), (0, 4)]
    assert all("parts" not in r.to_json() for k, r in run.snapshot(1).tensors.items()
               if k != "hidden/kernel")
    for name, step in (("initial", "initial"), ("0", 0), ("1", 1)):
        got = list(run.weights(step).values())
        want = [data[f"{name}__{i}"] for i in range(len(got))]
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert g.tobytes() == w.tobytes()
    _assert_stats_of_the_gathered_kernel(run, data, os.path.join(out, "run"))
    assert verify_run(os.path.join(out, "run")).ok
    assert not [n for n in os.listdir(os.path.join(out, "run", "shards"))
                if n.endswith(".json")], "shard records are removed once committed"
    with open(os.path.join(out, "run", "weightwatch.json")) as f:
        header = json.load(f)
    assert header["format_version"] == 3


def _assert_stats_of_the_gathered_kernel(run, data, run_dir):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    keys = list(run.weights("initial"))
    k = keys.index("hidden/kernel")
    names = [("initial", "initial"), ("0", 0), ("1", 1)]
    for i, (name, step) in enumerate(names):
        before = data[f"{names[i - 1][0]}__{k}"] if i else None
        want = tensor_stats(data[f"{name}__{k}"], before)
        got = run.snapshot(step).stats["hidden/kernel"]
        assert set(got) == set(want) == set(run.snapshot(step).stats["hidden/bias"])
        assert ("update_ratio" in got) == (i > 0)
        for stat, value in want.items():
            assert got[stat] == pytest.approx(value, rel=1e-12, abs=1e-15), (step, stat)
    acc = pea.EventAccumulator(os.path.join(run_dir, "weights"),
                               size_guidance={pea.TENSORS: 0})
    acc.Reload()
    last = run.snapshot(1).stats["hidden/kernel"]
    # (the weights stay finite, so no NaN/Inf count charts: they appear once a count is not 0)
    assert last["nan_count"] == last["inf_count"] == 0
    assert not {t for t in acc.Tags()["tensors"] if t.endswith(("nan_count", "inf_count"))}
    for stat in ("l2_norm", "mean", "std", "max_abs", "update_ratio"):
        events = acc.Tensors(f"hidden/kernel/{stat}")
        assert len(events) == (2 if stat == "update_ratio" else 3), stat  # as the bias's:
        assert len(events) == len(acc.Tensors(f"hidden/bias/{stat}")), stat
        value = float(tensor_util.make_ndarray(events[-1].tensor_proto))
        assert value == pytest.approx(last[stat], rel=1e-6), stat
