"""Bias-strength metrics for language→vision ranking scores, before and after debiasing (numpy only).

Positional bias, over content tokens (padding tokens, pad fraction > τ, left out), with Ā_i the mean
score at visual position i over the rows that hold it:
  ρ   = Spearman(i, Ā_i)              rank correlation of position and mean score; 0 = no monotone trend
  R   = exp(b·(n − 1))                end-to-start ratio of the least-squares fit Ā_i ≈ a·e^{b·i}; 1 = flat
  ρ_k = Spearman(i, q_i)              q_i = share of rows whose top-k keeps position i

Padding bias, at keep budget k, over rows whose image has padding (φ_ri = pad fraction of token i in row r,
K_r = its kept set):
  P = [Σ_r Σ_{i∈K_r} φ_ri / Σ_r |K_r|] ÷ [Σ_r Σ_i φ_ri / Σ_r n_r]
i.e. the padding share of the kept tokens divided by the padding share of the image area. P = 1 when
padding is kept in proportion to its area (random selection), > 1 when it is favoured, 0 when never kept.

``analyze`` computes both for raw scores ("before") and for the same scores debiased as
``debias_core.debias`` would (``debias_rows``: s·w(i), −inf on padding, k capped to the content), "after".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import DebiasError
from .geometry import pad_fractions, valid_mask

MODES = ("off", "pad", "pos", "full")


# ------------------------------------------------------------------------------------------- ranks

def rankdata(x) -> np.ndarray:
    """Average ranks (1-based; tied values share the mean of their ranks). float64 [n]."""
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    sorter = np.argsort(x, kind="mergesort")
    xs = x[sorter]
    first = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(first)                     # 1-based tie-group of each sorted entry
    bounds = np.r_[np.flatnonzero(first), n]     # start of each group, then n
    ranks = np.empty(n)
    ranks[sorter] = 0.5 * (bounds[group] + bounds[group - 1] + 1)
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation of x and y (pairs with a non-finite value dropped; ties averaged).
    NaN when fewer than 3 pairs remain or either side is constant."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise DebiasError(f"spearman needs equal lengths, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan")
    rx, ry = rankdata(x[ok]), rankdata(y[ok])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


# ------------------------------------------------------------------------------------------ metrics

def positional_strength(mean, selection=None) -> dict:
    """ρ, R (with the fit's b and r²) of a mean-score vector [n] (NaN = no data); ρ_k if ``selection`` [n]."""
    from .calibrate import fit_observed

    mean = np.asarray(mean, dtype=np.float64)
    pos = np.arange(mean.size, dtype=np.float64)
    out = {"spearman": spearman(pos, mean), "end_start_ratio": None, "b": None, "r2": None,
           "positions": int(np.isfinite(mean).sum())}
    try:
        t = fit_observed(mean)
        out.update(end_start_ratio=math.exp(t.b * (mean.size - 1)), b=t.b, r2=t.r2)
    except DebiasError as e:
        out["fit_error"] = str(e)
    if selection is not None:
        out["selection_spearman"] = spearman(pos, selection)
    return out


def padding_strength(kept, pad_fraction, threshold: float = 0.5) -> dict:
    """P (see module doc) from kept bool [rows, n] and pad fractions float [rows, n].

    Also: ``kept_padding_share`` (numerator), ``area_padding_share`` (denominator), ``kept_padding_tokens``
    (share of kept tokens with pad fraction > threshold) and the number of rows with padding."""
    kept = np.asarray(kept, dtype=bool)
    phi = np.asarray(pad_fraction, dtype=np.float64)
    if kept.shape != phi.shape:
        raise DebiasError(f"kept mask {kept.shape} and pad fractions {phi.shape} differ in shape")
    rows = phi.sum(1) > 0
    if not rows.any():
        return {"ratio": None, "kept_padding_share": None, "area_padding_share": 0.0, "kept_padding_tokens": None,
                "rows_with_padding": 0, "note": "no image has padding (square or non-pad preprocessing)"}
    k, f = kept[rows], phi[rows]
    n_kept = int(k.sum())
    kept_share = float((f * k).sum() / n_kept) if n_kept else 0.0
    area_share = float(f.sum() / f.size)
    return {"ratio": kept_share / area_share, "kept_padding_share": kept_share, "area_padding_share": area_share,
            "kept_padding_tokens": float(((f > threshold) & k).sum() / n_kept) if n_kept else 0.0,
            "rows_with_padding": int(rows.sum())}


# ---------------------------------------------------------------------------------- debias in numpy

def pad_fraction_rows(contexts, length: int, exact: bool = True) -> np.ndarray:
    """φ float64 [rows, length] from per-row sample dicts (None / non-pad / no image → zeros)."""
    out = np.zeros((len(contexts), length))
    for r, ctx in enumerate(contexts):
        if ctx and ctx.get("image_size") and ctx.get("preprocess", "pad") == "pad":
            fr = pad_fractions(tuple(ctx["image_size"]), grid=ctx.get("grid", 24),
                               resolution=ctx.get("resolution", 336), exact=exact).reshape(-1)
            if fr.size != length:
                raise DebiasError(f"row {r}: its {ctx.get('grid', 24)}² grid does not match the span length {length}")
            out[r] = fr
    return out


def padding_rows(pad_fraction: np.ndarray, threshold: float) -> np.ndarray:
    """Bool [rows, n]: padding tokens (``valid_mask`` per row, so never a row without content)."""
    return np.stack([~valid_mask(f, threshold) if f.any() else np.zeros(f.size, bool) for f in pad_fraction]) \
        if len(pad_fraction) else np.zeros(pad_fraction.shape, bool)


def _resolve(mode, trend):
    if mode not in MODES:
        raise DebiasError(f"debias mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if mode in ("pos", "full"):
        if trend is None:
            raise DebiasError(f"mode {mode!r} needs a trend (a Trend, a preset like paper:himap/gqa, or calibrated:<file>)")
        from .presets import resolve_trend
        return resolve_trend(trend)
    return None


def debias_rows(scores, *, mode: str, trend=None, stage: int = 0, padding=None) -> np.ndarray:
    """What ``debias_core.debias`` returns, in numpy, for scores at original positions.

    scores float [rows, n] (column = original position; NaN = token absent from that row);
    padding bool [rows, n] (True = padding token) for pad/full modes. Returns float64 [rows, n].
    """
    s = np.array(scores, dtype=np.float64)
    t = _resolve(mode, trend)
    if t is not None:
        s = s * t.for_stage(stage).weights(s.shape[1])[None, :]
    if mode in ("pad", "full") and padding is not None:
        s = np.where(padding, -np.inf, s)
    return s


def topk_rows(scores, k) -> np.ndarray:
    """Kept bool [rows, n]: the k highest finite scores per row (k int or per-row ints; NaN = absent,
    −inf never kept; ties go to the lower position)."""
    s = np.asarray(scores, dtype=np.float64)
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), (s.shape[0],))
    kept = np.zeros(s.shape, dtype=bool)
    for r in range(s.shape[0]):
        ok = np.isfinite(s[r])
        order = np.flatnonzero(ok)[np.argsort(-s[r, ok], kind="stable")]
        kept[r, order[:ks[r]]] = True
    return kept


