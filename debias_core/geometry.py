"""Padding geometry of VLM image preprocessing: which visual tokens lie on padding.

LLaVA-1.5 ``pad`` preprocessing (``expand2square`` then resize): the image (W, H) is pasted on an
S×S canvas, S = max(W, H), at integer offset o = (S − m)//2 along the short axis (m = min(W, H)),
then resized to R×R and cut into a g×g grid of patches, tokens in row-major order (t = g·row + col).
Along the short axis the content covers [o·R/S, (o + m)·R/S); a patch's padding fraction is the share
of its area outside that band.

Two geometries (``exact`` flag, env ``DEBIAS_GEOMETRY``):

- ``exact`` (default): the real ``expand2square`` band, computed in exact integer arithmetic. In units
  of R/(g·S) patch j spans [j·S, (j+1)·S) and the band [o·g, (o+m)·g), so R cancels and every overlap
  is an integer: any image size (10¹⁷×1 included) gives its true fractions.
- ``official``: the padding rule of the authors' own code for the ranking method (``method``):
    * FastV, PyramidDrop, HiMAP, TokenCarve (and no method): their ``generate_pad_mask`` — the band
      [pad, R − pad] with the unfloored pad = (S − m)/(2S)·R, patches of ⌊R/g⌋ pixels, evaluated with
      the very float operations of that function;
    * SparseVLMs: its patched ``process_images`` — a 0/1 mask pasted like the image (floored offset)
      is resized from S×S to g×g by Pillow's bilinear filter (triangle of half-width S/g, fixed-point
      coefficients with 22 fractional bits, 8-bit rounding after each pass) and a patch is content
      when the result is ≥ 0.5: the triangle-weighted content share, not the area share. Reproduced
      here bit for bit (checked against Pillow itself) for S ≤ ``OFFICIAL_MASK_MAX_SIDE``; above it
      the official code could not even allocate its S×S mask, and the exact geometry is used.
  Where the official rule leaves no patch valid (extreme aspect ratios: the authors' code then zeroes
  every weight and ranks arbitrarily), the exact geometry's content sliver is kept instead.

``none`` (centre crop, video frames) and ``anyres`` (LLaVA-1.6: base image stretched, crops unpadded)
have no padding tokens.
"""
from __future__ import annotations

import functools
import math
import numbers
from fractions import Fraction

import numpy as np

from .errors import DebiasError

PREPROCESS_MODES = ("pad", "none", "anyres")
MAX_GRID = 1024                 # 2^20 tokens per image: far beyond any ViT, and a table of that size is cheap
MAX_RESOLUTION = 1 << 16        # pixels per side of the encoder's input
OFFICIAL_MASK_MAX_SIDE = 1 << 20  # SparseVLMs' official rule builds an S×S mask image: 1 TiB at this side
_PIL_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point coefficients for 8-bit images (libImaging/Resample.c)
_ALMOST_ONE = float(np.nextafter(1.0, 0.0))  # the fraction of a patch that holds any content at all


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
    if grid > MAX_GRID:
        raise DebiasError(f"grid {grid} is too large: at most {MAX_GRID} patches per side ({MAX_GRID}² tokens); "
                          f"LLaVA-1.5 uses 24")
    if resolution > MAX_RESOLUTION:
        raise DebiasError(f"resolution {resolution} is too large: at most {MAX_RESOLUTION} pixels per side; "
                          f"LLaVA-1.5 uses 336")
    if resolution % grid:
        raise DebiasError(
            f"grid {grid} does not divide resolution {resolution}: patches would not be whole pixels "
            f"(LLaVA-1.5 uses grid 24 at 336, Video-LLaVA images grid 16 at 224)")
    return int(grid), int(resolution)


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= float(threshold) <= 1.0:
        raise DebiasError(f"pad threshold {threshold!r} must be a number in [0, 1] (paper: 0.5; PyramidDrop 0.01)")
    return float(threshold)


OFFICIAL_RULES = ("box", "bilinear")


@functools.lru_cache(maxsize=64)
def official_rule(method: str | None) -> str:
    """The authors' padding rule for ``method``, the registry's ``official_padding_rule``: ``"bilinear"`` (a pixel
    mask resized to the grid with Pillow's bilinear filter, as the official SparseVLMs patch does) or ``"box"``
    (``generate_pad_mask``: every other method, an unknown one, and no method)."""
    if method is None:
        return "box"
    from .presets import method_entry

    rule = (method_entry(method) or {}).get("official_padding_rule", "box")
    if rule not in OFFICIAL_RULES:
        raise DebiasError(f"official_padding_rule {rule!r} of method {method!r} is unknown; use one of {OFFICIAL_RULES}")
    return rule


