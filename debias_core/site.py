"""The ranking-site call: what a patch inserts just before a baseline's top-k.

    scores = debias_core.debias(scores, positions)   # [N] or [B, N]; positions = original raster indices
    k = debias_core.keep_cap(k)                       # ≤ number of non-padding tokens, ≥ 1

(Where the site's scores are ``torch.mean(x, dim=d)``, ``debias(x, positions, mean_dim=d)`` takes that mean
itself, so that debiasing adds no kernel: PyramidDrop. Where the site has sequence indices of the ranked tokens,
``debias(scores, indices, start=s0)`` takes positions ``indices − s0`` from a table shifted by ``s0``: no
subtraction kernel, in mode off none at all: HiMAP, iLLaVA. A later stage ranking the survivors of a stage
that suppressed padding and capped its count passes ``padding=False``: no survivor is padding, so the call
applies the positional weight only and gathers no bias: HiMAP's stage 2.)

Mode ``off`` returns ``scores`` itself and ``k`` unchanged (upstream behaviour). Otherwise:
  pos:  s̃_i = s_i · w(p_i)                 (w = f(0)/f(p), the positional trend's weight)
  pad:  s̃_i = s_i, −inf where p_i is padding
  full: both.
Computed in float32 (float64 stays float64). Positions −1 mark merged/cluster tokens: weight 1, never padding.
reference.py computes the same, bit for bit, in a dozen plain lines (tests/test_core_reference.py holds every
path here to it); read it for the maths, this module for how the call stays cheap.

Performance contract: the weight and padding tables (tables.py) are built once per (trend, stage, span
length, dtype, device) and (geometry, image size, threshold, device), then kept on that device in the one
bounded cache (``tables.Cache``: every table, plan, warm-path entry and tracked table), and combined once per
sample into a plan; a call is one fused multiply-add (``addcmul``), plus two ``take``s when
positions are given as a long tensor — one when there is no padding to suppress (``padding=False``, an image
without padding, mode pos) — (none for ``positions(n)[kept]``, which carry their table rows:
tracking.py). After the first call with given contexts, settings, stage, shapes, dtypes and devices, later
such calls skip every check and lookup but one dict access (the "fast path": ranking sites often run while
the GPU waits for the host, so host time there is latency). No file I/O, no host–device sync: tables reach
a CUDA device by non-blocking copies from pinned memory, and ``keep_cap`` reads the padding count that was computed
on the host from geometry. Pass positions on the scores' device (a host tensor is copied each call).
Value checks (finite scores, position range) run on CPU tensors, and on accelerator tensors only with
DEBIAS_CHECK=1 because they would sync; never on ``meta`` tensors, which have no values (tests use
them to prove the call reads none).
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from . import config as _config
from .config import SUPPRESSING_MODES, settings
from .context import _active as _samples_var
from .context import current_samples, required_samples
from .checks import check_finite, check_no_padding, check_range, checks_values
from .errors import DebiasError
from .recorder import _active as _recorder_var
from .tables import bias_table, cache as _cache, n_valid, upload, valid_host, weight_table
from .tracking import TrackedPositions


def cache_info() -> dict:
    """{"hits", "misses", "size"} of the one cache (tables.Cache; tests use it to prove reuse). size: entries in
    all its regions."""
    return {"hits": _cache.hits, "misses": _cache.misses, "size": _cache.size()}


def clear_cache() -> None:
    """Drop every cached table, plan, warm-path entry and tracked table, and reset the counters."""
    _cache.clear()


# The cache's regions this module reads on the hot path, by their historical names (the same dict objects:
# the cache empties them in place, never replaces them).
_plans = _cache.plans      # _Plan by _plan's key
_fast = _cache.debias      # WarmEntry by debias's fast-path key
_fast_pad = _cache.masks   # WarmEntry by mask_padding's fast-path key
_fast_caps = _cache.caps   # WarmCap by (id(sample contexts), id(settings))


def _check_scores(scores) -> None:
    if not isinstance(scores, torch.Tensor) or not scores.dtype.is_floating_point or scores.dim() not in (1, 2):
        raise DebiasError(f"scores must be a float tensor [N] or [B, N], got "
                          f"{type(scores).__name__} {getattr(scores, 'dtype', '')} {tuple(getattr(scores, 'shape', ()))}")


class _Plan:
    """Everything one (settings, sample contexts, stage, device, dtype) needs, built once per sample:
    ``table`` [2, L+1] = (weight, bias) rows when one padding table serves every row, else ``weight`` [L+1] and
    ``bias`` [B, L+1]. Slot L (reached by position −1) is neutral. debiased = bias + scores · weight, with
    bias −inf on padding and 0 elsewhere (an addition, so a zero score on padding is −inf, not NaN)."""

    __slots__ = ("st", "ctxs", "length", "table", "weight", "bias", "unbiased")

    def __init__(self, st, ctxs, stage: int, positional: bool, padded: bool, device, dtype):
        self.st, self.ctxs, self.length = st, ctxs, ctxs[0].span_length
        length = self.length
        if positional:
            weight = weight_table(st.trend, stage, length, device, dtype)
        else:
            weight = _cache.get(("ones", length, device, dtype),
                                lambda: torch.ones(length + 1, dtype=dtype, device=device))
        biases = [bias_table(c, st, device, dtype) for c in ctxs] if st.suppress_padding and padded else [None]
        self.unbiased = all(b is None for b in biases)  # no padding to suppress: gathered positions need no bias
        zeros = _cache.get(("zeros", length, device, dtype), lambda: torch.zeros(length + 1, dtype=dtype, device=device))
        biases = [zeros if b is None else b for b in biases]
        if all(b is biases[0] for b in biases):
            self.table = _cache.derived("plan", (weight, biases[0]), (), lambda: torch.stack([weight, biases[0]]))
            self.weight = self.bias = None
        else:
            self.table = None
            self.weight = weight
            self.bias = _cache.derived("stack", tuple(biases), (), lambda: torch.stack(biases))

    def operation(self, scores, index, start=None):
        """fn(scores, index) -> debiased scores for calls shaped like this one (table views prepared once).
        index: None (positions 0..N−1) or long positions on the device ([N], [1, N] or [B, N]), counted from
        ``start`` if given (sequence indices: position = index − start)."""
        if index is None:
            n = scores.shape[-1]
            bias, weight = ((self.table[1, :n], self.table[0, :n]) if self.table is not None
                            else (self.bias[:, :n], self.weight[:n]))
            return lambda s, _: torch.addcmul(bias, s, weight)
        table = self.table
        if start is not None:
            if table is None:
                return lambda s, i: self._per_row(s, i - start)
            table = _cache.derived(  # [2, start + L]: column start + p holds position p's row
                "shifted", (self.table,), (start,),
                lambda: torch.cat([self.table[:, -1:].expand(-1, start), self.table[:, :-1]], 1))
        if table is not None:
            weight, bias = table.unbind()  # contiguous rows
            if self.unbiased:  # the bias is all zeros: one take less; adding a broadcast zero keeps the result
                zero = bias[-1]  # bit for bit (0 + s·w turns −0.0 into +0.0, as the gathered zeros did)
                return lambda s, i: torch.addcmul(zero, s, weight.take(i))

            def take_fma(s, i):
                # two `take`s (which wrap −1 onto the neutral last slot) cost the host less than one 2-row
                # gather `table[:, i]` and its row views: about 130 vs 180 µs cold-cache on an H100 host
                return torch.addcmul(bias.take(i), s, weight.take(i))
            return take_fma
        return self._per_row

    def _per_row(self, scores, index):
        rows = index.expand(self.bias.shape[0], -1) if index.dim() == 1 or index.shape[0] == 1 else index
        bias = self.bias.gather(1, rows.remainder(self.length + 1))  # gather does not wrap −1 as indexing does
        return torch.addcmul(bias, scores, self.weight.take(index))  # take, as on the one-table path


def _plan(scores, needed_for: str, stage: int, positional: bool, padded: bool = True) -> _Plan:
    """The plan for these settings, sample contexts (by value: a later sample with the same image size and
    geometry reuses it), stage, device and dtype; built, and everything validated, on first use only.
    ``padded``: False when the ranked tokens hold no padding (``debias(..., padding=False)``)."""
    st = settings()
    ctxs = current_samples()
    key = (id(st), ctxs, stage, positional, padded, scores.device, scores.dtype == torch.float64, scores.dim(),
           scores.shape[0])
    plan = _plans.get(key)
    if plan is not None and plan.st is st:
        _cache.hits += 1
        return plan
    ctxs = required_samples(f"{needed_for} with DEBIAS={st.mode}")
    rows = 1 if scores.dim() == 1 else scores.shape[0]
    if len(ctxs) not in (1, rows) or (scores.dim() == 1 and len(ctxs) != 1):
        raise DebiasError(f"{len(ctxs)} sample contexts for scores of shape {tuple(scores.shape)}; "
                          f"a batch needs [B, N] scores and one context per row")
    if any(c.span_length != ctxs[0].span_length for c in ctxs):
        raise DebiasError(f"samples in one batch have different visual span lengths {[c.span_length for c in ctxs]}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return _cache.put(_plans, key, _Plan(st, ctxs, stage, positional, padded, scores.device, dtype))


def _positions(positions, scores, length: int, check: bool, start=None):
    """Positions as a long tensor on the scores' device (None stays None: raster 0..N−1)."""
    n = scores.shape[-1]
    if start is not None:
        if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
            raise DebiasError(f"start={start!r} must be a non-negative host integer: the sequence index of the "
                              f"visual span's first token, which positions are counted from")
        if positions is None or type(positions) is TrackedPositions:
            raise DebiasError(f"start={start} counts index positions from start; pass the tokens' sequence indices "
                              f"as a long tensor ({'none given' if positions is None else 'tracked positions are already original positions: drop start'})")
    if positions is None:
        if n > length:
            raise DebiasError(f"{n} scores but the visual span has {length} tokens; pass the tokens' original positions")
        return None
    if not isinstance(positions, torch.Tensor):
        positions = upload(np.asarray(positions), scores.device)
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise DebiasError(f"positions must be an integer tensor, got {positions.dtype}")
    if positions.shape[-1] != n or positions.dim() > scores.dim() or (
            positions.dim() == 2 and positions.shape[0] not in (1, scores.shape[0])):
        raise DebiasError(f"positions shape {tuple(positions.shape)} does not match scores shape {tuple(scores.shape)}")
    if check:
        check_range(positions, length, start)
    if positions.dtype != torch.long or positions.device != scores.device:
        positions = positions.to(device=scores.device, dtype=torch.long)
    return positions  # −1 indexes the tables' last, neutral slot