# -------------------------------------------------------------------------------------- before/after

@dataclass
class BiasAnalysis:
    """Arrays behind a before/after report (float64 [n] means; bool [rows, n] kept masks)."""
    report: dict
    mean_before: np.ndarray
    mean_after: np.ndarray
    kept_before: np.ndarray
    kept_after: np.ndarray
    pad_fraction: np.ndarray
    contexts: list = field(default_factory=list)


def _content_mean(values: np.ndarray, padding: np.ndarray) -> np.ndarray:
    v = np.where(padding | ~np.isfinite(values), np.nan, values)
    cnt = np.isfinite(v).sum(0)
    with np.errstate(invalid="ignore"):
        return np.where(cnt > 0, np.nansum(v, 0) / np.maximum(cnt, 1), np.nan)


def trend_label(trend) -> str | None:
    """A short JSON-able name for a trend spec or object."""
    if trend is None or isinstance(trend, str):
        return trend
    b = getattr(trend, "b", None)
    return f"{type(trend).__name__}(b={b:.6g})" if b is not None else type(trend).__name__


def analyze(scores, contexts=None, *, mode: str, trend=None, keep: int, stage: int = 0,
            threshold: float = 0.5, exact: bool = True) -> BiasAnalysis:
    """Bias strength before and after debiasing.

    scores:   raw scores at original positions, float [rows, n] (NaN = absent; e.g. Recorder.matrix(stage)).
    contexts: per-row sample dicts (image_size, preprocess, grid, resolution) or None (no padding known).
    mode, trend, threshold, exact: the debias settings of the "after" column (as DEBIAS, DEBIAS_TREND,
              the method's pad threshold, exact geometry).
    keep:     the keep budget k for selection-based metrics (capped to the content in pad/full modes,
              like ``keep_cap``).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0:
        raise DebiasError(f"scores must be [rows, n] with at least one row, got shape {s.shape}")
    if isinstance(keep, bool) or int(keep) != keep or keep < 1:
        raise DebiasError(f"keep budget {keep!r} must be a positive integer")
    contexts = list(contexts) if contexts is not None else [None] * s.shape[0]
    if len(contexts) != s.shape[0]:
        raise DebiasError(f"{len(contexts)} contexts for {s.shape[0]} score rows")
    phi = pad_fraction_rows(contexts, s.shape[1], exact)
    pad = padding_rows(phi, threshold)
    after = debias_rows(s, mode=mode, trend=trend, stage=stage, padding=pad)
    k_after = np.minimum(keep, np.maximum(1, (~pad).sum(1))) if mode in ("pad", "full") else keep
    kept_b, kept_a = topk_rows(s, keep), topk_rows(after, k_after)
    mean_b, mean_a = _content_mean(s, pad), _content_mean(after, pad)
    present = np.isfinite(s).sum(0)

    def block(mean, kept):
        with np.errstate(invalid="ignore"):
            sel = np.where(present > 0, kept.sum(0) / np.maximum(present, 1), np.nan)
        return {"positional": positional_strength(mean, sel), "padding": padding_strength(kept, phi, threshold)}

    report = {"settings": {"mode": mode, "trend": trend_label(trend), "keep": int(keep), "stage": stage,
                           "threshold": threshold, "rows": int(s.shape[0]), "positions": int(s.shape[1])},
              "before": block(mean_b, kept_b), "after": block(mean_a, kept_a)}
    return BiasAnalysis(report, mean_b, mean_a, kept_b, kept_a, phi, contexts)


def bias_report(scores, contexts=None, **settings) -> dict:
    """``analyze(...).report``: {"settings", "before", "after"} with "positional" and "padding" blocks."""
    return analyze(scores, contexts, **settings).report
