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


def check_range(positions: torch.Tensor, length: int) -> None:
    if positions.numel():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < -1 or hi >= length:
            raise DebiasError(f"position {lo if lo < -1 else hi} is outside the visual span 0..{length - 1} "
                              f"(−1 marks a merged token)")
