"""The ranking-site call: what a patch inserts just before a baseline's top-k.

    scores = debias_core.debias(scores, positions)   # [N] or [B, N]; positions = original raster indices
    k = debias_core.keep_cap(k)                       # ≤ number of non-padding tokens, ≥ 1

Mode ``off`` returns ``scores`` itself and ``k`` unchanged (upstream behaviour). Otherwise:
  pos:  s̃_i = s_i · w(p_i)                 (w = f(0)/f(p), the positional trend's weight)
  pad:  s̃_i = s_i, −inf where p_i is padding
  full: both.
Computed in float32 (float64 stays float64). Positions −1 mark merged/cluster tokens: weight 1, never padding.

Performance contract: the weight and padding tables are built once per (trend, stage, span length,
dtype, device) and (geometry, image size, threshold, device), then cached on that device; a call is
two gathers and a multiply. No file I/O, no host–device sync: tables reach a CUDA device by
non-blocking copies from pinned memory, and ``keep_cap`` reads the padding count that was computed
on the host from geometry. Pass positions on the scores' device (a host tensor is copied each call).
Value checks (finite scores, position range) run on CPU tensors, and on accelerator tensors only with
DEBIAS_CHECK=1 because they would sync; never on ``meta`` tensors, which have no values (tests use
them to prove the call reads none).
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .config import settings
from .context import SampleContext, current_samples
from .errors import DebiasError
from .geometry import pad_fractions, valid_mask
from .recorder import active_recorder


class _TableCache:
    def __init__(self):
        self.tables: dict = {}
        self.hits = 0
        self.misses = 0

    def get(self, key, build):
        try:
            value = self.tables[key]
        except KeyError:
            self.misses += 1
            value = self.tables[key] = build()
            return value
        self.hits += 1
        return value


_cache = _TableCache()


def cache_info() -> dict:
    """{"hits", "misses", "size"} of the per-device table cache (tests use it to prove reuse)."""
    return {"hits": _cache.hits, "misses": _cache.misses, "size": len(_cache.tables)}


def clear_cache() -> None:
    _cache.tables.clear()
    _cache.hits = _cache.misses = 0


def _contexts(needed_for: str) -> tuple:
    ctxs = current_samples()
    if ctxs is None:
        raise DebiasError(f"{needed_for} needs a sample context: wrap generate in "
                          f"`with debias_core.sample(image_size=(W, H), span_start=s0): ...` "
                          f"(or run with DEBIAS=off)")
    return ctxs


def _upload(array: np.ndarray, device, dtype=None) -> torch.Tensor:
    """Host array -> tensor on ``device``. On CUDA through pinned memory with a non-blocking copy: a
    plain copy from pageable memory would wait for all queued GPU work (a host–device sync)."""
    t = torch.from_numpy(array)
    if dtype is not None:
        t = t.to(dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _valid_host(ctx: SampleContext, threshold: float, exact: bool) -> np.ndarray | None:
    """Host bool [span_length] validity, or None when nothing is padding."""
    if ctx.image_size is None or ctx.preprocess != "pad":
        return None
    key = ("valid-host", ctx.image_size, ctx.grid, ctx.resolution, threshold, exact)
    return _cache.get(key, lambda: valid_mask(
        pad_fractions(ctx.image_size, grid=ctx.grid, resolution=ctx.resolution, exact=exact), threshold).reshape(-1))


def _n_valid(ctx: SampleContext, threshold: float, exact: bool) -> int:
    valid = _valid_host(ctx, threshold, exact)
    return ctx.span_length if valid is None else int(valid.sum())


def _valid_table(ctx, threshold, exact, device) -> torch.Tensor | None:
    """bool [span_length + 1] on device; the last slot is for position −1 (neutral)."""
    valid = _valid_host(ctx, threshold, exact)
    if valid is None:
        return None
    key = ("valid", ctx.image_size, ctx.grid, ctx.resolution, threshold, exact, device)
    return _cache.get(key, lambda: _upload(np.append(valid, True), device))


def _weight_table(trend, stage: int, length: int, device, dtype=torch.float32) -> torch.Tensor:
    """``dtype`` (float32 or float64) [length + 1] on device; the last slot (position −1) has weight 1."""
    t = trend.for_stage(stage)
    key = ("weight", id(t), length, device, dtype)

    def build():
        if length > t.n:
            raise DebiasError(f"the visual span has {length} tokens but the trend covers {t.n} positions; "
                              f"fit a trend over this span (python -m debias_core fit --scores S.npy --out T.json)")
        return _upload(np.append(t.weights(length), 1.0), device, dtype)

    table = _cache.get(key, build)
    _cache.tables.setdefault(("trend-ref", id(t)), t)  # keep t alive so its id is never reused
    return table


def _arange(n: int, device) -> torch.Tensor:
    return _cache.get(("arange", n, device), lambda: torch.arange(n, device=device))


def _index(positions, scores: torch.Tensor, length: int, check: bool) -> torch.Tensor:
    n = scores.shape[-1]
    if positions is None:
        if n > length:
            raise DebiasError(f"{n} scores but the visual span has {length} tokens; pass the tokens' original positions")
        return _arange(n, scores.device)
    if not isinstance(positions, torch.Tensor):
        positions = _upload(np.asarray(positions), scores.device)
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise DebiasError(f"positions must be an integer tensor, got {positions.dtype}")
    if positions.shape[-1] != n or positions.dim() > scores.dim() or (
            positions.dim() == 2 and positions.shape[0] not in (1, scores.shape[0])):
        raise DebiasError(f"positions shape {tuple(positions.shape)} does not match scores shape {tuple(scores.shape)}")
    if check and positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < -1 or hi >= length:
            raise DebiasError(f"position {lo if lo < -1 else hi} is outside the visual span 0..{length - 1} "
                              f"(−1 marks a merged token)")
    positions = positions.to(device=scores.device, dtype=torch.long)
    return torch.where(positions < 0, length, positions)


def _gather(tables: list, index: torch.Tensor) -> torch.Tensor:
    """Look up per-position table values. tables: 1 or B tensors [L+1]; index [N], [1, N] or [B, N]."""
    if len(tables) == 1 or all(t is tables[0] for t in tables):
        return tables[0][index]
    # cached tables live as long as the cache, so their ids name the stack
    table = _cache.get(("stack",) + tuple(id(t) for t in tables), lambda: torch.stack(tables))
    return table.gather(1, index.expand(table.shape[0], -1) if index.dim() == 1 or index.shape[0] == 1 else index)


def _prepare(scores, positions, needed_for: str):
    """Validate the call; return (settings, contexts, index into the tables, float32/64 scores)."""
    st = settings()
    if not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point or scores.dim() not in (1, 2):
        raise DebiasError(f"scores must be a float tensor [N] or [B, N], got "
                          f"{type(scores).__name__} {getattr(scores, 'dtype', '')} {tuple(getattr(scores, 'shape', ()))}")
    ctxs = _contexts(f"{needed_for} with DEBIAS={st.mode}")
    rows = 1 if scores.dim() == 1 else scores.shape[0]
    if len(ctxs) not in (1, rows) or (scores.dim() == 1 and len(ctxs) != 1):
        raise DebiasError(f"{len(ctxs)} sample contexts for scores of shape {tuple(scores.shape)}; "
                          f"a batch needs [B, N] scores and one context per row")
    length = ctxs[0].span_length
    if any(c.span_length != length for c in ctxs):
        raise DebiasError(f"samples in one batch have different visual span lengths {[c.span_length for c in ctxs]}")
    check = scores.device.type == "cpu" or (st.checks and scores.device.type != "meta")
    if check:
        finite = torch.isfinite(scores)
        if not finite.all():
            bad = tuple(int(i) for i in (~finite).nonzero()[0])
            raise DebiasError(f"scores contain {scores[bad].item()} at index {bad if len(bad) > 1 else bad[0]} "
                              f"(shape {tuple(scores.shape)}); the attention that produced them is broken "
                              f"(check for fp16 overflow before the ranking site)")
    index = _index(positions, scores, length, check)
    return st, ctxs, index, (scores if scores.dtype == torch.float64 else scores.float())


def _mask(st, ctxs, index, out):
    if not st.suppress_padding:
        return out
    tables = [_valid_table(c, st.pad_threshold, st.exact_geometry, out.device) for c in ctxs]
    if all(t is None for t in tables):
        return out
    length = ctxs[0].span_length
    if any(t is None for t in tables):
        ones = _cache.get(("all-valid", length, out.device),
                          lambda: torch.ones(length + 1, dtype=torch.bool, device=out.device))
        tables = [ones if t is None else t for t in tables]
    return out.masked_fill(~_gather(tables, index), float("-inf"))


def debias(scores: torch.Tensor, positions=None, *, stage: int = 0) -> torch.Tensor:
    """Debiased ranking scores (positional weight and/or padding suppression, by mode).

    scores:    float tensor [N] or [B, N] over the visual tokens being ranked, any device.
    positions: their original visual positions (long [N] or [B, N]; −1 = merged token); None = 0..N−1.
    stage:     index of the ranking stage (multi-stage methods; picks a per-stage trend if the trend has one).
    Returns float32 (float64 if given) of the same shape; in mode ``off``, ``scores`` itself.
    """
    rec = active_recorder()
    if rec is not None:
        rec.append(stage, scores, positions)
    if settings().mode == "off":
        return scores
    st, ctxs, index, out = _prepare(scores, positions, "debias")
    if st.positional:
        out = out * _weight_table(st.trend, stage, ctxs[0].span_length, out.device, out.dtype)[index]
    return _mask(st, ctxs, index, out)


def mask_padding(scores: torch.Tensor, positions=None) -> torch.Tensor:
    """Padding suppression alone (−inf on padding tokens; no positional weight), for scores that are
    not attention, e.g. TokenCarve's SVD information score. Same shapes and modes as ``debias``."""
    if not settings().suppress_padding:
        return scores
    st, ctxs, index, out = _prepare(scores, positions, "mask_padding")
    return _mask(st, ctxs, index, out)


def keep_cap(k, *, sample: int | None = None) -> int:
    """``k`` capped to the number of non-padding tokens (≥ 1); ``k`` itself unless padding is suppressed.

    A batched top-k needs one k, so for a batch the smallest cap is returned unless ``sample`` picks a row.
    Computed on the host from geometry: never reads a device tensor.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise DebiasError(f"keep count {k!r} must be a host integer (not a tensor: reading one would sync the device)")
    if k <= 0:
        raise DebiasError(f"keep count k={k} must be ≥ 1 (number of visual tokens to keep)")
    st = settings()
    if not st.suppress_padding:
        return int(k)
    ctxs = _contexts(f"keep_cap with DEBIAS={st.mode}")
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, numbers.Integral) or not 0 <= sample < len(ctxs):
            raise DebiasError(f"sample {sample!r} is not a row of this batch of {len(ctxs)} contexts")
        ctxs = (ctxs[sample],)
    return max(1, min(int(k), *(_n_valid(c, st.pad_threshold, st.exact_geometry) for c in ctxs)))
