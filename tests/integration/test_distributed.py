"""Distributed training: several devices or processes, one writer, snapshots equal get_weights().

- `tf.distribute.MirroredStrategy` over 2 logical CPU devices (one process).
- JAX `DataParallel` over 2 host CPU devices (one process).
- 2 JAX processes on 127.0.0.1 (`jax.distributed.initialize`, gloo collectives)
  with `DataParallel` over both: only process 0 writes. (Keras 3 cannot train
  with `MultiWorkerMirroredStrategy`; see `test_tf_config_*` and the README's
  support matrix.)
- 2 PyTorch processes with a `torch.distributed` gloo group: only rank 0 writes.

Every case runs in subprocesses: device configuration and multi-process
runtimes are set once per process. Each process's fit has a timeout, so a
hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import assert_same_arrays
from test_backends import PRELUDE, _available, event_values, expected_tags

from keras_weightwatch import load_run, verify_run
from keras_weightwatch.distribute import is_writer, writer_rank

TIMEOUT_S = 180

# Every view on; two callbacks, one per response mode. Records what process
# `rank` saw with get_weights() in out/recorded_<rank>.npz.
FIT = r'''
def watch(run_root, responses_dir=None):
    views = dict(histograms=True, kernel_images=True, feature_names=FEATURE_NAMES, top_k=3,
                 feature_layer="dense", sample_images=x[:2])
    return [
        WeightWatch(os.path.join(run_root, "kernel"), response_mode="kernel",
                    responses_dir=responses_dir, **views),
        WeightWatch(os.path.join(run_root, "activation"), response_mode="activation", **views),
    ]


def save_recorded(recorded, rank):
    np.savez(os.path.join(out, f"recorded_{rank}.npz"),
             **{f"{step}_{i}": w for step, ws in recorded.items() for i, w in enumerate(ws)})


def finish(rank, **more):
    from keras_weightwatch.distribute import writer_rank
    report.update(more)
    report["writer_rank"] = list(writer_rank(model))
    report["tensorflow_imported"] = "tensorflow" in sys.modules
    with open(os.path.join(out, f"report_{rank}.json"), "w") as f:
        json.dump(report, f)
'''

MIRRORED = r'''
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
''' + PRELUDE + FIT + r'''
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = cnn()
    recorded = fit(model, watch(os.path.join(out, "run")), epochs=2)
save_recorded(recorded, 0)
finish(0, replicas=strategy.num_replicas_in_sync,
       variable_type=type(model.weights[0].value).__name__)
'''

JAX_DEVICES = PRELUDE + FIT + r'''
import jax
devices = jax.devices()
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
model = cnn()
recorded = fit(model, watch(os.path.join(out, "run")), epochs=2)
save_recorded(recorded, 0)
finish(0, replicas=len(devices),
       variable_sharding=str(model.weights[0].value.sharding))
'''

# argv: out, rank, coordinator port. keras.distribution.initialize would import
# TensorFlow (it seeds through keras.utils.set_random_seed); jax.distributed's own
# initialize does not, and `random.seed` in PRELUDE gives both processes the same
# initial weights.
JAX_PROCESSES = r'''
import sys
rank, port = int(sys.argv[2]), sys.argv[3]
import jax
jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank,
    initialization_timeout=60,
)
''' + PRELUDE + FIT + r'''
keras.distribution.set_distribution(
    keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
)
# Each process feeds its own half of the data.
x, y = (x[:8], y[:8]) if rank == 0 else (x[8:], y[8:])
model = cnn()
recorded = fit(model, watch(os.path.join(out, f"run_{rank}"),
                            responses_dir=os.path.join(out, f"png_{rank}")), epochs=2)
save_recorded(recorded, rank)
finish(rank, process_count=jax.process_count(), devices=len(jax.devices()))
'''

TORCH_PROCESSES = r'''
import sys
rank, port = int(sys.argv[2]), sys.argv[3]
import datetime
import torch.distributed as dist
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
''' + PRELUDE + FIT + r'''
model = cnn()
recorded = fit(model, watch(os.path.join(out, f"run_{rank}"),
                            responses_dir=os.path.join(out, f"png_{rank}")), epochs=2)
save_recorded(recorded, rank)
finish(rank, world_size=dist.get_world_size())
dist.barrier()
dist.destroy_process_group()
'''


def _env(backend: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        CUDA_VISIBLE_DEVICES="",
        JAX_PLATFORMS="cpu",
    )
    env.pop("XLA_FLAGS", None)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: str, out: str, env: dict[str, str], ranks: int = 1) -> list[dict]:
    """Start `ranks` processes of `script`, wait for all (kill all on timeout), return reports."""
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, out, str(rank), port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in range(ranks)
    ]
    logs = []
    try:
        for rank, p in enumerate(procs):
            try:
                logs.append(p.communicate(timeout=TIMEOUT_S)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"process {rank} of {ranks} hung (no exit within {TIMEOUT_S} s)")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {rank} failed:\n{log[-4000:]}"
    reports = []
    for rank in range(ranks):
        with open(os.path.join(out, f"report_{rank}.json")) as f:
            reports.append(json.load(f))
    return reports


def _recorded(out: str, rank: int) -> dict:
    """What get_weights() returned in process `rank`: {step: [arrays]}."""
    data = np.load(os.path.join(out, f"recorded_{rank}.npz"))
    steps: dict = {}
    for name in sorted(data.files, key=lambda n: int(n.rsplit("_", 1)[1])):
        step, _ = name.rsplit("_", 1)
        steps.setdefault("initial" if step == "initial" else int(step), []).append(data[name])
    return steps


def _raw_event_counts(events_dir: str) -> tuple[list[str], dict[tuple[str, int], int]]:
    """The event files in a directory and how often each (tag, step) occurs in their records."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(f for f in os.listdir(events_dir) if f.startswith("events.out.tfevents."))
    counts: dict[tuple[str, int], int] = {}
    for name in files:
        for event in EventFileLoader(os.path.join(events_dir, name)).Load():
            for value in event.summary.value:
                counts[value.tag, event.step] = counts.get((value.tag, event.step), 0) + 1
    return files, counts