def _apply(scores, positions, stage: int, positional: bool, needed_for: str, start, fast: dict, key,
           padded: bool = True):
    """The full path: validate, build (or find) the plan, run it; and store the prepared operation under
    ``key`` (the fast-path key the caller looked up) when the positions needed no conversion."""
    _check_scores(scores)
    if padded is not True and padded is not False:
        raise DebiasError(f"padding={padded!r} must be True or False (False: the ranked tokens hold no padding, "
                          f"e.g. the survivors of a padding-suppressed, capped stage)")
    plan = _plan(scores, needed_for, stage, positional, padded)
    check = checks_values(plan.st, scores.device)
    if check:
        check_finite(scores)
    index = _positions(positions, scores, plan.length, check, start)
    claimed = None  # padding=False in a suppressing mode, where values are checked: the validity to hold them to
    if check and not padded and plan.st.suppress_padding:
        claimed = [valid_host(c, plan.st.pad_threshold, plan.st.exact_geometry, plan.st.method) for c in plan.ctxs]
        if all(v is None for v in claimed):
            claimed = None
        else:
            check_no_padding(_positions_or_raster(index, scores), claimed, start)
    operation = plan.operation(scores, index, start)
    if index is positions and key is not None:  # validated: later calls with this key take the fast path
        checks = ValueChecks(plan.length, start, claimed) if check else None
        _cache.put(fast, key, WarmEntry(current_samples(), settings(), operation, checks))
    return operation(scores, index)


