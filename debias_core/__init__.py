"""debias_core: attention debiasing for visual-token pruning (arXiv 2508.17807), in one place.

At a baseline's ranking site::

    scores = debias_core.debias(scores, positions)   # positional weight and/or padding → −inf
    k = debias_core.keep_cap(k)                       # never keep more tokens than there is content

a multi-stage method tracks its survivors' positions with ``p = debias_core.positions(n); p = p[kept]``.

around generation::

    with debias_core.sample(image_size=(W, H), span_start=s0):
        model.generate(...)

Mode by environment (DEBIAS=off|pad|pos|full, DEBIAS_TREND=paper:himap/gqa) or ``configure``.
Depends on torch and numpy only.
"""
from .config import MODES, Settings, configure, reset, settings
from .context import SampleContext, current_samples, sample
from .errors import DebiasError
from .geometry import keep_count, pad_fractions, valid_mask
from .presets import BENCHMARKS, METHODS, paper_trend, preset_names, resolve_trend
from .recorder import Recorder, recording
from .site import cache_info, clear_cache, debias, keep_cap, mask_padding
from .tracking import TrackedPositions, positions
from .trend import (ExponentialTrend, PolynomialTrend, StagedTrend, TableTrend, Trend, fit_exponential,
                    load_trend_file, save_trend, table_trend, trend_from_json)

__version__ = "0.1.0"

__all__ = [
    "BENCHMARKS", "METHODS", "MODES", "DebiasError", "ExponentialTrend", "PolynomialTrend", "Recorder",
    "SampleContext", "Settings", "StagedTrend", "TableTrend", "TrackedPositions", "Trend", "cache_info", "clear_cache", "configure",
    "current_samples", "debias", "fit_exponential", "keep_cap", "keep_count", "load_trend_file", "mask_padding",
    "pad_fractions", "paper_trend", "positions", "preset_names", "recording", "reset", "resolve_trend", "sample", "save_trend",
    "settings", "table_trend", "trend_from_json", "valid_mask",
]
