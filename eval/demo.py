"""The embedded demo (``bash scripts/demo.sh``): the whole eval path on CPU, offline, in under 3 minutes.

1. a tiny random LLaVA-1.5 saved locally (eval.tiny_llava), one checkpoint for every method as the paper uses
   llava-v1.5-7b for all: built by the first runnable baseline's LLaVA 1.1.3 (the released checkpoints' format),
   else by plain LLaVA; as many decoder layers as the deepest pruning layer needs;
2. three small synthetic POPE-format benchmarks with wide, tall and square images (eval.synthetic);
3. the driver (python -m eval.run) in modes off and full, for every method that can run here: plain LLaVA
   always; a baseline when third_party/<Name> is populated, its environment exists (.venv-<Name> or
   envs/venv-<Name>, or DEMO_PYTHON_<KEY>) and has what LLaVA's loader needs, and its adapter runs an exported
   tree (EVAL_THIRD_PARTY). Each baseline runs in its own interpreter on a temporary copy of its pinned tree with
   patches/<Name> applied (third_party/ is never modified). Each other case is reported, never skipped silently;
4. scoring with LLaVA's own eval_pope.py (python -m eval.score), then the report (table + radar);
5. a figure of the visual tokens kept under off vs full (eval.overlay): for each baseline that ran, the kept
   indices themselves, read by a demo-only hook where its ranking result enters the next decoder layer
   (``python -m eval.demo kept``, in the baseline's interpreter); with no baseline, a FastV-style stand-in
   selection on plain LLaVA.

The model has random weights: its answers and scores are meaningless; the demo shows the machinery.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from .benchmarks import SYNTHETIC, get_benchmark
from .common import ROOT, TREE_ENV, EvalError, populated
from .methods import ADAPTERS, get_adapter, method_spec, parse_method_args
from .upstream import export_tree
# LLaVA's load_pretrained_model needs these in a baseline's interpreter (slow LlamaTokenizer; low_cpu_mem_usage)
BASELINE_MODULES = ("torch", "transformers", "sentencepiece", "accelerate", "PIL", "tqdm", "debias_core")
# images drawn in the kept-token figure: (benchmark, index of the image in it)
OVERLAY_PICKS = (("synthetic_wide", 2), ("synthetic_wide", 3), ("synthetic_tall", 3), ("synthetic_square", 0))
STAND_IN_TITLE = ("Visual tokens kept by a FastV-style selection\n(K=2, k=128: top-k of the layer-1 last-token "
                  "attention)\non the tiny RANDOM demo LLaVA: shows the selection machinery,\nnot a pruned "
                  "baseline's result (no baseline could run here)")


# ---------------------------------------------------------------------------- which methods run
def env_python(env: str, method: str) -> Path | None:
    """The interpreter of a method's environment: DEMO_PYTHON_<METHOD>, else one built by setup.sh."""
    override = os.environ.get(f"DEMO_PYTHON_{method.upper()}")
    if override:
        return Path(override)
    for cand in (ROOT / "envs" / f"venv-{env}" / "bin" / "python", ROOT / "envs" / f"conda-{env}" / "bin" / "python",
                 ROOT / f".venv-{env}" / "bin" / "python"):
        if cand.exists():
            return cand
    if env == "LLaVA":  # upstream LLaVA (the iLLaVA port) runs on the demo's own stack (transformers 4.37)
        return Path(sys.executable)
    return None


def _missing_modules(python: Path) -> list[str]:
    code = ("import importlib.util as u; print(' '.join(m for m in %r if u.find_spec(m) is None))"
            % (BASELINE_MODULES,))
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    if r.returncode:
        return [f"(the interpreter fails: {r.stderr.strip()[-200:]})"]
    return r.stdout.split()


