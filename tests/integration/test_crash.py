"""Crash consistency: SIGKILL at random moments never leaves a run that fails to load.

One long-lived helper process (SERVER) imports numpy and the store (and, for the
Keras trials, Keras on the PyTorch backend, the fastest to start a fit) once, then
`os.fork`s one child per trial and SIGKILLs it after a random delay drawn by this
process from a seeded generator, uniform over the whole time an uninterrupted trial takes (measured
first): building, capturing, writing tensors with fsync, committing. After each
kill this process checks that the run loads, `verify()` is ok, the listed
snapshots are a prefix of the steps (an incomplete snapshot is invisible), every
listed snapshot equals its reference bit for bit, and that the run can be
continued.

- Store trials (`STORE_TRIALS`): the child writes snapshots of known arrays with
  `RunWriter` (what the callback's background thread does); the reference is the
  arrays themselves. The killed run is continued with a new `RunWriter`.
- Keras trials (`KERAS_TRIALS`): the child fits a 0.45M-parameter model with
  `WeightWatch(durable=True)`; a callback placed before WeightWatch appends the
  SHA-256 of `get_weights()` to a reference file at train begin and each epoch
  end. The killed run is continued in a new child with `fit(initial_epoch=k)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keras_weightwatch.run import RunWriter, is_run, load_run

STORE_TRIALS = 50
KERAS_TRIALS = 20
STORE_STEPS = 6  # the initial snapshot and 5 epochs
KERAS_EPOCHS = 3

SERVER = r'''
import json, os, signal, sys, time
import numpy as np
from keras_weightwatch.capture import ModelInfo, Snapshot, WeightSpec
from keras_weightwatch.run import RunWriter

def store_arrays(step):
    rng = np.random.default_rng(1000 + step)
    return {
        "big/kernel": rng.normal(size=(512, 512)).astype("float32"),
        "big/bias": rng.normal(size=(512,)).astype("float32"),
        "frozen/kernel": np.arange(64 * 64, dtype="float32").reshape(64, 64),
        "counter": np.array(step, dtype="int32"),
        "mask": rng.random(size=(7,)) > 0.5,
        "empty": np.zeros((0, 3), "float32"),
    }

def store_info():
    specs = tuple(
        WeightSpec(key=k, path="m/" + k, layer=k.rsplit("/", 1)[0] if "/" in k else "",
                   shape=a.shape, dtype=a.dtype.name, trainable=k != "frozen/kernel")
        for k, a in store_arrays(0).items()
    )
    return ModelInfo(name="m", class_name="Fake", layers=(), weights=specs)

def store_child(run, steps):
    w = RunWriter.open(run, store_info(), settings={}, versions={}, durable=True)
    start = -1 if w.last_step is None else w.last_step + 1
    for step in range(start, start + steps):
        snap = Snapshot(step=step, label="initial" if step == -1 else "epoch",
                        epoch=None if step == -1 else step, arrays=store_arrays(step),
                        logs={} if step == -1 else {"loss": float(step)})
        w.commit_snapshot(snap, w.store_tensors(snap), {})
    w.close()

KERAS = None

def keras_child(run, ref, epochs, resume):
    import hashlib
    import keras
    from keras_weightwatch import WeightWatch, load_run
    from keras_weightwatch.run import is_run
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(640, name="wide"),
                              keras.layers.Dense(640, name="deep"),
                              keras.layers.Dense(1, name="out")])
    rng = np.random.default_rng(7)
    model.set_weights([rng.normal(scale=0.05, size=w.shape).astype("float32")
                       for w in model.weights])
    initial_epoch = 0
    if resume and is_run(run):
        r = load_run(run)
        if r.snapshots:
            model.set_weights(list(r.weights("last").values()))
            initial_epoch = r.snapshots[-1].step + 1
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(3).normal(size=(16, 64)).astype("float32")
    fd = os.open(ref, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def digest():
        h = hashlib.sha256()
        for a in model.get_weights():
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    class Ref(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            os.write(fd, f"clock begin {time.perf_counter()}\n".encode())
            os.write(fd, f"begin {initial_epoch - 1} {digest()}\n".encode())

        def on_epoch_end(self, epoch, logs=None):
            os.write(fd, f"epoch {epoch} {digest()}\n".encode())

    model.fit(x, x[:, :1], batch_size=16, epochs=initial_epoch + epochs, verbose=0,
              initial_epoch=initial_epoch,
              callbacks=[Ref(), WeightWatch(run, durable=True, histograms=False)])
    os.write(fd, f"clock end {time.perf_counter()}\n".encode())  # WeightWatch has finished

for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["kind"] == "keras" and KERAS is None:
        # Imported once here, so that each forked child starts fast (no computation yet:
        # PyTorch starts its thread pool at the first one, and a fork must come before).
        import keras as KERAS
        import keras_weightwatch.callback
        import keras_weightwatch.summaries
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            if cmd["kind"] == "store":
                store_child(cmd["run"], cmd["steps"])
            else:
                keras_child(cmd["run"], cmd["ref"], cmd["epochs"], cmd["resume"])
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        os._exit(code)
    delay = cmd.get("delay")
    reaped, status = False, 0
    if delay is not None:
        deadline = t0 + delay
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reaped = True
                break
            left = deadline - time.perf_counter()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(min(left, 0.002))
    if not reaped:
        _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    print(json.dumps({"killed": killed, "code": code, "t0": t0,
                      "elapsed": time.perf_counter() - t0}), flush=True)
'''


class Server:
    def __init__(self, log_path: str):
        env = dict(os.environ)
        env.update(KERAS_BACKEND="torch", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                   CUDA_VISIBLE_DEVICES="")
        self._log = open(log_path, "w")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, env=env,
        )

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self._log.flush()
            with open(self.log_path) as f:
                pytest.fail(f"crash server died:\n{f.read()[-4000:]}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(str(tmp_path_factory.mktemp("crash") / "server.log"))
    yield s
    s.close()


def _check_child_ok(result: dict, server: Server) -> None:
    if not result["killed"] and result["code"] != 0:
        with open(server.log_path) as f:
            pytest.fail(f"trial child failed:\n{f.read()[-4000:]}")


# ------------------------------------------------------------------ store trials


def store_arrays(step: int) -> dict[str, np.ndarray]:
    """The same arrays as SERVER's store_arrays (the reference)."""
    rng = np.random.default_rng(1000 + step)
    return {
        "big/kernel": rng.normal(size=(512, 512)).astype("float32"),
        "big/bias": rng.normal(size=(512,)).astype("float32"),
        "frozen/kernel": np.arange(64 * 64, dtype="float32").reshape(64, 64),
        "counter": np.array(step, dtype="int32"),
        "mask": rng.random(size=(7,)) > 0.5,
        "empty": np.zeros((0, 3), "float32"),
    }


