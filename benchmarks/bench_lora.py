"""What a snapshot of a LoRA fine-tune costs when only the adapters train.

Issue 24, item 5. A large frozen base (a stack of `Dense` and `EinsumDense` layers of
`--width` x `--width` kernels, no biases, alternating; the depth chosen so the kernels total
`--params` parameters) with rank-`--rank` LoRA on every kernel (`layer.enable_lora`), fitted
with `WeightWatch` and its defaults (statistics, histograms, snapshots every epoch), one batch
of 8 per epoch. Per snapshot, medians over the epochs after the first, each beside its floor
measured in the same process:

- **hold**: the training thread's time inside `on_epoch_end` (the copy of every weight into
  the host buffers), against a warm memcpy of all the weights (`np.copyto` of every weight
  into buffers already touched, best of 3);
- **worker CPU**: CPU time (user + sys, psutil's per-thread times) of the whole process
  from the end of `on_epoch_end` until the worker is idle again, the training thread left
  out (the next epoch starts only once the worker is idle, so nothing else runs: this counts
  the worker thread, any thread it starts, and the BLAS threads its matrix products use),
  against libc `memcmp` of every weight's bytes against a copy of them (the CPU time of
  one thread, best of 3). The CPU of the threads WeightWatch started alone is printed
  beside it;
- **bytes written**: the bytes added under the run directory (tensor files, snapshot file,
  index line, TensorBoard events), against the bytes of the adapters (every `lora_*`
  variable).

It also checks what a frozen base must cost: each base kernel is stored in one tensor file
named by every snapshot, and the bytes the writer hashes per snapshot (the content hash of
each tensor file it writes) are the adapters' bytes, never the base's.

Each size runs in a process of its own (`--params 1e8,4e8,1e9` runs three in turn), so the
memory of one is given back before the next; a size whose weights need more memory than is
available (about 4 x the weight bytes: the model, WeightWatch's buffer sets, the floors'
copy) is skipped with the reason printed.

Run:  .venv/bin/python benchmarks/bench_lora.py --params 1e8,4e8 --markdown
      .venv/bin/python benchmarks/bench_lora.py --params 1e9 --markdown   (alone: ~17 GB RSS)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

MEASURES = (
    ("hold", "`on_epoch_end` hold", "warm memcpy of all weights", 1.5),
    ("worker", "worker CPU", "libc memcmp of all weights' bytes", 2.0),
    ("bytes", "bytes written", "adapters' bytes", 1.1),
)


def build(width: int, depth: int, rank: int):
    import keras

    layers: list = [keras.Input((width,))]
    for i in range(depth):
        if i % 2:
            layers.append(keras.layers.EinsumDense("ab,bc->ac", output_shape=width,
                                                   name=f"einsum_{i}"))
        else:
            layers.append(keras.layers.Dense(width, use_bias=False, name=f"dense_{i}"))
    model = keras.Sequential(layers)
    for layer in model.layers:
        layer.enable_lora(rank)
    model.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse")
    return model


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


_libc = ctypes.CDLL(None)
_libc.memcmp.restype = ctypes.c_int
_libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def floors(arrays: list[np.ndarray], repeats: int = 3) -> tuple[float, float]:
    """(warm memcpy wall time, memcmp CPU time) of every array, each the best of `repeats`."""
    copies = [np.array(a, copy=True) for a in arrays]  # touched: the copies are warm
    copy = cmp = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d, a in zip(copies, arrays):
            np.copyto(d, a)
        copy = min(copy, time.perf_counter() - t0)
        c0 = time.thread_time()
        same = all(_libc.memcmp(a.ctypes.data, d.ctypes.data, a.nbytes) == 0
                   for a, d in zip(arrays, copies))
        cmp = min(cmp, time.thread_time() - c0)
        assert same
    return copy, cmp


class Meter:
    """A Keras callback placed before WeightWatch: each epoch starts once WeightWatch's
    worker is idle; it records, per snapshot, the process's CPU from the end of
    `on_epoch_end` (or train begin) until then without the training thread's, the CPU of the
    threads WeightWatch started, and the bytes under the run directory."""

    def __init__(self, ww, started, log_dir: str):
        import threading

        import keras
        import psutil

        proc = psutil.Process()
        main_tid = None
        self.worker: list[float] = []
        self.threads: list[float] = []
        self.sizes: list[int] = []
        self.hashed: list[int] = []
        mark: dict[str, float] = {}

        def cpu() -> tuple[float, float, float]:
            total = main = own = 0.0
            for t in proc.threads():
                c = t.user_time + t.system_time
                total += c
                main += c if t.id == main_tid else 0.0
                own += c if t.id in started.thread_ids else 0.0
            return total, main, own

        def start() -> None:
            mark["total"], mark["main"], mark["own"] = cpu()

        class Callback(keras.callbacks.Callback):
            def on_train_begin(cb, logs=None):  # noqa: N805
                nonlocal main_tid
                main_tid = threading.get_native_id()

            def on_epoch_begin(cb, epoch, logs=None):  # noqa: N805
                if ww.pipeline is not None:
                    ww.pipeline.join()
                if mark:
                    total, main, own = cpu()
                    self.worker.append(total - mark["total"] - (main - mark["main"]))
                    self.threads.append(own - mark["own"])
                self.sizes.append(du(log_dir))
                self.hashed.append(HASHED[0])

        self.callback = Callback()
        self.start = start


HASHED = [0]


def count_hashed_bytes() -> None:
    """Count the bytes the run writer hashes (each tensor file it names by its content)."""
    from keras_weightwatch.run.format import Encoded

    digest = Encoded.digest

    def counted(self, hash_name):
        HASHED[0] += self.nbytes
        return digest(self, hash_name)

    Encoded.digest = counted  # type: ignore[method-assign]


def check_base_stored_once(log_dir: str, model) -> tuple[int, int]:
    """(tensor files under the run, files holding a base kernel); raise when a base kernel
    is named by more than one file over the run's snapshots."""
    from keras_weightwatch import load_run

    run = load_run(log_dir)
    bases = {f"{layer.name}/kernel" for layer in model.layers}
    files: dict[str, set[str]] = {k: set() for k in bases}
    for step in run.steps:
        for key, rec in run.snapshot(step).tensors.items():
            if key in files:
                files[key].add(rec.file)
    twice = {k: sorted(v) for k, v in files.items() if len(v) != 1}
    if twice:
        raise SystemExit(f"a frozen base was stored more than once: {twice}")
    n_files = len(os.listdir(os.path.join(log_dir, "tensors")))
    return n_files, len(bases)


