"""In situ: the debias_core calls timed inside real prefills (python -m bench.latency --insitu).

Every call the patches make into debias_core (debias, mask_padding, keep_cap, positions) and every re-indexing of
tracked positions runs inside a wrapper that records a CUDA event before and after it (read after the prefill:
the GPU-timeline time, which covers its kernels and any gap while the GPU waits for the host to launch them)
and its host time (perf_counter). Per mode, per prefill, these are summed and divided by the prefill's wall
time. Mode ``off`` is the control: the same wrappers around calls that return what upstream computes (their
input; positions: upstream's torch.arange, indexed as upstream does; debias with mean_dim: upstream's
torch.mean, which full mode folds into its multiply-add), i.e. what the measurement itself costs. Modes
alternate every rep; the first WARMUP reps are not kept.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from pathlib import Path

from .workload import SITE_CALLS, prepare, timed_generate

WARMUP = 3
MODES = ("off", "full")


def bench_in_situ(name: str, ckpt: Path, reps: int, device: str = "cuda", profile: bool = False) -> dict:
    """{"method", "profile"?, "in_situ": the summary of ``reps`` prefills per mode (in_situ_summary)}."""
    import debias_core

    work = prepare(name, ckpt, device)
    timer = CallTimer(device)
    samples = {mode: Samples() for mode in MODES}
    with timer.installed():
        for rep in range(reps + WARMUP):
            for mode in (("off", "full") if rep % 2 else ("full", "off")):
                debias_core.configure(mode=mode, trend=work.trend, method=work.trend_method)
                wall_ms = timed_prefill(work, timer)
                if rep >= WARMUP:
                    samples[mode].add(timer, wall_ms)
        if profile:
            debias_core.configure(mode="full", trend=work.trend, method=work.trend_method)
            profiled = profile_prefill(work, timer.originals)
    return {"method": name, **({"profile": profiled} if profile else {}), "in_situ": in_situ_summary(samples)}


def timed_prefill(work, timer: "CallTimer") -> float:
    """One prefill (generate one token) with the timer's records cleared first; its wall time in ms."""
    timer.clear()
    return timed_generate(work, 1) * 1e3


class HostStamp:
    """A CUDA event's interface on the host clock: a CPU run (smoke test) has no CUDA events."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class CallTimer:
    """Wraps debias_core's site calls and TrackedPositions.__getitem__; ``events`` holds (start, end, call,
    stage) per call of the current prefill (stage: debias only), ``host_s`` each call's host seconds."""

    def __init__(self, device: str):
        import debias_core

        self.cuda = device.startswith("cuda")
        self.events: list = []
        self.host_s: list = []
        self.originals = {n: getattr(debias_core, n) for n in SITE_CALLS}
        self.tracked_getitem = debias_core.TrackedPositions.__getitem__

    def clear(self) -> None:
        self.events.clear()
        self.host_s.clear()

    def stamp(self):
        import torch
        return torch.cuda.Event(enable_timing=True) if self.cuda else HostStamp()

    def timed(self, fn):
        call = fn.__name__ if fn.__name__ != "<lambda>" else "index"

        def wrapper(*args, **kwargs):
            start, end = self.stamp(), self.stamp()
            start.record()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.host_s.append(time.perf_counter() - t)
            end.record()
            self.events.append((start, end, call, kwargs.get("stage", 0) if call == "debias" else None))
            return out
        return wrapper

    @contextmanager
    def installed(self):
        """The wrappers in place of debias_core's functions for the ``with`` block."""
        import debias_core

        try:
            for n, fn in self.originals.items():
                setattr(debias_core, n, self.timed(fn))
            debias_core.positions = self._timed_positions()
            debias_core.TrackedPositions.__getitem__ = self.timed(self.tracked_getitem)
            yield self
        finally:
            for n, fn in self.originals.items():
                setattr(debias_core, n, fn)
            debias_core.TrackedPositions.__getitem__ = self.tracked_getitem

    def _timed_positions(self):
        """positions(), timed; in mode off (upstream's long arange) its result is wrapped so that the
        re-indexing of each stage is timed as "index", as TrackedPositions.__getitem__ is in mode full: the
        net share then also holds what tracking adds there."""
        import torch

        index_long = self.timed(lambda positions, index: positions[index])

        class TimedLongPositions:
            __slots__ = ("t",)

            def __init__(self, t):
                self.t = t

            def __getitem__(self, index):
                return TimedLongPositions(index_long(self.t, index))

        timed_positions = self.timed(self.originals["positions"])

        def positions(*args, **kwargs):
            out = timed_positions(*args, **kwargs)
            return TimedLongPositions(out) if isinstance(out, torch.Tensor) else out
        return positions


