"""A SYNTHETIC recording (no model): scores with a known recency trend and elevated padding attention.

For tests and for previewing the figures only; every figure made from it says "synthetic" in its title.
"""
from __future__ import annotations

import numpy as np

SIZES = ((640, 480), (500, 375), (480, 640), (333, 500), (500, 500), (1024, 512))


def synthetic_session(rows: int = 60, *, b: float = 0.003, padding_boost: float = 2.0, seed: int = 0,
                      stages: int = 1, meta: dict | None = None):
    """A RecordingSession filled through the real ``debias_core.debias`` path (mode off).

    Row r: s_i = e^{b·i} · lognormal(0, 0.3) · (padding_boost on padding tokens); later stages rank the
    top half of the previous stage's tokens (their original positions kept)."""
    import torch

    import debias_core as dc
    from debias_core.calibrate import RecordingSession
    from debias_core.geometry import pad_fractions

    rng = np.random.default_rng(seed)
    prev = dc.settings()
    dc.configure(mode="off")
    session = RecordingSession(meta=dict(meta or {"question_file": "synthetic", "model": "synthetic"}))
    try:
        with session:
            for r in range(rows):
                size = SIZES[r % len(SIZES)]
                pad = pad_fractions(size).reshape(-1) > 0.5
                s = np.exp(b * np.arange(576)) * rng.lognormal(0, 0.3, 576) * np.where(pad, padding_boost, 1.0)
                with session.sample(image_size=size, span_start=35, info={"question_id": r}):
                    scores, pos = torch.tensor(s), torch.arange(576)
                    for st in range(stages):
                        dc.debias(scores, pos, stage=st)
                        keep = torch.topk(scores, scores.numel() // 2).indices.sort().values
                        scores, pos = scores[keep], pos[keep]
    finally:
        restore_settings(prev)
    return session


def restore_settings(prev) -> None:
    """Put debias_core's mode / trend back as they were (by spec when the trend came from a name)."""
    import debias_core as dc

    spec = prev.trend_spec if prev.trend_spec not in (None, "<in-code trend>") else prev.trend
    dc.configure(mode=prev.mode, trend=spec, pad_threshold=prev.pad_threshold)
