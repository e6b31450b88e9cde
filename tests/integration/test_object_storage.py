"""Runs in a bucket: real `fit`s into a real S3-compatible server (moto's server mode).

The server is started by a fixture on 127.0.0.1 on a free port, with dummy
credentials and `AWS_ENDPOINT_URL`; nothing assumes it is running. An outage
is made by a TCP proxy on loopback that drops every connection for a while
(restarting moto would lose its in-memory bucket, which is not what a real
store does, so the proxy is the honest way to show an endpoint that is away
and comes back with its data).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

import keras  # noqa: E402
from fit_helpers import _data, _mlp  # noqa: E402

from keras_weightwatch import WeightWatch, WeightWatchWarning, load_run, verify_run  # noqa: E402
from keras_weightwatch.run.remote import FsspecStorage  # noqa: E402

SECRET = "wwSECRET-7f3a9c-do-not-store"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free loopback port, with the environment pointed at it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _wait_port(port, proc)
        yield env["AWS_ENDPOINT_URL"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket; yields its name. The s3fs instance cache is cleared around it."""
    import s3fs

    name = "ww-" + request.node.name.lower().replace("_", "-")[:40]
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield name
    s3fs.S3FileSystem.clear_instance_cache()


def _objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    client = boto3.client("s3", endpoint_url=endpoint)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return out


def _recorded_fit(url, epochs=2, **kwargs):
    keras.utils.set_random_seed(0)
    model = _mlp()
    x, y = _data()
    weights = {}

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            weights[epoch] = [np.array(w, copy=True) for w in self.model.get_weights()]

    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0,
              callbacks=[WeightWatch(url, **kwargs), Record()])
    return model, weights


def test_fit_into_a_bucket_equals_get_weights_and_verifies(s3_server, bucket, tmp_path):
    url = f"s3://{bucket}/runs/exp1"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        model, weights = _recorded_fit(url)
    finally:
        os.chdir(cwd)
    assert os.listdir(tmp_path) == []  # nothing local: no directory named "s3:"
    run = load_run(url)
    assert run.epochs == [0, 1]
    for epoch, expected in weights.items():
        got = list(run.weights(epoch).values())
        assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    report = verify_run(url)
    assert report.ok and report.snapshots == 3
    keys = set(_objects(s3_server, bucket))
    assert f"runs/exp1/{'.weightwatch.lock'}" not in keys  # the lease is given back
    events = sorted(k for k in keys if "/weights/events.out.tfevents." in k)
    assert len(events) == 3  # one event object per snapshot, names in write order


