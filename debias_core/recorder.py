"""Recording raw ranking scores at the patch sites, for calibration.

    with debias_core.recording() as rec:
        ...run the patched method (any mode; rows are the raw, un-debiased scores)...
    rec.save("scores.npz")
    mean = rec.mean_by_position(stage=0, length=576)

Recording copies each score row to the host (a device sync): use it for calibration runs only.
Files are .npz of plain numeric arrays (loaded with allow_pickle=False).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from .errors import DebiasError

_active: ContextVar["Recorder | None"] = ContextVar("debias_core_recorder", default=None)


class Recorder:
    """Rows per stage: original positions (int64, −1 = merged/neutral) and raw scores (float64)."""

    def __init__(self):
        self.rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def append(self, stage: int, scores, positions=None) -> None:
        s = scores.detach().float().cpu().numpy().astype(np.float64)
        s = s.reshape(1, -1) if s.ndim == 1 else s
        if positions is None:
            p = np.broadcast_to(np.arange(s.shape[1], dtype=np.int64), s.shape)
        else:
            p = np.asarray(positions.detach().cpu().numpy() if hasattr(positions, "detach") else positions, dtype=np.int64)
            p = np.broadcast_to(p.reshape(1, -1) if p.ndim == 1 else p, s.shape)
        for row_s, row_p in zip(s, p):
            self.rows.setdefault(int(stage), []).append((row_p.copy(), row_s.copy()))

    @property
    def stages(self) -> list[int]:
        return sorted(self.rows)

    def count(self, stage: int = 0) -> int:
        return len(self.rows.get(stage, []))

    def matrix(self, stage: int = 0, length: int | None = None) -> np.ndarray:
        """Scores scattered to original positions: float64 [rows, length], NaN where a row lacks a position."""
        rows = self.rows.get(stage)
        if not rows:
            raise DebiasError(f"nothing was recorded at stage {stage}; recorded stages: {self.stages}")
        length = length or 1 + max(int(p.max()) for p, _ in rows)
        out = np.full((len(rows), length), np.nan)
        for r, (p, s) in enumerate(rows):
            keep = (p >= 0) & (p < length)
            out[r, p[keep]] = s[keep]
        return out

    def mean_by_position(self, stage: int = 0, length: int | None = None) -> np.ndarray:
        """Mean raw score per original position over the rows that contain it. float64 [length]."""
        m = self.matrix(stage, length)
        seen = np.isfinite(m).any(axis=0)
        out = np.full(m.shape[1], np.nan)
        out[seen] = np.nanmean(m[:, seen], axis=0)
        return out

    def save(self, path) -> None:
        arrays = {}
        for st, rows in self.rows.items():
            for r, (p, s) in enumerate(rows):
                arrays[f"s{st}_r{r}_pos"] = p
                arrays[f"s{st}_r{r}_score"] = s
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path) -> "Recorder":
        rec = cls()
        with np.load(path, allow_pickle=False) as z:
            keys = sorted({k.rsplit("_", 1)[0] for k in z.files}, key=lambda k: (int(k[1:].split("_r")[0]), int(k.split("_r")[1])))
            for k in keys:
                st = int(k[1:].split("_r")[0])
                rec.rows.setdefault(st, []).append((z[k + "_pos"], z[k + "_score"]))
        return rec


@contextmanager
def recording(recorder: Recorder | None = None):
    """Record every ``debias`` call's raw scores inside the block."""
    rec = recorder or Recorder()
    token = _active.set(rec)
    try:
        yield rec
    finally:
        _active.reset(token)


def active_recorder() -> Recorder | None:
    return _active.get()
