"""Bootstrap intervals for accuracies and paired accuracy differences (seeded, percentile method)."""
from __future__ import annotations

import numpy as np

RESAMPLES = 2000


def bootstrap_ci(correct, *, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the accuracy (%) of a 0/1 vector [n]; (nan, nan) when empty."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1) * 100
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(a, b, *, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """Accuracy of ``b`` minus accuracy of ``a`` (points) on the same questions, with a paired 95 % interval:
    questions are resampled together, so the interval reflects only the questions whose outcome differs."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.shape} vs {b.shape}")
    if a.size == 0:
        return {"diff": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    d = (b - a) * 100
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci95": [float(lo), float(hi)], "n": int(a.size),
            "discordant": int((a != b).sum())}