def _assert_one_complete_run(run_root: str, recorded: dict) -> None:
    """Both runs (kernel, activation) have every snapshot equal to get_weights(), views once."""
    for mode in ("kernel", "activation"):
        path = os.path.join(run_root, mode)
        run = load_run(path)
        assert run.steps == [-1, 0, 1]
        assert verify_run(path).ok
        assert_same_arrays(run.weights("initial"), recorded["initial"])
        for epoch in (0, 1):
            assert_same_arrays(run.weights(epoch), recorded[epoch])
        files, counts = _raw_event_counts(os.path.join(path, "weights"))
        assert len(files) == 1, files
        expected = expected_tags()
        assert counts == {(t, s): 1 for t, steps in expected.items() for s in steps}
        assert {t: sorted(v) for t, v in event_values(path).items()} == expected


# ------------------------------------------------------------------ one process, two devices


@pytest.mark.slow
def test_mirrored_strategy_two_logical_cpus(tmp_path):
    out = str(tmp_path)
    (report,) = _run(MIRRORED, out, _env("tensorflow"))
    assert report["replicas"] == 2
    assert report["variable_type"] == "MirroredVariable"
    assert report["writer_rank"] == [0, "single process"]
    _assert_one_complete_run(os.path.join(out, "run"), _recorded(out, 0))


