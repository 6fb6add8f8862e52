"""Calibration: fit our own positional trends from raw ranking scores recorded at the patch sites.

Record (the eval driver's ``--record FILE`` does this; any loop over samples can)::

    session = debias_core.calibrate.RecordingSession(meta={"question_file": q, "model": m, "method": x})
    with session:                                         # wraps debias_core.recording()
        for sample in calibration_set:                    # a held-out set, NEVER the evaluated benchmark
            with session.sample(image_size=(W, H), span_start=s0):   # same arguments as debias_core.sample
                model.generate(...)
    session.save("calib.npz")       # Recorder rows (.npz) + which sample each row is (calib.samples.json)

Fit::

    trend = calibrate("calib.npz", model="llava-v1.5-7b", method="pdrop", stages="all")
    write_trend(trend, "pdrop_calibrated.json")           # DEBIAS_TREND=calibrated:pdrop_calibrated.json

or ``python -m debias_core.calibrate calib.npz --model llava-v1.5-7b --method pdrop --out trend.json``.

Per stage s: the raw scores of every recorded row are placed at their original visual positions
(float64 [rows, n]); tokens lying on padding (pad fraction > the method's threshold; needs the sample
sidecar) are left out; Ā_i = mean over rows that hold position i; the trend f(i) = a·e^{b·i} is the
least-squares fit of Ā (``debias_core.fit_exponential``). The naive alternative f(i) = Ā_i (a table
trend) is reported beside it, and both are scored on held-out rows (split-half r²) because the table
fits its own data perfectly. One stage → an exponential trend; several → a staged trend (one per stage).
Mean scores ≤ 0 at an observed position are refused (an exponential is positive everywhere), and so is a fit
whose weights leave float32's range over the span (debias_core.trend validates every trend).

Command-line exit status: 0 done (the trend file is written last, atomically); 2 bad input — an unreadable or
foreign recording, a bad option value, data an exponential cannot describe, an unwritable output path — as one
``error: ...`` line on stderr, with no --out, --table-out or --report written; 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import DebiasError
from .geometry import check_threshold, pad_fractions, valid_mask
from .presets import METHODS, method_name, pad_threshold as paper_pad_threshold
from .recorder import Recorder, recording
from .trend import (ExponentialTrend, StagedTrend, TableTrend, Trend, check_positive_means, fit_exponential,
                    fit_exponential_at, write_json_atomic)

SIDECAR_SUFFIX = ".samples.json"


# ------------------------------------------------------------------------------------ recording side

def sidecar_path(path) -> Path:
    """``calib.npz`` → ``calib.samples.json`` (which sample each recorded row belongs to)."""
    path = Path(path)
    stem = path.name[:-4] if path.name.endswith(".npz") else path.name
    return path.with_name(stem + SIDECAR_SUFFIX)


class RecordingSession:
    """A ``debias_core.recording()`` that also notes which sample (image size, preprocessing) each row is.

    ``meta`` (JSON-able dict) is saved with the rows: put ``question_file``, ``model``, ``method`` there so
    that calibration can refuse a recording of the benchmark being evaluated.
    """

    def __init__(self, meta: dict | None = None):
        self.recorder = Recorder()
        self.samples: list[dict] = []
        self.row_sample: dict[int, list[int]] = {}
        self.meta = dict(meta or {})
        self._cm = None

    def __enter__(self):
        self._cm = recording(self.recorder)
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        cm, self._cm = self._cm, None
        return cm.__exit__(*exc)

    @contextmanager
    def sample(self, image_size=None, *, info=None, **kwargs):
        """``debias_core.sample(image_size, **kwargs)`` plus bookkeeping. ``info``: per-sample JSON-able
        extras (question_id, image path: figures overlay kept tokens on the image when it is given).
        A batch (list of sizes) records one entry per sample; rows of a [B, N] call map to samples in order."""
        from .context import sample as _sample

        if self._cm is None:
            raise DebiasError("RecordingSession.sample() must run inside `with session:`")
        before = {st: self.recorder.count(st) for st in self.recorder.stages}
        with _sample(image_size, **kwargs) as ctx:
            ctxs = ctx if isinstance(ctx, tuple) else (ctx,)
            first = len(self.samples)
            infos = info if isinstance(info, list) else [info] * len(ctxs)
            for c, extra in zip(ctxs, infos):
                self.samples.append({
                    "image_size": list(c.image_size) if c.image_size else None, "preprocess": c.preprocess,
                    "grid": c.grid, "resolution": c.resolution, "span_start": c.span_start,
                    "span_length": c.span_length, **(extra or {})})
            yield ctx
        self._pad_rows(before)
        for st in self.recorder.stages:
            new = self.recorder.count(st) - before.get(st, 0)
            self.row_sample[st].extend(first + (r % len(ctxs)) for r in range(new))

    def _pad_rows(self, counts: dict | None = None) -> None:
        """Mark rows recorded outside ``sample()`` (up to ``counts``, default: all rows) as belonging to none."""
        for st in self.recorder.stages:
            rows = self.row_sample.setdefault(st, [])
            upto = self.recorder.count(st) if counts is None else counts.get(st, 0)
            rows.extend([-1] * (upto - len(rows)))

    def save(self, path) -> tuple[Path, Path]:
        """Write the rows (.npz, no pickle) and the sidecar JSON; returns both paths."""
        path = Path(path)
        if path.suffix != ".npz":
            raise DebiasError(f"recording file {str(path)!r} must end in .npz")
        self.recorder.save(path)
        self._pad_rows()
        side = sidecar_path(path)
        side.write_text(json.dumps({"meta": self.meta, "samples": self.samples,
                                    "row_sample": {str(k): v for k, v in sorted(self.row_sample.items())}},
                                   indent=1, default=str))
        return path, side


class Recording:
    """Recorded rows plus, when known, the sample context of each row (per stage)."""

    def __init__(self, recorder: Recorder, samples: list | None = None, row_sample: dict | None = None,
                 meta: dict | None = None, sources: list | None = None):
        self.recorder = recorder
        self.samples = samples or []
        self.row_sample = {int(k): list(v) for k, v in (row_sample or {}).items()}
        self.meta = meta or {}
        self.sources = sources or []

    @property
    def has_contexts(self) -> bool:
        return bool(self.samples) and all(len(self.row_sample.get(st, [])) == self.recorder.count(st)
                                          for st in self.recorder.stages)

    def contexts(self, stage: int) -> list:
        """Per row of ``stage``: the sample dict, or None (unknown / outside a sample)."""
        rows = self.row_sample.get(stage)
        if rows is None or len(rows) != self.recorder.count(stage):
            return [None] * self.recorder.count(stage)
        return [self.samples[i] if i >= 0 else None for i in rows]

    def n_samples(self, stage: int) -> int:
        rows = self.row_sample.get(stage)
        if rows is None or len(rows) != self.recorder.count(stage):
            return self.recorder.count(stage)
        return len({r for r in rows if r >= 0}) + sum(1 for r in rows if r < 0)

    @classmethod
    def load(cls, paths) -> "Recording":
        """Merge one or more ``.npz`` recordings (and their ``.samples.json`` sidecars, when present)."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise DebiasError("no recording files given; record with debias_core.recording() / --record FILE")
        merged, samples, row_sample, metas, sources = Recorder(), [], {}, [], []
        for p in paths:
            p = Path(p)
            if not p.is_file():
                raise DebiasError(f"recording {str(p)!r} does not exist; make one with the eval driver's --record "
                                  f"FILE (or debias_core.calibrate.RecordingSession)")
            rec = _load_rows(p)
            side = sidecar_path(p)
            side_data = _load_sidecar(side) if side.is_file() else None
            offset = len(samples)
            for st in rec.stages:
                have = merged.count(st)
                rows = row_sample.setdefault(st, [-1] * have)
                if side_data is not None and str(st) in side_data.get("row_sample", {}):
                    got = side_data["row_sample"][str(st)]
                    if len(got) != rec.count(st):
                        raise DebiasError(f"{side.name} maps {len(got)} rows of stage {st} but {p.name} has "
                                          f"{rec.count(st)}; the two files do not belong together")
                    rows.extend(r + offset if r >= 0 else -1 for r in got)
                else:
                    rows.extend([-1] * rec.count(st))
                merged.rows.setdefault(st, []).extend(rec.rows[st])
            if side_data is not None:
                samples.extend(side_data.get("samples", []))
                metas.append(side_data.get("meta", {}))
            sources.append({"file": p.name, "sha256": file_sha256(p), "sidecar": side.name if side_data else None})
        for st in merged.stages:  # stages that appeared in a later file only
            row_sample.setdefault(st, [])
            row_sample[st] = row_sample[st] + [-1] * (merged.count(st) - len(row_sample[st]))
        meta = metas[0] if len(metas) == 1 else {"parts": metas} if metas else {}
        return cls(merged, samples, row_sample, meta, sources)