def fit_with_weightwatch(model, x, y, log_dir: str, epochs: int) -> dict[str, list[float]]:
    """Fit with WeightWatch and the meters; per snapshot: the hold, the worker's CPU (the
    process's, and the threads WeightWatch started), the bytes added, the bytes hashed."""
    from common import CostMeter, TimedWeightWatch

    ww = TimedWeightWatch(log_dir)
    cost = CostMeter(ww)
    meter = Meter(ww, cost, log_dir)
    end_hook = ww.on_epoch_end

    def on_epoch_end(epoch, logs=None):
        end_hook(epoch, logs)
        meter.start()

    ww.on_epoch_end = on_epoch_end
    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, callbacks=[meter.callback, ww])
    return {"hold": ww.hook_times["on_epoch_end"], "worker": meter.worker,
            "threads": meter.threads,
            "bytes": [b - a for a, b in zip(meter.sizes[1:], meter.sizes[2:])],
            "hashed": [b - a for a, b in zip(meter.hashed[1:], meter.hashed[2:])]}


def one(params: int, width: int, rank: int, epochs: int, root: str) -> dict:
    """Measure one size in this process; return the row (medians over the snapshots after
    the first epoch's)."""
    import keras
    from common import med

    from keras_weightwatch.capture import _host_view

    depth = max(1, round(params / (width * width)))
    keras.utils.set_random_seed(0)
    model = build(width, depth, rank)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, width), dtype=np.float32)
    y = rng.standard_normal((8, width), dtype=np.float32)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)  # trace and allocate first
    count_hashed_bytes()
    log_dir = os.path.join(root, f"run{params}")
    got = fit_with_weightwatch(model, x, y, log_dir, epochs)
    files, n_bases = check_base_stored_once(log_dir, model)
    shutil.rmtree(log_dir)
    gc.collect()  # WeightWatch's buffers go before the floors copy the weights
    weights = [_host_view(v) for v in model.weights]  # the variables' memory, no copy
    adapters = sum(w.nbytes for v, w in zip(model.weights, weights) if "lora_" in v.path)
    base = sum(w.nbytes for v, w in zip(model.weights, weights) if "lora_" not in v.path)
    copy, cmp = floors(weights)
    row = {k: med(v[1:] if k in ("hold", "worker", "threads") else v) for k, v in got.items()}
    return {**row, "params": int(sum(w.size for w in weights)), "base": base,
            "adapters": adapters, "layers": depth, "width": width, "snapshots": epochs + 1,
            "files": files, "bases": n_bases, "copy": copy, "cmp": cmp}


