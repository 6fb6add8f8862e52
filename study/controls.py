"""Control selections at a baseline's own ranking site: random tokens, or a spatially uniform grid.

Unified pruning benchmarks found random pruning and plain downsampling competitive with attention-based
methods, so the study runs both at the same layer and budgets as FastV: FastV's code runs unchanged (mode off),
and only the scores its ranking site hands to ``debias_core.debias`` are replaced (``study/observer``), so the
kept count, the layer and everything after the ranking stay FastV's.

- ``random``: i.i.d. uniform scores, one draw per sample (the same at every decode step of that sample), seeded by
  (seed, sample index);
- ``grid``: a fixed spatial priority: the 24 x 24 grid ordered by a Bayer (ordered-dither) matrix, so the first k
  tokens of the order are spread evenly over the image for every k (k = 144 is every other row and column).
"""
from __future__ import annotations

import numpy as np

CONTROLS = ("random", "grid")


def bayer(n: int) -> np.ndarray:
    """The n x n ordered-dither matrix (n a power of two), values 0 .. n²-1."""
    m = np.zeros((1, 1), dtype=np.int64)
    while m.shape[0] < n:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return m


def grid_priority(grid: int = 24) -> np.ndarray:
    """float32 [grid²], higher = kept first: raster positions ordered by the Bayer matrix cropped to the grid."""
    size = 1 << (grid - 1).bit_length()
    order = bayer(size)[:grid, :grid].reshape(-1)
    rank = np.argsort(np.argsort(order, kind="stable"), kind="stable")
    return (grid * grid - rank).astype(np.float32)


def random_scores(n: int, seed: int, sample_index: int) -> np.ndarray:
    """float32 [n] uniform scores for one sample."""
    return np.random.default_rng([seed, sample_index]).random(n).astype(np.float32)


def parse(spec: str) -> tuple[str, int]:
    """'random:3' -> ('random', 3); 'grid' -> ('grid', 0)."""
    name, _, seed = spec.partition(":")
    if name not in CONTROLS:
        raise ValueError(f"control {spec!r} is unknown; use random:<seed> or grid")
    try:
        return name, int(seed or 0)
    except ValueError:
        raise ValueError(f"control {spec!r}: the seed must be an integer") from None