def _load_rows(path: Path) -> Recorder:
    """``Recorder.load`` with a clear error for a file it did not write (not .npz, torn, pickled, other keys)."""
    try:
        return Recorder.load(path)
    except (OSError, ValueError, EOFError, KeyError, IndexError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise DebiasError(f"recording {str(path)!r} is not a .npz written by debias_core's Recorder.save "
                          f"({type(e).__name__}: {e}); record it again with the eval driver's --record FILE.npz") from None


def _load_sidecar(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DebiasError(f"sidecar {str(path)!r} is not JSON ({e}); delete it (the rows are then used without "
                          f"their image sizes) or record again") from None
    if not isinstance(data, dict) or not isinstance(data.get("samples", []), list) \
            or not isinstance(data.get("row_sample", {}), dict):
        raise DebiasError(f"sidecar {str(path)!r} is not a RecordingSession sidecar (expected an object with "
                          f"'samples' and 'row_sample'); delete it or record again")
    return data


def as_recording(source) -> Recording:
    if isinstance(source, Recording):
        return source
    if isinstance(source, RecordingSession):
        source._pad_rows()
        return Recording(source.recorder, source.samples, source.row_sample, source.meta)
    if isinstance(source, Recorder):
        return Recording(source)
    return Recording.load(source)


# ------------------------------------------------------------------------------------------- fitting

def position_matrix(rec: Recording, stage: int, length: int, *, exclude_padding: bool,
                    pad_threshold: float = 0.5) -> np.ndarray:
    """Raw scores at original positions, float64 [rows, length]; NaN where a row lacks the position or the
    token lies on padding (pad fraction > ``pad_threshold``; only for rows with a known pad-mode image)."""
    top = max((int(p.max()) for p, _ in rec.recorder.rows.get(stage, []) if p.size), default=-1)
    if top >= length:
        raise DebiasError(f"stage {stage} has a score at position {top}, outside a span of {length} positions; "
                          f"pass the right span length (--length)")
    m = rec.recorder.matrix(stage, length)
    if exclude_padding:
        for r, ctx in enumerate(rec.contexts(stage)):
            pad = padding_of(ctx, pad_threshold)
            if pad is not None:
                if pad.size != length:
                    raise DebiasError(f"row {r} of stage {stage}: a {ctx['grid']}×{ctx['grid']} grid has {pad.size} "
                                      f"tokens but the span length is {length}")
                m[r, pad] = np.nan
    return m


def padding_of(ctx, pad_threshold: float = 0.5, exact: bool = True):
    """Bool [grid²] (True = padding token) for a sample dict, or None if the sample has no padding geometry."""
    if not ctx or not ctx.get("image_size") or ctx.get("preprocess", "pad") != "pad":
        return None
    fr = pad_fractions(tuple(ctx["image_size"]), grid=ctx.get("grid", 24), resolution=ctx.get("resolution", 336),
                       exact=exact)
    return ~valid_mask(fr, pad_threshold).reshape(-1)


def column_means(m: np.ndarray) -> np.ndarray:
    """Per-position mean over finite entries, NaN where a position has none. float64 [n]."""
    seen = np.isfinite(m)
    cnt = seen.sum(0)
    tot = np.where(seen, m, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def fit_observed(mean: np.ndarray, *, iterations: int = 100) -> ExponentialTrend:
    """f(i) = a·e^{b·i} fitted by least squares to the finite entries of ``mean`` [n] (NaN = unobserved).

    All finite: exactly ``debias_core.fit_exponential``. Otherwise the same fit over the observed positions
    only (``fit_exponential_at``); r² over those positions.
    """
    mean = np.asarray(mean, dtype=np.float64)
    n = mean.size
    obs = np.isfinite(mean)
    if obs.all():
        return fit_exponential(mean, iterations=iterations)
    if obs.sum() < 2:
        raise DebiasError(f"only {int(obs.sum())} of {n} positions were observed; record more samples")
    return fit_exponential_at(np.flatnonzero(obs), mean[obs], n, iterations=iterations)


def fit_loglinear(mean: np.ndarray) -> ExponentialTrend:
    """f(i) = a·e^{b·i} by least squares on log Ā_i (finite, positive entries of ``mean`` [n]).

    Every position weighs the same in relative terms, so a few very large means (e.g. an LLM's last
    tokens) do not dominate the fit as they do on the original scale. r² is on the original scale,
    like ``fit_exponential``'s, for comparison."""
    mean = np.asarray(mean, dtype=np.float64)
    n = mean.size
    ok = np.isfinite(mean)
    check_positive_means(np.flatnonzero(ok), mean[ok])
    x = np.flatnonzero(ok).astype(np.float64)
    b, log_a = np.polyfit(x, np.log(mean[ok]), 1)
    try:
        t = ExponentialTrend(a=float(math.exp(log_a)), b=float(b), n=n)
    except DebiasError as e:
        raise DebiasError(f"the fitted trend is unusable: {e}") from None
    t.r2 = float(r2_on(t.values(np.arange(n)), mean))
    return t


FITS = {"lsq": fit_observed, "loglinear": fit_loglinear}
FIT_DESCRIPTIONS = {
    "lsq": "least squares f(i) = a·exp(b·i) on the per-position mean of raw scores (debias_core.fit_exponential)",
    "loglinear": "least squares of log Ā_i = log a + b·i (per-position mean of raw scores, log scale)",
}


def _fit_function(fit: str):
    if fit not in FITS:
        raise DebiasError(f"fit {fit!r} is unknown; use one of {', '.join(FITS)}")
    return FITS[fit]


def r2_on(pred: np.ndarray, target: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` for ``target`` over positions finite in both."""
    ok = np.isfinite(pred) & np.isfinite(target)
    if ok.sum() < 2:
        return float("nan")
    t = target[ok]
    sst = float(((t - t.mean()) ** 2).sum())
    return 1.0 - float(((t - pred[ok]) ** 2).sum()) / sst if sst > 0 else float("nan")


def split_half(m: np.ndarray, groups: np.ndarray, fit: str = "lsq") -> dict:
    """Held-out r² of the exponential and the table trend: fit on even groups, score on odd, and back.

    m float64 [rows, n] (NaN = absent); groups int [rows] (the sample of each row; rows of one sample stay
    together so a held-out half is held-out samples)."""
    uniq = np.unique(groups)
    if uniq.size < 4:
        return {"exponential": float("nan"), "table": float("nan"), "note": "fewer than 4 samples: not scored"}
    half = np.isin(groups, uniq[0::2])
    exp_r2, tab_r2 = [], []
    for fit_rows, test_rows in ((half, ~half), (~half, half)):
        fit_mean, test_mean = column_means(m[fit_rows]), column_means(m[test_rows])
        try:
            t = _fit_function(fit)(fit_mean)
        except DebiasError:
            return {"exponential": float("nan"), "table": float("nan"), "note": "half could not be fitted"}
        exp_r2.append(r2_on(t.values(np.arange(m.shape[1])), test_mean))
        tab_r2.append(r2_on(fit_mean, test_mean))
    return {"exponential": float(np.mean(exp_r2)), "table": float(np.mean(tab_r2))}


def _finite_or_none(x):
    """JSON-safe copy: NaN/inf floats become None (trend files are strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def git_sha(root: Path | None = None) -> str:
    """HEAD of the project's git checkout, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else "unknown"


def file_sha256(path) -> str:
    """Streaming sha256 (hex) of a file: the project's one helper (recordings, trends, checkpoints, splits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve_stages(rec: Recording, stages) -> list[int]:
    have = rec.recorder.stages
    if not have:
        raise DebiasError("the recording holds no rows: was the patched method run inside the recording, "
                          "and does it call debias_core.debias at its ranking site?")
    if stages in (None, "all"):
        return have
    wanted = [int(s) for s in ([stages] if isinstance(stages, (int, np.integer)) else stages)]
    missing = [s for s in wanted if s not in have]
    if missing:
        raise DebiasError(f"stage(s) {missing} were not recorded; recorded stages: {have}")
    return wanted


def default_length(rec: Recording) -> int:
    """Span length: the sidecar's (if all samples agree), else 1 + the largest recorded position."""
    spans = {s.get("span_length") for s in rec.samples if s.get("span_length")}
    if len(spans) == 1:
        return int(spans.pop())
    top = max((int(p.max()) for rows in rec.recorder.rows.values() for p, _ in rows if p.size), default=-1)
    if top < 1:
        raise DebiasError("the recording holds no visual positions; pass the span length (--length 576)")
    return top + 1


def _method_threshold(method: str, pad_threshold) -> float:
    if pad_threshold is not None:
        return float(pad_threshold)
    try:
        return paper_pad_threshold(method)
    except DebiasError:
        return 0.5


def calibrate(source, *, model: str, method: str, stages="all", length: int | None = None,
              exclude_padding: bool = True, pad_threshold: float | None = None,
              calibration_set: str | None = None, benchmark: str | None = None, fit: str = "lsq",
              report: dict | None = None) -> Trend:
    """Fit positional trends from recorded raw scores.

    source:   a Recorder, RecordingSession, Recording, or .npz path(s) (``Recorder.save`` files, with their
              ``.samples.json`` sidecars when the session wrote one).
    model, method: provenance (``method`` also picks the paper's padding threshold when it is one of
              fastv/pdrop/sparsevlm/himap/tokencarve; ``pad_threshold`` overrides).
    stages:   "all" or stage numbers; one stage → ExponentialTrend, several → StagedTrend.
    length:   number of visual positions (default: the sidecar's span length, else 1 + the largest position).
    exclude_padding: leave padding tokens out of the per-position mean (needs sample sizes from the sidecar).
    calibration_set / benchmark: question files; refused when they are the same (no transductive fit).
    fit:      "lsq" (default; ``fit_exponential``, the paper's presumed recipe) or "loglinear" (fit on log Ā,
              robust to a few very large means).
    report:   if a dict is given, it is filled with per-stage diagnostics (also stored in the provenance).
    Returns the trend; ``write_trend`` writes it as JSON for ``DEBIAS_TREND=calibrated:<file>``.
    """
    rec = as_recording(source)
    check_not_benchmark(calibration_set or rec.meta.get("question_file"), benchmark)
    fitter = _fit_function(fit)
    if not isinstance(model, str) or not model or not isinstance(method, str) or not method:
        raise DebiasError(f"model {model!r} and method {method!r} must be non-empty names (they go into the provenance)")
    stage_list = _resolve_stages(rec, stages)
    thr = _method_threshold(method, pad_threshold)
    if length is None:
        length = default_length(rec)
    base = {
        "model": model, "method": method, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(), "calibration_set": calibration_set or rec.meta.get("question_file"),
        "recordings": rec.sources, "recording_meta": rec.meta, "fit": FIT_DESCRIPTIONS[fit],
    }
    trends, diag = {}, {}
    for st in stage_list:
        m = position_matrix(rec, st, length, exclude_padding=exclude_padding, pad_threshold=thr)
        n = m.shape[1]
        mean = column_means(m)
        observed = int(np.isfinite(mean).sum())
        trend = fitter(mean)
        rows_sample = np.asarray(rec.row_sample.get(st) or [], dtype=np.int64)
        groups = rows_sample if rows_sample.size == m.shape[0] else np.arange(m.shape[0])
        groups = np.where(groups < 0, -1 - np.arange(m.shape[0]), groups)  # unknown rows: their own group
        padded_ctx = sum(1 for c in rec.contexts(st) if (pm := padding_of(c, thr)) is not None and pm.any())
        table_ok = observed == n and bool((mean > 0).all())
        d = {
            "stage": st, "n_rows": int(m.shape[0]), "n_samples": rec.n_samples(st), "positions": n,
            "positions_observed": observed,
            "a": trend.a, "b": trend.b, "r2": trend.r2, "end_start_ratio": math.exp(trend.b * (n - 1)),
            "padding": (f"excluded (pad fraction > {thr}) on the {padded_ctx} rows whose image has padding"
                        if exclude_padding and padded_ctx else
                        "included" if not exclude_padding else "none known (no sidecar, or no image with padding)"),
            "table_trend": {"available": table_ok,
                            "why_not": None if table_ok else f"{n - observed} positions unobserved or mean ≤ 0"},
            "held_out_r2": split_half(m, groups, fit),
        }
        keys = ("n_rows", "n_samples", "positions_observed", "end_start_ratio", "padding", "held_out_r2")
        trend.provenance = _finite_or_none({**base, "stage": st, **{k: d[k] for k in keys}})
        trends[st] = trend
        diag[st] = d
    if report is not None:
        report.update(_finite_or_none({"stages": diag, "provenance": base}))
    if len(trends) == 1:
        return next(iter(trends.values()))
    staged = StagedTrend(trends)
    staged.provenance = {**base, "stages": stage_list}
    return staged


def mean_scores_by_stage(source, *, stages="all", length=None, exclude_padding=True, pad_threshold=0.5) -> dict:
    """{stage: float64 [n] per-position mean raw score (NaN = unobserved)} — the data behind the fit."""
    rec = as_recording(source)
    return {st: column_means(position_matrix(rec, st, length or default_length(rec),
                                             exclude_padding=exclude_padding, pad_threshold=pad_threshold))
            for st in _resolve_stages(rec, stages)}


def table_from(mean: np.ndarray) -> TableTrend:
    """The naive per-position-average trend (``debias_core.table_trend``) from a mean vector."""
    from .trend import table_trend
    return table_trend(mean)


def trend_json(trend: Trend) -> dict:
    """JSON of a trend; a staged trend also carries its top-level provenance (ignored by the loader)."""
    d = trend.to_json()
    prov = getattr(trend, "provenance", None)
    if isinstance(trend, StagedTrend) and prov:
        d["provenance"] = prov
    return d


def write_trend(trend: Trend, path) -> Path:
    """Write the trend JSON atomically (creating the folder); an unwritable path is a DebiasError naming it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DebiasError(f"cannot create the folder of {str(path)!r}: {e.strerror or e}; pick a writable --out") from None
    return write_json_atomic(path, trend_json(trend))


# ------------------------------------------------------------------------------ no transductive fit

def check_not_benchmark(calibration_set, benchmark) -> None:
    """Refuse when the calibration question file is the benchmark being evaluated (both must be named).

    Files are the same if they are one file on disk or have identical content; names that are not files
    (e.g. ``gqa``) are compared case-insensitively."""
    if not calibration_set or not benchmark:
        return
    c, b = Path(str(calibration_set)), Path(str(benchmark))
    same = False
    if c.is_file() and b.is_file():
        same = os.path.samefile(c, b) or (c.stat().st_size == b.stat().st_size and file_sha256(c) == file_sha256(b))
    elif not c.is_file() and not b.is_file():
        same = str(calibration_set).strip().lower() == str(benchmark).strip().lower()
    if same:
        raise DebiasError(f"calibration set {str(calibration_set)!r} is the benchmark being evaluated "
                          f"({str(benchmark)!r}): fitting the trend on the test questions is a transductive fit. "
                          f"Record the calibration run on a held-out question file (e.g. another benchmark's "
                          f"train/val split) and pass that as --calibration-set")


# ---------------------------------------------------------------------------------------------- CLI

def _parse_stages(text: str):
    if text == "all":
        return "all"
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stages {text!r} is not 'all' or a comma-separated list like 0,1,2") from None


def build_parser() -> argparse.ArgumentParser:
    from .cli import EXIT_CODES, OneLineParser

    p = OneLineParser(prog="python -m debias_core.calibrate",
                      description="Fit positional trends from recorded raw ranking scores (.npz from "
                                  "debias_core.recording / the eval driver's --record).",
                      epilog=EXIT_CODES.replace("nothing written", "no --out, --table-out or --report written"),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recordings", nargs="+", help="one or more .npz recordings (their .samples.json sidecars are read)")
    p.add_argument("--model", required=True, help="model the scores came from, e.g. llava-v1.5-7b (provenance)")
    p.add_argument("--method", required=True, help=f"ranking method ({', '.join(METHODS)} or another name)")
    p.add_argument("--out", required=True, help="trend JSON to write (use as DEBIAS_TREND=calibrated:<file>)")
    p.add_argument("--stages", type=_parse_stages, default="all", help="'all' (default) or e.g. 0,1,2")
    p.add_argument("--length", type=int, default=None, help="visual positions (default: from the sidecar; 576)")
    p.add_argument("--include-padding", action="store_true", help="keep padding tokens in the per-position mean")
    p.add_argument("--pad-threshold", type=float, default=None, help="default: the method's (pdrop 0.01, else 0.5)")
    p.add_argument("--calibration-set", default=None, help="question file the recording was made on")
    p.add_argument("--benchmark", default=None, help="question file (or name) to be evaluated with this trend; "
                                                     "refused if it is the calibration set")
    p.add_argument("--fit", choices=sorted(FITS), default="lsq",
                   help="lsq: least squares on the mean (default, debias_core.fit_exponential); loglinear: on log mean")
    p.add_argument("--table-out", default=None, help="also write the naive per-position-average trend (stage 0) here")
    p.add_argument("--report", default=None, help="write the per-stage diagnostics as JSON here")
    return p


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _check_writable(option: str, path) -> None:
    """Refuse an output path whose folder cannot be created or written, before anything is computed."""
    folder = Path(path).resolve().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise DebiasError(f"{option} {str(path)!r} cannot be written ({folder} is not a writable folder); "
                          f"pick another path")


def _run(args) -> int:
    if args.length is not None and args.length < 2:
        raise DebiasError(f"--length {args.length} must be ≥ 2 (number of visual positions, 576 for LLaVA-1.5)")
    if args.pad_threshold is not None:
        check_threshold(args.pad_threshold)
    for option in ("out", "table_out", "report"):
        if getattr(args, option):
            _check_writable("--" + option.replace("_", "-"), getattr(args, option))
    if args.method.lower() in METHODS or args.method.lower() in ("pyramiddrop", "sparsevlms"):
        method = method_name(args.method)
    else:
        method = args.method
    rec = Recording.load(args.recordings)
    report: dict = {}
    trend = calibrate(rec, model=args.model, method=method, stages=args.stages, length=args.length,
                      exclude_padding=not args.include_padding, pad_threshold=args.pad_threshold,
                      calibration_set=args.calibration_set, benchmark=args.benchmark, fit=args.fit,
                      report=report)
    table = None
    if args.table_out:  # computed before anything is written: a refused table leaves no trend file behind
        st0 = min(report["stages"])
        mean = mean_scores_by_stage(rec, stages=[st0], length=args.length, exclude_padding=not args.include_padding,
                                    pad_threshold=_method_threshold(method, args.pad_threshold))[st0]
        table = table_from(mean)
    for st, d in report["stages"].items():
        ho = d["held_out_r2"]
        print(f"stage {st}: {d['n_samples']} samples ({d['n_rows']} rows), {d['positions_observed']}/{d['positions']} "
              f"positions; f(i) = {d['a']:.6g}·exp({d['b']:.6g}·i), r² = {d['r2']:.4f}, "
              f"end/start = {d['end_start_ratio']:.3f}; held-out r²: exponential {_fmt(ho['exponential'])}, "
              f"naive table {_fmt(ho['table'])}; padding {d['padding']}")
    if args.report:
        write_json_atomic(args.report, report)
    if table is not None:
        write_json_atomic(args.table_out, table.to_json(), indent=None)
        print(f"wrote {args.table_out}: naive table trend of stage {min(report['stages'])}")
    write_trend(trend, args.out)  # last: a trend file exists only when the whole command succeeded
    print(f"wrote {args.out}  (DEBIAS_TREND=calibrated:{args.out})")
    return 0


def main(argv=None) -> int:
    from .cli import run_main

    return run_main(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