# ------------------------------------------------------------------------------- exact geometry

def _band_overlaps(w: int, h: int, grid: int) -> tuple[list[int], int]:
    """Overlap of each patch along the short axis with the content band, in units where a patch is S wide.

    Returns ([grid] Python ints in 0..S, S). Exact for any image size.
    """
    side, short = max(w, h), min(w, h)
    lo, hi = (side - short) // 2 * grid, ((side - short) // 2 + short) * grid
    return [max(0, min((j + 1) * side, hi) - max(j * side, lo)) for j in range(grid)], side


def _exact_fraction(overlap: int, side: int) -> float:
    """Padding fraction (side − overlap)/side correctly rounded, except that a patch holding any content
    is never reported as 1.0 (so the never-empty fallback can still find the content sliver)."""
    fraction = (side - overlap) / side  # int / int: correctly rounded in Python, whatever the size
    return _ALMOST_ONE if overlap and fraction == 1.0 else fraction


def _exact_axis(w: int, h: int, grid: int) -> np.ndarray:
    overlaps, side = _band_overlaps(w, h, grid)
    return np.array([_exact_fraction(o, side) for o in overlaps], dtype=np.float64)


def _exact_valid_axis(w: int, h: int, grid: int, threshold: float) -> np.ndarray:
    """Bool [grid]: pad fraction ≤ threshold, compared exactly ((S − ov)·q ≤ p·S with threshold = p/q)."""
    overlaps, side = _band_overlaps(w, h, grid)
    p, q = Fraction(threshold).as_integer_ratio()
    valid = np.array([(side - o) * q <= p * side for o in overlaps])
    if not valid.any():  # extreme aspect ratio: keep the patches holding the most content
        valid = np.array([o == max(overlaps) for o in overlaps])
    return valid


# ------------------------------------------------------------------------------- official rules

def _box_axis(w: int, h: int, grid: int, resolution: int) -> np.ndarray:
    """Per-patch padding fraction along the short axis, as the authors' ``generate_pad_mask`` computes it
    (1 − inter_area/patch_area, with the same float operations; the other axis is fully covered)."""
    patch = resolution // grid
    if w == h:
        return np.zeros(grid)
    side = max(w, h)
    pad = (side - min(w, h)) / (2 * side) * resolution   # Python int/int: as in their code
    lo, hi = pad, resolution - pad
    edges = np.arange(grid + 1, dtype=np.float64) * patch
    inter = np.maximum(0.0, np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo))
    return 1 - (inter * float(patch)) / float(patch * patch)