@pytest.mark.slow
@pytest.mark.skipif(not _available("jax"), reason="jax is not installed (`make test` does)")
def test_jax_data_parallel_two_cpu_devices(tmp_path):
    out = str(tmp_path)
    env = _env("jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    (report,) = _run(JAX_DEVICES, out, env)
    assert report["replicas"] == 2
    assert "NamedSharding" in report["variable_sharding"]  # replicated over the 2 devices
    assert not report["tensorflow_imported"]
    _assert_one_complete_run(os.path.join(out, "run"), _recorded(out, 0))


# ------------------------------------------------------------------ two processes


def _assert_only_rank_0_wrote(out: str) -> None:
    written = sorted(os.listdir(out))
    # Process 1 created nothing: no run directory, no event file, no response PNGs.
    assert written == [
        "png_0", "recorded_0.npz", "recorded_1.npz", "report_0.json", "report_1.json", "run_0"
    ]
    assert sorted(os.listdir(os.path.join(out, "png_0"))) == ["conv"]


@pytest.mark.slow
@pytest.mark.skipif(not _available("jax"), reason="jax is not installed (`make test` does)")
def test_jax_two_processes_only_process_0_writes(tmp_path):
    out = str(tmp_path)
    reports = _run(JAX_PROCESSES, out, _env("jax"), ranks=2)
    assert [r["writer_rank"] for r in reports] == [[0, "jax.process_index()"],
                                                   [1, "jax.process_index()"]]
    assert [r["process_count"] for r in reports] == [2, 2]
    assert [r["devices"] for r in reports] == [2, 2]
    assert not any(r["tensorflow_imported"] for r in reports)
    _assert_only_rank_0_wrote(out)
    # Data parallel: both processes hold the same weights, and process 0 stored them.
    rec0, rec1 = _recorded(out, 0), _recorded(out, 1)
    for step in rec0:
        assert_same_arrays(dict(enumerate(rec1[step])), rec0[step])
    _assert_one_complete_run(os.path.join(out, "run_0"), rec0)


@pytest.mark.slow
@pytest.mark.skipif(not _available("torch"), reason="torch is not installed (`make test` does)")
def test_torch_two_processes_only_rank_0_writes(tmp_path):
    """Keras's fit does not all-reduce across a torch.distributed group; the writer is rank 0."""
    out = str(tmp_path)
    reports = _run(TORCH_PROCESSES, out, _env("torch"), ranks=2)
    assert [r["writer_rank"] for r in reports] == [[0, "torch.distributed rank"],
                                                   [1, "torch.distributed rank"]]
    assert not any(r["tensorflow_imported"] for r in reports)
    _assert_only_rank_0_wrote(out)
    _assert_one_complete_run(os.path.join(out, "run_0"), _recorded(out, 0))


# ------------------------------------------------------------------ who writes (no processes)


def _tf_config(task_type: str, index: int, chief: bool = False) -> str:
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    if chief:
        cluster["chief"] = ["127.0.0.1:3"]
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize(
    "tf_config, rank",
    [
        (None, 0),
        (_tf_config("worker", 0), 0),
        (_tf_config("worker", 1), 1),
        (_tf_config("chief", 0, chief=True), 0),
        (_tf_config("worker", 0, chief=True), 1),
        (_tf_config("evaluator", 0, chief=True), 1),
        (json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}}), 0),  # no task: not a worker
    ],
)
def test_tf_config_chief_writes(monkeypatch, tf_config, rank):
    """The chief writes, or worker 0 when the cluster has no chief (tf.distribute's rule)."""
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    assert writer_rank()[0] == rank
    assert is_writer() is (rank == 0)


def _strategy_model(task_type, task_id, cluster):
    resolver = SimpleNamespace(
        task_type=task_type,
        task_id=task_id,
        cluster_spec=lambda: SimpleNamespace(as_dict=lambda: cluster),
    )
    return SimpleNamespace(distribute_strategy=SimpleNamespace(cluster_resolver=resolver))


def test_strategy_cluster_resolver_decides(monkeypatch):
    """A model's multi-worker strategy is asked before TF_CONFIG."""
    monkeypatch.setenv("TF_CONFIG", _tf_config("worker", 0))
    cluster = {"worker": ["a:1", "b:2"]}
    assert writer_rank(_strategy_model("worker", 1, cluster)) == (
        1, "tf.distribute task worker:1"
    )
    assert is_writer(_strategy_model("worker", 0, cluster))
    # A single-process strategy (MirroredStrategy, the default one) has no cluster resolver.
    monkeypatch.delenv("TF_CONFIG")
    assert writer_rank(SimpleNamespace(distribute_strategy=SimpleNamespace())) == (
        0, "single process"
    )
