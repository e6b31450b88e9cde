"""The run directory: its format, reading it, writing it, and where its files live.

- `format`: names, records (`TensorRecord`, `SnapshotRecord`, `WeightSpec`,
  `LayerInfo`, `ModelInfo`), their JSON, one declarative check per record, and
  the dtype conversions of stored tensors. No file access.
- `reader`: `load_run`, `Run`, `verify_run`, `is_run`; every array read goes
  through one check of its `.npy` file against its record.
- `writer`: `RunWriter` (atomic, content-addressed writes), its `RunLock`, and
  retention.
- `storage`: `Storage`, the one seam where files are touched, and
  `LocalStorage`, a run in a local directory.

Reading a run needs numpy only.
"""

from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_FILE,
    LOCK_FILE,
    MAX_SAMPLE_BYTES,
    SNAPSHOT_DIR,
    TENSOR_DIR,
    Derivation,
    LayerInfo,
    ModelInfo,
    ResponseLayer,
    Samples,
    SnapshotRecord,
    StoredSample,
    TensorRecord,
    WeightSpec,
    architecture_mismatch,
    encode_tensor,
    holds,
    storage_array,
)
from .reader import Run, VerifyReport, hash_file, is_run, load_run, open_run, verify_run
from .storage import LocalStorage, Storage
from .writer import RunLock, RunWriter, ShardWriter, retained_steps

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HEADER_FILE",
    "LOCK_FILE",
    "MAX_SAMPLE_BYTES",
    "SNAPSHOT_DIR",
    "TENSOR_DIR",
    "Derivation",
    "LayerInfo",
    "LocalStorage",
    "ModelInfo",
    "Run",
    "RunLock",
    "ResponseLayer",
    "RunWriter",
    "ShardWriter",
    "Samples",
    "SnapshotRecord",
    "Storage",
    "StoredSample",
    "TensorRecord",
    "VerifyReport",
    "WeightSpec",
    "architecture_mismatch",
    "encode_tensor",
    "hash_file",
    "holds",
    "is_run",
    "load_run",
    "open_run",
    "retained_steps",
    "storage_array",
    "verify_run",
]
