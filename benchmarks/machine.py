"""The line each benchmark prints first: the machine and the versions it ran with."""

from __future__ import annotations

import os
import platform
import sys


def machine() -> str:
    """CPU model, usable cores, and the versions of what is loaded (Keras only if imported)."""
    import numpy as np

    import keras_weightwatch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    keras = sys.modules.get("keras")
    if keras is not None:
        versions.append(f"keras {keras.__version__} ({keras.backend.backend()})")
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            versions.append(f"tensorflow {tf.__version__}")
        import tensorboard

        versions.append(f"tensorboard {tensorboard.__version__}")
    versions.append(f"keras-weightwatch {keras_weightwatch.__version__}")
    return f"{cpu}, {cores} cores usable; " + ", ".join(versions)


def available_bytes() -> int:
    """The memory the kernel says is available now (MemAvailable), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62
