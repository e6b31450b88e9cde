"""Which process of a distributed run writes: one writer, whatever the backend.

In a multi-worker or multi-process run every process calls the callback, and
every process holds the same (synchronized) weights. If each wrote the run
directory, the files would race and the event files would repeat or lose
data. `is_writer` decides, without side effects, whether this process is the
one that writes: the chief of a TensorFlow multi-worker strategy, process 0
of a JAX multi-process run, rank 0 of a `torch.distributed` group.

It never imports a framework that the program has not imported already: no
TensorFlow on JAX or PyTorch, no JAX or PyTorch on TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["is_writer", "writer_rank"]


def _chief_of(task_type: str | None, task_id: Any, cluster: Mapping[str, Any] | None) -> bool:
    """The rule of tf.distribute: the `chief` task, or `worker` 0 when there is no chief."""
    if not task_type:
        return True  # not a multi-worker task (single process, or TF_CONFIG without a task)
    if task_type == "chief":
        return True
    if task_type == "worker":
        has_chief = cluster is not None and "chief" in cluster
        return not has_chief and int(task_id or 0) == 0
    # evaluator, ps: they do not train the model whose weights are watched.
    return False


def _tf_config_task() -> tuple[str | None, int, dict[str, Any] | None] | None:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    task = config.get("task") or {}
    cluster = config.get("cluster") or None
    if not isinstance(task, dict):
        return None
    if not isinstance(cluster, dict):
        cluster = None
    return task.get("type"), int(task.get("index", 0) or 0), cluster


def _tensorflow_rank(model: Any) -> tuple[int, str] | None:
    """0 for the chief of a tf.distribute multi-worker run, 1 for another task, else None."""
    strategy = None
    if model is not None and "tensorflow" in sys.modules:
        try:
            strategy = getattr(model, "distribute_strategy", None)
        except Exception:  # a backend whose trainer has no strategy
            strategy = None
    resolver = getattr(strategy, "cluster_resolver", None) if strategy is not None else None
    if resolver is not None and getattr(resolver, "task_type", None):
        try:
            cluster = resolver.cluster_spec().as_dict()
        except Exception:
            cluster = None
        chief = _chief_of(resolver.task_type, resolver.task_id, cluster)
        return (0 if chief else 1), f"tf.distribute task {resolver.task_type}:{resolver.task_id}"
    task = _tf_config_task()
    if task is not None and task[0]:
        chief = _chief_of(*task)
        return (0 if chief else 1), f"TF_CONFIG task {task[0]}:{task[1]}"
    return None


def _jax_rank(backend: str) -> tuple[int, str] | None:
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    if backend != "jax":
        # Asking JAX for its process index starts its runtime (and, on a GPU, claims
        # memory); do so only when JAX trains the model or its multi-process runtime
        # was started by the program.
        try:
            from jax._src import distributed as jax_distributed

            if getattr(jax_distributed.global_state, "client", None) is None:
                return None
        except Exception:
            return None
    try:
        if jax.process_count() <= 1:
            return None
        return int(jax.process_index()), "jax.process_index()"
    except Exception:
        return None


def _torch_rank() -> tuple[int, str] | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if dist.get_world_size() <= 1:
            return None
        return int(dist.get_rank()), "torch.distributed rank"
    except Exception:
        return None


def _keras_backend() -> str:
    keras = sys.modules.get("keras")
    if keras is None:
        return os.environ.get("KERAS_BACKEND", "tensorflow")
    try:
        return str(keras.backend.backend())
    except Exception:
        return os.environ.get("KERAS_BACKEND", "tensorflow")


def writer_rank(model: Any = None) -> tuple[int, str]:
    """This process's rank for writing, and where the rank came from.

    Rank 0 writes; any other rank writes nothing. The rank comes from the
    first of these that applies: a TensorFlow multi-worker strategy (the
    model's `distribute_strategy`, or `TF_CONFIG` on the TensorFlow backend;
    the chief, or worker 0 when there is no chief, is rank 0), JAX's
    `process_index()` in a multi-process JAX run, the `torch.distributed`
    rank when a process group is initialized. A single process is rank 0.

    Args:
        model: The model being trained, whose `distribute_strategy` is read on
            the TensorFlow backend. Defaults to None (`TF_CONFIG` only).

    Returns:
        `(rank, source)`: the rank, and a short description of where it came
        from (`"single process"` when no distributed setup was found).

    Example:

    ```python
    rank, source = writer_rank(model)  # (0, 'single process') outside a cluster
    ```
    """
    backend = _keras_backend()
    if backend == "tensorflow":
        found = _tensorflow_rank(model)
        if found is not None:
            return found
    for probe in (lambda: _jax_rank(backend), _torch_rank):
        found = probe()
        if found is not None:
            return found
    return 0, "single process"


def is_writer(model: Any = None) -> bool:
    """Whether this process writes the run directory and the event files.

    True in a single-process run (one device or many: a `MirroredStrategy`
    or a JAX `DataParallel` distribution over local devices trains in one
    process), and in exactly one process of a multi-process run; see
    `writer_rank` for how that process is chosen. Nothing is imported that
    the program has not imported.

    Args:
        model: The model being trained. Defaults to None.

    Returns:
        True if this process is the writer.

    Example:

    ```python
    if is_writer(model):
        model.save("model.keras")
    ```
    """
    return writer_rank(model)[0] == 0