def _adapter_refuses(python: Path, method: str, trees: Path) -> str | None:
    """The adapter's own environment check, run in the method's interpreter on the exported trees (e.g.
    SparseVLMs needs flash-attn); None when it passes."""
    code = ("import sys\nfrom eval.common import EvalError\nfrom eval.methods import get_adapter\n"
            f"try:\n    get_adapter({method!r}).check_environment()\n"
            "except EvalError as e:\n    print(e)\n    sys.exit(3)\n")
    r = subprocess.run([str(python), "-c", code], cwd=ROOT, env=_sub_env(trees), capture_output=True, text=True,
                       timeout=120)
    if r.returncode == 0:
        return None
    return r.stdout.strip() or f"its adapter does not load ({r.stderr.strip().splitlines()[-1:]})"


def demo_methods() -> list[tuple[str, str]]:
    """[(method, python)]: plain LLaVA, then each baseline that can run here; prints why each other does not."""
    out = [("llava", sys.executable)]
    for name in ADAPTERS:
        spec = method_spec(name)
        if name == "llava":
            continue  # runs in this interpreter
        py = env_python(spec["env"], name)
        why = None
        if not populated(spec["upstream"]):
            why = f"third_party/{spec['upstream']} is not populated"
        elif py is None:
            why = (f"no environment .venv-{spec['env']} or envs/venv-{spec['env']} (bash setup.sh --test-env "
                   f"{spec['env']}), and DEMO_PYTHON_{name.upper()} is not set")
        elif not py.exists():
            why = f"DEMO_PYTHON_{name.upper()}={py} does not exist"
        else:
            missing = _missing_modules(py)
            if missing:
                why = (f"{py} lacks {', '.join(missing)} (LLaVA's load_pretrained_model needs sentencepiece and "
                       f"accelerate: add them to envs/cpu/{spec['env']}.txt and rebuild)")

        if why:
            print(f"demo: not running {name}: {why}")
        else:
            out.append((name, str(py)))
    return out