def _positions_or_raster(index, scores):
    """``index``, or the raster positions 0..N−1 that None stands for."""
    return torch.arange(scores.shape[-1]) if index is None else index


# The warm path. What the full path checks and builds depends only on what the key holds (sample contexts
# and settings by identity — both are interned by value —, stage, start, padding, shapes, dtypes, devices), so once a
# call with a key has passed it, later ones go straight to the prepared operation: a dict lookup and one to
# three kernels, little Python (at ranking sites the GPU is often idle, waiting for the host, and each Python
# call there costs microseconds of cold-cache host time: debias and mask_padding inline the lookup). Keys hold
# id()s; each entry keeps its contexts and settings alive, so an id in a key cannot be reused by another object.

class ValueChecks:
    """What a warm call checks values against (CPU tensors, or DEBIAS_CHECK=1): the span ``length``, the
    ``start`` positions are counted from, and per sample context the validity that ``padding=False`` claims
    (host bool [L] or None), or None when the call makes no such claim."""

    __slots__ = ("length", "start", "claimed")

    def __init__(self, length: int, start, claimed):
        self.length, self.start, self.claimed = length, start, claimed


class WarmEntry:
    """A validated call's prepared ``operation(scores, positions)``, with the sample contexts and settings its
    key names by id (held here, so those ids stay theirs) and its ``checks`` (None: values are not checked)."""

    __slots__ = ("samples", "settings", "operation", "checks")

    def __init__(self, samples, settings, operation, checks):
        self.samples, self.settings, self.operation, self.checks = samples, settings, operation, checks


