"""GPU latency of each patched method with DEBIAS=off vs full, beside unpruned LLaVA-1.5.

    python -m bench.latency --out outputs/bench                 # every method whose environment exists
    python -m bench.latency --methods KEY,KEY --reps 30     # keys: python -m eval.registry methods --supports bench
    bash scripts/bench.sh                                        # the same, with the usual env lookup

What it measures, per method (each in its own interpreter, its own environment):
- a random-weight LLaVA-1.5-7B (bench/checkpoint.py) loaded through the method's eval adapter, i.e. the
  baseline's own load_pretrained_model, configured with the paper's settings; a 640×480 image (pad
  preprocessing, 432 real tokens) and a 35 + 576 + 40 token prompt;
- prefill latency (generate with one new token) and prefill + 32 decode tokens, for off and full
  interleaved, median of --reps after --warmup, wall clock around a synchronised generate call;
- peak GPU memory; the number of debias calls per generate; host syncs inside debias_core: every debias /
  keep_cap / mask_padding / positions call of one cold-cache and one warm generate runs under
  torch.cuda.set_sync_debug_mode("error"), so any synchronisation in them raises;
- the debias call alone (debias + keep_cap + topk vs plain topk) at N = 576 and 2,056, fp16 and bf16.
Writes bench.json and bench.md under --out. Not a test: nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from eval import registry

ROOT = Path(__file__).resolve().parents[1]
METHODS = tuple(registry.methods(supports="bench", plugins=False))  # the registry's methods marked bench: true
REFERENCE = registry.reference_method()  # unpruned LLaVA: every speedup is measured against it
CALL = "_call"                           # the job that times the debias call alone
IMAGE_SIZE = (640, 480)
PREFIX, SUFFIX = 35, 40          # vicuna_v1 puts the image after 35 tokens; ~40 question tokens after it
BENCH_TREND_BENCHMARK = "gqa"    # which paper preset the exponential methods use (latency does not depend on it)


# ---------------------------------------------------------------------------------------------- worker side

def _synthetic_ids(image_token_index: int, vocab: int = 32000):
    import torch
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, vocab, (PREFIX - 1 + SUFFIX,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[:PREFIX - 1], torch.tensor([image_token_index]), text[PREFIX - 1:]])
    return ids.unsqueeze(0)


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


SITE_CALLS = ("debias", "mask_padding", "keep_cap", "positions")  # what the patches call in debias_core


def _strict_sync(calls: dict, device: str):
    """Wrap debias_core's site functions: count calls and (on CUDA) raise on any host-device sync inside them."""
    import torch
    import debias_core

    cuda = device.startswith("cuda")

    originals = {name: getattr(debias_core, name) for name in SITE_CALLS}

    def wrap(name, fn):
        def strict(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            if not cuda:
                return fn(*args, **kwargs)
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        return strict

    for name, fn in originals.items():
        setattr(debias_core, name, wrap(name, fn))
    return lambda: [setattr(debias_core, n, f) for n, f in originals.items()]


def _prepare(name: str, ckpt: Path, device: str):
    """The method loaded through its eval adapter (the baseline's own loader, the paper's settings), the
    benchmark's input (640×480 random image, synthetic prompt) and its paper trend (None: no ranking site)."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from eval.methods import get_adapter

    adapter = get_adapter(name)
    adapter.activate()
    loaded = adapter.load(str(ckpt), device=device)
    adapter.configure(loaded)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3),
                                                              dtype=np.uint8))
    grid, resolution = adapter.geometry(loaded)
    trend = registry.paper_trend_name(name, BENCH_TREND_BENCHMARK)
    return SimpleNamespace(adapter=adapter, loaded=loaded, image=image, pixels=adapter.image_tensor(loaded, image, "pad"),
                           ids=_synthetic_ids(adapter.llava.IMAGE_TOKEN_INDEX, loaded.model.config.vocab_size),
                           grid=grid, resolution=resolution, trend=trend)


def bench_method(name: str, ckpt: Path, reps: int, warmup: int, decode: int, device: str = "cuda") -> dict:
    import torch

    import debias_core

    prep = _prepare(name, ckpt, device)
    adapter, loaded, image, pixels, ids, trend = prep.adapter, prep.loaded, prep.image, prep.pixels, prep.ids, prep.trend
    for cfg in (loaded.model.config, loaded.model.generation_config):
        cfg.eos_token_id = None  # random weights: always generate the full length
    modes = ("off", "full") if trend else ("off",)
    debias_core.configure(mode="off", trend=trend, method=adapter.trend_method)

    def generate(mode: str, new_tokens: int) -> float:
        debias_core.configure(mode=mode)
        with debias_core.sample(image_size=image.size, span_start=PREFIX, grid=prep.grid, resolution=prep.resolution):
            _sync(device)
            t0 = time.perf_counter()
            adapter.generate(loaded, ids, pixels, image.size, max_new_tokens=new_tokens)
            _sync(device)
            return time.perf_counter() - t0

    out = {"method": name, "upstream": adapter.upstream_state(), "trend": trend, "modes": {}}
    # host syncs: cold cache first (table uploads), then warm
    syncs = {}
    for mode in modes[1:]:
        debias_core.clear_cache()
        for label in ("cold", "warm"):
            calls = {}
            restore = _strict_sync(calls, device)
            try:
                generate(mode, 1)  # one prefill: the calls counted are the ranking calls per prefill
                syncs[label] = {"ok": True, "calls": calls, "checked": device.startswith("cuda")}
            except RuntimeError as e:
                syncs[label] = {"ok": False, "error": str(e)[:300], "calls": calls}
            finally:
                restore()
    out["host_syncs_in_debias_core"] = syncs or "n/a (no ranking site)"

    for new_tokens, key in ((1, "prefill_ms"), (decode + 1, f"prefill_decode{decode}_ms")):
        # prefill also gets an A/A control ("off" twice, the second labelled "off_control"): its paired
        # difference measures the harness's own bias, against which the off → full difference is read
        arms = (*modes, "off_control") if key == "prefill_ms" and len(modes) > 1 else modes
        n_reps = reps * 2 if key == "prefill_ms" else reps
        for _ in range(warmup):
            for arm in arms:
                generate(arm.replace("_control", ""), new_tokens)
        times = {arm: [] for arm in arms}
        for i in range(n_reps):
            order = arms if i % 2 == 0 else arms[::-1]  # alternate the order: no arm always runs first
            for arm in order:
                times[arm].append(generate(arm.replace("_control", ""), new_tokens) * 1e3)
        for arm in arms:
            t = sorted(times[arm])
            out["modes"].setdefault(arm, {})[key] = {
                "median": statistics.median(t), "p10": t[max(0, len(t) // 10)], "p90": t[min(len(t) - 1, len(t) * 9 // 10)],
                "n": len(t), "runs": times[arm]}  # in rep order: full run i is paired with off run i
    for mode in modes:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        generate(mode, decode + 1)
        out["modes"][mode]["peak_memory_gib"] = (torch.cuda.max_memory_allocated() / 2 ** 30
                                                 if device.startswith("cuda") else float("nan"))
    return out


def bench_in_situ(name: str, ckpt: Path, reps: int, device: str = "cuda", profile: bool = False) -> dict:
    """The debias_core calls (debias, mask_padding, keep_cap, positions, and indexing tracked positions) inside
    real prefills, per mode (``off`` is the control: the same wrapper around calls that return what upstream
    computes — their input; positions: upstream's torch.arange, indexed as upstream does; debias with mean_dim:
    upstream's torch.mean, which full mode folds into its multiply-add —, i.e. what the measurement itself
    costs). Per call: CUDA events recorded (asynchronously) before and after it, read after the prefill — the
    GPU-timeline time, which covers the kernels and any gap while the GPU waits for the host to launch them —
    and the host time (perf_counter).
    Summed per prefill and divided by the prefill's wall time; modes alternate every rep."""
    import torch

    import debias_core

    prep = _prepare(name, ckpt, device)
    adapter, loaded, image, pixels, ids, grid, resolution, trend = (
        prep.adapter, prep.loaded, prep.image, prep.pixels, prep.ids, prep.grid, prep.resolution, prep.trend)
    tm = adapter.trend_method
    events: list = []
    host_s: list = []
    originals = {n: getattr(debias_core, n) for n in SITE_CALLS}

    class HostStamp:  # a CPU run (smoke test) has no CUDA events: its timeline is the host's
        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    def stamp():
        return torch.cuda.Event(enable_timing=True) if torch.device(device).type == "cuda" else HostStamp()

    def timed(fn):
        call = fn.__name__ if fn.__name__ != "<lambda>" else "index"

        def wrapper(*args, **kwargs):
            start, end = stamp(), stamp()
            start.record()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            host_s.append(time.perf_counter() - t)
            end.record()
            events.append((start, end, call, kwargs.get("stage", 0) if call == "debias" else None))
            return out
        return wrapper

    # A multi-stage method re-indexes its positions at each stage: in mode full that is TrackedPositions.__getitem__
    # (a gather of the debias rows), in mode off the same indexing of upstream's long arange. Both are timed, so the
    # net share also holds what tracking adds there.
    tracked_getitem = debias_core.TrackedPositions.__getitem__
    index_long = timed(lambda positions, index: positions[index])

    class TimedLongPositions:
        __slots__ = ("t",)

        def __init__(self, t):
            self.t = t

        def __getitem__(self, index):
            return TimedLongPositions(index_long(self.t, index))

    timed_positions = timed(originals["positions"])

    def positions(*args, **kwargs):
        out = timed_positions(*args, **kwargs)
        return TimedLongPositions(out) if isinstance(out, torch.Tensor) else out

    per_mode = {m: {"share_pct": [], "gpu_us": [], "host_us": [], "calls": [], "timed": [], "by_call": {},
                    "by_stage": {}} for m in ("off", "full")}
    try:
        for n, fn in originals.items():
            setattr(debias_core, n, timed(fn))
        debias_core.positions = positions
        debias_core.TrackedPositions.__getitem__ = timed(tracked_getitem)
        for i in range(reps + 3):
            for mode in (("off", "full") if i % 2 else ("full", "off")):
                debias_core.configure(mode=mode, trend=trend, method=tm)
                events.clear()
                host_s.clear()
                with debias_core.sample(image_size=image.size, span_start=PREFIX, grid=grid, resolution=resolution):
                    _sync(device)
                    t0 = time.perf_counter()
                    adapter.generate(loaded, ids, pixels, image.size, max_new_tokens=1)
                    _sync(device)
                    wall_ms = (time.perf_counter() - t0) * 1e3
                inside_ms = sum(a.elapsed_time(b) for a, b, _, _ in events)
                if i >= 3:  # warm-up
                    q = per_mode[mode]
                    q["share_pct"].append(100 * inside_ms / wall_ms)
                    q["gpu_us"].append(inside_ms * 1e3)
                    q["host_us"].append(sum(host_s) * 1e6)
                    q["calls"].append(sum(n in ("debias", "mask_padding") for _, _, n, _ in events))
                    q["timed"].append(len(events))
                    per_call: dict = {}
                    per_stage: dict = {}
                    for a, b, n, stage in events:
                        per_call[n] = per_call.get(n, 0.0) + a.elapsed_time(b) * 1e3
                        if stage is not None:
                            per_stage[stage] = per_stage.get(stage, 0.0) + a.elapsed_time(b) * 1e3
                    for n, us in per_call.items():
                        q["by_call"].setdefault(n, []).append(us)
                    for stage, us in per_stage.items():
                        q["by_stage"].setdefault(stage, []).append(us)
        if profile:
            debias_core.configure(mode="full", trend=trend, method=tm)
            profiled = _profile_prefill(prep, originals)
    finally:
        for n, fn in originals.items():
            setattr(debias_core, n, fn)
        debias_core.TrackedPositions.__getitem__ = tracked_getitem
    med = statistics.median
    full, off = per_mode["full"], per_mode["off"]
    in_situ = {"overhead_pct_median": med(full["share_pct"]), "overhead_pct_max": max(full["share_pct"]),
               "debias_us_per_prefill_median": med(full["gpu_us"]),
               "host_us_per_prefill_median": med(full["host_us"]),
               "control_us_per_prefill_median": med(off["gpu_us"]),
               "control_pct_median": med(off["share_pct"]),
               "net_pct_median": med(f - o for f, o in zip(full["share_pct"], off["share_pct"])),
               "calls_per_prefill": med(full["calls"]), "n": len(full["share_pct"]),
               "timed_per_prefill": {"full": med(full["timed"]), "off": med(off["timed"])},
               # GPU-timeline µs per prefill by call (index/__getitem__: re-indexing long/tracked positions)
               "by_call_us_median": {m: {n: round(med(v), 1) for n, v in per_mode[m]["by_call"].items()}
                                     for m in ("full", "off")},
               # the debias calls alone, by ranking stage (GPU-timeline µs per prefill)
               "debias_by_stage_us_median": {m: {str(st): round(med(v), 1) for st, v in per_mode[m]["by_stage"].items()}
                                             for m in ("full", "off")}}
    return {"method": name, **({"profile": profiled} if profile else {}), "in_situ": in_situ}


def _profile_prefill(prep, originals) -> list[dict]:
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
        with debias_core.sample(image_size=prep.image.size, span_start=PREFIX, grid=prep.grid, resolution=prep.resolution):
            prep.adapter.generate(prep.loaded, prep.ids, prep.pixels, prep.image.size, max_new_tokens=1)
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


def bench_call(reps: int = 2000, device: str = "cuda") -> list[dict]:
    """debias + keep_cap + topk vs plain topk on one score vector, wall µs per call (launch-bound)."""
    import torch

    import debias_core
    from debias_core import ExponentialTrend
    from debias_core.presets import METHODS as FAMILIES, pad_threshold, single_trend_families

    rows = []
    # the paper family with the lowest pad threshold (the most padding suppressed), with its trend
    family = min(FAMILIES, key=pad_threshold)
    preset = f"paper:{family}" if family in single_trend_families() else f"paper:{family}/{BENCH_TREND_BENCHMARK}"
    cases = [(576, dict(image_size=IMAGE_SIZE), preset),
             (2056, dict(image_size=None, preprocess="none", span_length=2056),
              ExponentialTrend(a=1.0, b=0.002, n=2056))]  # no published video trend: a synthetic one
    for n, ctx, trend in cases:
        for dtype in (torch.float16, torch.bfloat16):
            scores = torch.rand(n, device=device, dtype=dtype)
            debias_core.configure(mode="full", trend=trend, method=family if n == 576 else None)
            with debias_core.sample(**ctx):
                def plain():
                    return scores.topk(128).indices

                def debiased():
                    return debias_core.debias(scores).topk(debias_core.keep_cap(128)).indices

                result = {"n": n, "dtype": str(dtype).replace("torch.", "")}
                for label, fn in (("topk_us", plain), ("debias_topk_us", debiased)):
                    for _ in range(50):
                        fn()
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    _sync(device)
                    result[label] = (time.perf_counter() - t0) / reps * 1e6
                if device.startswith("cuda"):
                    previous = torch.cuda.get_sync_debug_mode()
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        debiased()
                        result["host_syncs"] = "none"
                    except RuntimeError as e:
                        result["host_syncs"] = str(e)[:200]
                    finally:
                        torch.cuda.set_sync_debug_mode(previous)
                else:
                    result["host_syncs"] = "not checked (CPU)"
                result["overhead_us"] = result["debias_topk_us"] - result["topk_us"]
                rows.append(result)
    return rows


def worker(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latency --worker")
    p.add_argument("job", choices=["checkpoint", "call", "method", "insitu"])
    p.add_argument("--method")
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny checkpoint (CPU smoke runs of this script)")
    p.add_argument("--profile", action="store_true", help="insitu: also one torch.profiler prefill")
    a = p.parse_args(argv)
    if os.environ.get("BENCH_HIDE_TOKENIZERS"):
        # transformers 4.31 checks tokenizers<0.14 at import, and no such wheel exists for Python 3.12; the slow
        # sentencepiece tokenizer is used and token ids are fed directly, so the package is hidden instead.
        sys.modules["tokenizers"] = None
    import torch
    if a.job == "checkpoint":
        from bench.checkpoint import TINY, TINY_CLIP, build
        from eval.methods import get_adapter
        get_adapter(REFERENCE).activate()  # LLaVA's package (the tokenizer builder imports it)
        result = {"checkpoint": str(build(a.ckpt, device=a.device, **(dict(overrides=TINY, clip_overrides=TINY_CLIP)
                                                                       if a.tiny else {})))}
    elif a.job == "call":
        result = {"call": bench_call(reps=50 if a.tiny else 2000, device=a.device)}
    elif a.job == "insitu":
        result = bench_in_situ(a.method, a.ckpt, a.reps, a.device, a.profile)
    else:
        result = bench_method(a.method, a.ckpt, a.reps, a.warmup, a.decode, a.device)
    result["torch"] = torch.__version__
    result["gpu"] = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU ({platform.machine()})"
    print("BENCH_RESULT " + json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------- orchestrator

def _run_worker(env_for: dict, args: list[str], timeout: int) -> dict:
    env = dict(os.environ, **env_for.get("env", {}))
    cmd = [env_for["python"], "-m", "bench.latency", "--worker", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    tail = (r.stdout[-1500:] + "\n" + r.stderr[-3000:]).strip()
    return {"error": f"exit {r.returncode}", "log_tail": tail}


def environments(methods, carry: Path | None, trees: Path | None = None) -> dict:
    """method -> {"python", "env"}: carried site folders (device runs) or each baseline's environment (with
    ``trees``: exported, patched upstream trees instead of third_party/, as EVAL_THIRD_PARTY)."""
    from bench import carry as carrying
    from eval.methods import method_spec
    if carry is not None:
        return {m: carrying.environment(carry, m) for m in (*methods, CALL)}
    out = {}
    for m in (*methods, CALL):
        env_name = method_spec(REFERENCE if m == CALL else m)["env"]
        for cand in (ROOT / "envs" / f"venv-{env_name}" / "bin/python", ROOT / "envs" / f"conda-{env_name}" / "bin/python",
                     ROOT / f".venv-{env_name}" / "bin/python"):
            if cand.exists():
                out[m] = {"python": str(cand), "env": {}}
                break
        else:
            out[m] = {"python": sys.executable, "env": {}, "note": f"no environment for {env_name}; using {sys.executable}"}
        if trees is not None:
            out[m]["env"]["EVAL_THIRD_PARTY"] = str(Path(trees).resolve())
    return out


def paired_overhead(off: list, full: list, seed: int = 0) -> dict:
    """Median of the paired differences full_i − off_i (adjacent runs, so slow drift cancels), as % of the
    median off time, with a bootstrap 95 % interval over the pairs."""
    import numpy as np

    d = np.asarray(full) - np.asarray(off)
    base = float(np.median(off))
    rng = np.random.default_rng(seed)
    boot = np.median(d[rng.integers(0, len(d), (4000, len(d)))], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"median_pct": 100 * float(np.median(d)) / base, "ci95_pct": [100 * lo / base, 100 * hi / base]}


def summarise(results: dict) -> dict:
    """Overhead ratio (full − off)/off and speedup retention per method, against unpruned LLaVA."""
    ref = results.get(REFERENCE, {}).get("modes", {}).get("off", {})
    call = {(r["n"], r["dtype"]): r for r in results.get(CALL, {}).get("call", [])}
    per_call_us = call.get((576, "float16"), {}).get("overhead_us")
    summary = {}
    for m, r in results.items():
        if m in (REFERENCE, CALL) or "modes" not in r or "full" not in r["modes"]:
            continue
        row = {}
        for key in r["modes"]["off"]:
            if not key.endswith("_ms"):
                continue
            off, full = r["modes"]["off"][key]["median"], r["modes"]["full"][key]["median"]
            row[key] = {"off": off, "full": full, "overhead_pct": 100 * (full - off) / off,
                        "spread_pct": 100 * (r["modes"]["off"][key]["p90"] - r["modes"]["off"][key]["p10"]) / off}
            if "runs" in r["modes"]["off"][key]:
                row[key]["paired"] = paired_overhead(r["modes"]["off"][key]["runs"], r["modes"]["full"][key]["runs"])
                control = r["modes"].get("off_control", {}).get(key)
                if control:
                    row[key]["control"] = paired_overhead(r["modes"]["off"][key]["runs"], control["runs"])
            if key in ref:
                base = ref[key]["median"]
                row[key]["speedup_off"], row[key]["speedup_full"] = base / off, base / full
                row[key]["speedup_kept_pct"] = 100 * (base / full) / (base / off)
                if "paired" in row[key]:  # the same from the paired estimate of full/off, which is less noisy
                    q = row[key]["paired"]
                    row[key]["speedup_kept_paired_pct"] = {
                        "median": 100 / (1 + q["median_pct"] / 100),
                        "ci95": [100 / (1 + q["ci95_pct"][1] / 100), 100 / (1 + q["ci95_pct"][0] / 100)]}
        calls = r.get("host_syncs_in_debias_core", {}).get("warm", {}).get("calls", {}) if isinstance(
            r.get("host_syncs_in_debias_core"), dict) else {}
        if per_call_us is not None and "prefill_ms" in row:
            n_calls = calls.get("debias", 0) + calls.get("mask_padding", 0)  # per prefill (keep_cap is host-only)
            row["debias_calls_per_prefill"] = n_calls
            row["isolated_overhead_pct"] = 100 * n_calls * per_call_us / 1e3 / row["prefill_ms"]["off"]
        summary[m] = row
    return summary


_CALL_KINDS = (*SITE_CALLS, "index")


def markdown(results: dict, summary: dict, meta: dict) -> str:
    lines = [f"# Debias overhead — {meta['gpu']}, {meta['date']}", "",
             f"torch {meta['torch']}; random-weight LLaVA-1.5-7B (fp16), {IMAGE_SIZE[0]}×{IMAGE_SIZE[1]} image "
             f"(pad), prompt {PREFIX} + 576 + {SUFFIX} tokens; median of {meta['reps']} after {meta['warmup']} "
             f"warm-up runs, off/full interleaved. Overhead = (full − off)/off; spread = (p90 − p10)/median of off "
             f"(the run-to-run noise the overhead has to be read against).", "",
             "Paired = median of (full_i − off_i) over adjacent runs (order alternated every rep) ÷ median off, with a "
             "bootstrap 95 % interval; A/A = the same for off vs off, i.e. what the harness reads when nothing "
             "differs. Prefill: twice the reps.", "",
             "| method | prefill off (ms) | prefill full (ms) | overhead (medians) | paired [95 % CI] | A/A [95 % CI] | spread | "
             "speedup off → full (kept) | prefill+decode off (ms) | full (ms) | paired [95 % CI] | peak GiB off/full | "
             "debias syncs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in METHODS:
        r = results.get(m)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {m} | not run: {r['error']} — {r.get('log_tail', '').splitlines()[-1] if r.get('log_tail') else ''} |"
                         + " |" * 11)
            continue
        modes = r["modes"]
        dk = next(k for k in modes["off"] if k.startswith("prefill_decode"))
        if m == REFERENCE:
            lines.append(f"| {m} (unpruned reference) | {modes['off']['prefill_ms']['median']:.2f} | — | — | — | — | "
                         f"{100 * (modes['off']['prefill_ms']['p90'] - modes['off']['prefill_ms']['p10']) / modes['off']['prefill_ms']['median']:.1f} % | — | "
                         f"{modes['off'][dk]['median']:.1f} | — | — | {modes['off']['peak_memory_gib']:.1f} | — |")
            continue
        s = summary.get(m, {})
        p, d = s.get("prefill_ms", {}), s.get(dk, {})
        sync = r.get("host_syncs_in_debias_core", {})
        if not all(v.get("checked", True) for v in sync.values()):
            sync_text = "not checked (CPU)"
        elif all(v.get("ok") for v in sync.values()):
            sync_text = "none"
        else:
            sync_text = "SYNC: " + "; ".join(v.get("error", "") for v in sync.values() if not v.get("ok"))

        def paired(cell, which="paired"):
            q = cell.get(which)
            return f"{q['median_pct']:+.2f} % [{q['ci95_pct'][0]:+.2f}, {q['ci95_pct'][1]:+.2f}]" if q else "—"
        speed = (f"{p['speedup_off']:.2f}× → {p['speedup_full']:.2f}× ({p['speedup_kept_pct']:.1f} %)"
                 if "speedup_off" in p else "—")
        if "speedup_kept_paired_pct" in p:
            k = p["speedup_kept_paired_pct"]
            speed += f"; paired {k['median']:.1f} % [{k['ci95'][0]:.1f}, {k['ci95'][1]:.1f}]"
        lines.append(f"| {m} | {p['off']:.2f} | {p['full']:.2f} | {p['overhead_pct']:+.2f} % | {paired(p)} | "
                     f"{paired(p, 'control')} | "
                     f"{p['spread_pct']:.1f} % | {speed} | {d['off']:.1f} | {d['full']:.1f} | {paired(d)} | "
                     f"{modes['off']['peak_memory_gib']:.1f} / {modes['full']['peak_memory_gib']:.1f} | {sync_text} |")
    insitu = {m: r["in_situ"] for m, r in results.items() if isinstance(r, dict) and "overhead_pct_median" in
              r.get("in_situ", {})}
    if insitu:
        lines += ["", "## In situ: every debias_core call inside real prefills", "",
                  "Every debias / mask_padding / keep_cap / positions call (calls per prefill counts the first two), "
                  "and every re-indexing of tracked positions (control: the same indexing of upstream's long ones). "
                  "CUDA events recorded before and after each call (GPU-timeline time: its kernels plus any gap "
                  "while the GPU waits for the host to launch them) and the call's host time, summed per prefill. "
                  "Control = the same wrapper in mode `off`, where each call returns what upstream computes (its "
                  "input; positions: upstream's `torch.arange`; PyramidDrop's debias, called with `mean_dim=0`: "
                  "upstream's own `torch.mean` over the text queries): what the measurement itself costs, plus any "
                  "upstream work that full mode folds into the call. Net = median over prefills of (full share − "
                  "control share of the prefill's wall time); modes alternate every rep. Speedup kept = 1 / (1 + net share): the method's own speedup "
                  "that debiasing leaves.", "",
                  "| method | calls per prefill | full: GPU-timeline µs | full: host µs | control: GPU-timeline µs "
                  "| full share, median (max) | control share | **net share** | speedup kept | n |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m, q in insitu.items():
            if "net_pct_median" not in q:  # an older run without the control
                lines.append(f"| {m} | {q['calls_per_prefill']:g} | {q['debias_us_per_prefill_median']:.1f} | — | — | "
                             f"{q['overhead_pct_median']:.3f} % ({q['overhead_pct_max']:.3f} %) | — | — | — | {q['n']} |")
                continue
            lines.append(f"| {m} | {q['calls_per_prefill']:g} | {q['debias_us_per_prefill_median']:.1f} | "
                         f"{q['host_us_per_prefill_median']:.1f} | {q['control_us_per_prefill_median']:.1f} | "
                         f"{q['overhead_pct_median']:.3f} % ({q['overhead_pct_max']:.3f} %) | "
                         f"{q['control_pct_median']:.3f} % | **{q['net_pct_median']:.3f} %** | "
                         f"{100 / (1 + q['net_pct_median'] / 100):.2f} % | {q['n']} |")
    by_call = {m: q["by_call_us_median"] for m, q in insitu.items() if "by_call_us_median" in q}
    if by_call:
        lines += ["", "Where the net goes: GPU-timeline µs per prefill by call, full / control (off), medians "
                  "(`index`: re-indexing positions between stages, tracked in full, upstream's long ones in off).", "",
                  "| method | " + " | ".join(_CALL_KINDS) + " |", "|---|" + "---|" * len(_CALL_KINDS)]
        for m, per in by_call.items():
            cells = []
            for kind in _CALL_KINDS:
                full_us = per["full"].get("__getitem__" if kind == "index" else kind)
                off_us = per["off"].get(kind)
                cells.append("—" if full_us is None and off_us is None else
                             f"{full_us or 0:.1f} / {off_us or 0:.1f} ({(full_us or 0) - (off_us or 0):+.1f})")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    iso = {m: s["isolated_overhead_pct"] for m, s in summary.items() if "isolated_overhead_pct" in s}
    if iso:
        lines += ["", "Isolated estimate (debias calls per prefill × the call's measured cost ÷ prefill): " +
                  ", ".join(f"{m} {v:.3f} %" for m, v in iso.items())]
    call = results.get(CALL, {}).get("call")
    if call:
        lines += ["", "## The call alone (wall µs per call, launch-bound; debias + keep_cap + topk vs plain topk)", "",
                  "| N | dtype | topk | debias + topk | overhead | host syncs |", "|---|---|---|---|---|---|"]
        for c in call:
            lines.append(f"| {c['n']} | {c['dtype']} | {c['topk_us']:.1f} | {c['debias_topk_us']:.1f} | "
                         f"{c['overhead_us']:+.1f} | {c['host_syncs']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/bench-ckpt/llava-v1.5-7b-random"))
    p.add_argument("--carry", type=Path, default=None, help="carried wheels + patched trees (bench/carry.py)")
    p.add_argument("--trees", type=Path, default=None,
                   help="exported, patched upstream trees to run instead of third_party/ (EVAL_THIRD_PARTY)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--timeout", type=int, default=1200, help="seconds per method")
    p.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run with --tiny")
    p.add_argument("--tiny", action="store_true", help="tiny random checkpoint: checks the script, not latency")
    p.add_argument("--profile", action="store_true", help="with --insitu: one torch.profiler prefill per method")
    p.add_argument("--insitu", action="store_true",
                   help="only the in-situ measurement (CUDA events around the debias calls inside real prefills), "
                        "added to the methods' entries in an existing bench.json")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # the reference every speedup is measured against
    a.out.mkdir(parents=True, exist_ok=True)
    if a.carry is not None:
        from bench.carry import install
        install(a.carry)
    envs = environments(methods, a.carry, a.trees)
    results_path = a.out / "bench.json"
    results = json.loads(results_path.read_text())["results"] if results_path.exists() else {}
    t0 = time.time()
    print(f"checkpoint {a.ckpt} ...", flush=True)
    common = ["--device", a.device] + (["--tiny"] if a.tiny else [])
    made = _run_worker(envs[REFERENCE], ["checkpoint", "--ckpt", str(a.ckpt), *common], a.timeout)
    if "error" in made:
        print(f"error: could not build the random checkpoint:\n{made['log_tail']}", file=sys.stderr)
        return 1
    if a.insitu:
        for m in methods:
            if m == REFERENCE:
                continue
            if m not in results or "error" in results[m]:
                print(f"{m}: skipped in situ: no successful measurement of it in {results_path}; "
                      f"run without --insitu first", flush=True)
                continue
            print(f"{m}: in situ ...", flush=True)
            try:
                r = _run_worker(envs[m], ["insitu", "--method", m, "--ckpt", str(a.ckpt), "--reps", str(a.reps),
                                          *common, *(["--profile"] if a.profile else [])], a.timeout)
            except subprocess.TimeoutExpired:
                r = {"error": f"timed out after {a.timeout} s"}
            results[m]["in_situ"] = r.get("in_situ", {"error": r.get("error"), "log_tail": r.get("log_tail")})
            if "profile" in r:
                results[m]["in_situ_profile"] = r["profile"]
            data = json.loads(results_path.read_text())
            data["results"] = results
            results_path.write_text(json.dumps(data, indent=1))
        methods_done = True
    else:
        methods_done = False
    for m in ([] if methods_done else [CALL, *methods]):
        if m in results and "error" not in results[m]:
            print(f"{m}: already measured (in {results_path}); delete it to re-run", flush=True)
            continue
        print(f"{m} ...", flush=True)
        job = ["call", *common] if m == CALL else [
            "method", "--method", m, "--ckpt", str(a.ckpt), "--reps", str(a.reps), "--warmup", str(a.warmup),
            "--decode", str(a.decode), *common]
        try:
            results[m] = _run_worker(envs[m], job, a.timeout)
        except subprocess.TimeoutExpired:
            results[m] = {"error": f"timed out after {a.timeout} s"}
        meta = {"gpu": results[m].get("gpu", made.get("gpu")), "torch": made.get("torch"),
                "date": time.strftime("%Y-%m-%d"), "reps": a.reps, "warmup": a.warmup, "host": platform.node()}
        results_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))  # nothing lost on a kill
        print(f"{m}: {'error: ' + results[m]['error'] if 'error' in results[m] else 'done'} "
              f"({time.time() - t0:.0f} s)", flush=True)
    summary = summarise(results)
    meta = json.loads(results_path.read_text())["meta"]
    results_path.write_text(json.dumps({"meta": meta, "results": results, "summary": summary}, indent=1))
    (a.out / "bench.md").write_text(markdown(results, summary, meta))
    print((a.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