# ---------------------------------------------------------------------------- patched temporary trees
# ---------------------------------------------------------------------------- steps
def _sub_env(trees: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS")}  # the demo sets modes itself
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if trees is not None:
        env[TREE_ENV] = str(trees)
    return env


# Method arguments that are decoder-layer indices without "layer" in their name (iLLaVA merges before layer k).
LAYER_ARGS = ("illava_llm_k",)


def demo_layers(methods: list[str]) -> int:
    """Decoder layers for the demo model: one past the deepest layer a method prunes at (2 for plain LLaVA)."""
    deepest = 1
    for m in methods:
        for key, value in method_spec(m)["args"].items():
            if "layer" in key or key in LAYER_ARGS:
                deepest = max([deepest, *(value if isinstance(value, list) else [value])])
    return deepest + 1


def method_args(method: str, s0: int) -> list[str]:
    """--method-arg for the demo model: the sys length (window start) is its tokenizer's image position."""
    return [a for key in method_spec(method)["args"] if key.endswith("sys_length")
            for a in ("--method-arg", f"{key}={s0}")]


def demo_trend(method: str) -> str:
    """The synthetic benchmarks have no paper preset: FastV's single trend, else the method's POPE preset."""
    m = method_spec(method)["trend_method"]
    return "paper:fastv" if m in (None, "fastv") else f"paper:{m}/pope"


# Methods whose model needs more than the shared one: TokenCarve's SVD needs hidden_size >= 576 (a wide model
# for all would make every method slow on CPU). method -> (layers, hidden).
OWN_MODEL = {"tokencarve": (3, 640)}
# Methods whose upstream code cannot load the demo's tiny model at all, and why.
DEMO_CANNOT = {"sparsevlm": "its loader attaches attention modules to exactly 32 decoder layers (LLaVA-1.5-7B's); "
                            "the demo's tiny model has fewer (tests/baselines/test_sparsevlm*.py run it on a "
                            "32-layer tiny model)"}


def build_model(methods: list[tuple[str, str]], out: Path, trees: Path, layers: int, hidden: int = 64) -> Path:
    """A tiny model: built by the first baseline's LLaVA (1.1.3 format) if one runs, else here."""
    if len(methods) > 1:
        method, python = methods[1]
        r = subprocess.run([python, "-m", "eval.tiny_llava", str(out), "--layers", str(layers), "--method", method,
                            "--hidden", str(hidden), "--attn", "default"],
                           cwd=ROOT, env=_sub_env(trees), capture_output=True, text=True)
        if r.returncode:
            raise EvalError(f"building the tiny model with {method}'s LLaVA failed:\n{r.stderr[-2000:]}")
        return Path(r.stdout.strip().splitlines()[-1])
    from .tiny_llava import build_tiny_llava
    return build_tiny_llava(out, layers=layers, hidden=hidden, attn_implementation=None)


def run_driver(python: str, method: str, model: Path, data: Path, answers: Path, max_new: int, s0: int,
               trees: Path) -> None:
    cmd = [python, "-m", "eval.run", "--method", method, "--benchmark", ",".join(SYNTHETIC), "--mode", "off,full",
           "--trend", demo_trend(method), "--model-path", str(model), "--data-dir", str(data),
           "--answers-dir", str(answers), "--max-new-tokens", str(max_new), "--device", "cpu",
           *method_args(method, s0)]
    r = subprocess.run(cmd, cwd=ROOT, env=_sub_env(None if method == "llava" else trees))
    if r.returncode:
        raise EvalError(f"the driver failed for {method} (exit {r.returncode}): {' '.join(cmd)}")


def overlay_samples(data: Path) -> list[tuple[str, object]]:
    """[(name, Sample)] of the images the figure shows (OVERLAY_PICKS)."""
    from .questions import load_samples

    out = []
    for key, i in OVERLAY_PICKS:
        by_image = {}
        for s in load_samples(get_benchmark(key), data):
            by_image.setdefault(s.image_path, s)
        s = list(by_image.values())[i % len(by_image)]
        out.append((f"{key.split('_')[1]}/{s.image_path.name}", s))
    return out


def kept_tokens(python: str, method: str, model: Path, data: Path, s0: int, trees: Path, out_json: Path) -> dict:
    cmd = [python, "-m", "eval.demo", "kept", "--method", method, "--model", str(model), "--data", str(data),
           "--trend", demo_trend(method), "--out", str(out_json), *method_args(method, s0)]
    r = subprocess.run(cmd, cwd=ROOT, env=_sub_env(trees))
    if r.returncode:
        raise EvalError(f"recording {method}'s kept tokens failed (exit {r.returncode}): {' '.join(cmd)}")
    return json.loads(out_json.read_text())


def draw_baselines(adapter, model: Path, data: Path, recorded: list[dict], out_png: Path) -> Path:
    """One row per image, columns '<method> off', '<method> full' for each baseline recorded."""
    from .overlay import draw_kept

    loaded = adapter.load(str(model), device="cpu")
    grid, resolution = adapter.geometry(loaded)
    entries = []
    for name, s in overlay_samples(data):
        image = s.load_image()
        kept = {f"{r['method']} {mode}": r["kept"][name][mode] for r in recorded for mode in ("off", "full")}
        entries.append({"name": name, "size": image.size, "grid": grid, "resolution": resolution, "kept": kept,
                        "pixels": adapter.image_tensor(loaded, image, "pad")})
    lines = ["Visual tokens kept by the patched baselines, read where their ranking enters the next decoder "
             "layer (prefill)", *(r["label"] for r in recorded),
             "on the tiny RANDOM demo LLaVA: shows the machinery (padding out, earlier tokens favoured), not a result"]
    width = 80 * len(recorded)  # characters per title line that fit two panels (8.4 in) per baseline
    title = "\n".join(textwrap.fill(line, width) for line in lines)
    proc = loaded.image_processor
    return draw_kept(entries, out_png, mean=proc.image_mean, std=proc.image_std, title=title)


def draw_stand_in(adapter, model: Path, data: Path, out_png: Path) -> Path:
    from .overlay import draw_kept, fastv_style_selection

    loaded = adapter.load(str(model), device="cpu")
    entries = []
    for name, s in overlay_samples(data):
        e = fastv_style_selection(adapter, loaded, s.load_image(), s.question)
        e["name"] = name
        entries.append(e)
    proc = loaded.image_processor
    return draw_kept(entries, out_png, mean=proc.image_mean, std=proc.image_std, title=STAND_IN_TITLE)


# ---------------------------------------------------------------------------- `kept`: in a baseline's interpreter
def _fastv_hook(adapter, model, kept: list):
    """Pre-hook on decoder layer K: the visual tokens FastV left visible (mask mode) or kept (in-place)."""
    a = adapter.args
    s0, n = a["fast_v_sys_length"], a["fast_v_image_token_length"]

    def hook(module, args, kwargs):
        if not a["fast_v_inplace"]:
            row = kwargs["attention_mask"][0, 0, -1, s0:s0 + n]   # additive mask of the last query: 0 = visible
            kept.append((row == 0).nonzero().flatten().tolist())
        else:
            pos = kwargs["position_ids"][0]
            kept.append((pos[(pos >= s0) & (pos < s0 + n)] - s0).tolist())

    model.model.layers[a["fast_v_agg_layer"]].register_forward_pre_hook(hook, with_kwargs=True)
    return (f"FastV: layer K={a['fast_v_agg_layer']} keeps R={a['fast_v_attention_rank']} by the last token's "
            f"attention at layer K-1")


def _himap_hook(adapter, model, kept: list):
    """Pre-hook on decoder layer K_i: position ids are the original indices of what both stages kept."""
    a = adapter.args
    s0, n = a["sys_length"], a["img_length"]

    def hook(module, args, kwargs):
        pos = kwargs["position_ids"][0]
        kept.append(sorted((pos[(pos >= s0) & (pos < s0 + n)] - s0).tolist()))

    model.model.layers[a["hmap_v_attn_img_layer"]].register_forward_pre_hook(hook, with_kwargs=True)
    return (f"HiMAP: the final set, K_t={a['hmap_v_attn_txt_layer']} keeps R_t={a['hmap_v_attn_txt_rank']} "
            f"(text->image), then K_i={a['hmap_v_attn_img_layer']} keeps R_i={a['hmap_v_attn_img_rank']} "
            f"(image->image)")


KEPT_HOOKS = {"fastv": _fastv_hook, "himap": _himap_hook}


def kept_main(argv=None) -> int:
    """Kept visual tokens at prefill, off vs full, for the figure's images: JSON {method, label, kept}."""
    p = argparse.ArgumentParser(prog="python -m eval.demo kept",
                                description="record a baseline's kept visual tokens for the demo figure")
    p.add_argument("--method", required=True, choices=sorted(KEPT_HOOKS))
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--trend", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method-arg", action="append", default=[])
    a = p.parse_args(argv)
    try:
        import debias_core

        adapter = get_adapter(a.method, parse_method_args(a.method_arg))
        adapter.activate()
        loaded = adapter.load(a.model, device="cpu")
        adapter.configure(loaded)
        grid, resolution = adapter.geometry(loaded)
        forwards: list = []
        label = KEPT_HOOKS[a.method](adapter, loaded.model, forwards)
        kept = {}
        for name, s in overlay_samples(a.data):
            image = s.load_image()
            pixels = adapter.image_tensor(loaded, image, "pad")
            ids = adapter.input_ids(loaded, s.question, has_image=True)
            kept[name] = {}
            for mode in ("off", "full"):
                debias_core.configure(mode=mode, trend=a.trend, method=adapter.trend_method)
                forwards.clear()
                with debias_core.sample(image_size=image.size, preprocess="pad", grid=grid, resolution=resolution,
                                        span_start=adapter.span_start(ids)):
                    adapter.generate(loaded, ids, pixels, image.size, max_new_tokens=1)
                if not forwards:
                    raise EvalError(f"{a.method} never reached its pruning layer: the hook saw no forward")
                kept[name][mode] = forwards[0]
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.out.write_text(json.dumps({"method": a.method, "label": label, "kept": kept}))
    return 0