def test_event_objects_read_by_tensorboard_in_step_order(s3_server, bucket, tmp_path):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea

    url = f"s3://{bucket}/r"
    _recorded_fit(url, epochs=3)
    local = tmp_path / "weights"
    local.mkdir()
    for key, body in _objects(s3_server, bucket).items():
        if "/weights/" in key:
            (local / key.rsplit("/", 1)[-1]).write_bytes(body)
    acc = pea.EventAccumulator(str(local), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    steps = [e.step for e in acc.Tensors("head/kernel/l2_norm")]
    assert steps == [-1, 0, 1, 2]
    run = load_run(url)
    kernel = run.weights(2)["head/kernel"]
    value = float(np.asarray(acc.Tensors("head/kernel/l2_norm")[-1].tensor_proto.float_val[0]))
    assert value == pytest.approx(float(np.linalg.norm(kernel)), rel=1e-5)


def test_cli_show_verify_and_diff_on_s3_urls(s3_server, bucket):
    a, b = f"s3://{bucket}/a", f"s3://{bucket}/b"
    _recorded_fit(a)
    _recorded_fit(b, epochs=3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cli = [sys.executable, "-m", "keras_weightwatch.cli"]
    show = subprocess.run([*cli, "show", a], capture_output=True, text=True, env=env, timeout=120)
    assert show.returncode == 0, show.stderr
    assert "head/kernel" in show.stdout or "head" in show.stdout
    ver = subprocess.run([*cli, "verify", b], capture_output=True, text=True, env=env, timeout=120)
    assert ver.returncode == 0, ver.stderr
    diff = subprocess.run([*cli, "diff", f"{b}@0", f"{b}@2"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert diff.returncode == 0, diff.stderr
    run = load_run(b)
    delta = np.linalg.norm(run.weights(2)["head/kernel"] - run.weights(0)["head/kernel"])
    assert delta > 0 and "head" in diff.stdout


def test_responses_dir_in_the_bucket_holds_the_event_files_pngs(s3_server, bucket, tmp_path,
                                                                 monkeypatch):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    monkeypatch.chdir(tmp_path)  # a local directory named "s3:" would appear here
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).random((8, 8, 8, 1)).astype("float32")
    cb = WeightWatch(str(tmp_path / "run"), sample_images=x[:2], kernel_images=False,
                     histograms=False, responses_dir=f"s3://{bucket}/pngs")
    model.fit(x, x[:, :1, 0, 0], epochs=1, verbose=0, callbacks=[cb])
    assert sorted(os.listdir(tmp_path)) == ["run"]
    acc = pea.EventAccumulator(str(tmp_path / "run" / "weights"), {pea.TENSORS: 0})
    acc.Reload()
    tags = sorted(t for t in acc.Tags()["tensors"] if "/1_responses/conv/" in t)
    objects = _objects(s3_server, bucket)
    assert len(tags) == 2 and len(objects) == 2 * 2  # 2 samples x (initial, epoch 0)
    for i, tag in enumerate(tags):
        for event in acc.Tensors(tag):
            png = tensor_util.make_ndarray(event.tensor_proto)[2]
            assert objects[f"pngs/conv/sample_{i}/step_{event.step}.png"] == png


def test_secret_in_storage_options_never_stored_or_shown(s3_server, bucket):
    options = {"key": "testing", "secret": SECRET, "endpoint_url": s3_server}
    cb = WeightWatch(f"s3://{bucket}/sec", storage_options=options)
    assert SECRET not in repr(cb.settings) and SECRET not in json.dumps(cb.get_config())
    keras.utils.set_random_seed(0)
    model = _mlp()
    x, y = _data()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[cb])
    objects = _objects(s3_server, bucket)
    assert any(k.endswith("weightwatch.json") for k in objects)
    assert not [k for k, body in objects.items() if SECRET.encode() in body]
    assert load_run(f"s3://{bucket}/sec", storage_options=options).verify().ok
    # An error with the same options (a bucket that does not exist) names the URL, not the secret.
    with pytest.warns(WeightWatchWarning) as caught:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[
            WeightWatch("s3://no-such-bucket-ww/run", storage_options=options)])
    text = " ".join(str(w.message) for w in caught)
    assert "s3://no-such-bucket-ww/run" in text and SECRET not in text


def test_no_such_bucket_is_reported_at_train_begin_with_url_and_cause(s3_server):
    epochs_run = []

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epochs_run.append(epoch)

    model = _mlp()
    x, y = _data()
    with pytest.warns(WeightWatchWarning) as caught:
        model.fit(x, y, epochs=2, verbose=0,
                  callbacks=[WeightWatch("s3://missing-bucket-ww/run"), Epochs()])
    first = str(caught[0].message)
    assert "s3://missing-bucket-ww/run" in first and "bucket" in first.lower()
    assert epochs_run == [0, 1]  # reported before the first epoch; training went on
    strict = WeightWatch("s3://missing-bucket-ww/run", strict=True)
    with pytest.raises(Exception, match="missing-bucket-ww"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[strict])


class FlakyProxy:
    """A TCP proxy on loopback to the S3 server; `down()` drops every connection until `up()`."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.is_down = False
        self.dropped = 0
        self.first_drop = 0.0
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.is_down:
                self.dropped += 1
                self.first_drop = self.first_drop or time.monotonic()
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def down(self):
        self.is_down = True
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conns = []

    def up(self):
        self.is_down = False

    def up_after_refusing_for(self, seconds: float):
        """Come back once connections were refused for `seconds` (longer than the client
        library's own retries, so the writer's retries must carry the outage)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
                self.first_drop and time.monotonic() - self.first_drop > seconds):
            time.sleep(0.05)
        self.up()

    def close(self):
        self.sock.close()


def test_endpoint_down_for_a_while_warns_once_and_resumes(s3_server, bucket):
    port = int(s3_server.rsplit(":", 1)[1])
    proxy = FlakyProxy(port)
    options = {"endpoint_url": f"http://127.0.0.1:{proxy.port}",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    url = f"s3://{bucket}/flaky"
    outage = {}

    class Outage(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                proxy.down()
                outage["start"] = time.monotonic()
                threading.Thread(target=proxy.up_after_refusing_for, args=(10.0,)).start()

    keras.utils.set_random_seed(0)
    model = _mlp()
    x, y = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=5, batch_size=8, verbose=0,
                  callbacks=[Outage(), WeightWatch(url, storage_options=options, max_queue=8)])
    proxy.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, WeightWatchWarning)]
    assert proxy.dropped > 0
    assert sum("retrying" in m for m in messages) == 1, messages
    assert any("reachable again" in m for m in messages), messages
    run = load_run(url)  # through the server directly, not the proxy
    assert run.steps == [-1, 0, 1, 2, 3, 4]  # nothing completed was lost
    assert run.verify().ok