def _check_store_run(run: str, n_expected: int | None = None) -> int:
    """Assert the run is consistent; return how many snapshots it lists."""
    loaded = load_run(run)
    report = loaded.verify()
    assert report.ok, report.problems
    steps = loaded.steps
    assert steps == list(range(-1, len(steps) - 1))  # a prefix: incomplete ones invisible
    if n_expected is not None:
        assert len(steps) == n_expected
    for step in steps:
        got = loaded.weights(step)
        want = store_arrays(step)
        assert list(got) == list(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
            assert got[key].tobytes() == want[key].tobytes(), (step, key)
    return len(steps)


def test_sigkill_during_store_writes_never_breaks_the_run(tmp_path, server):
    full = server.call(kind="store", run=str(tmp_path / "full"), steps=STORE_STEPS)
    assert not full["killed"]
    _check_child_ok(full, server)
    assert _check_store_run(str(tmp_path / "full")) == STORE_STEPS
    again = server.call(kind="store", run=str(tmp_path / "full2"), steps=STORE_STEPS)
    window = min(full["elapsed"], again["elapsed"]) * 1.1  # the first fork runs colder

    rng = np.random.default_rng(2024)
    counts, tmp_left, killed = [], 0, 0
    for trial in range(STORE_TRIALS):
        run = str(tmp_path / f"t{trial}")
        res = server.call(kind="store", run=run, steps=STORE_STEPS,
                          delay=float(rng.uniform(0, window)))
        _check_child_ok(res, server)
        killed += res["killed"]
        if not is_run(run):
            counts.append(-1)  # killed before the run header existed: nothing to load
        else:
            counts.append(_check_store_run(run))
            tmp_left += any(n.startswith(".tmp-") for d in ("tensors", "snapshots")
                            for n in os.listdir(os.path.join(run, d)))
            # Continue the killed run (its lock died with the process).
            done = counts[-1]
            w = RunWriter.open(run, _store_info(), settings={}, versions={}, durable=False)
            for step in range(done - 1, STORE_STEPS - 1):
                from keras_weightwatch.capture import Snapshot

                snap = Snapshot(step=step, label="initial" if step == -1 else "epoch",
                                epoch=None if step == -1 else step, arrays=store_arrays(step),
                                logs={} if step == -1 else {"loss": float(step)})
                w.commit_snapshot(snap, w.store_tensors(snap), {})
            w.close()
            assert _check_store_run(run, STORE_STEPS) == STORE_STEPS
    # The kills landed all over the window: several distinct stages were observed.
    assert killed >= STORE_TRIALS // 2
    assert len(set(counts)) >= 3, counts
    print(f"store trials: {STORE_TRIALS}, killed {killed}, snapshots visible {sorted(counts)}, "
          f"left a temporary file {tmp_left}")


def _store_info():
    from keras_weightwatch.capture import ModelInfo, WeightSpec

    specs = tuple(
        WeightSpec(key=k, path="m/" + k, layer=k.rsplit("/", 1)[0] if "/" in k else "",
                   shape=a.shape, dtype=a.dtype.name, trainable=k != "frozen/kernel")
        for k, a in store_arrays(0).items()
    )
    return ModelInfo(name="m", class_name="Fake", layers=(), weights=specs)


# ------------------------------------------------------------------ keras trials


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _refs(path: str) -> dict[int, str]:
    """Step -> digest of get_weights() from a reference file (clock lines left out)."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] != "clock":
                    out[int(parts[1])] = parts[2]
    return out


def _clock(path: str, what: str) -> float:
    with open(path) as f:
        for line in f:
            if line.startswith(f"clock {what} "):
                return float(line.split()[2])
    raise AssertionError(f"no clock {what} in {path}")


def _check_keras_run(run: str, refs: dict[int, str]) -> list[int]:
    loaded = load_run(run)
    report = loaded.verify()
    assert report.ok, report.problems
    for snap in loaded.snapshots:
        assert snap.step in refs, (snap.step, sorted(refs))
        assert _digest(loaded.weights(snap.step).values()) == refs[snap.step], snap.step
    return loaded.steps


def test_sigkill_during_fit_never_breaks_the_run_and_fit_continues(tmp_path, server):
    full_run, full_ref = str(tmp_path / "full"), str(tmp_path / "full.ref")
    full = server.call(kind="keras", run=full_run, ref=full_ref, epochs=KERAS_EPOCHS,
                       resume=False)
    _check_child_ok(full, server)
    assert _check_keras_run(full_run, _refs(full_ref)) == list(range(-1, KERAS_EPOCHS))
    # Kill times are uniform over fit (train begin to WeightWatch's last write), which is
    # mostly capturing and writing here: one batch per epoch, 1.8 MB per snapshot, fsync.
    begin = _clock(full_ref, "begin") - full["t0"]
    end = _clock(full_ref, "end") - full["t0"]

    rng = np.random.default_rng(7)
    stages = []
    for trial in range(KERAS_TRIALS):
        run, ref = str(tmp_path / f"k{trial}"), str(tmp_path / f"k{trial}.ref")
        res = server.call(kind="keras", run=run, ref=ref, epochs=KERAS_EPOCHS, resume=False,
                          delay=float(rng.uniform(begin, end)))
        _check_child_ok(res, server)
        refs = _refs(ref)
        steps = _check_keras_run(run, refs) if is_run(run) else None
        if steps is not None:
            assert steps == list(range(-1, len(steps) - 1))
        stages.append(-2 if steps is None else len(steps))
        # Continue in a fresh process with fit(initial_epoch=k), k = the run's next epoch.
        ref2 = ref + ".2"
        res2 = server.call(kind="keras", run=run, ref=ref2, epochs=2, resume=True)
        _check_child_ok(res2, server)
        assert not res2["killed"]
        refs2 = _refs(ref2)
        resumed_from = min(refs2) + 1  # the initial_epoch the continuation used
        if steps:  # it restarted from the run's last snapshot, exactly
            assert refs2[resumed_from - 1] == refs[steps[-1]]
        expected = list(steps or []) + list(range(resumed_from, resumed_from + 2))
        if not steps:
            expected = [-1, 0, 1]  # nothing was complete: the continuation starts the run
        all_refs = {**refs, **refs2} if steps else refs2
        assert _check_keras_run(run, all_refs) == expected
    assert len(set(stages)) >= 2, stages
    print(f"keras trials: {KERAS_TRIALS}, snapshots visible at the kill: {stages}")