def print_row(r: dict) -> None:
    print(f"  {r['params']:,} parameters ({r['layers']} x ({r['width']}, {r['width']}) frozen "
          f"kernels, {r['base'] / 1e6:,.0f} MB; adapters {r['adapters'] / 1e6:.2f} MB), "
          f"{r['snapshots']} snapshots:")
    print(f"    hold {r['hold'] * 1e3:.2f} ms, warm memcpy {r['copy'] * 1e3:.2f} ms: "
          f"RATIO {r['hold'] / r['copy']:.2f}")
    print(f"    worker CPU {r['worker'] * 1e3:.2f} ms (threads WeightWatch started "
          f"{r['threads'] * 1e3:.1f} ms), memcmp {r['cmp'] * 1e3:.2f} ms: "
          f"RATIO {r['worker'] / r['cmp']:.2f}")
    print(f"    bytes written {r['bytes']:,.0f}, adapters {r['adapters']:,}: "
          f"RATIO {r['bytes'] / r['adapters']:.3f}")
    print(f"    hashed per snapshot {r['hashed']:,.0f} bytes; tensor files {r['files']} for "
          f"{r['snapshots']} snapshots, each of the {r['bases']} base kernels in one file")


def markdown(rows: list[dict]) -> None:
    from tables import command_line

    print(f"\nMeasured with `{command_line()}`:\n")
    print("| parameters (frozen base) | adapters | "
          + " | ".join(f"{name} / {floor}" for _, name, floor, _ in MEASURES) + " |")
    print("|---:|---:|" + "---:|" * len(MEASURES))
    for r in rows:
        cells = [f"{r['hold'] * 1e3:.0f} / {r['copy'] * 1e3:.0f} ms = "
                 f"**{r['hold'] / r['copy']:.2f}**",
                 f"{r['worker'] * 1e3:.0f} / {r['cmp'] * 1e3:.0f} ms = "
                 f"**{r['worker'] / r['cmp']:.2f}**",
                 f"{r['bytes'] / 1e6:.2f} / {r['adapters'] / 1e6:.2f} MB = "
                 f"**{r['bytes'] / r['adapters']:.3f}**"]
        print(f"| {r['base'] // 4:,} | {r['adapters'] // 4:,} | " + " | ".join(cells) + " |")
    print("| target | | " + " | ".join(f"<= {t}" for *_, t in MEASURES) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default="1e8,4e8,1e9",
                   help="comma-separated sizes of the frozen base (parameters)")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5,
                   help="at least 3: the medians are of the snapshots after the first epoch's")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--dir", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.epochs < 3:
        p.error(f"--epochs must be at least 3. Received: epochs={args.epochs}")
    sizes = [int(float(s)) for s in args.params.split(",")]
    if args.one:
        root = tempfile.mkdtemp(prefix="ww-bench-lora-", dir=args.dir)
        try:
            row = one(sizes[0], args.width, args.rank, args.epochs, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print("ROW " + json.dumps(row))
        return 0
    import keras  # noqa: F401 (for the machine line's versions)
    from common import machine

    print(f"machine: {machine()}")
    sys.stdout.flush()
    rows = [row for params in sizes if (row := run_size(params, args)) is not None]
    if args.markdown and rows:
        markdown(rows)
    return 0


def run_size(params: int, args) -> dict | None:
    from machine import available_bytes

    need = 4 * 4 * params * 1.1
    if need > available_bytes():
        print(f"skipped {params:,} parameters: about {need / 1e9:.1f} GB needed, "
              f"{available_bytes() / 1e9:.1f} GB available")
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--one", "--params", str(params),
           "--width", str(args.width), "--rank", str(args.rank), "--epochs", str(args.epochs)]
    if args.dir:
        cmd += ["--dir", args.dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        print(proc.stdout[-2000:] + proc.stderr[-3000:])
        raise SystemExit(f"the measure at {params:,} parameters failed")
    row = json.loads(rows[0])
    print_row(row)
    sys.stdout.flush()
    return row


if __name__ == "__main__":
    raise SystemExit(main())
