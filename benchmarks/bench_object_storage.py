"""Snapshots into an S3-compatible server next to the local disk: upload throughput and worker time.

Starts moto's S3 server on a free loopback port (dummy credentials), then fits the same
model twice per repeat, interleaved: into a local run directory (`durable=True`, fsync)
and into `s3://bench/run-N`. The views are off, so the worker's time per snapshot is
the time to store it (hash, encode, upload or write, commit its record). Printed per
place: the median worker time per snapshot, the bytes of a snapshot, the throughput
(bytes / worker time) and the training thread's hold in `on_epoch_end`.

    python benchmarks/bench_object_storage.py                  # the reference CNN (2.0M)
    python benchmarks/bench_object_storage.py --model dense --width 4096 --depth 6  # 100M
    (100.7M parameters: 403 MB a snapshot; each finished run is deleted before the next)
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before Keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import WORKER_TIMES, TimedWeightWatch, machine, med, time_worker  # noqa: E402
from tables import print_markdown  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, str]:
    """moto's server on a free port, the environment pointed at it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=url)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
    return proc, url


def build(kind: str, width: int, depth: int) -> tuple[keras.Model, np.ndarray, np.ndarray]:
    keras.utils.set_random_seed(0)
    if kind == "cnn":
        model = keras.Sequential([
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
        x = np.random.rand(256, 28, 28, 1).astype("float32")
        y = np.random.randint(0, 10, 256).astype("float32")
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model, x, y
    layers = [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(depth)]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(1e-4), "mse")
    x = np.random.rand(64, width).astype("float32")
    return model, x, x


def one_fit(kind: str, width: int, depth: int, epochs: int, log_dir: str) -> dict[str, float]:
    model, x, y = build(kind, width, depth)
    cb = TimedWeightWatch(log_dir, histograms=False, kernel_images=False)
    WORKER_TIMES.clear()
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, callbacks=[cb])
    nbytes = sum(w.nbytes for w in model.get_weights())
    worker = med(WORKER_TIMES[1:])  # the initial snapshot writes the run's header too
    return {"worker": worker, "bytes": nbytes, "hold": med(cb.hook_times["on_epoch_end"][1:])}


def remove(where: str) -> None:
    """Delete a finished run, so that the repeats of a large model fit in memory and on disk."""
    if where.startswith("s3://"):
        import fsspec

        fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).rm(
            where, recursive=True)
    else:
        shutil.rmtree(where, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("cnn", "dense"), default="cnn")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    time_worker()
    proc, endpoint = start_s3()
    results: dict[str, list[dict[str, float]]] = {"local disk": [], "S3 (moto)": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                for place in results:
                    where = (os.path.join(tmp, f"run-{r}") if place == "local disk"
                             else f"s3://bench/run-{r}")
                    results[place].append(
                        one_fit(args.model, args.width, args.depth, args.epochs, where))
                    remove(where)  # moto keeps objects in memory: 400 MB a snapshot at 100M
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    print(f"model: {args.model}, {results['local disk'][0]['bytes'] / 1e6:.1f} MB of weights, "
          f"{args.epochs} epochs, {args.repeats} repeats, views off; endpoint {endpoint}")
    for place, runs in results.items():
        worker = med([x["worker"] for x in runs])
        nbytes = runs[0]["bytes"]
        hold = med([x["hold"] for x in runs])
        print(f"{place:<12} worker {worker * 1e3:9.1f} ms/snapshot  {nbytes / worker / 1e6:8.1f} "
              f"MB/s  hold {hold * 1e3:7.2f} ms")
    local = med([x["worker"] for x in results["local disk"]])
    s3 = med([x["worker"] for x in results["S3 (moto)"]])
    print(f"RATIO S3 worker time / local disk worker time: {s3 / local:.2f}")
    if args.markdown:
        rows = []
        for place, runs in results.items():
            worker = med([x["worker"] for x in runs])
            rows.append((place, f"{runs[0]['bytes'] / 1e6:.1f} MB", f"{worker * 1e3:.1f} ms",
                         f"{runs[0]['bytes'] / worker / 1e6:.1f} MB/s",
                         f"{med([x['hold'] for x in runs]) * 1e3:.2f} ms"))
        rows.append(("S3 / local disk", "", f"**{s3 / local:.2f}**", "", ""))
        print_markdown(["where", "weights per snapshot", "worker time per snapshot", "throughput",
                        "training-thread hold"], rows, note=f" on {machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
