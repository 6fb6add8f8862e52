"""GPU latency of each patched method with DEBIAS=off vs full, beside unpruned LLaVA-1.5.

    python -m bench.latency --out outputs/bench                 # every method whose environment exists
    python -m bench.latency --methods KEY,KEY --reps 30     # keys: python -m eval.registry methods --driver any --supports bench
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

Modules: workload (each method loaded with its input; video: Video-LLaVA's), insitu (--insitu), report
(summary and bench.md), checkpoint (the random LLaVA-1.5-7B), carry (wheels and trees for a machine without
network); this one runs each job in its method's interpreter (--worker) and collects the results.
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
from eval.common import environment_python

from .insitu import bench_in_situ
from .report import markdown, paired_overhead, summarise  # noqa: F401 (paired_overhead: the tests')
from .workload import (BENCH_TREND_BENCHMARK, CALL, IMAGE_SIZE, METHODS, REFERENCE, SITE_CALLS, prepare, sync,
                       timed_generate)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- worker side

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


def bench_method(name: str, ckpt: Path, reps: int, warmup: int, decode: int, device: str = "cuda") -> dict:
    """End to end: host syncs inside debias_core, prefill and prefill + ``decode`` tokens per mode (medians of
    ``reps`` after ``warmup``, modes interleaved) and each mode's peak memory."""
    import debias_core

    work = prepare(name, ckpt, device)
    modes = ("off", "full") if work.trend else ("off",)
    debias_core.configure(mode="off", trend=work.trend, method=work.trend_method)
    out = {"method": name, "upstream": work.upstream_state(), "trend": str(work.trend) if work.trend else None,
           **({"input": work.input} if getattr(work, "input", None) else {}), "modes": {}}
    out["host_syncs_in_debias_core"] = _host_syncs(work, modes[1:]) or "n/a (no ranking site)"
    for new_tokens, key in ((1, "prefill_ms"), (decode + 1, f"prefill_decode{decode}_ms")):
        # prefill also gets an A/A control ("off" twice, the second labelled "off_control"): its paired
        # difference measures the harness's own bias, against which the off → full difference is read
        arms = (*modes, "off_control") if key == "prefill_ms" and len(modes) > 1 else modes
        times = _interleaved_times(work, arms, new_tokens, reps * 2 if key == "prefill_ms" else reps, warmup)
        for arm, runs in times.items():
            out["modes"].setdefault(arm, {})[key] = _distribution(runs)
    for mode in modes:
        out["modes"][mode]["peak_memory_gib"] = _peak_memory_gib(work, mode, decode + 1)
    return out


def _timed_generate(work, mode: str, new_tokens: int) -> float:
    """Seconds of one synchronised generate in debias mode ``mode``."""
    import debias_core

    debias_core.configure(mode=mode)
    return timed_generate(work, new_tokens)


def _host_syncs(work, modes) -> dict:
    """Per ranking mode, a cold-cache prefill (table uploads) then a warm one with every debias_core call under
    the sync-error mode: {"cold"|"warm": {"ok", "calls" (the ranking calls per prefill), "checked"|"error"}}."""
    import debias_core

    syncs = {}
    for mode in modes:
        debias_core.clear_cache()
        for label in ("cold", "warm"):
            calls = {}
            restore = _strict_sync(calls, work.device)
            try:
                _timed_generate(work, mode, 1)
                syncs[label] = {"ok": True, "calls": calls, "checked": work.device.startswith("cuda")}
            except RuntimeError as e:
                syncs[label] = {"ok": False, "error": str(e)[:300], "calls": calls}
            finally:
                restore()
    return syncs


def _interleaved_times(work, arms, new_tokens: int, reps: int, warmup: int) -> dict:
    """arm -> ms of ``reps`` generates after ``warmup`` rounds, the arms run in turn, the order reversed every
    rep (no arm always runs first); an arm "<mode>_control" runs <mode> again."""
    for _ in range(warmup):
        for arm in arms:
            _timed_generate(work, arm.replace("_control", ""), new_tokens)
    times = {arm: [] for arm in arms}
    for i in range(reps):
        for arm in (arms if i % 2 == 0 else arms[::-1]):
            times[arm].append(_timed_generate(work, arm.replace("_control", ""), new_tokens) * 1e3)
    return times


