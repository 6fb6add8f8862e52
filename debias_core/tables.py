"""The tables behind the ranking call, built once and cached: per-sample validity (host), padding bias and
positional weight (host arrays, and their device copies). ``site`` combines them into per-sample plans;
``tracking`` lays them out per tracked token. Both read the same values from here, so the two paths agree
bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

from .context import SampleContext
from .errors import DebiasError
from .geometry import official_rule, valid_tokens


class Cache:
    """Every object the ranking call caches, in one place, under one bound.

    Regions (plain dicts: a warm call is one dict lookup):

    ``tables``   host validity arrays and device tensors built from geometry and trends (this module), and the
                 plans' stacked and shifted tables (site.py); read through ``get``, which counts hits and misses
    ``plans``    ``site._Plan`` per (settings, sample contexts, stage, flags, device, dtype kind, rank, rows)
    ``debias``   warm-path entries (``site.WarmEntry``) of ``debias``, by the fast-path key
    ``masks``    the same for ``mask_padding``
    ``caps``     warm-path keep caps (``site.WarmCap``) by (sample contexts, settings)
    ``tracked``  ``tracking.TrackedPositions`` per (settings, sample contexts, n, device)

    **Bound: no region holds more than ``LIMIT`` entries.** Storing into a full region first empties every
    region: entries refer to one another's objects by ``id`` (a plan to its tables, a shifted table to its
    plan's table), so they are dropped together and rebuilt on demand; objects a caller still holds (an
    operation, tracked positions) keep their own tensors. Keys hold ``id()``s only of objects their own entry
    keeps alive (``derived``; settings and sample contexts in the warm-path entries), so an id in a key is
    never reused while the key exists. ``clear`` empties everything and resets the counters.
    """

    LIMIT = 1024

    def __init__(self):
        self.tables: dict = {}
        self.plans: dict = {}
        self.debias: dict = {}
        self.masks: dict = {}
        self.caps: dict = {}
        self.tracked: dict = {}
        self.hits = 0
        self.misses = 0

    def regions(self) -> tuple:
        return self.tables, self.plans, self.debias, self.masks, self.caps, self.tracked

    def put(self, region: dict, key, value):
        """``region[key] = value`` within the bound; returns ``value``."""
        if len(region) >= self.LIMIT:
            self.drop_all()
        region[key] = value
        return value

    def get(self, key, build):
        """``tables[key]``, built by ``build()`` on first use."""
        try:
            value = self.tables[key]
        except KeyError:
            self.misses += 1
            return self.put(self.tables, key, build())
        self.hits += 1
        return value

    def derived(self, kind: str, sources: tuple, params: tuple, build):
        """``tables`` entry built from ``sources`` (objects, keyed by identity) and ``params`` (by value). The
        entry keeps its sources alive, so the ids in its key always name them."""
        key = (kind, *(id(source) for source in sources), *params)
        return self.get(key, lambda: (build(), sources))[0]

    def drop_all(self) -> None:
        for region in self.regions():
            region.clear()

    def clear(self) -> None:
        self.drop_all()
        self.hits = self.misses = 0

    def size(self) -> int:
        return sum(len(region) for region in self.regions())


cache = Cache()


def upload(array: np.ndarray, device, dtype=None) -> torch.Tensor:
    """Host array -> tensor on ``device``. On CUDA through pinned memory with a non-blocking copy: a
    plain copy from pageable memory would wait for all queued GPU work (a host–device sync)."""
    t = torch.from_numpy(array)
    if dtype is not None:
        t = t.to(dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def valid_host(ctx: SampleContext, threshold: float, exact: bool, method: str | None = None) -> np.ndarray | None:
    """Host bool [span_length] validity, or None when nothing is padding. ``exact`` False: the authors' own
    padding rule for ``method`` (geometry.official_rule)."""
    if ctx.image_size is None or ctx.preprocess != "pad":
        return None
    rule = None if exact else official_rule(method)
    key = ("valid-host", ctx.image_size, ctx.grid, ctx.resolution, threshold, exact, rule)

    def build():
        valid = valid_tokens(ctx.image_size, grid=ctx.grid, resolution=ctx.resolution, threshold=threshold,
                             exact=exact, method=method).reshape(-1)
        return None if valid.all() else valid  # e.g. a square image: no bias to add, no gather for it
    return cache.get(key, build)


def n_valid(ctx: SampleContext, threshold: float, exact: bool, method: str | None = None) -> int:
    valid = valid_host(ctx, threshold, exact, method)
    return ctx.span_length if valid is None else int(valid.sum())


def bias_host(valid: np.ndarray) -> np.ndarray:
    """float64 [len(valid)]: 0 on valid tokens, −inf on padding."""
    return np.where(valid, 0.0, -np.inf)


def weight_host(trend, length: int) -> np.ndarray:
    """float64 [length]: ``trend``'s weights over a visual span of ``length`` tokens (one stage's trend)."""
    if length > trend.n:
        raise DebiasError(f"the visual span has {length} tokens but the trend covers {trend.n} positions; "
                          f"fit a trend over this span (python -m debias_core fit --scores S.npy --out T.json)")
    return np.asarray(trend.weights(length), dtype=np.float64)


def bias_table(ctx, st, device, dtype) -> torch.Tensor | None:
    """``dtype`` [span_length + 1] on device: −inf on padding, 0 elsewhere (last slot: position −1, neutral);
    None when the sample has no padding."""
    valid = valid_host(ctx, st.pad_threshold, st.exact_geometry, st.method)
    if valid is None:
        return None
    rule = None if st.exact_geometry else official_rule(st.method)
    key = ("bias", ctx.image_size, ctx.grid, ctx.resolution, st.pad_threshold, st.exact_geometry, rule, device, dtype)
    return cache.get(key, lambda: upload(bias_host(np.append(valid, True)), device, dtype))


def weight_table(trend, stage: int, length: int, device, dtype=torch.float32) -> torch.Tensor:
    """``dtype`` (float32 or float64) [length + 1] on device; the last slot (position −1) has weight 1."""
    t = trend.for_stage(stage)
    return cache.derived("weight", (t,), (length, device, dtype),
                         lambda: upload(np.append(weight_host(t, length), 1.0), device, dtype))
