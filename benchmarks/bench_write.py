"""How fast RunWriter persists a snapshot, against the same bytes written plainly.

Target (issue 13, item 3): a 100M-parameter snapshot persisted by `RunWriter`
(`store_tensors` + `commit_snapshot`, durable) within 1.5x of the same bytes written with
one `write` + `fsync` per tensor. Both run alternately in one process on fresh directories
of the same disk, every tensor changed since the previous snapshot (the worst case: all
are hashed and written); medians. `--profile` adds a cProfile of the writer for the
reference CNN's weights (2.0M parameters) and for the large set, top functions by own time.

Run:  .venv/bin/python benchmarks/bench_write.py            (about 1 minute on 2 cores)
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from machine import machine
from tables import print_markdown

from keras_weightwatch.capture import ModelInfo, Snapshot, WeightSpec
from keras_weightwatch.run import RunWriter, storage
from keras_weightwatch.run.format import encode_tensor
from keras_weightwatch.scratch import empty

# The reference CNN: Conv32-Pool-Conv64-Flatten-Dense256-Dense10 on 28x28x1.
CNN = {"conv2d/kernel": (3, 3, 1, 32), "conv2d/bias": (32,), "conv2d_1/kernel": (3, 3, 32, 64),
       "conv2d_1/bias": (64,), "dense/kernel": (7744, 256), "dense/bias": (256,),
       "dense_1/kernel": (256, 10), "dense_1/bias": (10,)}


def dense_stack(width: int, depth: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(depth):
        shapes[f"dense_{i}/kernel"] = (width, width)
        shapes[f"dense_{i}/bias"] = (width,)
    return shapes


def info_of(shapes: dict[str, tuple[int, ...]]) -> ModelInfo:
    return ModelInfo("m", "Sequential", (), tuple(
        WeightSpec(k, f"m/{k}", k.split("/")[0], s, "float32", True) for k, s in shapes.items()))


def arrays_of(shapes, seed: int) -> dict[str, np.ndarray]:
    """Random weights in page-aligned buffers from `scratch.empty`, as captures hold them
    (what lets `LocalStorage` write a large tensor past the page cache)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in shapes.items():
        out[k] = empty(s, np.float32)
        out[k][...] = rng.standard_normal(s, dtype=np.float32)
    return out