class WarmCap:
    """A batch's keep cap (≥ 1) for the sample contexts and settings its key names by id."""

    __slots__ = ("samples", "settings", "cap")

    def __init__(self, samples, settings, cap: int):
        self.samples, self.settings, self.cap = samples, settings, cap


def _check_values(checks: ValueChecks, scores, positions) -> None:
    """The fast path's value checks."""
    check_finite(scores)
    if positions is not None:
        check_range(positions, checks.length, checks.start)
    if checks.claimed is not None:
        check_no_padding(_positions_or_raster(positions, scores), checks.claimed, checks.start)


def debias(scores: torch.Tensor, positions=None, *, stage: int = 0, mean_dim: int | None = None,
           start: int | None = None, padding: bool = True) -> torch.Tensor:
    """Debiased ranking scores (positional weight and/or padding suppression, by mode).

    scores:    float tensor [N] or [B, N] over the visual tokens being ranked, any device.
    positions: their original visual positions (long [N] or [B, N]; −1 = merged token); None = 0..N−1;
               or ``positions(n)[kept]``, tracked positions that carry their rows (one kernel, no gather).
    stage:     index of the ranking stage (multi-stage methods; picks a per-stage trend if the trend has one).
    mean_dim:  for a site whose scores are upstream's ``torch.mean(x, dim=mean_dim)``: pass ``x`` and the mean
               is taken here. Mode ``off`` returns exactly that mean; otherwise a singleton ``mean_dim`` (one
               text query, as at inference) is dropped as a view instead — same values, the mean of one value
               being that value — so debiasing adds no kernel to the site: the multiply-add replaces the mean.
    start:     positions are counted from ``start`` (host int): pass the tokens' sequence indices and the
               sequence index of the span's first token, instead of ``indices − start`` (a kernel, in every mode).
               Values must lie in start..start+L−1 (no −1).
    padding:   False when the ranked tokens hold no padding — a later stage ranking the survivors of a stage
               whose padding was suppressed and whose keep count was capped (``keep_cap``): the call applies the
               positional weight only (one gather less at long positions; mode ``pad`` returns ``scores``).
               The claim is checked where values are (CPU tensors, DEBIAS_CHECK=1): a padding position is an error.
               Tracked positions carry their bias at no cost: with them the flag changes nothing but mode pad.
    Returns float32 (float64 if given) of the same shape; in mode ``off`` (and ``pad`` with ``padding=False``),
    ``scores`` itself (with ``mean_dim``: upstream's ``torch.mean``).
    """
    # The hot path inlines settings() and the context lookups: at sites where the GPU waits for the host, each
    # Python call costs microseconds of cold-cache host time, i.e. latency.
    st = _config._settings or settings()
    if mean_dim is not None:
        scores = _mean(scores, mean_dim, st.mode == "off")
    rec = _recorder_var.get()
    if rec is not None:
        rec.append(stage, scores, _raster(positions, start))
    if st.mode == "off" or (padding is False and not st.positional):
        return scores
    if type(positions) is TrackedPositions and start is None:
        out = positions._debiased(scores, stage, st, True)  # carried bias: free, so padding=False changes nothing
        if out is not None:
            return out
        positions = positions.long()
    try:  # the fast-path key: contexts and settings by identity, stage, start, padding, shapes, dtypes, devices
        key = (id(_samples_var.get()), id(st), stage, start, padding, scores.dtype, scores.device, scores.shape,
               None if positions is None else (positions.dtype, positions.device, positions.shape))
    except AttributeError:  # not tensors: the full path says what is wrong
        key = None
    entry = _fast.get(key)
    if entry is None:
        return _apply(scores, positions, stage, st.positional, "debias", start, _fast, key, padding)
    _cache.hits += 1
    if entry.checks is not None:
        _check_values(entry.checks, scores, positions)
    return entry.operation(scores, positions)


