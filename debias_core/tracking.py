"""Tracked positions: the original positions of a multi-stage method's surviving visual tokens, carrying
their debias weights and padding bias so that a later stage's ranking call needs no gather.

PyramidDrop ranks three times per prefill; at stage s it ranks the survivors of stage s−1 and ``debias``
needs their original raster positions. Tracked as a plain long tensor, each call gathers the weight and
padding tables at those positions before its multiply-add (two ``take``s): three kernel launches. Its ranking sites run
just after a host–device sync (upstream indexes with a boolean mask), while the GPU waits for the host, so
every launch there is latency. ``positions(n)`` returns instead one float32 table [2 + S, n] — the
positions, their padding bias and their weight under each of the trend's S stage trends — and indexing it
with a stage's kept indices gathers all of it in the single launch that indexing the long tensor costs. A
ranking call on it is then one ``addcmul`` of two row views, and stage 0 needs no ``arange`` (the table is
cached)::

    p = debias_core.positions(576, device=x.device)   # mode off: torch.arange(576, device=x.device)
    scores = debias_core.debias(scores, p, stage=0)
    p = p[kept]                                         # kept: long [k] indices into the ranked span
    scores = debias_core.debias(scores, p, stage=1)

The result is bit-identical to passing ``p.long()``: the table holds the same float32 values as the tables
that path gathers from.
"""
from __future__ import annotations

import numpy as np
import torch

from . import config as _config
from .checks import check_finite, checks_values
from .config import settings
from .context import _active as _samples_var
from .context import required_samples
from .errors import DebiasError
from .tables import bias_host, cache, upload, valid_host, weight_host

_FLOAT32_OR_NARROWER = (torch.float16, torch.bfloat16, torch.float32)


class _Layout:
    """What a tracked table was built for (settings and sample contexts, by identity) and which table row
    holds each stage's weight."""

    __slots__ = ("st", "ctxs", "trend_rows", "stage_rows", "positional", "check")

    def __init__(self, st, ctxs, trend_rows, device: torch.device):
        self.st, self.ctxs, self.trend_rows, self.stage_rows = st, ctxs, trend_rows, {}
        self.positional = st.positional  # read per call: a slot, not the property
        self.check = checks_values(st, device)  # as on the general path

    def weight_row(self, stage: int) -> int:
        row = self.stage_rows[stage] = self.trend_rows[id(self.st.trend.for_stage(stage))]
        return row


class TrackedPositions:
    """Positions [n] of visual tokens in the original raster (0..span−1), with their debias rows.

    ``table``: float32 [2 + S, n] on the device, one row per field — row 0 the positions (exact in float32),
    row 1 their padding bias (−inf on padding, else 0), row 2 + j their weights under the j-th distinct stage
    trend (S = 0 when the mode has no positional weight). Field-major: ``t[i]`` is the cheapest view for the
    host, and ``p[kept]`` is still one gather (in situ the two layouts measure the same within noise;
    ``index_select`` would be one gather too, but costs the host more than this indexing on CUDA).
    Index it like a 1-D tensor (``p[kept]``, ``p[a:b]``, ``p[mask]``); pass it to ``debias`` /
    ``mask_padding`` as positions; ``long()`` gives the plain positions.
    """

    __slots__ = ("table", "layout")

    def __init__(self, table: torch.Tensor, layout: _Layout):
        self.table, self.layout = table, layout

    def __getitem__(self, index) -> "TrackedPositions":
        table = self.table[:, index]
        if table.dim() != 2:
            raise DebiasError(f"indexing tracked positions with {index!r} gives shape {tuple(table.shape[1:])}; "
                              f"index with a 1-D index tensor, a slice or a boolean mask")
        return TrackedPositions(table, self.layout)

    def __len__(self) -> int:
        return self.table.shape[1]

    @property
    def shape(self) -> torch.Size:
        return self.table.shape[1:]

    @property
    def device(self) -> torch.device:
        return self.table.device

    def long(self) -> torch.Tensor:
        """The positions as a long tensor [n] on the table's device."""
        return self.table[0].long()

    def __repr__(self) -> str:
        return f"TrackedPositions(n={len(self)}, columns={self.table.shape[1]}, device={self.table.device})"

    def _debiased(self, scores, stage: int, st, weighted: bool):
        """``bias + scores · weight`` (``weighted`` and a positional mode) or ``bias + scores`` from the carried
        rows, one kernel; None when this call must take the general path: other settings or samples than the
        table was built for, float64 or mismatched scores."""
        layout, table = self.layout, self.table
        if (layout.st is not st or layout.ctxs is not _samples_var.get() or type(scores) is not torch.Tensor
                or scores.dtype not in _FLOAT32_OR_NARROWER or scores.dim() not in (1, 2)
                or scores.shape[-1] != table.shape[1] or scores.device != table.device):
            return None
        if layout.check:
            check_finite(scores)
        if weighted and layout.positional:
            row = layout.stage_rows.get(stage)
            return torch.addcmul(table[1], scores, table[layout.weight_row(stage) if row is None else row])
        return torch.add(table[1], scores)  # == addcmul(bias, scores, 1) bit for bit: s·1 is exact


_tracked = cache.tracked  # TrackedPositions by (id(settings), id(sample contexts), n, device); the one cache's bound


def positions(n: int, *, device=None):
    """Positions 0..n−1 of a visual span to track through a multi-stage method's pruning (see module doc).

    Mode ``off`` (or n = 0): ``torch.arange(n, device=device)``. Otherwise a ``TrackedPositions`` for the active
    sample (a batch tracks each row with ``debias`` called per row), built once per settings, sample geometry,
    n and device and cached, so creating it launches nothing.
    """
    st = _config._settings or settings()
    if st.mode == "off" or n == 0:  # n = 0: a sample without an image (upstream skips its ranking)
        return torch.arange(n, device=device)
    ctxs = _samples_var.get()
    hit = _tracked.get((id(st), id(ctxs), n, device))
    if hit is not None and hit.layout.st is st and hit.layout.ctxs is ctxs:  # ids held alive by the hit itself
        return hit
    return cache.put(_tracked, (id(st), id(ctxs), n, device), _build(st, n, device))


def _build(st, n, device) -> TrackedPositions:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DebiasError(f"positions(n={n!r}): n must be a non-negative integer (the number of visual tokens)")
    ctxs = required_samples(f"positions() with DEBIAS={st.mode}")
    if len(ctxs) != 1:
        raise DebiasError(f"positions() tracks one sample's tokens but {len(ctxs)} sample contexts are active; "
                          f"track each row with debias_core.sample(...) around it, or pass long positions")
    ctx = ctxs[0]
    if n > ctx.span_length:
        raise DebiasError(f"positions(n={n}) exceeds the visual span of {ctx.span_length} tokens")
    rows = [np.arange(n, dtype=np.float64)]
    valid = valid_host(ctx, st.pad_threshold, st.exact_geometry, st.method) if st.suppress_padding else None
    rows.append(np.zeros(n) if valid is None else bias_host(valid[:n]))
    trend_rows = {}
    for t in (st.trend.stage_trends() if st.positional else []):
        trend_rows[id(t)] = len(rows)
        rows.append(weight_host(t, ctx.span_length)[:n])
    table = upload(np.stack(rows, axis=0), torch.device("cpu" if device is None else device), torch.float32)
    return TrackedPositions(table, _Layout(st, ctxs, trend_rows, table.device))
