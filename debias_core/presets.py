"""The paper's positional trends, regenerated from parameters (data/paper_presets.json).

Names: ``paper:<method>/<benchmark>`` with method ∈ fastv, pdrop, sparsevlm, himap, tokencarve and
benchmark ∈ gqa, mmbench, mmbench_cn, mme, mmvet, pope, scienceqa, textvqa, vizwiz, vqav2.
FastV has one trend for every benchmark (``paper:fastv`` also works).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import DebiasError
from .trend import ExponentialTrend, Trend, load_trend_file, trend_from_json

BENCHMARKS = ("gqa", "mmbench", "mmbench_cn", "mme", "mmvet", "pope", "scienceqa", "textvqa", "vizwiz", "vqav2")
BENCHMARK_ALIASES = {"mm-vet": "mmvet", "mmbench-cn": "mmbench_cn", "sqa": "scienceqa"}
DEFAULT_PAD_THRESHOLD = 0.5


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(resources.files(__package__).joinpath("data/paper_presets.json").read_text())


@lru_cache(maxsize=1)
def _registry() -> dict:
    """The method registry's entries (data/methods.json, maintained through eval.registry); only their keys,
    ``trend_method``, ``aliases`` and (by geometry.official_rule) ``official_padding_rule`` are read here."""
    return json.loads(resources.files(__package__).joinpath("data/methods.json").read_text())["methods"]


def single_trend_families() -> tuple:
    """Paper trend families with one trend for every benchmark (preset ``paper:<family>``)."""
    return tuple(k for k in _data() if k not in ("description", "n", "pad_threshold", "exponential_b"))


# the paper's trend families: presets paper:<family>[/<benchmark>] and a pad threshold each
METHODS = (*single_trend_families(), *_data()["exponential_b"])
# other names of a family or of a registered method (upstream spellings, e.g. a submodule's name)
METHOD_ALIASES = {alias: key for key, entry in _registry().items() for alias in entry.get("aliases", [])}


def method_name(method: str) -> str:
    """A paper trend family or a registered method's key, from any of its names (case-insensitive)."""
    if not isinstance(method, str):
        raise DebiasError(f"method {method!r} is not a name; use one of {', '.join(METHODS)}")
    m = METHOD_ALIASES.get(method.lower(), method.lower())
    if m not in METHODS and m not in _registry():
        raise DebiasError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
    return m


def method_entry(method: str) -> dict | None:
    """The registry entry of a registered method under any of its names; None for a trend family or an unknown
    name."""
    m = METHOD_ALIASES.get(method.lower(), method.lower()) if isinstance(method, str) else None
    return _registry().get(m)


def pad_threshold(method: str | None) -> float:
    """The paper's padding threshold for a method (PyramidDrop 0.01, the others 0.5): a registered method's is its
    trend family's; 0.5 when None or without a family."""
    if method is None:
        return DEFAULT_PAD_THRESHOLD
    m = method_name(method)
    family = _registry()[m]["trend_method"] if m in _registry() else m
    return _data()["pad_threshold"].get(family, DEFAULT_PAD_THRESHOLD)


def preset_names() -> list[str]:
    names = [f"paper:{m}" for m in single_trend_families()]
    names += [f"paper:{m}/{b}" for m in METHODS if m not in single_trend_families() for b in BENCHMARKS]
    return names


def paper_trend(method: str, benchmark: str | None = None) -> Trend:
    m = method_name(method)
    if m not in METHODS:
        raise DebiasError(f"the paper publishes no trend for {method!r}; fit one from recorded scores "
                          f"(python -m debias_core fit --scores S.npy --out T.json)")
    b = None if benchmark is None else BENCHMARK_ALIASES.get(benchmark.lower(), benchmark.lower())
    if b is not None and b not in BENCHMARKS:
        raise DebiasError(f"benchmark {benchmark!r} has no paper preset; use one of {', '.join(BENCHMARKS)}")
    if m in single_trend_families():
        return trend_from_json(_data()[m], f"{m} preset")  # one trend for every benchmark
    if b is None:
        raise DebiasError(f"paper preset for {m} needs a benchmark: paper:{m}/<benchmark>, benchmark ∈ {', '.join(BENCHMARKS)}")
    table = _data()["exponential_b"][m]
    return ExponentialTrend(a=1.0, b=table[b], n=_data()["n"], provenance={"source": f"paper:{m}/{b}"})


_resolved_presets: dict = {}


def resolve_trend(spec) -> Trend:
    """A Trend from a Trend, a preset name (``paper:himap/gqa``), ``calibrated:<file>`` or a JSON path."""
    if isinstance(spec, Trend):
        return spec
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise DebiasError(f"trend {spec!r} is not a preset name or a JSON file path")
    s = str(spec)
    if s.startswith("paper:"):
        # one object per preset: device tables are cached per trend object, so switching settings back
        # and forth (configure) must not rebuild them
        if s not in _resolved_presets:
            method, _, bench = s[len("paper:"):].partition("/")
            _resolved_presets[s] = paper_trend(method, bench or None)
        return _resolved_presets[s]
    if s.startswith("calibrated:"):
        return load_trend_file(s[len("calibrated:"):])
    if s.endswith(".json") or Path(s).exists():
        return load_trend_file(s)
    raise DebiasError(f"trend {s!r} is neither a preset (e.g. paper:himap/gqa; list: python -m debias_core show --list) "
                      f"nor an existing .json file")
