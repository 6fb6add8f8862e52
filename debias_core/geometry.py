"""Padding geometry of VLM image preprocessing: which visual tokens lie on padding.

LLaVA-1.5 ``pad`` preprocessing (``expand2square`` then resize): the image (W, H) is pasted on an
S×S canvas, S = max(W, H), at integer offset o = (S − m)//2 along the short axis (m = min(W, H)),
then resized to R×R and cut into a g×g grid of patches, tokens in row-major order (t = g·row + col).
Along the short axis the content covers [o·R/S, (o + m)·R/S); a patch's padding fraction is the share
of its area outside that band.

``none`` (centre crop, video frames) and ``anyres`` (LLaVA-1.6: base image stretched, crops unpadded)
have no padding tokens.
"""
from __future__ import annotations

import numbers

import numpy as np

from .errors import DebiasError

PREPROCESS_MODES = ("pad", "none", "anyres")


def check_image_size(image_size) -> tuple[int, int]:
    """Return (W, H) as ints, or raise naming the bad value."""
    try:
        w, h = image_size
    except (TypeError, ValueError):
        raise DebiasError(f"image size {image_size!r} is not a (width, height) pair; pass e.g. (640, 480)") from None
    for name, v in (("width", w), ("height", h)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) and not (isinstance(v, numbers.Real) and float(v).is_integer()):
            raise DebiasError(f"image {name} {v!r} is not an integer; pass the original image's pixel size, e.g. (640, 480)")
        if v <= 0:
            raise DebiasError(f"image {name} {v!r} is not positive; pass the original image's pixel size, e.g. (640, 480)")
    return int(w), int(h)


def check_grid(grid, resolution) -> tuple[int, int]:
    for name, v in (("grid", grid), ("resolution", resolution)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise DebiasError(f"{name} {v!r} must be a positive integer (LLaVA-1.5: grid 24, resolution 336)")
    if resolution % grid:
        raise DebiasError(
            f"grid {grid} does not divide resolution {resolution}: patches would not be whole pixels "
            f"(LLaVA-1.5 uses grid 24 at 336, Video-LLaVA images grid 16 at 224)")
    return int(grid), int(resolution)


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= float(threshold) <= 1.0:
        raise DebiasError(f"pad threshold {threshold!r} must be a number in [0, 1] (paper: 0.5; PyramidDrop 0.01)")
    return float(threshold)


def _axis_overlap(grid: int, resolution: int, lo: float, hi: float) -> np.ndarray:
    """Share of each of the ``grid`` patches along one axis that falls inside [lo, hi). Shape [grid]."""
    edges = np.arange(grid + 1, dtype=np.float64) * (resolution / grid)
    overlap = np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo)
    return np.clip(overlap / (resolution / grid), 0.0, 1.0)


def pad_fractions(image_size, *, grid: int = 24, resolution: int = 336, preprocess: str = "pad",
                  exact: bool = True) -> np.ndarray:
    """Fraction of each patch that is padding. Returns float64 [grid, grid], row-major like the tokens.

    ``exact=False`` reproduces the official repo's ``generate_pad_mask``, which uses the unfloored
    offset (S − m)/2; it differs from the real ``expand2square`` on boundary patches only.
    """
    grid, resolution = check_grid(grid, resolution)
    if preprocess not in PREPROCESS_MODES:
        raise DebiasError(f"preprocess {preprocess!r} is unknown; use one of {', '.join(PREPROCESS_MODES)}")
    if preprocess != "pad":
        if image_size is not None:
            check_image_size(image_size)
        return np.zeros((grid, grid))
    w, h = check_image_size(image_size)
    side, short = max(w, h), min(w, h)
    offset = (side - short) // 2 if exact else (side - short) / 2
    # multiply before dividing: a square image then spans exactly [0, R) (R/S·S can round below R)
    band = _axis_overlap(grid, resolution, offset * resolution / side, (offset + short) * resolution / side)
    full = np.ones(grid)
    rows, cols = (band, full) if w >= h else (full, band)
    return np.clip(1.0 - np.outer(rows, cols), 0.0, 1.0)


def valid_mask(fractions: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean mask (same shape) of patches kept as content: padding fraction ≤ threshold.

    Never empty: for extreme aspect ratios (1×5000) where every patch exceeds the threshold, the
    patches with the least padding (the ones holding the content sliver) count as valid.
    """
    threshold = check_threshold(threshold)
    valid = fractions <= threshold
    if not valid.any():
        valid = fractions <= fractions.min()
    return valid


def keep_count(image_size, *, grid: int = 24, resolution: int = 336, preprocess: str = "pad",
               threshold: float = 0.5, exact: bool = True) -> int:
    """Number of non-padding patches (≥ 1)."""
    fr = pad_fractions(image_size, grid=grid, resolution=resolution, preprocess=preprocess, exact=exact)
    return int(valid_mask(fr, threshold).sum())