def _distribution(runs: list) -> dict:
    t = sorted(runs)
    return {"median": statistics.median(t), "p10": t[max(0, len(t) // 10)], "p90": t[min(len(t) - 1, len(t) * 9 // 10)],
            "n": len(t), "runs": runs}  # in rep order: full run i is paired with off run i


def _peak_memory_gib(work, mode: str, new_tokens: int) -> float:
    import torch

    cuda = work.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    _timed_generate(work, mode, new_tokens)
    return torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")


def bench_call(reps: int = 2000, device: str = "cuda") -> list[dict]:
    """debias + keep_cap + topk vs plain topk on one score vector, wall µs per call (launch-bound), at N = 576
    (LLaVA-1.5's span, fp16 and bf16) and 2,056 (Video-LLaVA's)."""
    import torch

    from debias_core import ExponentialTrend
    from debias_core.presets import METHODS as FAMILIES, pad_threshold, single_trend_families

    # the paper family with the lowest pad threshold (the most padding suppressed), with its trend
    family = min(FAMILIES, key=pad_threshold)
    preset = f"paper:{family}" if family in single_trend_families() else f"paper:{family}/{BENCH_TREND_BENCHMARK}"
    cases = [(576, dict(image_size=IMAGE_SIZE), preset, family),
             (2056, dict(image_size=None, preprocess="none", span_length=2056),
              ExponentialTrend(a=1.0, b=0.002, n=2056), None)]  # no published video trend: a synthetic one
    return [_call_case(n, ctx, trend, method, dtype, reps, device) for n, ctx, trend, method in cases
            for dtype in (torch.float16, torch.bfloat16)]


def _call_case(n: int, ctx: dict, trend, method, dtype, reps: int, device: str) -> dict:
    """One row of bench_call: N random fp scores [n], debiased under ``trend`` in the sample context ``ctx``."""
    import torch

    import debias_core

    scores = torch.rand(n, device=device, dtype=dtype)
    debias_core.configure(mode="full", trend=trend, method=method)
    with debias_core.sample(**ctx):
        def plain():
            return scores.topk(128).indices

        def debiased():
            return debias_core.debias(scores).topk(debias_core.keep_cap(128)).indices

        result = {"n": n, "dtype": str(dtype).replace("torch.", "")}
        for label, fn in (("topk_us", plain), ("debias_topk_us", debiased)):
            result[label] = _wall_us_per_call(fn, reps, device)
        result["host_syncs"] = _sync_check(debiased) if device.startswith("cuda") else "not checked (CPU)"
    result["overhead_us"] = result["debias_topk_us"] - result["topk_us"]
    return result


def _wall_us_per_call(fn, reps: int, device: str) -> float:
    for _ in range(50):  # warm-up
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps * 1e6


def _sync_check(fn) -> str:
    """"none", or the error of the first host-device synchronisation inside ``fn`` (CUDA sync-error mode)."""
    import torch

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return "none"
    except RuntimeError as e:
        return str(e)[:200]
    finally:
        torch.cuda.set_sync_debug_mode(previous)


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


def environments(methods, carry: Path | None, trees: Path | None = None, site: Path | None = None) -> dict:
    """method -> {"python", "env"}: carried site folders (device runs: ``site``, default bench.carry's) or each
    baseline's environment (with ``trees``: exported, patched upstream trees instead of third_party/, as
    EVAL_THIRD_PARTY)."""
    from bench import carry as carrying
    if carry is not None:
        return {m: carrying.environment(carry, m, site or carrying.SITE_ROOT) for m in (*methods, CALL)}
    every = registry.methods(driver=None)
    out = {}
    for m in (*methods, CALL):
        env_name = every[REFERENCE if m == CALL else m]["env"]
        python = environment_python(env_name)
        out[m] = ({"python": str(python), "env": {}} if python is not None else
                  {"python": sys.executable, "env": {}, "note": f"no environment for {env_name}; using {sys.executable}"})
        if trees is not None:
            out[m]["env"]["EVAL_THIRD_PARTY"] = str(Path(trees).resolve())
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker(argv[1:])
    a = _parser().parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # the reference every speedup is measured against
    a.out.mkdir(parents=True, exist_ok=True)
    if a.carry is not None:
        from bench.carry import SITE_ROOT, install
        install(a.carry, a.site or SITE_ROOT)
    run = Run(a, environments(methods, a.carry, a.trees, a.site))
    print(f"checkpoint {a.ckpt} ...", flush=True)
    run.made = _run_worker(run.envs[REFERENCE], ["checkpoint", "--ckpt", str(a.ckpt), *run.common], a.timeout)
    if "error" in run.made:
        print(f"error: could not build the random checkpoint:\n{run.made['log_tail']}", file=sys.stderr)
        return 1
    if a.insitu:
        for m in methods:
            if m != REFERENCE:
                run.in_situ(m)
    else:
        for m in (CALL, *methods):
            run.end_to_end(m)
    run.write_report()
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/bench-ckpt/llava-v1.5-7b-random"))
    p.add_argument("--carry", type=Path, default=None, help="carried wheels + patched trees (bench/carry.py)")
    p.add_argument("--site", type=Path, default=None,
                   help="with --carry: where its stacks are (installed there unless already), default "
                        "/tmp/bench-site; the study's bundle: /tmp/study-site")
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
    return p


class Run:
    """One orchestrator run: the workers' environments and arguments, and bench.json and bench.md under --out,
    rewritten after every job (nothing is lost on a kill; a rerun measures only what is missing or failed)."""

    def __init__(self, args, envs: dict):
        self.a, self.envs = args, envs
        self.common = ["--device", args.device] + (["--tiny"] if args.tiny else [])
        self.path = args.out / "bench.json"
        self.results = json.loads(self.path.read_text())["results"] if self.path.exists() else {}
        self.made: dict = {}
        self.t0 = time.time()

    def _job(self, m: str, job: list[str]) -> dict:
        try:
            return _run_worker(self.envs[m], job, self.a.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {self.a.timeout} s"}

    def end_to_end(self, m: str) -> None:
        a = self.a
        if m in self.results and "error" not in self.results[m]:
            print(f"{m}: already measured (in {self.path}); delete it to re-run", flush=True)
            return
        print(f"{m} ...", flush=True)
        job = ["call", *self.common] if m == CALL else [
            "method", "--method", m, "--ckpt", str(a.ckpt), "--reps", str(a.reps), "--warmup", str(a.warmup),
            "--decode", str(a.decode), *self.common]
        self.results[m] = r = self._job(m, job)
        self._save({"gpu": r.get("gpu", self.made.get("gpu")), "torch": self.made.get("torch"),
                    "date": time.strftime("%Y-%m-%d"), "reps": a.reps, "warmup": a.warmup, "host": platform.node()})
        print(f"{m}: {'error: ' + r['error'] if 'error' in r else 'done'} ({time.time() - self.t0:.0f} s)", flush=True)

    def in_situ(self, m: str) -> None:
        """Adds "in_situ" (and "in_situ_profile") to the method's entry of an earlier end-to-end run."""
        a, results = self.a, self.results
        if m not in results or "error" in results[m]:
            print(f"{m}: skipped in situ: no successful measurement of it in {self.path}; "
                  f"run without --insitu first", flush=True)
            return
        print(f"{m}: in situ ...", flush=True)
        r = self._job(m, ["insitu", "--method", m, "--ckpt", str(a.ckpt), "--reps", str(a.reps), *self.common,
                          *(["--profile"] if a.profile else [])])
        results[m]["in_situ"] = r.get("in_situ", {"error": r.get("error"), "log_tail": r.get("log_tail")})
        if "profile" in r:
            results[m]["in_situ_profile"] = r["profile"]
        self._save(json.loads(self.path.read_text())["meta"])

    def _save(self, meta: dict) -> None:
        """bench.json (meta, results, summary) and bench.md as they stand: a killed run leaves both readable."""
        summary = summarise(self.results)
        self.path.write_text(json.dumps({"meta": meta, "results": self.results, "summary": summary}, indent=1))
        (self.a.out / "bench.md").write_text(markdown(self.results, summary, meta))

    def write_report(self) -> None:
        self._save(json.loads(self.path.read_text())["meta"])
        print((self.a.out / "bench.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
