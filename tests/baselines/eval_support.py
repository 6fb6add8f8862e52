"""Shared pieces of the adapter-through-driver tests (tests/baselines/test_<key>_eval.py).

Each of them runs ``python -m eval.run --method <key>`` in a subprocess of the baseline's interpreter, from the
repository root, on exported trees (support.patched_tree: third_party/<Name> at its pin + patches/<Name>, temp
copies) that reach the adapter through EVAL_THIRD_PARTY, as the demo and the GPU benchmark run them; the
submodules are never modified. The model is a tiny random LLaVA-1.5 (eval/tiny_llava.py), the benchmark
eval/synthetic.py plus a few questions of their own (``synthetic_data``).

Observation is probe-only, in one of two ways; the adapters and the driver always run unchanged:
- ``OBSERVER``, a ``sitecustomize`` first on PYTHONPATH (``observer_dir``, ``run_observed``), wraps
  ``debias_core.sample/debias/keep_cap`` and, when the driver exits, dumps what they saw (events) and where
  ``eval``, ``llava`` and transformers' Llama module were imported from;
- the test file runs itself as a script that wraps eval.run.main with forward hooks (FastV, HiMAP:
  ``self_probe_setup``, ``run_self_probe``, and ``probe_main`` as the file's ``__main__``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests import support

NARROW = (1000, 101)                 # 2 rows of 24 patches are content: 48 valid tokens at τ = 0.5
SUFFIX = "Answer the question using a single word or phrase."
TEXT_ONLY = [{"question_id": 900, "text": f"What shape is it?\n{SUFFIX}"},
             {"question_id": 901, "text": "Is there a red circle?"}]
NARROW_QUESTION = {"question_id": 800, "image": "narrow_1000x101.png",
                   "text": f"Is there a red circle in the image?\n{SUFFIX}"}

# Imported by the driver's interpreter at start-up (first on PYTHONPATH); observes only when EVAL_PROBE_OUT is set.
OBSERVER = r'''
import atexit, contextlib, json, os, sys
if os.environ.get("EVAL_PROBE_OUT"):
    import debias_core, torch
    _events = []
    _sample, _debias, _cap = debias_core.sample, debias_core.debias, debias_core.keep_cap

    @contextlib.contextmanager
    def sample(*args, **kwargs):
        with _sample(*args, **kwargs) as ctx:
            _events.append({"event": "sample", "image_size": ctx.image_size, "preprocess": ctx.preprocess,
                            "span_start": ctx.span_start, "mode": debias_core.settings().mode})
            yield ctx

    def debias(scores, positions=None, *, stage=0, mean_dim=None, **kwargs):  # kwargs: start, padding, ...
        out = _debias(scores, positions, stage=stage, mean_dim=mean_dim, **kwargs)
        # untouched: upstream's value itself (with mean_dim: exactly upstream's torch.mean, a new tensor)
        upstream = scores if mean_dim is None else torch.mean(scores, dim=mean_dim)
        _events.append({"event": "debias", "stage": stage, "n": int(out.shape[-1]),
                        "neg_inf": int(torch.isneginf(out).sum()),
                        "untouched": out is scores if mean_dim is None else
                                     out.dtype == upstream.dtype and torch.equal(out, upstream)})
        return out

    def keep_cap(k, **kwargs):
        out = _cap(k, **kwargs)
        _events.append({"event": "keep_cap", "k": int(k), "capped": int(out)})
        return out

    debias_core.sample, debias_core.debias, debias_core.keep_cap = sample, debias, keep_cap

    @atexit.register
    def _dump():
        files = {m: getattr(sys.modules.get(m), "__file__", None)
                 for m in ("eval", "llava", "transformers.models.llama.modeling_llama")}
        with open(os.environ["EVAL_PROBE_OUT"], "w") as f:
            json.dump({"events": _events, "modules": files}, f)
'''


# --- running things -----------------------------------------------------------------------------------------

def clean_env(path: list = (), trees: Path | None = None, **extra) -> dict:
    """This environment without DEBIAS* settings, offline, one thread; PYTHONPATH: ``path``, then what it was, then
    the repository (eval/, and debias_core where the environment does not install it); EVAL_THIRD_PARTY=``trees``
    (a folder of exported trees, ``export_trees``) when given; ``extra``: more variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore", **extra)
    if trees is not None:
        env["EVAL_THIRD_PARTY"] = str(trees)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in path] + [p for p in [os.environ.get("PYTHONPATH")] if p]
                                        + [str(support.ROOT)])
    return env


