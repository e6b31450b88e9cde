"""The TensorBoard views that WeightWatch writes at each snapshot.

One module per view; `base` holds the `View` protocol (its hooks: `prepare`,
`restrict`, `capture`, `write`, `close`) and `build.build_views(settings)`
turns `Settings` into the list of views. Importing this package imports
neither Keras nor TensorFlow: the views import Keras when they first need it.

Tags (all made by `summaries.tag`, so they are stable across runs; the images by
`summaries.response_tag`, `kernel_tag` and `saliency_tag`, grouped by model,
`<model>` being `naming.model_group`: the model's name without Keras's counter):

| view | plugin | tag |
|---|---|---|
| `StatsView` | scalars | `<weight key>/<statistic>` (`dense/kernel/l2_norm`) |
| `AdapterView` | scalars | `<kernel key>/lora_update` (each LoRA layer's update size) |
| `AdapterView` | text | `adapters/summary` (update sizes, A/B update ratios, adapters idle) |
| `HistogramView` | histograms | `<weight key>/histogram` |
| `FeatureView` | text | `features/<layer>` |
| `FeatureView` | scalars | `features/<layer>/<feature name>` (see `MAX_FEATURE_SCALARS`) |
| `KernelImageView` | images | `<model>/2_kernels/<n>_<weight key>/image` (`n`: the layer's place) |
| `ResponseView` | images | `<model>/1_responses/<layer>/sample_<i>` |
| `SpectralView` | scalars | `<weight key>/<metric>` (`SCALARS`: `alpha`, `stable_rank`, ...) |
| `SpectralView` | histograms | `<weight key>/esd` (log10 eigenvalues) |
| `SpectralView` | text | `spectral/summary` |
| `SaliencyView` | images | `<model>/3_saliency/<method>/sample_<i>` |
| `GradientView` | scalars | `<weight key>/grad_norm`, `<weight key>/grad_to_weight` |
| `GradientView` | histograms | `<weight key>/grad_histogram` (with `gradient_histograms`) |
| `HealthView` | text | `health/findings` (the open findings of the health rules) |
| `HealthView` | scalars | `health/errors`, `health/warnings` (how many are open) |
"""

from .adapters import AdapterView
from .base import View
from .build import build_views
from .features import MAX_FEATURE_SCALARS, FeatureView
from .gradients import GradientView
from .health import HealthView
from .histograms import HistogramView
from .kernels import KernelImageView
from .responses import ResponseView
from .saliency import SaliencyView
from .spectral import SpectralView
from .stats import StatsView

__all__ = [
    "AdapterView",
    "MAX_FEATURE_SCALARS",
    "FeatureView",
    "GradientView",
    "HealthView",
    "HistogramView",
    "KernelImageView",
    "ResponseView",
    "SpectralView",
    "SaliencyView",
    "StatsView",
    "View",
    "build_views",
]
