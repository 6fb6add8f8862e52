"""Per-sample context: what the caller (the eval driver) knows about the image(s) behind one generate call.

    with debias_core.sample(image_size=(640, 480), span_start=35):
        model.generate(...)

Batches pass one entry per sample: ``image_size=[(640, 480), (500, 500)]``; other fields may be a
scalar (shared) or a per-sample list. The context lives in a ContextVar, so it is thread-safe and is
gone when the ``with`` block ends — no stale image size leaks into the next sample.
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from .errors import DebiasError
from .geometry import PREPROCESS_MODES, check_grid, check_image_size


@dataclass(frozen=True)
class SampleContext:
    """One sample. ``image_size`` is the original (W, H), or None for a text-only sample.

    ``span_start`` is the sequence index of the first visual token (35 for LLaVA-1.5 vicuna_v1);
    ``span_length`` the number of visual tokens (grid² for LLaVA-1.5; 2056 for Video-LLaVA's 8 frames).
    """
    image_size: tuple | None = None
    preprocess: str = "pad"
    grid: int = 24
    resolution: int = 336
    span_start: int | None = None
    span_length: int = 576


_active: ContextVar[tuple | None] = ContextVar("debias_core_sample", default=None)


def make_context(image_size=None, *, preprocess="pad", grid=24, resolution=336, span_start=None,
                 span_length=None) -> SampleContext:
    if preprocess not in PREPROCESS_MODES:
        raise DebiasError(f"preprocess {preprocess!r} is unknown; use one of {', '.join(PREPROCESS_MODES)}")
    grid, resolution = check_grid(grid, resolution)
    size = check_image_size(image_size) if image_size is not None else None
    if span_length is None:
        span_length = grid * grid
    if isinstance(span_length, bool) or not isinstance(span_length, numbers.Integral) or span_length <= 0:
        raise DebiasError(f"span_length {span_length!r} must be a positive integer (number of visual tokens)")
    if preprocess == "pad" and size is not None and span_length != grid * grid:
        raise DebiasError(f"span_length {span_length} does not match a {grid}×{grid} pad grid ({grid * grid} tokens); "
                          f"use preprocess='anyres' or 'none' for other layouts")
    if span_start is not None and (isinstance(span_start, bool) or not isinstance(span_start, numbers.Integral)
                                   or span_start < 0):
        raise DebiasError(f"span_start {span_start!r} must be a non-negative integer (index of the first visual token)")
    return SampleContext(size, preprocess, grid, resolution, None if span_start is None else int(span_start),
                         int(span_length))


def _is_batch(image_size) -> bool:
    return isinstance(image_size, (list, tuple)) and len(image_size) > 0 and all(
        s is None or isinstance(s, (list, tuple)) for s in image_size)


_interned: dict = {}


def _intern(ctxs: tuple) -> tuple:
    """Equal contexts → one tuple object, so the ranking site can find a sample's plan by identity."""
    if len(_interned) >= 4096:
        _interned.clear()
    return _interned.setdefault(ctxs, ctxs)


@contextmanager
def sample(image_size=None, *, preprocess="pad", grid=24, resolution=336, span_start=None, span_length=None):
    """Scope one sample's (or one batch's) context to the ``with`` block."""
    fields = dict(preprocess=preprocess, grid=grid, resolution=resolution, span_start=span_start,
                  span_length=span_length)
    if _is_batch(image_size):
        n = len(image_size)
        for k, v in fields.items():
            if isinstance(v, list) and len(v) != n:
                raise DebiasError(f"{k} has {len(v)} entries for a batch of {n} image sizes")
        ctxs = tuple(make_context(image_size[b], **{k: (v[b] if isinstance(v, list) else v) for k, v in fields.items()})
                     for b in range(n))
    else:
        ctxs = (make_context(image_size, **fields),)
    token = _active.set(_intern(ctxs))
    try:
        yield ctxs if len(ctxs) > 1 else ctxs[0]
    finally:
        _active.reset(token)


def current_samples() -> tuple | None:
    """The active contexts (one per batch row), or None outside any ``sample`` block."""
    return _active.get()


def required_samples(needed_for: str) -> tuple:
    """The active contexts; a DebiasError naming ``needed_for`` and the fix outside any ``sample`` block."""
    ctxs = _active.get()
    if ctxs is None:
        raise DebiasError(f"{needed_for} needs a sample context: wrap generate in "
                          f"`with debias_core.sample(image_size=(W, H), span_start=s0): ...` "
                          f"(or run with DEBIAS=off)")
    return ctxs
