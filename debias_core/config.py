"""Mode and trend selection: environment variables, overridable in code with ``configure``.

    DEBIAS=off|pad|pos|full         off = upstream behaviour (default)
    DEBIAS_TREND=<preset|file>      e.g. paper:himap/gqa, calibrated:trend.json, trend.json
    DEBIAS_METHOD=<method>          picks the paper's pad threshold (pdrop 0.01, others 0.5)
    DEBIAS_PAD_THRESHOLD=<0..1>     overrides it
    DEBIAS_GEOMETRY=exact|official  official = the authors' own pad rule for DEBIAS_METHOD (docs/parity.md)
    DEBIAS_CHECK=1                  value checks (NaN scores, position range) on GPU tensors too (syncs)

Values are read strictly: modes and geometry case-insensitively; DEBIAS_CHECK takes 1/0, true/false, on/off,
yes/no (any case); an empty variable counts as unset. Anything else raises DebiasError naming the variable,
its value and what it accepts — a typo never silently selects a default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import DebiasError
from .geometry import check_threshold
from .presets import method_name, pad_threshold as paper_pad_threshold, resolve_trend
from .trend import Trend

MODES = ("off", "pad", "pos", "full")
SUPPRESSING_MODES = ("pad", "full")   # padding → −inf
POSITIONAL_MODES = ("pos", "full")    # scores weighted by the trend


@dataclass(frozen=True)
class Settings:
    mode: str = "off"
    trend: Trend | None = None
    trend_spec: str | None = None
    method: str | None = None
    pad_threshold: float = 0.5
    exact_geometry: bool = True
    checks: bool = False

    @property
    def suppress_padding(self) -> bool:
        return self.mode in SUPPRESSING_MODES

    @property
    def positional(self) -> bool:
        return self.mode in POSITIONAL_MODES


_settings: Settings | None = None


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise DebiasError(f"debias mode {mode!r} is unknown; use one of {', '.join(MODES)} (env DEBIAS)")
    return mode


def _build(mode, trend, method, threshold, geometry, checks, spec=None) -> Settings:
    mode = _check_mode(mode)
    if geometry not in ("exact", "official"):
        raise DebiasError(f"geometry {geometry!r} is unknown; use exact or official (env DEBIAS_GEOMETRY)")
    if method is not None:
        method_name(method)  # unknown method: clear error even when the threshold is given explicitly
    checks = parse_flag(checks, "checks")
    resolved = resolve_trend(trend) if trend not in (None, "") else None
    if mode in ("pos", "full") and resolved is None:
        raise DebiasError(f"mode {mode!r} needs a positional trend: set DEBIAS_TREND to a preset "
                          f"(e.g. paper:himap/gqa; `python -m debias_core show --list`) or a trend JSON file")
    thr = check_threshold(threshold) if threshold is not None else paper_pad_threshold(method)
    if spec is None:
        spec = trend if isinstance(trend, str) else (None if trend is None else "<in-code trend>")
    key = (mode, id(resolved), spec, method, thr, geometry == "exact", bool(checks))
    interned = _interned.get(key)
    if interned is None or interned.trend is not resolved:
        if len(_interned) >= 64:
            _interned.clear()
        interned = _interned[key] = Settings(mode, resolved, spec, method, thr, geometry == "exact", bool(checks))
    return interned  # equal settings are one object: the ranking site's plans are keyed by it


_interned: dict = {}


TRUE_WORDS = ("1", "true", "on", "yes")
FALSE_WORDS = ("0", "false", "off", "no")


def parse_flag(value, name: str = "DEBIAS_CHECK") -> bool:
    """A boolean setting: a bool, or 1/0, true/false, on/off, yes/no in any case; anything else is an error."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise DebiasError(f"{name}={value!r} is not a yes/no value; use one of {', '.join(TRUE_WORDS)} (on) or "
                      f"{', '.join(FALSE_WORDS)} (off)")


def _env(env, name: str) -> str | None:
    """The variable's value stripped, or None when unset or empty."""
    value = env.get(name)
    return value.strip() if value is not None and value.strip() else None


def env_pad_threshold(env=os.environ) -> float | None:
    """DEBIAS_PAD_THRESHOLD as a number in [0, 1], or None when unset; DebiasError naming a bad value."""
    thr = _env(env, "DEBIAS_PAD_THRESHOLD")
    if thr is not None:
        try:
            thr = float(thr)
        except ValueError:
            raise DebiasError(f"DEBIAS_PAD_THRESHOLD={thr!r} is not a number in [0, 1]; e.g. 0.5 "
                              f"(unset it for the method's paper threshold)") from None
        if not 0.0 <= thr <= 1.0:  # also NaN
            raise DebiasError(f"DEBIAS_PAD_THRESHOLD={env.get('DEBIAS_PAD_THRESHOLD')!r}: pad threshold {thr} must be "
                              f"a number in [0, 1], e.g. 0.5 (unset it for the method's paper threshold)")
    return thr


def check_env(env=os.environ) -> tuple:
    """The DEBIAS* variables' syntax, checked without resolving DEBIAS_TREND: (mode, threshold or None,
    geometry, checks, method or None). Command-line tools call it so a typo is reported even where the
    variables are not used."""
    thr = env_pad_threshold(env)
    mode = _check_mode((_env(env, "DEBIAS") or "off").lower())
    geometry = (_env(env, "DEBIAS_GEOMETRY") or "exact").lower()
    if geometry not in ("exact", "official"):
        raise DebiasError(f"geometry {env.get('DEBIAS_GEOMETRY')!r} is unknown; use exact or official (env DEBIAS_GEOMETRY)")
    checks = parse_flag(_env(env, "DEBIAS_CHECK") or "0", "DEBIAS_CHECK")
    method = _env(env, "DEBIAS_METHOD")
    if method is not None:
        method_name(method)
    return mode, thr, geometry, checks, method


def from_env(env=os.environ) -> Settings:
    mode, thr, geometry, checks, method = check_env(env)
    return _build(mode, _env(env, "DEBIAS_TREND"), method, thr, geometry, checks)


def settings() -> Settings:
    """Current settings (read from the environment on first use)."""
    global _settings
    if _settings is None:
        _settings = from_env()
    return _settings


def configure(mode=None, trend=None, *, method=None, pad_threshold=None, geometry=None, checks=None) -> Settings:
    """Override settings in code; arguments left None keep their current value."""
    global _settings
    cur = settings()
    new_method = method if method is not None else cur.method
    _settings = _build(
        mode if mode is not None else cur.mode,
        trend if trend is not None else cur.trend,  # the same object: its device tables stay cached
        new_method,
        pad_threshold if pad_threshold is not None else (cur.pad_threshold if method is None else None),
        geometry if geometry is not None else ("exact" if cur.exact_geometry else "official"),
        checks if checks is not None else cur.checks,
        spec=None if trend is not None else cur.trend_spec,
    )
    return _settings


def reset() -> None:
    """Forget in-code settings; the environment is read again on next use."""
    global _settings
    _settings = None