_KILLED_CHILD = r"""
import os, sys, numpy as np, keras
from keras_weightwatch import WeightWatch
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(1024), keras.layers.Dense(256)])
model.compile("adam", "mse")
x = np.random.rand(64, 256).astype("float32")
model.fit(x, x, epochs=500, batch_size=64, verbose=0, callbacks=[WeightWatch(sys.argv[1])])
"""


def test_sigkill_mid_upload_leaves_listed_snapshots_that_verify(s3_server, bucket):
    url = f"s3://{bucket}/killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), KERAS_BACKEND="jax")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, url], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = boto3.client("s3", endpoint_url=s3_server)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            listed = client.list_objects_v2(Bucket=bucket, Prefix="killed/snapshots/")
            if listed.get("KeyCount", 0) >= 3:
                break
            time.sleep(0.05)
        time.sleep(0.13)  # land somewhere inside a later snapshot's uploads
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run = load_run(url)
    assert len(run.snapshots) >= 3
    report = run.verify()
    assert report.ok, report.problems
    for snap in run.snapshots:
        assert set(run.weights(snap.step)) == {s.key for s in run.specs}
    lease = json.loads(client.get_object(Bucket=bucket, Key="killed/.weightwatch.lock")["Body"]
                       .read())
    assert "pid" in lease["owner"] and lease["expires"] > time.time() - 120


def test_lease_refuses_a_second_writer_until_it_expires(s3_server, bucket):
    from keras_weightwatch.run.storage import LockHeld

    first = FsspecStorage(f"s3://{bucket}/leased")
    lease = first.lock(".weightwatch.lock", "pid 1")
    second = FsspecStorage(f"s3://{bucket}/leased")
    with pytest.raises(LockHeld, match="pid 1"):
        second.lock(".weightwatch.lock", "pid 2")
    lease._stop.set()  # the first writer dies: its lease is no longer renewed
    client = boto3.client("s3", endpoint_url=s3_server)
    body = json.dumps({"owner": "pid 1", "token": lease.token, "expires": time.time() - 60})
    client.put_object(Bucket=bucket, Key="leased/.weightwatch.lock", Body=body.encode())
    taken = second.lock(".weightwatch.lock", "pid 2")
    held = json.loads(client.get_object(Bucket=bucket, Key="leased/.weightwatch.lock")["Body"]
                      .read())
    assert held["owner"].startswith("pid 2") and held["expires"] > time.time()
    taken.release()
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="leased/")


_TENSORBOARD_WITHOUT_TF = r"""
import sys

class HideTensorFlow:  # TensorBoard reads s3:// by its own boto3 file system only without TF
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, HideTensorFlow())
from tensorboard import main
sys.argv = ["tensorboard", "--logdir", sys.argv[1], "--host", "127.0.0.1", "--port", sys.argv[2],
            "--load_fast=false", "--reload_interval=1"]
main.run_main()
"""


def _get_json(url, timeout=2):
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def test_tensorboard_without_tensorflow_serves_the_views_from_the_bucket(s3_server, bucket):
    url = f"s3://{bucket}/tb/exp1"
    _recorded_fit(url, epochs=2)
    run = load_run(url)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), S3_ENDPOINT=s3_server)
    proc = subprocess.Popen([sys.executable, "-c", _TENSORBOARD_WITHOUT_TF, url, str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/data/plugin/scalars"
    tag = "head/kernel/l2_norm"
    try:
        deadline, points = time.monotonic() + 90, []
        while time.monotonic() < deadline and len(points) < 3:
            time.sleep(1)
            try:
                tags = _get_json(f"{base}/tags")
                if tag in tags.get("weights", {}):
                    points = _get_json(f"{base}/scalars?run=weights&tag={tag}")
            except OSError:
                continue
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert [p[1] for p in points] == [-1, 0, 1]
    expected = [float(np.linalg.norm(run.weights(s)["head/kernel"])) for s in (-1, 0, 1)]
    assert [p[2] for p in points] == pytest.approx(expected, rel=1e-5)
