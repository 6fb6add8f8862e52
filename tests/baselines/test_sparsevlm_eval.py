"""SparseVLMs through the eval driver: ``python -m eval.run --method sparsevlm`` (a subprocess in this
environment) loads a tiny random 32-layer LLaVA-1.5 through SparseVLMs' own ``load_pretrained_model`` (its
builder attaches the flash-attention module to exactly 32 layers) from the patched tree and answers the synthetic
benchmark (eval/synthetic.py, wide images, plus two text-only questions) in modes off and full.

- every question is answered in both modes; metadata carries method, mode, budget, trend;
- the adapter passed ``retained_tokens=128``: keep counts 303 / 110 / 36 at layers 2 / 6 / 15, ranked over the
  576 visual tokens, then over what was kept (plus recycled clusters);
- in full mode the ranking really was debiased: padding (threshold 0.5) is −inf at layer 2 for each image's real
  size, and the keep count is capped to the real tokens where it exceeds them (400×200, 640×200);
- text-only questions are answered without reaching the ranking site;
- without flash-attn the driver stops with an error naming flash-attn 2.3.3.
CPU stand-ins, in this TEST only (flash-attn is CUDA-only): a ``flash_attn`` package whose ``flash_attn_func`` is
torch SDPA (causal like flash-attn for equal query/key lengths), handed to transformers' Llama module after it
loads (transformers enables flash-attn only with CUDA); no-op ``torch.cuda.Event``/``synchronize``;
``Tensor.cuda`` as the identity (decode position ids). Observation is probe-only too: a ``sitecustomize`` wraps
``debias_core.sample/debias/keep_cap``. The patched tree sits in a temp superproject (a copy of eval/ next to
third_party/SparseVLMs) so the adapter finds it exactly as it finds the submodule.

Environment: .venv-SparseVLMs (transformers 4.37, einops; accelerate for load_pretrained_model).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.baseline

NAME, KEY = "SparseVLMs", "sparsevlm"
LAYERS = 32                     # builder.py L113: range(32)
TREND = "paper:sparsevlm/gqa"
THRESHOLD = 0.5                 # DEBIAS_METHOD=sparsevlm
BUDGET = "128"
KEEP = [303, 110, 36]           # score.py sparse_token_list_128, layers 2 / 6 / 15
TEXT_ONLY = [{"question_id": 900, "text": "What shape is it?\nAnswer the question using a single word or phrase."},
             {"question_id": 901, "text": "Is there a red circle?"}]

# Probe-only observation, imported by the driver's interpreter at start-up when EVAL_PROBE_OUT is set.
SITECUSTOMIZE = r'''
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

    def debias(scores, positions=None, *, stage=0):
        out = _debias(scores, positions, stage=stage)
        _events.append({"event": "debias", "stage": stage, "n": int(scores.shape[-1]),
                        "neg_inf": int(torch.isneginf(out).sum()), "untouched": out is scores})
        return out

    def keep_cap(k, **kwargs):
        out = _cap(k, **kwargs)
        _events.append({"event": "keep_cap", "k": int(k), "capped": int(out)})
        return out

    debias_core.sample, debias_core.debias, debias_core.keep_cap = sample, debias, keep_cap

    @atexit.register
    def _dump():
        files = {m: getattr(sys.modules.get(m), "__file__", None) for m in ("eval", "llava")}
        with open(os.environ["EVAL_PROBE_OUT"], "w") as f:
            json.dump({"events": _events, "modules": files}, f)

if os.environ.get("EVAL_PROBE_CPU_FLASH"):  # CPU stand-ins for what SparseVLMs needs of CUDA
    import importlib.abc, importlib.machinery, torch

    class _Event:
        def __init__(self, *a, **k): pass
        def record(self, *a, **k): pass
        def elapsed_time(self, other): return 0.0

    torch.cuda.Event, torch.cuda.synchronize = _Event, (lambda *a, **k: None)
    torch.Tensor.cuda = lambda self, *a, **k: self

    class _GiveFlashAttnToLlama(importlib.abc.MetaPathFinder):
        """After transformers' modeling_llama loads: flash_attn_func, as it imports it when flash-attn is usable."""
        def find_spec(self, fullname, path, target=None):
            if fullname != "transformers.models.llama.modeling_llama":
                return None
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                import flash_attn
                module.flash_attn_func = flash_attn.flash_attn_func

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _GiveFlashAttnToLlama())
'''

FLASH_ATTN_STAND_IN = r'''
"""CPU stand-in for flash-attn 2.3.3 (tests only): flash_attn_func through torch SDPA."""
import torch.nn.functional as F