def raw_write(root: str, arrays: dict[str, np.ndarray]) -> float:
    """The floor: each tensor's bytes in one write, then fsync, then close; one file each."""
    os.makedirs(root)
    t0 = time.perf_counter()
    for i, a in enumerate(arrays.values()):
        fd = os.open(os.path.join(root, f"{i}.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
        view = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t0


def snapshot_cpu(root: str, arrays: dict[str, np.ndarray], drop: bool) -> float:
    """CPU time (this thread's) of writing one snapshot's tensors into new files, each
    followed by fsync and, with `drop`, by POSIX_FADV_DONTNEED as `LocalStorage` does."""
    os.makedirs(root)
    t0 = time.thread_time()
    for i, a in enumerate(arrays.values()):
        path = os.path.join(root, f"{i}.bin")
        with open(path, "xb", buffering=0) as f:
            f.write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
            os.fsync(f.fileno())
            if drop:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return time.thread_time() - t0


def storage_cpu(root: str, arrays: dict[str, np.ndarray], direct: bool) -> float:
    """CPU time (this thread's) of `LocalStorage` writing one snapshot's tensor files,
    durably, as the writer does; with `direct` off, every file is written through the page
    cache (and its pages handed back after the fsync), as before `O_DIRECT`."""
    os.makedirs(root)
    files = [(f"{i}.npy", encode_tensor(a, "float32")) for i, a in enumerate(arrays.values())]
    saved = storage._O_DIRECT
    storage._O_DIRECT = saved if direct else 0
    try:
        t0 = time.thread_time()
        storage.LocalStorage(root).write_atomic_many(
            ((name, (enc.header, enc.data)) for name, enc in files), durable=True)
        return time.thread_time() - t0
    finally:
        storage._O_DIRECT = saved


def page_cache(root: str, snapshots: int) -> None:
    """Writing the reference CNN's snapshots with the page cache growing, handing the
    written pages back, and (`LocalStorage` as it is) its large tensor past the page cache,
    in runs of `snapshots` each way, files kept (deleting them would free their pages)."""
    if snapshots < 1 or not hasattr(os, "posix_fadvise"):
        return
    sets = [arrays_of(CNN, s) for s in (0, 1)]
    mb = sum(a.nbytes for a in sets[0].values()) / 1e6
    ways = {"grow": lambda r, a: snapshot_cpu(r, a, False),
            "drop": lambda r, a: snapshot_cpu(r, a, True),
            "buffered": lambda r, a: storage_cpu(r, a, False),
            "direct": lambda r, a: storage_cpu(r, a, True)}
    cpu: dict[str, list[float]] = {way: [] for way in ways}
    for block in range(2):  # a run of snapshots each way, twice: a fit writes many in a row
        for way, write in ways.items():
            cpu[way] += [write(os.path.join(root, f"pc-{block}-{way}-{i}"), sets[i % 2])
                         for i in range(snapshots)]
    m = {way: statistics.median(times) * 1e3 for way, times in cpu.items()}
    print(f"reference CNN snapshot ({mb:.1f} MB) into new files, CPU of write+fsync, median of "
          f"2 x {snapshots} each way: page cache grows {m['grow']:.1f} ms, pages handed back "
          f"{m['drop']:.1f} ms")
    print(f"RATIO page cache grows / pages handed back: {m['grow'] / m['drop']:.2f}")
    print(f"LocalStorage, CPU of the same snapshot's tensor files: buffered, pages handed back "
          f"{m['buffered']:.1f} ms; large tensors past the page cache (O_DIRECT) "
          f"{m['direct']:.1f} ms")
    print(f"RATIO buffered / past the page cache: {m['buffered'] / m['direct']:.2f}")


def writer_write(writer: RunWriter, step: int, arrays: dict[str, np.ndarray]) -> float:
    snap = Snapshot(step=step, label="epoch", epoch=step, arrays=arrays, logs={"loss": 1.0})
    t0 = time.perf_counter()
    writer.commit_snapshot(snap, writer.store_tensors(snap), {})
    return time.perf_counter() - t0


def profile(label: str, shapes, root: str, top: int) -> None:
    path = os.path.join(root, f"profile-{label}")
    writer = RunWriter.open(path, info_of(shapes), settings={}, versions={}, durable=True)
    writer_write(writer, 0, arrays_of(shapes, 0))
    sets = [arrays_of(shapes, s) for s in (1, 2, 3)]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for step, arrays in enumerate(sets, 1):
        writer_write(writer, step, arrays)
    prof.disable()
    took = (time.perf_counter() - t0) / len(sets)
    writer.close()
    n = sum(int(np.prod(s)) for s in shapes.values())
    print(f"\nprofile, {label}: {n:,} parameters, {took:.3f} s per snapshot "
          f"(3 snapshots, every tensor changed); top {top} by own time:")
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    for (file, line, fn), (_, calls, own, cum, _) in rows:
        where = f"{os.path.basename(file)}:{line}({fn})" if line else fn
        print(f"  {own:7.3f} s  {100 * own / total:5.1f} %  cum {cum:7.3f} s  n={calls:<6} {where}")
    shutil.rmtree(path, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    p.add_argument("--page-cache", type=int, default=10,
                   help="snapshots of the reference CNN written each way for the page-cache "
                        "comparison (0: skip)")
    p.add_argument("--dir", default=None, help="where files go (default: a temp dir)")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    shapes = dense_stack(args.width, args.depth)
    n = sum(int(np.prod(s)) for s in shapes.values())
    root = tempfile.mkdtemp(prefix="ww-bench-write-", dir=args.dir)
    try:
        sets = [arrays_of(shapes, s) for s in (0, 1)]
        nbytes = sum(a.nbytes for a in sets[0].values())
        print(f"tensors: {len(shapes)} ({args.depth} x Dense({args.width})), {n:,} parameters, "
              f"{nbytes / 1e6:.0f} MB; {args.repeats} repeats, alternating")
        sys.stdout.flush()
        writer = RunWriter.open(os.path.join(root, "run"), info_of(shapes), settings={},
                                versions={}, durable=True)
        writer_write(writer, 0, sets[1])  # a previous snapshot, so each next one is compared
        raw, ours = [], []
        for r in range(args.repeats):
            raw.append(raw_write(os.path.join(root, f"raw{r}"), sets[r % 2]))
            shutil.rmtree(os.path.join(root, f"raw{r}"))
            ours.append(writer_write(writer, r + 1, sets[r % 2]))
            writer.apply_retention(keep_last=1)  # keep the disk use bounded
            print(f"  repeat {r}: write+fsync per tensor {raw[-1]:.3f} s, RunWriter "
                  f"{ours[-1]:.3f} s")
            sys.stdout.flush()
        writer.close()
        m_raw, m_ours = statistics.median(raw), statistics.median(ours)
        print(f"write+fsync per tensor: median {m_raw:.3f} s ({nbytes / m_raw / 1e9:.2f} GB/s)")
        print(f"RunWriter snapshot:     median {m_ours:.3f} s ({nbytes / m_ours / 1e9:.2f} GB/s)")
        print(f"RATIO RunWriter / write+fsync per tensor: {m_ours / m_raw:.2f}  (target <= 1.5)")
        if args.markdown:
            print_markdown(["", "measured", "target"], [
                (f"{n / 1e6:.1f}M parameters: one snapshot persisted by the worker / the same "
                 "bytes with one write+fsync per tensor",
                 f"{m_ours:.3f} / {m_raw:.3f} s = **{m_ours / m_raw:.2f}**", "<= 1.5")],
                note=f" on {machine()}")
        page_cache(root, args.page_cache)
        if args.profile:
            profile("reference CNN", CNN, root, 8)
            profile(f"{args.depth} x Dense({args.width})", shapes, root, 8)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