# ---------------------------------------------------------------------------- the demo
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["kept"]:
        return kept_main(argv[1:])
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
        from .tiny_llava import image_start

        out = a.out.resolve()
        for sub in ("answers", "report", "tiny-llava", "kept"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "kept").mkdir(parents=True)
        candidates = demo_methods()
        adapter = get_adapter("llava")
        adapter.activate()  # the llava package that scores and draws the figure
        with tempfile.TemporaryDirectory(prefix="demo-trees-") as tmp:
            trees = Path(tmp)
            upstreams = {method_spec(m)["upstream"]: method_spec(m)["sys_path"] for m, _ in candidates[1:]}
            if "tokencarve" in dict(candidates) and populated("LLaVA"):
                upstreams.setdefault("LLaVA", [""])  # TokenCarve runs on upstream LLaVA
            for upstream, sys_path in upstreams.items():
                print(f"demo: [0/5] third_party/{upstream} at its pin + patches/{upstream} -> a temporary copy",
                      flush=True)
                export_tree(upstream, trees / upstream, paths=[p for p in sys_path if p] or None)
            methods = candidates[:1]
            for method, python in candidates[1:]:
                why = DEMO_CANNOT.get(method) or _adapter_refuses(Path(python), method, trees)
                if why:
                    print(f"demo: not running {method}: {why}", flush=True)
                else:
                    methods.append((method, python))
            shared = [(m, py) for m, py in methods if m not in OWN_MODEL]
            layers = demo_layers([m for m, _ in shared])
            builder = methods[1][0] if len(methods) > 1 else "llava"
            print(f"demo: [1/5] tiny random LLaVA ({layers} layers, built by {builder}'s llava) -> "
                  f"{out / 'tiny-llava'}", flush=True)
            model = build_model(shared, out / "tiny-llava", trees, layers)
            models = {m: model for m, _ in shared}
            for m, py in methods:
                if m in OWN_MODEL:
                    own_layers, hidden = OWN_MODEL[m]
                    print(f"demo: [1/5] tiny random LLaVA for {m} ({own_layers} layers, hidden {hidden})", flush=True)
                    models[m] = build_model([("llava", sys.executable), (m, py)], out / f"tiny-llava-{m}", trees,
                                            own_layers, hidden)
            s0 = image_start(model)
            print(f"demo: [2/5] synthetic benchmarks -> {out / 'data'}", flush=True)
            build_synthetic(out / "data", images=a.images)
            for method, python in methods:
                print(f"demo: [3/5] driver: {method}, modes off and full", flush=True)
                run_driver(python, method, models[method], out / "data", out / "answers", a.max_new_tokens,
                           image_start(models[method]), trees)
            print("demo: [4/5] scoring with LLaVA's eval_pope.py, then the report", flush=True)
            if score_main(["--answers-dir", str(out / "answers")]):
                raise EvalError("scoring failed (see above)")
            rep = make_report([out / "answers"], out / "report",
                              title="Demo: tiny random LLaVA on the synthetic benchmarks (scores are meaningless)")
            print(rep["markdown"].read_text())
            fig = out / "report" / "kept_tokens.png"
            recorded = [kept_tokens(py, m, model, out / "data", s0, trees, out / "kept" / f"{m}.json")
                        for m, py in methods[1:] if m in KEPT_HOOKS]
            if recorded:
                print(f"demo: [5/5] kept-token figure: {', '.join(r['method'] for r in recorded)}, off vs full",
                      flush=True)
                draw_baselines(adapter, model, out / "data", recorded, fig)
            else:
                print("demo: [5/5] kept-token figure (no baseline ran: FastV-style stand-in on plain LLaVA)",
                      flush=True)
                draw_stand_in(adapter, model, out / "data", fig)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"demo: done in {time.time() - t0:.0f} s\n  table  {rep['markdown']}\n  csv    {rep['csv']}\n"
          f"  chart  {rep['radar']}\n  tokens {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