def _raster(positions, start):
    """What the recorder gets: plain positions over the raster."""
    if type(positions) is TrackedPositions:
        return positions.long()
    return positions if start is None or positions is None else torch.as_tensor(positions) - start


def _mean(scores, dim, exact: bool):
    """``torch.mean(scores, dim=dim)``, or (not ``exact``) a view without ``dim`` when it has size 1: equal
    values, except that the mean turns −0.0 into +0.0 — which the debias bias (+0 or −inf) adds anyway."""
    try:
        if exact or scores.shape[dim] != 1:
            return torch.mean(scores, dim=dim)
        return scores[0] if dim == 0 else scores.select(dim, 0)
    except (AttributeError, IndexError, TypeError, RuntimeError) as e:
        raise DebiasError(f"mean_dim={dim!r} does not fit scores {type(scores).__name__} "
                          f"{tuple(getattr(scores, 'shape', ()))}: {e}; pass the dim upstream's torch.mean "
                          f"reduces") from None


def mask_padding(scores: torch.Tensor, positions=None, *, start: int | None = None) -> torch.Tensor:
    """Padding suppression alone (−inf on padding tokens; no positional weight), for scores that are
    not attention, e.g. TokenCarve's SVD information score. Same shapes, modes and ``start`` as ``debias``."""
    st = _config._settings or settings()
    if not st.suppress_padding:
        return scores
    if type(positions) is TrackedPositions and start is None:
        out = positions._debiased(scores, 0, st, False)
        if out is not None:
            return out
        positions = positions.long()
    try:  # debias's key less its padding flag, in mask_padding's own cache
        key = (id(_samples_var.get()), id(st), 0, start, scores.dtype, scores.device, scores.shape,
               None if positions is None else (positions.dtype, positions.device, positions.shape))
    except AttributeError:
        key = None
    entry = _fast_pad.get(key)
    if entry is None:
        return _apply(scores, positions, 0, False, "mask_padding", start, _fast_pad, key)
    _cache.hits += 1
    if entry.checks is not None:
        _check_values(entry.checks, scores, positions)
    return entry.operation(scores, positions)


def keep_cap(k, *, sample: int | None = None) -> int:
    """``k`` capped to the number of non-padding tokens (≥ 1); ``k`` itself unless padding is suppressed.

    A batched top-k needs one k, so for a batch the smallest cap is returned unless ``sample`` picks a row.
    Computed on the host from geometry: never reads a device tensor.
    """
    st = _config._settings or settings()
    if type(k) is int and k > 0 and sample is None and st.mode in SUPPRESSING_MODES:  # warm path: this sample's cap
        warm = _fast_caps.get((id(_samples_var.get()), id(st)))
        if warm is not None:
            _cache.hits += 1
            return min(k, warm.cap)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise DebiasError(f"keep count {k!r} must be a host integer (not a tensor: reading one would sync the device)")
    if k <= 0:
        raise DebiasError(f"keep count k={k} must be ≥ 1 (number of visual tokens to keep)")
    if not st.suppress_padding:
        return int(k)
    ctxs = required_samples(f"keep_cap with DEBIAS={st.mode}")
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, numbers.Integral) or not 0 <= sample < len(ctxs):
            raise DebiasError(f"sample {sample!r} is not a row of this batch of {len(ctxs)} contexts")
        ctxs = (ctxs[sample],)
    cap = min(n_valid(c, st.pad_threshold, st.exact_geometry, st.method) for c in ctxs)
    if sample is None:
        _cache.put(_fast_caps, (id(ctxs), id(st)), WarmCap(ctxs, st, max(1, cap)))
    return max(1, min(int(k), cap))
