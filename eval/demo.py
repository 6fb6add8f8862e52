"""The embedded demo (``bash scripts/demo.sh``): the whole eval path on CPU, offline, in well under 3 minutes.

1. a tiny random LLaVA-1.5 saved locally (eval.tiny_llava) and loaded through LLaVA's load_pretrained_model;
2. three small synthetic POPE-format benchmarks with wide, tall and square images (eval.synthetic);
3. the driver (python -m eval.run) in modes off and full, for every method that can run here: plain LLaVA
   always; a baseline when its adapter is registered, third_party/<Name> is populated and its environment
   exists (each other case is reported, never skipped silently);
4. scoring with LLaVA's own eval_pope.py (python -m eval.score), then the report (table + radar);
5. a figure of the visual tokens a FastV-style selection keeps under off vs full (eval.overlay).

The model has random weights: its answers and scores are meaningless; the demo shows the machinery.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .benchmarks import SYNTHETIC, get_benchmark
from .common import ROOT, EvalError, populated
from .methods import ADAPTERS, get_adapter, method_spec

OVERLAY_TITLE = ("Visual tokens kept by a FastV-style selection\n(K=2, k=128: top-k of the layer-1 last-token "
                 "attention)\non the tiny RANDOM demo LLaVA: shows the selection machinery,\nnot a pruned "
                 "baseline's result")


def env_python(env: str) -> Path | None:
    """The interpreter of a method's environment built by setup.sh, if any."""
    for cand in (ROOT / "envs" / f"venv-{env}" / "bin" / "python", ROOT / "envs" / f"conda-{env}" / "bin" / "python",
                 ROOT / f".venv-{env}" / "bin" / "python"):
        if cand.exists():
            return cand
    return None


def demo_methods() -> list[tuple[str, str]]:
    """[(method, python)] that can run here; prints why each other registered method does not."""
    out = [("llava", sys.executable)]
    for name in ADAPTERS:
        if name == "llava":
            continue
        spec = method_spec(name)
        py = env_python(spec["env"])
        if not populated(spec["upstream"]):
            print(f"demo: not running {name}: third_party/{spec['upstream']} is not populated")
        elif py is None:
            print(f"demo: not running {name}: no environment envs/venv-{spec['env']} (bash setup.sh --only {spec['env']})")
        else:
            out.append((name, str(py)))
    unadapted = [m for m in ("fastv", "pdrop", "sparsevlm", "himap", "tokencarve") if m not in ADAPTERS]
    if unadapted:
        print(f"demo: no eval adapter yet for {', '.join(unadapted)}: running plain LLaVA")
    return out


def run_driver(python: str, method: str, model: Path, data: Path, answers: Path, max_new: int) -> None:
    cmd = [python, "-m", "eval.run", "--method", method, "--benchmark", ",".join(SYNTHETIC), "--mode", "off,full",
           "--model-path", str(model), "--data-dir", str(data), "--answers-dir", str(answers),
           "--max-new-tokens", str(max_new), "--device", "cpu"]
    if method == "llava":
        cmd += ["--trend", "paper:fastv"]  # llava has no trend of its own; the overlay's selection is FastV's
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode:
        raise EvalError(f"the driver failed for {method} (exit {r.returncode}): {' '.join(cmd)}")


def overlay(adapter, model: Path, data: Path, out_png: Path) -> Path:
    from .overlay import draw_kept, fastv_style_selection
    from .questions import load_samples

    loaded = adapter.load(str(model), device="cpu")
    entries = []
    for key, picks in (("synthetic_wide", (2, 3)), ("synthetic_tall", (3,)), ("synthetic_square", (0,))):
        samples = load_samples(get_benchmark(key), data)
        by_image = {}
        for s in samples:
            by_image.setdefault(s.image_path, s)
        for i in picks:
            s = list(by_image.values())[i % len(by_image)]
            e = fastv_style_selection(adapter, loaded, s.load_image(), s.question)
            e["name"] = f"{key.split('_')[1]}/{s.image_path.name}"
            entries.append(e)
    proc = loaded.image_processor
    return draw_kept(entries, out_png, mean=proc.image_mean, std=proc.image_std, title=OVERLAY_TITLE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--images", type=int, default=4, help="images per synthetic benchmark (2 questions each)")
    a = p.parse_args(argv)
    t0 = time.time()
    try:
        from .report import make_report
        from .score import main as score_main
        from .synthetic import build_synthetic
        from .tiny_llava import build_tiny_llava

        out = a.out.resolve()
        for sub in ("answers", "report"):
            shutil.rmtree(out / sub, ignore_errors=True)
        print(f"demo: [1/5] tiny random LLaVA -> {out / 'tiny-llava'}", flush=True)
        adapter = get_adapter("llava")
        adapter.activate()  # the same llava package builds the model, and draws the overlay later
        model = build_tiny_llava(out / "tiny-llava")
        print(f"demo: [2/5] synthetic benchmarks -> {out / 'data'}", flush=True)
        build_synthetic(out / "data", images=a.images)
        for method, python in demo_methods():
            print(f"demo: [3/5] driver: {method}, modes off and full", flush=True)
            run_driver(python, method, model, out / "data", out / "answers", a.max_new_tokens)
        print("demo: [4/5] scoring with LLaVA's eval_pope.py, then the report", flush=True)
        if score_main(["--answers-dir", str(out / "answers")]):
            raise EvalError("scoring failed (see above)")
        rep = make_report([out / "answers"], out / "report",
                          title="Demo: tiny random LLaVA on the synthetic benchmarks (scores are meaningless)")
        print(rep["markdown"].read_text())
        print("demo: [5/5] kept-token figure (FastV-style selection, off vs full)", flush=True)
        fig = overlay(adapter, model, out / "data", out / "report" / "kept_tokens.png")
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"demo: done in {time.time() - t0:.0f} s\n  table  {rep['markdown']}\n  csv    {rep['csv']}\n"
          f"  chart  {rep['radar']}\n  tokens {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