class Samples:
    """One mode's per-prefill readings: share of the wall time, GPU-timeline and host µs, calls counted
    (debias + mask_padding) and timed, and GPU-timeline µs by call and by debias stage."""

    def __init__(self):
        self.share_pct, self.gpu_us, self.host_us, self.calls, self.timed = [], [], [], [], []
        self.by_call: dict = {}
        self.by_stage: dict = {}

    def add(self, timer: CallTimer, wall_ms: float) -> None:
        events = timer.events
        inside_ms = sum(a.elapsed_time(b) for a, b, _, _ in events)
        self.share_pct.append(100 * inside_ms / wall_ms)
        self.gpu_us.append(inside_ms * 1e3)
        self.host_us.append(sum(timer.host_s) * 1e6)
        self.calls.append(sum(n in ("debias", "mask_padding") for _, _, n, _ in events))
        self.timed.append(len(events))
        per_call: dict = {}
        per_stage: dict = {}
        for a, b, n, stage in events:
            per_call[n] = per_call.get(n, 0.0) + a.elapsed_time(b) * 1e3
            if stage is not None:
                per_stage[stage] = per_stage.get(stage, 0.0) + a.elapsed_time(b) * 1e3
        for n, us in per_call.items():
            self.by_call.setdefault(n, []).append(us)
        for stage, us in per_stage.items():
            self.by_stage.setdefault(stage, []).append(us)


def in_situ_summary(samples: dict) -> dict:
    """Medians over prefills of full's readings, of the control's (off), and of their paired difference."""
    med = statistics.median
    full, off = samples["full"], samples["off"]
    return {"overhead_pct_median": med(full.share_pct), "overhead_pct_max": max(full.share_pct),
            "debias_us_per_prefill_median": med(full.gpu_us),
            "host_us_per_prefill_median": med(full.host_us),
            "control_us_per_prefill_median": med(off.gpu_us),
            "control_pct_median": med(off.share_pct),
            "net_pct_median": med(f - o for f, o in zip(full.share_pct, off.share_pct)),
            "calls_per_prefill": med(full.calls), "n": len(full.share_pct),
            "timed_per_prefill": {"full": med(full.timed), "off": med(off.timed)},
            # GPU-timeline µs per prefill by call (index/__getitem__: re-indexing long/tracked positions)
            "by_call_us_median": {m: {n: round(med(v), 1) for n, v in samples[m].by_call.items()}
                                  for m in ("full", "off")},
            # the debias calls alone, by ranking stage (GPU-timeline µs per prefill)
            "debias_by_stage_us_median": {m: {str(st): round(med(v), 1) for st, v in samples[m].by_stage.items()}
                                          for m in ("full", "off")}}


def profile_prefill(work, originals) -> list[dict]:
    """One prefill under torch.profiler with each debias_core call marked: per call, its host time and the
    operators (host µs) and kernels (device µs) inside it."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    import debias_core

    def marked(n, fn):
        def wrapper(*args, **kwargs):
            with record_function(f"debias_core.{n}"):
                return fn(*args, **kwargs)
        return wrapper

    for n, fn in originals.items():
        setattr(debias_core, n, marked(n, fn))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with work.sample():
            work.generate(1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    out = []
    for e in prof.events():
        if e.name.startswith("debias_core."):
            kids = [(c.name, round(c.cpu_time_total, 1), round(getattr(c, "device_time_total", 0.0), 1))
                    for c in e.cpu_children]
            out.append({"call": e.name, "host_us": round(e.cpu_time_total, 1),
                        "device_us": round(getattr(e, "device_time_total", 0.0), 1), "ops": kids})
    return out
