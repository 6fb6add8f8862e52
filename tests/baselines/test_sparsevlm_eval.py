"""SparseVLMs through the eval driver: ``python -m eval.run --method sparsevlm`` (a subprocess in this
environment) loads a tiny random 32-layer LLaVA-1.5 (LLaVA-1.5-7B's depth, the only one upstream's builder
takes) through SparseVLMs' own ``load_pretrained_model`` from the patched tree and answers the synthetic
benchmark (eval/synthetic.py, wide images, plus two text-only questions) in modes off and full.

- every question is answered in both modes; metadata carries method, mode, budget, trend;
- the adapter passed ``retained_tokens=128``: keep counts 303 / 110 / 36 at layers 2 / 6 / 15, ranked over the
  576 visual tokens, then over what was kept (plus recycled clusters);
- in full mode the ranking really was debiased: padding (threshold 0.5) is −inf at layer 2 for each image's real
  size, and the keep count is capped to the real tokens where it exceeds them (400×200, 640×200);
- text-only questions are answered without reaching the ranking site;
- without flash-attn the driver runs (patches/SparseVLMs/0003 falls back to PyTorch SDPA);
- DEBIAS=off on the full series is bit-identical to the pin with only the SDPA fallback and CPU timing (upstream's
  own range(32) builder): patches/SparseVLMs/0004 changes nothing on a 32-layer model.
CPU stand-ins, in this TEST only (flash-attn is CUDA-only): a ``flash_attn`` package whose ``flash_attn_func`` is
torch SDPA (causal like flash-attn for equal query/key lengths), handed to transformers' Llama module after it
loads (transformers enables flash-attn only with CUDA); no-op ``torch.cuda.Event``/``synchronize``;
``Tensor.cuda`` as the identity (decode position ids). Observation is probe-only too (eval_support.OBSERVER wraps
``debias_core.sample/debias/keep_cap``); the patched tree reaches the adapter through EVAL_THIRD_PARTY.

Environment: .venv-SparseVLMs (transformers 4.37, einops; accelerate for load_pretrained_model).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import support
from tests.baselines import eval_support as es

pytestmark = pytest.mark.baseline

NAME, KEY = "SparseVLMs", "sparsevlm"
LAYERS = 32                     # builder.py L114 at the pin: range(32)
TREND = "paper:sparsevlm/gqa"
THRESHOLD = 0.5                 # DEBIAS_METHOD=sparsevlm
BUDGET = "128"
KEEP = [303, 110, 36]           # score.py sparse_token_list_128, layers 2 / 6 / 15

# Start-up code after eval_support.OBSERVER in the driver's sitecustomize.
CPU_FLASH = r'''
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    support.require_populated(NAME)
    support.require_transformers("4.37", NAME)
    support.require_module("einops", "SparseVLMs' llava/model/language_model/utils.py imports einops", NAME)
    support.require_module("accelerate", "SparseVLMs' load_pretrained_model passes low_cpu_mem_usage/device_map, "
                                         "which need accelerate; the eval adapter was not run", NAME)
    support.require_module("sentencepiece", "the tiny LLaVA's tokenizer is a sentencepiece model", NAME)
    root = tmp_path_factory.mktemp("sparsevlm-eval")
    trees = es.export_trees(root / "trees", NAME)
    # --attn default: no _attn_implementation, as llava-v1.5-7b's config.json (transformers 4.37 then picks sdpa)
    model = es.build_tiny_llava(root / "tiny-llava-sparsevlm", es.clean_env([trees / NAME]), "--layers", str(LAYERS),
                                "--attn", "default")
    flash = root / "flash"
    (flash / "flash_attn").mkdir(parents=True)
    (flash / "flash_attn" / "__init__.py").write_text(FLASH_ATTN_STAND_IN)
    return {"root": root, "trees": trees, "tree": trees / NAME, "model": model, "flash": flash,
            "probe": es.observer_dir(root / "probe", extra=CPU_FLASH),
            **es.synthetic_data(root / "data", images=3, extra=es.TEXT_ONLY)}


def run_driver(setup, name: str, *args, stand_ins: bool = True):
    """eval.run under the observer; with ``stand_ins`` the CPU stand-ins (flash_attn first on PYTHONPATH, the
    sitecustomize's EVAL_PROBE_CPU_FLASH part) are on."""
    stand_in = {"path": [setup["flash"]], "EVAL_PROBE_CPU_FLASH": "1"} if stand_ins else {}
    r, answers, probe = es.run_observed(setup, name, KEY, *args, **stand_in)
    return r, answers / f"{KEY}-{BUDGET}", probe


@pytest.fixture(scope="module")
def run(setup):
    r, run_dir, probe = run_driver(setup, "answers", "--mode", "off,full", "--trend", TREND)
    assert r.returncode == 0, r.stderr[-6000:]
    return run_dir, probe


def test_driver_ran_the_patched_tree(setup, run):
    _, probe = run
    assert Path(probe["modules"]["eval"]).is_relative_to(support.ROOT / "eval")
    assert Path(probe["modules"]["llava"]).is_relative_to(setup["tree"]), probe["modules"]


@pytest.mark.parametrize("mode", ["off", "full"])
def test_every_question_answered_with_metadata(setup, run, mode):
    run_dir, _ = run
    es.assert_answers(run_dir / es.mode_folder(mode, TREND), [q["question_id"] for q in setup["questions"]],
                      setup["model"].name, KEY, mode, BUDGET, TREND)


def test_paper_schedule_and_debiasing_reach_the_ranking(setup, run):
    _, probe = run
    samples = es.image_samples(probe, setup["questions"], setup["data"] / "synthetic" / "wide" / "images")
    for ctx, calls, size in samples:
        # per pruning layer: debias(scores), keep_cap(schedule) for the top-k, keep_cap(N) for recycling
        ranks = [i for i, c in enumerate(calls) if c["event"] == "debias"]
        assert [calls[i]["stage"] for i in ranks] == [0, 1, 2], calls
        assert calls[ranks[0]]["n"] == 576
        valid = len(support.valid_positions(size, THRESHOLD))
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
    full_caps = [calls[i + 1] for ctx, calls, _ in samples if ctx["mode"] == "full"
                 for i, c in enumerate(calls) if c["event"] == "debias" and c["stage"] == 0]
    assert any(c["capped"] < c["k"] for c in full_caps), "no image made the cap bite (the test would be vacuous)"


def test_missing_flash_attn_is_no_longer_a_stop(setup, tmp_path):
    """Without flash-attn (this environment has none) the adapter accepts the run: patches/SparseVLMs/0003 falls
    back to PyTorch SDPA (tests/baselines/test_sparsevlm_sdpa.py checks that fallback's kept tokens)."""
    import importlib.util

    assert importlib.util.find_spec("flash_attn") is None, "this test needs an environment without flash-attn"
    r, _, _ = run_driver({**setup, "root": tmp_path}, "no-flash", "--mode", "off", "--check-only", stand_ins=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "flash" not in r.stderr.lower(), r.stderr[-3000:]


def test_off_through_upstreams_32_layer_builder_is_bit_identical(setup, tmp_path):
    """On a 32-layer model, patches/SparseVLMs/0004 (the builder loops over num_hidden_layers instead of
    range(32)) changes nothing, and in DEBIAS=off nor do 0001/0002: the driver on the full series vs on the pin
    with only 0003 and 0005 (SDPA where flash-attn is absent, CUDA-event timing only where CUDA is: without them
    upstream cannot run here), i.e. upstream's own range(32) builder. No stand-in on either side. Compared by
    study_probe.py (upstream_compare): every ranking's indices, every logit, the answers, bit for bit."""
    import sys

    from tests.baselines import upstream_compare as compare

    compare.reference_tree(NAME, tmp_path / "upstream" / NAME, ("0003", "0005"))
    assert "for i in range(32):" in (tmp_path / "upstream" / NAME / "llava/model/builder.py").read_text()
    runs = {}
    for side, trees in (("upstream", tmp_path / "upstream"), ("ours", setup["trees"])):
        args = ["--method", KEY, "--benchmark", "synthetic_wide", "--model-path", str(setup["model"]), "--data-dir",
                str(setup["data"]), "--answers-dir", str(tmp_path / f"{side}-run" / "answers"), "--mode", "off",
                "--max-new-tokens", "4", "--device", "cpu", "--workers", "0"]
        runs[side] = compare.run_observed_driver(Path(sys.executable), trees, args, tmp_path / f"{side}-run")
        assert Path(runs[side]["modules"]["llava"]).is_relative_to(trees), runs[side]["modules"]
    compare.assert_off_matches_upstream(runs["upstream"], runs["ours"], "SparseVLMs, 32 layers",
                                        [q["question_id"] for q in setup["questions"]])


def test_a_tree_that_cannot_run_on_a_cpu_is_refused_in_one_line(setup, tmp_path):
    """Without patches/SparseVLMs/0005 upstream's CUDA-event timing raises on a CPU mid-generation; the adapter
    refuses such a tree before loading, in one line naming the patch (exit 2, no traceback)."""
    from tests.baselines import upstream_compare as compare

    compare.reference_tree(NAME, tmp_path / "trees" / NAME, ("0003", "0004"))
    answers = tmp_path / "answers"
    r = es.run_python(["-m", "eval.run", "--method", KEY, "--benchmark", "synthetic_wide", "--model-path",
                       str(setup["model"]), "--data-dir", str(setup["data"]), "--answers-dir", str(answers),
                       "--mode", "off", "--device", "cpu", "--workers", "0"], es.clean_env(trees=tmp_path / "trees"))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last.startswith("error: ") and "patches/SparseVLMs/0005" in last and "'cpu'" in last, last
    assert not any(f.read_text().strip() for f in answers.rglob("*.jsonl")), "a refused run wrote answers"