def _pil_bilinear_coefficients(in_size: int, out_size: int) -> list[tuple[int, np.ndarray]]:
    """Pillow's fixed-point bilinear coefficients for resizing ``in_size`` → ``out_size`` pixels.

    Returns, per output pixel, (first input pixel, int64 [n] coefficients), as ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc`` of libImaging/Resample.c build them (same double operations, in order).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    inverse = 1.0 / filterscale
    result = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        x = (np.arange(xmax, dtype=np.int64) + xmin).astype(np.float64)
        w = np.abs((x - center + 0.5) * inverse)
        w = np.where(w < 1.0, 1.0 - w, 0.0)
        total = np.cumsum(w)[-1] if xmax else 0.0    # sequential sum, like the C loop
        if total != 0.0:
            w = w / total
        result.append((xmin, np.floor(0.5 + w * (1 << _PIL_PRECISION_BITS)).astype(np.int64)))
    return result


def _bilinear_content_axis(w: int, h: int, grid: int) -> np.ndarray | None:
    """int64 [grid]: the fixed-point content weight (of 2^22) of each output pixel along the short axis
    when SparseVLMs' official code resizes its S×S 0/1 mask to g×g; None when S is beyond what it could
    allocate (``OFFICIAL_MASK_MAX_SIDE``).

    The mask is constant along the long axis, so that pass returns it unchanged (each row or column is
    all 0 or all 1) and only the short axis' pass decides: its 8-bit result is 1 exactly when the
    coefficients over content pixels sum to ≥ 2^21 (``(2^21 + Σ) >> 22``).
    """
    side, short = max(w, h), min(w, h)
    if side > OFFICIAL_MASK_MAX_SIDE:
        return None
    start = (side - short) // 2   # mask.paste(..., ((S − m) // 2, 0)): floored, like expand2square
    content = np.empty(grid, dtype=np.int64)
    for j, (xmin, coeffs) in enumerate(_pil_bilinear_coefficients(side, grid)):
        lo, hi = max(start - xmin, 0), max(min(start + short - xmin, coeffs.size), 0)
        content[j] = int(coeffs[lo:hi].sum()) if hi > lo else 0
    return content


def _bilinear_axis(w: int, h: int, grid: int) -> np.ndarray | None:
    content = _bilinear_content_axis(w, h, grid)
    if content is None:
        return None
    return np.clip(1.0 - content / float(1 << _PIL_PRECISION_BITS), 0.0, 1.0)  # exact: dyadic with 22 bits


def _official_axis(w: int, h: int, grid: int, resolution: int, method: str | None) -> np.ndarray:
    if official_rule(method) == "bilinear":
        axis = _bilinear_axis(w, h, grid)
        if axis is None:
            return _exact_axis(w, h, grid)
    else:
        axis = _box_axis(w, h, grid, resolution)
    # a patch the official rule sees as all padding but that holds content: just below 1.0, so that where
    # the official mask would be empty the fallback keeps the exact content sliver (see the module doc)
    overlaps, _ = _band_overlaps(w, h, grid)
    return np.where((axis >= 1.0) & (np.array(overlaps) > 0), _ALMOST_ONE, axis)


# ------------------------------------------------------------------------------- public API

def _checked(image_size, grid, resolution, preprocess):
    grid, resolution = check_grid(grid, resolution)
    if preprocess not in PREPROCESS_MODES:
        raise DebiasError(f"preprocess {preprocess!r} is unknown; use one of {', '.join(PREPROCESS_MODES)}")
    if preprocess != "pad":
        if image_size is not None:
            check_image_size(image_size)
        return None, grid, resolution
    return check_image_size(image_size), grid, resolution


def _spread(axis: np.ndarray, w: int, h: int) -> np.ndarray:
    """[grid, grid] from the short axis' per-patch values: rows padded for landscape, columns for portrait."""
    grid = axis.size
    return np.repeat(axis[:, None], grid, 1) if w >= h else np.repeat(axis[None, :], grid, 0)


def pad_fractions(image_size, *, grid: int = 24, resolution: int = 336, preprocess: str = "pad",
                  exact: bool = True, method: str | None = None) -> np.ndarray:
    """Fraction of each patch that is padding. Returns float64 [grid, grid], row-major like the tokens.

    ``exact=False``: the authors' rule for ``method`` (see the module doc); for SparseVLMs the "fraction"
    is one minus Pillow's triangle-weighted content share, which the official code thresholds at 0.5.
    A patch holding any content never reads 1.0.
    """
    size, grid, resolution = _checked(image_size, grid, resolution, preprocess)
    if size is None:
        return np.zeros((grid, grid))
    w, h = size
    axis = _exact_axis(w, h, grid) if exact else _official_axis(w, h, grid, resolution, method)
    return _spread(axis, w, h)


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


def valid_tokens(image_size, *, grid: int = 24, resolution: int = 336, preprocess: str = "pad",
                 threshold: float = 0.5, exact: bool = True, method: str | None = None) -> np.ndarray:
    """Bool [grid, grid]: the non-padding patches, decided without float rounding in the exact geometry
    (pad fraction compared to the threshold as integers) and with the official code's own comparisons
    otherwise. Never empty (see ``valid_mask``)."""
    threshold = check_threshold(threshold)
    size, grid, resolution = _checked(image_size, grid, resolution, preprocess)
    if size is None:
        return np.ones((grid, grid), dtype=bool)
    w, h = size
    if exact:
        return _spread(_exact_valid_axis(w, h, grid, threshold), w, h)
    return valid_mask(pad_fractions(size, grid=grid, resolution=resolution, exact=False, method=method), threshold)


def keep_count(image_size, *, grid: int = 24, resolution: int = 336, preprocess: str = "pad",
               threshold: float = 0.5, exact: bool = True, method: str | None = None) -> int:
    """Number of non-padding patches (≥ 1)."""
    return int(valid_tokens(image_size, grid=grid, resolution=resolution, preprocess=preprocess,
                            threshold=threshold, exact=exact, method=method).sum())