__version__ = "2.3.3+cpu-test-stand-in"


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    if causal and q.shape[1] != k.shape[1]:
        raise NotImplementedError("stand-in: causal attention only for equal query and key lengths")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                          scale=softmax_scale).transpose(1, 2)
'''

BUILD = r'''
import json, sys
from pathlib import Path
from eval.tiny_llava import build_tiny_llava
out = build_tiny_llava(sys.argv[1], layers=int(sys.argv[2]))
cfg = json.loads((out / "config.json").read_text())
cfg.pop("_attn_implementation", None)   # as llava-v1.5-7b's config.json: transformers 4.37 then picks sdpa
(out / "config.json").write_text(json.dumps(cfg, indent=2))
print(out)
'''


def valid_count(size, threshold, grid=24, resolution=336) -> int:
    """Visual tokens whose expand2square pad fraction is ≤ threshold (written out here, independently)."""
    w, h = size
    s, m = max(w, h), min(w, h)
    lo = (s - m) // 2 * resolution / s
    hi = lo + m * resolution / s
    side = resolution / grid
    cover = [max(0.0, min(side * (k + 1), hi) - max(side * k, lo)) / side for k in range(grid)]
    return grid * sum(1 for c in cover if 1 - c <= threshold + 1e-12)


def clean_env(path: list, **extra) -> dict:
    """This environment without DEBIAS* settings, offline, one thread; PYTHONPATH: ``path``, then what it was, then
    the repository (debias_core, where the environment does not install it; eval/ comes from ``path``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in path] + [p for p in [os.environ.get("PYTHONPATH")] if p]
                                        + [str(support.ROOT)])
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    support.require_populated(NAME)
    support.require_transformers("4.37", NAME)
    support.require_module("einops", "SparseVLMs' llava/model/language_model/utils.py imports einops", NAME)
    support.require_module("accelerate", "SparseVLMs' load_pretrained_model passes low_cpu_mem_usage/device_map, "
                                         "which need accelerate; the eval adapter was not run", NAME)
    support.require_module("sentencepiece", "the tiny LLaVA's tokenizer is a sentencepiece model", NAME)
    from eval.synthetic import build_synthetic

    root = tmp_path_factory.mktemp("sparsevlm-eval")
    repo = root / "repo"  # the layout the adapter expects: eval/ next to third_party/<Name>
    shutil.copytree(support.ROOT / "eval", repo / "eval", ignore=shutil.ignore_patterns("__pycache__"))
    tree = support.patched_tree(NAME, repo / "third_party" / NAME)
    (tree / ".git").mkdir()  # eval.common.populated() looks for it
    r = subprocess.run([sys.executable, "-c", BUILD, str(root / "tiny-llava-sparsevlm"), str(LAYERS)],
                       capture_output=True, text=True, env=clean_env([tree, support.ROOT]), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    model = Path(r.stdout.strip().splitlines()[-1])

    data = root / "data"
    build_synthetic(data, images=3)  # wide: 640×480, 400×200, 640×200
    questions = data / "synthetic" / "wide" / "llava_synthetic.jsonl"
    with open(questions, "a") as f:
        f.writelines(json.dumps(q) + "\n" for q in TEXT_ONLY)
    probe = root / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (probe / "flash_attn").mkdir()
    (probe / "flash_attn" / "__init__.py").write_text(FLASH_ATTN_STAND_IN)
    return {"root": root, "repo": repo, "tree": tree, "model": model, "data": data, "probe": probe,
            "questions": [json.loads(line) for line in questions.read_text().splitlines()]}


def run_driver(setup, name: str, *args, stand_ins: bool = True):
    """eval.run in a subprocess; with ``stand_ins`` the probe folder (sitecustomize, flash_attn) leads PYTHONPATH."""
    answers, out = setup["root"] / name, setup["root"] / f"{name}.json"
    path = [setup["probe"], setup["repo"]] if stand_ins else [setup["repo"]]
    env = clean_env(path, EVAL_PROBE_OUT=str(out), **({"EVAL_PROBE_CPU_FLASH": "1"} if stand_ins else {}))
    cmd = [sys.executable, "-m", "eval.run", "--method", KEY, "--benchmark", "synthetic_wide", "--model-path",
           str(setup["model"]), "--data-dir", str(setup["data"]), "--answers-dir", str(answers),
           "--max-new-tokens", "4", "--device", "cpu", *args]
    r = subprocess.run(cmd, cwd=setup["repo"], env=env, capture_output=True, text=True, timeout=900)
    probe = json.loads(out.read_text()) if out.exists() else None
    return r, answers / setup["model"].name / "synthetic_wide" / f"{KEY}-{BUDGET}", probe


@pytest.fixture(scope="module")
def run(setup):
    r, run_dir, probe = run_driver(setup, "answers", "--mode", "off,full", "--trend", TREND)
    assert r.returncode == 0, r.stderr[-6000:]
    return run_dir, probe


def per_sample(events):
    """Split the event stream at each ``sample`` event: [(sample, [debias/keep_cap events])]."""
    out = []
    for e in events:
        if e["event"] == "sample":
            out.append((e, []))
        else:
            assert out, f"{e} happened outside any debias_core.sample context"
            out[-1][1].append(e)
    return out


def test_driver_ran_the_patched_tree(setup, run):
    _, probe = run
    assert Path(probe["modules"]["eval"]).is_relative_to(setup["repo"] / "eval")
    assert Path(probe["modules"]["llava"]).is_relative_to(setup["tree"]), probe["modules"]


@pytest.mark.parametrize("mode", ["off", "full"])
def test_every_question_answered_with_metadata(setup, run, mode):
    run_dir, _ = run
    folder = run_dir / ("off" if mode == "off" else "full-" + TREND.replace(":", "-").replace("/", "-"))
    rows = [json.loads(line) for line in (folder / "merge.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in setup["questions"]]
    for r in rows:
        assert r["metadata"] == {"method": KEY, "mode": mode, "budget": BUDGET,
                                 "trend": None if mode == "off" else TREND, "preprocess": "pad"}
        assert isinstance(r["text"], str) and r["model_id"] == setup["model"].name


def test_paper_schedule_and_debiasing_reach_the_ranking(setup, run):
    from PIL import Image

    _, probe = run
    samples = per_sample(probe["events"])
    questions = setup["questions"] * 2  # off, then full
    assert len(samples) == len(questions)
    images = setup["data"] / "synthetic" / "wide" / "images"
    for (ctx, calls), q in zip(samples, questions):
        if "image" not in q:  # text-only: no image, no ranking
            assert ctx["image_size"] is None and ctx["span_start"] is None and calls == [], (q, calls)
            continue
        size = Image.open(images / q["image"]).size
        assert tuple(ctx["image_size"]) == size and ctx["preprocess"] == "pad" and ctx["span_start"] is not None
        # per pruning layer: debias(scores), keep_cap(schedule) for the top-k, keep_cap(N) for recycling
        ranks = [i for i, c in enumerate(calls) if c["event"] == "debias"]
        assert [calls[i]["stage"] for i in ranks] == [0, 1, 2], calls
        assert calls[ranks[0]]["n"] == 576
        valid = valid_count(size, THRESHOLD)
        for i, k in zip(ranks, KEEP):
            rank, top, recycle = calls[i:i + 3]
            assert (top["event"], top["k"]) == ("keep_cap", k), calls[i:i + 3]
            assert (recycle["event"], recycle["k"]) == ("keep_cap", rank["n"]), calls[i:i + 3]
            if ctx["mode"] == "off":
                assert rank["untouched"] and rank["neg_inf"] == 0 and top["capped"] == top["k"]
        if ctx["mode"] == "full":
            rank, top = calls[ranks[0]], calls[ranks[0] + 1]
            assert not rank["untouched"] and rank["neg_inf"] == 576 - valid > 0, (size, rank)
            assert top["capped"] == min(KEEP[0], valid), (size, top)
        else:
            assert ctx["mode"] == "off"
    full_caps = [calls[i + 1] for ctx, calls in samples if ctx["mode"] == "full"
                 for i, c in enumerate(calls) if c["event"] == "debias" and c["stage"] == 0]
    assert any(c["capped"] < c["k"] for c in full_caps), "no image made the cap bite (the test would be vacuous)"


def test_missing_flash_attn_stops_with_a_clear_error(setup, tmp_path):
    r, _, _ = run_driver({**setup, "root": tmp_path}, "no-flash", "--mode", "off", "--check-only", stand_ins=False)
    assert r.returncode == 2 and "flash-attn 2.3.3" in r.stderr and "flash_attn" in r.stderr, r.stderr[-3000:]
