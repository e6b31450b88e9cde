"""Settings -> the list of views, in writing order."""

from __future__ import annotations

from ..capture import ModelInfo
from ..settings import Settings
from .adapters import AdapterView
from .base import View
from .features import FeatureView
from .gradients import GradientView
from .health import HealthView
from .histograms import HistogramView
from .kernels import KernelImageView
from .responses import ResponseView
from .saliency import SaliencyView
from .spectral import SpectralView
from .stats import StatsView


def build_views(settings: Settings, info: ModelInfo | None = None) -> list[View]:
    """The views the settings ask for, in writing order.

    Args:
        settings: The callback's settings.
        info: The model's description; with LoRA layers among its derivations, the
            adapters view is on. Defaults to None (no adapters view).

    Returns:
        Statistics always; the adapters view for a model with LoRA layers; histograms, the
        feature table, kernel images, responses, spectral metrics, saliency maps and
        gradient statistics when the settings ask for them; the health rules last, unless
        `health=None`.
    """
    views: list[View] = [StatsView()]
    if info is not None and any(d.rule == "lora" for d in info.derived):
        views.append(AdapterView(warn=settings.health is None))  # else the health rules warn
    if settings.histograms:
        views.append(HistogramView())
    if settings.wants_features:
        views.append(
            FeatureView(
                settings.feature_names,
                settings.top_k,
                settings.feature_layer,
                settings.feature_data,
            )
        )
    if settings.kernel_images:
        views.append(KernelImageView(settings.max_kernel_tiles))
    if settings.sample_images is not None:
        views.append(
            ResponseView(
                settings.sample_images,
                settings.response_mode,
                settings.response_layers,
                settings.max_kernel_tiles,
                settings.responses_dir,
                settings.storage_options,
            )
        )
    if settings.spectral_freq is not None:
        views.append(SpectralView(settings.spectral_freq, traps=settings.spectral_traps))
    if settings.saliency is not None and settings.sample_images is not None:
        views.append(
            SaliencyView(
                settings.sample_images,
                settings.saliency,
                settings.saliency_class,
                settings.saliency_layer,
                settings.responses_dir,
                settings.gradient_freq,
                settings.storage_options,
            )
        )
    if settings.gradient_data is not None:
        views.append(
            GradientView(
                settings.gradient_data, settings.gradient_freq, settings.gradient_histograms
            )
        )
    if settings.health is not None:
        views.append(HealthView(settings.health))  # last: it reads every other view's numbers
    return views
