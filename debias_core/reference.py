"""The ranking-site call written plainly: no caches, no fast paths, no checks. Read this for the maths.

``site.debias`` / ``site.keep_cap`` compute exactly this (bit for bit: tests/test_core_reference.py checks every
fast path against it); they only add caching, value checks and error messages.

For visual tokens with scores s (``[N]`` or ``[B, N]``) at original raster positions p (0..L−1 over the
visual span of L tokens; −1 marks a merged token)::

    debiased = s · w[p] + bias[p]
    w[i]     = f(0) / f(i)       the positional trend's weight        (1 unless the mode is pos or full)
    bias[i]  = −inf on padding,  0 on content                         (0 unless the mode is pad or full)
    w[−1] = 1, bias[−1] = 0      merged tokens are neutral
    keep     = min(k, number of content tokens), ≥ 1                  (k unless the mode is pad or full)

computed in float32 (float64 stays float64). The bias is *added*, so a zero score on padding gives −inf, not
0·inf = NaN. Mode ``off`` returns ``s`` itself and ``k`` unchanged. ``padding=False`` (the ranked tokens are
the survivors of a stage that already suppressed padding and capped its count) drops the bias term.
"""
from __future__ import annotations

import numpy as np
import torch

from .geometry import valid_tokens


def weights(trend, stage: int, length: int) -> np.ndarray:
    """float64 [length]: the weight w[i] = f(0)/f(i) of ``trend``'s stage ``stage`` over a span of ``length``."""
    return np.asarray(trend.for_stage(stage).weights(length), dtype=np.float64)


def content(sample, threshold: float, exact: bool = True, method: str | None = None) -> np.ndarray:
    """bool [span_length]: True where the token is image content, False where it is padding (``exact`` False:
    the authors' rule for ``method``)."""
    if sample.image_size is None or sample.preprocess != "pad":
        return np.ones(sample.span_length, dtype=bool)
    return valid_tokens(sample.image_size, grid=sample.grid, resolution=sample.resolution, threshold=threshold,
                        exact=exact, method=method).reshape(-1)


def debiased_scores(scores: torch.Tensor, positions: torch.Tensor | None, *, mode: str,
                    weight: np.ndarray, is_content: np.ndarray, padding: bool = True) -> torch.Tensor:
    """The maths. scores [N] or [B, N]; positions long [N], [1, N] or [B, N] (None: 0..N−1);
    weight float64 [L]; is_content bool [L] (one sample) or [B, L] (one row per sample)."""
    if mode == "off" or (mode == "pad" and not padding):
        return scores
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    p = torch.arange(scores.shape[-1]) if positions is None else positions.long().cpu()
    w = torch.from_numpy(weight) if mode in ("pos", "full") else torch.ones(len(weight), dtype=torch.float64)
    bias = torch.from_numpy(np.where(np.atleast_2d(is_content), 0.0, -np.inf))   # [1 or B, L]
    if mode == "pos" or not padding:
        bias = torch.zeros_like(bias)
    w = torch.cat([w, torch.ones(1, dtype=torch.float64)]).to(dtype)              # slot L: position −1
    bias = torch.cat([bias, torch.zeros(len(bias), 1, dtype=torch.float64)], 1).to(dtype)
    rows = torch.arange(len(bias)).unsqueeze(1) if scores.dim() == 2 else 0       # row b uses sample b's mask
    out = scores.cpu().to(dtype) * w[p] + bias[rows, p]
    return out.to(scores.device)


def debias(scores, positions=None, *, stage: int = 0, mean_dim: int | None = None, start: int | None = None,
           padding: bool = True, settings=None, samples=None) -> torch.Tensor:
    """``debias_core.debias`` with the same arguments, from first principles. ``settings`` and ``samples``
    default to the active ones (``debias_core.settings()``, ``debias_core.current_samples()``)."""
    from .config import settings as current_settings
    from .context import current_samples
    st = settings or current_settings()
    if mean_dim is not None:
        scores = torch.mean(scores, dim=mean_dim)
    if st.mode == "off":
        return scores
    samples = samples or current_samples()
    if positions is not None:
        positions = (positions.long() if isinstance(positions, torch.Tensor) or hasattr(positions, "long")
                     else torch.as_tensor(positions)) - (start or 0)
    length = samples[0].span_length
    weight = weights(st.trend, stage, length) if st.positional else np.ones(length)
    is_content = np.stack([content(c, st.pad_threshold, st.exact_geometry, st.method) for c in samples])
    if scores.dim() == 1 or len(samples) == 1:
        is_content = is_content[:1]
    return debiased_scores(scores, positions, mode=st.mode, weight=weight, is_content=is_content, padding=padding)


def mask_padding(scores, positions=None, *, start: int | None = None, settings=None, samples=None):
    """``debias_core.mask_padding``: the padding term alone (mode pad) where the mode suppresses padding."""
    from .config import settings as current_settings
    st = settings or current_settings()
    if not st.suppress_padding:
        return scores
    return debias(scores, positions, start=start, settings=_with_mode(st, "pad"), samples=samples)


def _with_mode(st, mode: str):
    import dataclasses
    return dataclasses.replace(st, mode=mode)


def keep_cap(k: int, *, settings=None, samples=None) -> int:
    """``debias_core.keep_cap``: k capped to the fewest content tokens of any sample (≥ 1) in modes pad/full."""
    from .config import settings as current_settings
    from .context import current_samples
    st = settings or current_settings()
    if not st.suppress_padding:
        return k
    samples = samples or current_samples()
    return max(1, min(k, *(int(content(c, st.pad_threshold, st.exact_geometry, st.method).sum()) for c in samples)))
