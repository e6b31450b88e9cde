"""Runs written with numpy alone (no Keras) and numpy oracles, for the comparison tests.

Import as `from compare_runs import ...`; each test module defines its own `run_dir` fixture from
`write_run(tmp_path / "run", epochs())`.
"""

from __future__ import annotations

import io

import numpy as np

from keras_weightwatch.capture import LayerInfo, ModelInfo, Snapshot, WeightSpec
from keras_weightwatch.cli import main
from keras_weightwatch.run import RunWriter

LAYERS = [
    ("conv1", "Conv2D"),
    ("bn", "BatchNormalization"),
    ("conv2", "Conv2D"),
    ("dense", "Dense"),
    ("out", "Dense"),
]


def weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A small CNN's weights: conv(1->4) bn conv(4->6) flatten(2x2x6) dense(24->5) dense(5->1)."""
    def f(*shape):
        return rng.normal(size=shape).astype("float32")

    return {
        "conv1/kernel": f(3, 3, 1, 4),
        "conv1/bias": f(4),
        "bn/gamma": f(4),
        "bn/beta": f(4),
        "bn/moving_mean": f(4),
        "bn/moving_variance": np.abs(f(4)),
        "conv2/kernel": f(3, 3, 4, 6),
        "conv2/bias": f(6),
        "dense/kernel": f(24, 5),
        "dense/bias": f(5),
        "out/kernel": f(5, 1),
        "out/bias": f(1),
    }


def write_run(path, snapshots, layers=LAYERS, settings=None, derived=()) -> str:
    """Write a run directory without Keras: `snapshots` is a list of (label, step, arrays), or
    of (label, step, arrays, stats) with the statistics to store (weight key -> name -> number);
    `derived` the header's `Derivation`s (LoRA, quantized kernels)."""
    first = snapshots[0][2]
    specs = tuple(
        WeightSpec(key=k, path=f"model/{k}", layer=k.rsplit("/", 1)[0], shape=a.shape,
                   dtype=a.dtype.name, trainable=True)
        for k, a in first.items()
    )
    info = ModelInfo("model", "Sequential", tuple(LayerInfo(n, c, 0, 0, 0) for n, c in layers),
                     specs, derived=tuple(derived))
    writer = RunWriter.open(str(path), info, settings=settings or {}, versions={}, durable=False)
    try:
        for label, step, arrays, *stats in snapshots:
            snap = Snapshot(step=step, label=label, epoch=None if label == "initial" else step,
                            arrays=dict(arrays),
                            logs={"loss": 1.0 / (step + 2)})
            writer.commit_snapshot(snap, writer.store_tensors(snap), *stats)
    finally:
        writer.close()
    return str(path)


def epochs(n: int = 3, seed: int = 0) -> list[tuple[str, int, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    w = weights(rng)
    w["conv1/bias"][:] = 0  # zeros, as Keras initialises biases
    out = [("initial", -1, w)]
    for step in range(n - 1):
        w = {k: (v + 0.1 * (step + 1) * rng.normal(size=v.shape)).astype(v.dtype)
             for k, v in w.items()}
        w["bn/moving_variance"] = np.abs(w["bn/moving_variance"])
        w["out/bias"] = out[-1][2]["out/bias"]  # a frozen tensor
        out.append(("epoch", step, w))
    return out


def permuted(w: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """The same network with the units of conv1, conv2 and dense permuted (and their inputs)."""
    rng = np.random.default_rng(seed)
    p1, p2, p3 = rng.permutation(4), rng.permutation(6), rng.permutation(5)
    while np.all(p1 == np.arange(4)):
        p1 = rng.permutation(4)
    q = dict(w)
    q["conv1/kernel"] = w["conv1/kernel"][..., p1]
    q["conv1/bias"] = w["conv1/bias"][p1]
    for k in ("gamma", "beta", "moving_mean", "moving_variance"):
        q[f"bn/{k}"] = w[f"bn/{k}"][p1]
    q["conv2/kernel"] = w["conv2/kernel"][:, :, p1, :][..., p2]
    q["conv2/bias"] = w["conv2/bias"][p2]
    # Flatten of (2, 2, 6) puts channels fastest: rows are (position, channel).
    q["dense/kernel"] = w["dense/kernel"].reshape(4, 6, 5)[:, p2, :].reshape(24, 5)[:, p3]
    q["dense/bias"] = w["dense/bias"][p3]
    q["out/kernel"] = w["out/kernel"][p3]
    return q


def perm_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each unit of `a`, the unit of `b` with the same sorted values (brute force)."""
    a2 = np.sort(a.reshape(-1, a.shape[-1]), axis=0)
    b2 = np.sort(b.reshape(-1, b.shape[-1]), axis=0)
    return np.array([next(j for j in range(b2.shape[1]) if np.array_equal(a2[:, i], b2[:, j]))
                     for i in range(a2.shape[1])])


def oracle(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    d = b64 - a64
    return {
        "rel_l2": np.linalg.norm(d) / np.linalg.norm(a64),
        "cosine": a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)),
        "max_abs": np.max(np.abs(d)),
        "rms": np.sqrt(np.mean(d * d)),
    }


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()
