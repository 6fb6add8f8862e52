"""Positional trends f(i) over visual-token position i, their weights w_i = f(0)/f(i), fitting and JSON I/O.

Debiased score = score · w_i, i.e. the score divided by the trend normalised to f(0) = 1. Top-k is
scale-invariant, so no renormalisation is needed.

JSON forms (``"form"`` key):
- ``exponential``: f(i) = a·exp(b·i) — {"form", "a", "b", "n", ["r2"], ["provenance"]}
- ``polynomial``:  f(i) = Σ_k coef[k]·(i/x_scale)^k — {"form", "coef", "x_scale", "n"} (FastV's cubic)
- ``table``:       f(i) = values[i], the naive per-position average — {"form", "values"}
- ``staged``:      one trend per ranking stage — {"form": "staged", "stages": {"0": {...}, "1": {...}}}

Every trend is validated when it is built (from JSON, by a fit, or in code): its parameters are finite and its
values positive, and every weight w_i over its whole span 0..n−1 lies in float32's normal range
[1.2e-38, 3.4e38] — debiasing multiplies in float32, where a weight of inf, 0 or NaN would turn finite scores
into inf/NaN or erase them. For an exponential this bounds b: |b|·(n−1) ≤ ln(3.4e38) ≈ 88.7 (and
−b·(n−1) ≥ ln(1.2e-38) ≈ −87.3). A violation raises DebiasError naming the parameter, its value and the span.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DebiasError

# Debiasing multiplies in float32: every weight must be a normal float32 (no inf, no 0, no subnormal).
WEIGHT_MIN = float(np.finfo(np.float32).tiny)   # 1.18e-38
WEIGHT_MAX = float(np.finfo(np.float32).max)    # 3.40e38


def _span(n: int) -> str:
    return f"the span 0..{n - 1} ({n} positions)"


def check_weights(trend: "Trend", what: str) -> None:
    """Raise DebiasError unless every weight w_i = f(0)/f(i) over the trend's whole span is a normal float32.

    ``what`` names the parameter(s) in the message, e.g. "b = 0.2"."""
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        w = trend.weights()
    bad = ~(np.isfinite(w) & (w >= WEIGHT_MIN) & (w <= WEIGHT_MAX))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DebiasError(f"{what} gives weight w_{i} = f(0)/f({i}) = {w[i]:.4g} over {_span(trend.n)}, outside "
                          f"float32's range [{WEIGHT_MIN:.3g}, {WEIGHT_MAX:.3g}] (debiasing multiplies in float32, "
                          f"where it would turn finite scores into inf/NaN or zero); refit the trend on scores that "
                          f"follow a positive trend, or use a shorter span n")


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DebiasError(f"{name} = {value!r} must be a finite number")
    return float(value)


def _span_length(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise DebiasError(f"n = {n!r} (number of positions) must be an integer ≥ 2")
    return int(n)


class Trend:
    """Base class. ``n`` is the number of positions the trend was fitted on (its domain)."""

    n: int

    def values(self, positions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def weights(self, n: int | None = None) -> np.ndarray:
        """w_i = f(0)/f(i) for i = 0..n−1 (default: the trend's own n). float64 [n]."""
        n = self.n if n is None else n
        if n > self.n:
            raise DebiasError(f"trend is defined on {self.n} positions, asked for {n}; fit a trend for this span length")
        f = self.values(np.arange(n, dtype=np.float64))
        return self.values(np.zeros(1))[0] / f

    def for_stage(self, stage: int) -> "Trend":
        return self

    def stage_trends(self) -> list:
        """The distinct trends ``for_stage`` can return."""
        return [self]

    def to_json(self) -> dict:
        raise NotImplementedError


@dataclass
class ExponentialTrend(Trend):
    a: float
    b: float
    n: int
    r2: float | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self.a, self.b = _finite(self.a, "exponential trend: a"), _finite(self.b, "exponential trend: b")
        self.n = _span_length(self.n)
        if self.a <= 0:
            raise DebiasError(f"exponential trend: a = {self.a!r} must be > 0 (f(i) = a·exp(b·i) is a positive trend)")
        check_weights(self, f"exponential trend f(i) = a·exp(b·i): b = {self.b!r}")

    def values(self, positions):
        return self.a * np.exp(self.b * np.asarray(positions, dtype=np.float64))

    def weights(self, n=None):
        n = self.n if n is None else n
        if n > self.n:
            raise DebiasError(f"trend is defined on {self.n} positions, asked for {n}; fit a trend for this span length")
        return np.exp(-self.b * np.arange(n, dtype=np.float64))  # exact form of the official files

    def to_json(self):
        out = {"form": "exponential", "a": self.a, "b": self.b, "n": self.n}
        if self.r2 is not None:
            out["r2"] = self.r2
        if self.provenance:
            out["provenance"] = self.provenance
        return out


@dataclass
class PolynomialTrend(Trend):
    coef: list
    x_scale: float
    n: int

    def __post_init__(self):
        if not isinstance(self.coef, (list, tuple)) or not self.coef:
            raise DebiasError(f"polynomial trend: coef = {self.coef!r} must be a non-empty list of numbers")
        self.coef = [_finite(c, f"polynomial trend: coef[{k}]") for k, c in enumerate(self.coef)]
        self.x_scale = _finite(self.x_scale, "polynomial trend: x_scale")
        if self.x_scale == 0:
            raise DebiasError("polynomial trend: x_scale = 0.0 must be non-zero (f(i) = Σ coef[k]·(i/x_scale)^k)")
        self.n = _span_length(self.n)
        f = self.values(np.arange(self.n))
        if not (np.isfinite(f) & (f > 0)).all():
            i = int(np.flatnonzero(~(np.isfinite(f) & (f > 0)))[0])
            raise DebiasError(f"polynomial trend is not positive on 0..{self.n - 1}: f({i}) = {f[i]:.4g} "
                              f"(coef = {self.coef}, x_scale = {self.x_scale})")
        check_weights(self, f"polynomial trend coef = {self.coef}, x_scale = {self.x_scale}")

    def values(self, positions):
        x = np.asarray(positions, dtype=np.float64) / self.x_scale
        return np.polynomial.polynomial.polyval(x, np.asarray(self.coef, dtype=np.float64))

    def to_json(self):
        return {"form": "polynomial", "coef": list(self.coef), "x_scale": self.x_scale, "n": self.n}


@dataclass
class TableTrend(Trend):
    table: np.ndarray

    def __post_init__(self):
        self.table = np.asarray(self.table, dtype=np.float64)
        if self.table.ndim != 1 or self.table.size < 2:
            raise DebiasError(f"table trend: values must be a list of ≥ 2 positive numbers, got shape {self.table.shape}")
        bad = ~(np.isfinite(self.table) & (self.table > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DebiasError(f"table trend: values[{i}] = {self.table[i]!r}; table values must be finite and > 0")
        self.n = len(self.table)
        check_weights(self, f"table trend values (f(0) = {self.table[0]:.4g}, range "
                            f"{self.table.min():.4g}..{self.table.max():.4g})")

    def values(self, positions):
        return self.table[np.asarray(positions, dtype=np.int64)]

    def to_json(self):
        return {"form": "table", "values": self.table.tolist()}


@dataclass
class StagedTrend(Trend):
    """One trend per ranking stage (multi-stage methods); stages without an entry use stage 0's."""
    stages: dict

    def __post_init__(self):
        if not isinstance(self.stages, dict) or not self.stages:
            raise DebiasError("staged trend: stages must map stage numbers to trends (at least one)")
        for k, t in self.stages.items():
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not isinstance(t, Trend):
                raise DebiasError(f"staged trend: stage {k!r} → {type(t).__name__}; stages map integers to trends")
        self.n = min(t.n for t in self.stages.values())

    def for_stage(self, stage):
        if stage in self.stages:
            return self.stages[stage]
        return self.stages[min(self.stages)]

    def stage_trends(self):
        return list({id(t): t for t in self.stages.values()}.values())

    def values(self, positions):
        return self.for_stage(0).values(positions)

    def weights(self, n=None):
        return self.for_stage(0).weights(n)

    def to_json(self):
        return {"form": "staged", "stages": {str(k): v.to_json() for k, v in sorted(self.stages.items())}}


# ----------------------------------------------------------------------------------------- fitting

def mean_scores(scores) -> np.ndarray:
    """1-D mean vector from a mean vector [n] or per-sample rows [rows, n] (rows averaged)."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 2:
        if arr.shape[0] == 0:
            raise DebiasError("scores have no rows; record at least one sample")
        arr = arr.mean(axis=0)
    if arr.ndim != 1 or arr.size < 2:
        raise DebiasError(f"scores must be a 1-D mean vector or 2-D rows with ≥ 2 positions, got shape {np.shape(scores)}")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise DebiasError(f"scores contain a non-finite value at position {bad} ({arr[bad]}); drop that row or position")
    return arr


def fit_exponential(scores, *, iterations: int = 100) -> ExponentialTrend:
    """Least-squares fit of f(i) = a·exp(b·i) to mean scores (1-D [n] or 2-D [rows, n]).

    Minimises Σ_i (ȳ_i − a·e^{b·i})² by Levenberg–Marquardt, started from the log-linear fit.
    r² is reported on the original scale.
    """
    y = mean_scores(scores)
    return fit_exponential_at(np.arange(y.size), y, y.size, iterations=iterations)


def check_positive_means(positions, y) -> None:
    """Refuse mean scores an exponential a·e^{b·i} (positive everywhere) cannot describe: any mean ≤ 0.

    Fitting through them would give a trend whose weights blow up (or a non-positive a); the fix is to record
    scores that are attention weights, or to leave such positions out."""
    y = np.asarray(y, dtype=np.float64)
    bad = ~(y > 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DebiasError(f"mean score at position {int(np.asarray(positions)[i])} is {float(y[i])!r} "
                          f"({int(bad.sum())} of {y.size} positions ≤ 0): an exponential trend a·exp(b·i) is "
                          f"positive everywhere and cannot describe it; fit positive mean scores (attention "
                          f"weights), or leave those positions out")
    if y.size < 2:
        raise DebiasError("fewer than two positions have a positive mean score; record more samples")


def fit_exponential_at(positions: np.ndarray, y: np.ndarray, n: int, *, iterations: int = 100) -> ExponentialTrend:
    """The same fit over the observed ``positions`` (int [m], in 0..n−1) with means ``y`` [m]; the trend's
    domain is 0..n−1. Used directly when some positions were never observed (later pruning stages)."""
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(positions, dtype=np.float64) / (n - 1)   # conditioned abscissa; b = β/(n−1)
    check_positive_means(positions, y)
    beta, log_a = np.polyfit(x, np.log(y), 1)
    a = math.exp(log_a)
    lam = 1e-3

    def sse(a_, beta_):
        return float(((y - a_ * np.exp(beta_ * x)) ** 2).sum())

    cur = sse(a, beta)
    for _ in range(iterations):
        e = np.exp(beta * x)
        r = y - a * e
        jac = np.stack([e, a * x * e], axis=1)
        jtj, jtr = jac.T @ jac, jac.T @ r
        step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-30), jtr)
        cand = sse(a + step[0], beta + step[1])
        if cand < cur:
            a, beta, cur, lam = a + step[0], beta + step[1], cand, lam / 10
            if abs(step[1]) < 1e-13 and abs(step[0]) < 1e-13 * abs(a):
                break
        else:
            lam *= 10
            if lam > 1e12:
                break
    if a <= 0:
        raise DebiasError("the exponential fit went non-positive (a ≤ 0): the mean scores are not a positive trend")
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - cur / sst if sst > 0 else 1.0
    try:
        return ExponentialTrend(a=float(a), b=float(beta / (n - 1)), n=n, r2=float(r2))
    except DebiasError as e:
        raise DebiasError(f"the fitted trend is unusable: {e}") from None


def table_trend(scores) -> TableTrend:
    """The naive alternative: the per-position mean itself as the trend (noisy; for comparison)."""
    y = mean_scores(scores)
    if (y <= 0).any():
        raise DebiasError("a table trend needs every mean score > 0; some positions have none")
    return TableTrend(y)


# ----------------------------------------------------------------------------------------- JSON I/O

def _number(d: dict, key: str, where: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise DebiasError(f"{where}: field {key!r} must be a finite number, got {v!r}")
    return float(v)


def _length(d: dict, where: str) -> int:
    n = d.get("n")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise DebiasError(f"{where}: field 'n' (number of positions) must be an integer ≥ 2, got {n!r}")
    return int(n)


def trend_from_json(d, where: str = "trend") -> Trend:
    """Build a trend from its JSON dict; raises DebiasError naming ``where``, the bad field and its value."""
    try:
        return _trend_from_json(d, where)
    except DebiasError as e:
        msg = str(e)
        raise DebiasError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _trend_from_json(d, where: str) -> Trend:
    if not isinstance(d, dict):
        raise DebiasError(f"{where}: expected a JSON object with a 'form' field, got {type(d).__name__}")
    form = d.get("form")
    if form == "exponential":
        a = _number(d, "a", where)
        if a <= 0:
            raise DebiasError(f"{where}: field 'a' must be > 0 (f(i) = a·exp(b·i) is a positive trend), got {a!r}")
        r2 = _number(d, "r2", where) if d.get("r2") is not None else None
        provenance = d.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise DebiasError(f"{where}: field 'provenance' must be a JSON object, got {provenance!r}")
        return ExponentialTrend(a=a, b=_number(d, "b", where), n=_length(d, where), r2=r2, provenance=provenance)
    if form == "polynomial":
        coef = d.get("coef")
        if (not isinstance(coef, list) or not coef
                or not all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in coef)):
            raise DebiasError(f"{where}: field 'coef' must be a non-empty list of numbers, got {coef!r}")
        return PolynomialTrend(coef=[float(c) for c in coef], x_scale=_number(d, "x_scale", where), n=_length(d, where))
    if form == "table":
        vals = d.get("values")
        if (not isinstance(vals, list) or len(vals) < 2
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in vals)):
            raise DebiasError(f"{where}: field 'values' must be a list of ≥ 2 positive numbers")
        arr = np.asarray(vals, dtype=np.float64)
        if not np.isfinite(arr).all() or (arr <= 0).any():
            raise DebiasError(f"{where}: table values must be finite and > 0")
        return TableTrend(arr)
    if form == "staged":
        stages = d.get("stages")
        if not isinstance(stages, dict) or not stages:
            raise DebiasError(f"{where}: field 'stages' must map stage numbers to trends")
        try:
            keys = {k: int(k) for k in stages}
        except (TypeError, ValueError):
            raise DebiasError(f"{where}: stage keys must be integers, got {list(stages)}") from None
        return StagedTrend({keys[k]: trend_from_json(v, f"{where} stage {k}") for k, v in stages.items()})
    raise DebiasError(f"{where}: unknown form {form!r}; expected exponential, polynomial, table or staged")


def load_trend_file(path) -> Trend:
    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"trend file {str(path)!r} does not exist; write one with `python -m debias_core fit` or name a preset")
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DebiasError(f"trend file {str(path)!r} is not JSON ({e}); trend files are JSON, never pickle") from None
    return trend_from_json(d, where=f"trend file {str(path)!r}")


def save_trend(trend: Trend, path) -> None:
    """Write the trend as JSON, atomically (a reader never sees a half-written file)."""
    write_json_atomic(path, trend.to_json())


def write_json_atomic(path, obj, *, indent: int | None = 1) -> Path:
    """Strict JSON (no NaN) to ``path`` via a temporary file in the same folder and a rename. OSError (an
    unwritable or missing folder) becomes a DebiasError naming the path."""
    path = Path(path)
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise DebiasError(f"cannot write {str(path)!r}: {e.strerror or e}; pick a writable --out") from None
    return path