def run_python(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python args...`` with this interpreter, from the repository root (so ``-m eval.run`` is this eval/)."""
    return subprocess.run([sys.executable, *args], cwd=support.ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def export_trees(root: Path, *names: str, patched: bool = True) -> Path:
    """``root``/<Name> for each name: its pinned tree, with our series applied when ``patched``; returns ``root``,
    the folder EVAL_THIRD_PARTY names."""
    export = support.patched_tree if patched else support.pristine_tree
    for name in names:
        export(name, root / name)
    return root


def build_tiny_llava(out: Path, env: dict, *args: str) -> Path:
    """``python -m eval.tiny_llava out args...`` in this interpreter with ``env`` (whose ``llava`` package, on
    PYTHONPATH or through ``--method`` and EVAL_THIRD_PARTY, decides the checkpoint format); the model's path."""
    r = run_python(["-m", "eval.tiny_llava", str(out), *args], env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


def observer_dir(dest: Path, extra: str = "") -> Path:
    """A folder holding ``sitecustomize.py`` = OBSERVER + ``extra`` (more start-up code), for PYTHONPATH."""
    dest.mkdir(parents=True)
    (dest / "sitecustomize.py").write_text(OBSERVER + extra)
    return dest


def run_observed(setup: dict, name: str, method: str, *args: str, path: list = (), **env):
    """eval.run on synthetic_wide (4 new tokens, CPU) under the observer, answers in setup["root"]/``name``;
    PYTHONPATH: setup["probe"] (``observer_dir``), then ``path``; EVAL_THIRD_PARTY: setup["trees"]. ``args``: more
    driver arguments; ``env``: more variables. Returns (the CompletedProcess, the benchmark's answers folder,
    the observer's dump or None when the driver did not get to exit normally)."""
    answers, out = setup["root"] / name, setup["root"] / f"{name}.json"
    cmd = ["-m", "eval.run", "--method", method, "--benchmark", "synthetic_wide", "--model-path", str(setup["model"]),
           "--data-dir", str(setup["data"]), "--answers-dir", str(answers), "--max-new-tokens", "4", "--device",
           "cpu", *args]
    r = run_python(cmd, clean_env([setup["probe"], *path], setup["trees"], EVAL_PROBE_OUT=str(out), **env))
    probe = json.loads(out.read_text()) if out.exists() else None
    return r, answers / setup["model"].name / "synthetic_wide", probe


def self_probe_setup(tmp: Path, name: str, method: str, layers: int, extra: list[dict]) -> dict:
    """Inputs of a self-probing test (FastV, HiMAP) in ``tmp``: trees/<name>, patched; a tiny LLaVA with ``layers``
    decoder layers built by the baseline's own llava (``--method``: its LLaVA 1.1.3 checkpoint format); the
    synthetic benchmarks (2 images per aspect) with ``extra`` questions. Keys: tmp, trees, model, s0 (the image
    start of its prompts), data, questions."""
    from eval.tiny_llava import image_start

    trees = export_trees(tmp / "trees", name)
    model = build_tiny_llava(tmp / "tiny-llava", clean_env(trees=trees), "--layers", str(layers), "--method", method)
    return {"tmp": tmp, "trees": trees, "model": model, "s0": image_start(model),
            **synthetic_data(tmp / "data", images=2, extra=extra)}


def run_self_probe(script: str, setup: dict, driver_args: list[str]) -> dict:
    """``python script probe OUT driver_args...``: the test file ``script`` runs eval.run.main under its own hooks on
    setup's trees (``self_probe_setup``) and writes its observations to OUT. Asserts it succeeded; returns
    {"answers": the model's answers folder, **the observations}."""
    obs = setup["tmp"] / "observed.json"
    r = run_python([script, "probe", str(obs), *driver_args], clean_env(trees=setup["trees"]), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    answers = Path(driver_args[driver_args.index("--answers-dir") + 1]) / setup["model"].name
    return {"answers": answers, **json.loads(obs.read_text())}


def probe_main(probe) -> None:
    """``__main__`` of a test file run as a script: ``probe OUT_JSON DRIVER_ARGS...`` -> exit(probe(OUT_JSON, ARGS))."""
    if len(sys.argv) < 3 or sys.argv[1] != "probe":
        sys.exit(f"usage: {sys.argv[0]} probe OUT_JSON DRIVER_ARGS...")
    sys.exit(probe(sys.argv[2], sys.argv[3:]))


# --- data -----------------------------------------------------------------------------------------------------

def synthetic_data(data: Path, images: int, extra: list[dict]) -> dict:
    """eval/synthetic.py's benchmarks (``images`` per aspect; wide: 640×480, 400×200, 640×200, …) in ``data``, with
    ``extra`` questions (loader format) appended to synthetic_wide; NARROW_QUESTION's image is a 1000×101 picture
    of a red circle. Returns {"data": data, "questions": synthetic_wide's questions, in order}."""
    from PIL import Image, ImageDraw

    from eval.synthetic import build_synthetic

    build_synthetic(data, images=images)
    wide = data / "synthetic" / "wide"
    if any(q.get("image") == NARROW_QUESTION["image"] for q in extra):
        img = Image.new("RGB", NARROW, (235, 232, 225))
        ImageDraw.Draw(img).ellipse([450, 5, 540, 95], fill=(220, 40, 40))
        img.save(wide / "images" / NARROW_QUESTION["image"])
    with open(wide / "llava_synthetic.jsonl", "a") as f:
        f.writelines(json.dumps(q) + "\n" for q in extra)
    return {"data": data, "questions": rows(wide / "llava_synthetic.jsonl")}


def rows(path: Path) -> list[dict]:
    """A .jsonl file's records."""
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- checks ---------------------------------------------------------------------------------------------------

def mode_folder(mode: str, trend: str | None) -> str:
    """The driver's run folder for a mode: 'off', or 'full-<trend with ':' and '/' as '-'>'."""
    return "off" if mode == "off" else "full-" + trend.replace(":", "-").replace("/", "-")


def assert_answers(folder: Path, question_ids: list, model_id: str, method: str, mode: str, budget: str,
                   trend: str | None) -> list[dict]:
    """``folder``/merge.jsonl answers ``question_ids`` in order, each with a text, ``model_id`` and the metadata
    {method, mode, budget, trend (None when off), preprocess 'pad'}; returns its rows."""
    answers = rows(folder / "merge.jsonl")
    assert [r["question_id"] for r in answers] == question_ids
    for r in answers:
        assert r["metadata"] == {"method": method, "mode": mode, "budget": budget,
                                 "trend": None if mode == "off" else trend, "preprocess": "pad"}
        assert isinstance(r["text"], str) and r["model_id"] == model_id
    return answers


def per_sample(events: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Split the observer's event stream at each ``sample`` event: [(sample, [debias/keep_cap events])]."""
    out = []
    for e in events:
        if e["event"] == "sample":
            out.append((e, []))
        else:
            assert out, f"{e} happened outside any debias_core.sample context"
            out[-1][1].append(e)
    return out


def image_samples(probe: dict, questions: list[dict], images: Path, span_start: int | None = None) -> list:
    """[(sample event, its debias/keep_cap events, image size)] of the image questions, in run order, once every
    sample is checked: the driver answered ``questions`` in order in mode off, then full; a text-only question
    opened a context without image or span and reached no ranking; an image question's context carried the
    image's real size (read from ``images``), pad preprocessing and a span start (== ``span_start`` if given)."""
    from PIL import Image

    samples = per_sample(probe["events"])
    assert len(samples) == 2 * len(questions)
    out = []
    for (ctx, calls), q in zip(samples, questions * 2):
        if "image" not in q:
            assert ctx["image_size"] is None and ctx["span_start"] is None and calls == [], (q, calls)
            continue
        size = Image.open(images / q["image"]).size
        assert tuple(ctx["image_size"]) == size and ctx["preprocess"] == "pad" and ctx["span_start"] is not None
        assert span_start is None or ctx["span_start"] == span_start, (ctx, span_start)
        out.append((ctx, calls, size))
    return out


def assert_llava113_preprocessing(method: str) -> None:
    """The adapter preprocesses as LLaVA 1.1.3's eval modules do (FastV, HiMAP): model_vqa_loader / model_vqa_mmbench
    pad (process_images), model_vqa / model_vqa_science centre-crop; no image sizes are passed to generate."""
    from eval.methods import get_adapter

    adapter = get_adapter(method)
    assert {m: adapter.preprocess_mode(m) for m in ("loader", "vqa", "science", "mmbench")} == \
        {"loader": "pad", "vqa": "crop", "science": "crop", "mmbench": "pad"}
    assert adapter.passes_image_sizes is False


def assert_off_for_text_only(forwards: list[dict], on: str, span: int = 576) -> None:
    """From a self-probe's per-forward records (image_size, length, ``on``: the method's switch as the pruning
    layer saw it): text-only forwards (shorter than the visual ``span``) ran with the method off, and every image
    forward after them with it on again."""
    text = [f for f in forwards if f["image_size"] is None]
    assert text and not any(f[on] for f in text)
    assert all(f["length"] < span for f in text)
    assert all(f[on] for f in forwards if f["image_size"] is not None)
