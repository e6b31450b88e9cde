"""The WeightWatch dashboard: a TensorBoard plugin over the run directories of a log directory.

Installed with the package and found by TensorBoard through the
`tensorboard_plugins` entry point: `tensorboard --logdir runs` shows a
WeightWatch tab.
"""

from .plugin import WeightWatchPlugin

__all__ = ["WeightWatchPlugin"]
