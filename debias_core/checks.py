"""Value checks at the ranking site. They read tensor values, which on an accelerator is a host–device
sync, so they run on CPU tensors always, on accelerators only with DEBIAS_CHECK=1, never on ``meta``
tensors (which have no values; tests use them to prove a call reads none)."""
from __future__ import annotations

import torch

from .errors import DebiasError


def checks_values(st, device: torch.device) -> bool:
    """Whether calls with settings ``st`` on ``device`` check values."""
    return device.type == "cpu" or (st.checks and device.type != "meta")


def check_finite(scores: torch.Tensor) -> None:
    finite = torch.isfinite(scores)
    if not finite.all():
        bad = tuple(int(i) for i in (~finite).nonzero()[0])
        raise DebiasError(f"scores contain {scores[bad].item()} at index {bad if len(bad) > 1 else bad[0]} "
                          f"(shape {tuple(scores.shape)}); the attention that produced them is broken "
                          f"(check for fp16 overflow before the ranking site)")


def check_range(positions: torch.Tensor, length: int, start: int | None = None) -> None:
    """Positions within the visual span 0..length−1 (−1 marks a merged token), or, counted from ``start``,
    within start..start+length−1."""
    if positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        first = -1 if start is None else start
        last = length - 1 if start is None else start + length - 1
        if lo < first or hi > last:
            where = (f"the visual span 0..{length - 1} (−1 marks a merged token)" if start is None else
                     f"the visual span {start}..{last} (positions counted from start={start})")
            raise DebiasError(f"position {lo if lo < first else hi} is outside {where}")


def check_no_padding(positions: torch.Tensor, valid: list, start: int | None = None) -> None:
    """No position is padding (``debias(..., padding=False)``). ``valid``: per sample context, host bool [L]
    or None (no padding); positions [N] hold for every context, [B, N] row by row (already range-checked)."""
    p = positions.detach().to("cpu", torch.long).reshape(-1, positions.shape[-1]).numpy() - (start or 0)
    for row, v in enumerate(valid):
        if v is None:
            continue
        q = p[row if p.shape[0] > 1 else 0]
        q = q[q >= 0]  # −1: a merged token, never padding
        bad = q[~v[q]]
        if bad.size:
            raise DebiasError(f"position {int(bad[0])} is padding (sample {row}), but padding=False says the ranked "
                              f"tokens hold none: pass padding=False only for the survivors of a stage that "
                              f"suppressed padding and capped its keep count with keep_cap")
