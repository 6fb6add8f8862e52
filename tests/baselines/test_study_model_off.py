"""DEBIAS=off on the study model (docs/study.md: LLaVA-1.5 on SmolLM2-135M, 30 layers, width 576, 9 heads) is
bit-identical to upstream for every baseline that can load it.

For each baseline the eval driver (``python -m eval.run --benchmark study``, as the study runs it) answers two
evaluation questions of the study split (``study.data.generate_split``: two images, one padded) in the baseline's
own CPU environment (.venv-<Name>), once on the upstream tree and once on the patched tree with DEBIAS=off; the
adapter loads the assembled model (models/llava-smollm2-study) through that tree's own ``load_pretrained_model``.
The probe (study_probe.py) observes both runs identically and the test asserts, per question, bit for bit:

- the indices of every ranking (every ``topk`` / ``sort`` / ``argsort`` during generation, in call order: the
  kept visual tokens of each stage), and that at least one ranking ran;
- every logit (sha256 of the fp32 lm_head outputs) and their shapes (the pruned sequence lengths);
- the answers the driver wrote.

"Upstream" is the pinned tree, except where upstream cannot load or run the study model on a CPU at all; there the
reference is the pin plus only the series' patches that make it run, and everything the debias patches add is
still compared (REFERENCE_PATCHES):
- SparseVLMs: 0003 (PyTorch SDPA where flash-attn is absent), 0004 (its builder attaches the attention module to
  ``num_hidden_layers`` layers; upstream's ``range(32)`` cannot load a 30-layer model) and 0005 (CUDA-event timing
  only where CUDA is; upstream cannot run on a CPU);
- the iLLaVA port (LLaVA): 0001, the port itself (upstream LLaVA has no iLLaVA stage to compare with).
TokenCarve runs on upstream LLaVA's package (envs/TokenCarve.txt installs third_party/LLaVA): pristine LLaVA on the
upstream side, patched on ours. Nothing is stood in for: every tree runs on the CPU as it is.
Not covered, and why: iLLaVA's own tree and Video-LLaVA (``test_loaders_that_cannot_take_the_study_model``).

Skips (with the reason) where the study model is not assembled (bash setup.sh --test), a submodule is not
populated or a baseline's environment is absent, so CI on an empty checkout skips cleanly. Cost: two questions,
4 new tokens, about 20-40 s per tree on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import support
from tests.baselines import upstream_compare as compare

pytestmark = [pytest.mark.baseline, pytest.mark.slow]

MODEL = support.ROOT / "models" / "llava-smollm2-study"
KEEP = 64                 # visual tokens kept (the study's --quick budget; SparseVLMs has a 64 schedule)
NEW_TOKENS = 4


@dataclass(frozen=True)
class Baseline:
    upstream: str                         # third_party/<upstream>, patches/<upstream>
    env: str                              # .venv-<env> (LLaVA: this interpreter, as the demo and study run it)
    reference_patches: tuple = ()         # patch numbers applied to the pin to make the reference run at all
    llava_on_path: bool = False           # runs on upstream LLaVA's package (TokenCarve): that tree on PYTHONPATH


BASELINES = {
    "fastv": Baseline("FastV", "FastV"),
    "pdrop": Baseline("PyramidDrop", "PyramidDrop"),
    "sparsevlm": Baseline("SparseVLMs", "SparseVLMs", ("0003", "0004", "0005")),
    "himap": Baseline("HiMAP", "HiMAP"),
    "tokencarve": Baseline("TokenCarve", "TokenCarve", llava_on_path=True),
    "illava": Baseline("LLaVA", "LLaVA", ("0001",)),
}

CANNOT_LOAD = {
    "iLLaVA": "iLLaVA's own tree is LLaVA-OneVision's (a Qwen2 LLM with a SigLIP tower, loaded by its lmms_eval "
              "model class), which cannot load a LLaVA-1.5 checkpoint on a LLaMA-architecture LLM; the iLLaVA method "
              "runs on the study model as the LLaVA-1.5 port (patches/LLaVA), the 'illava' case here",
    "Video-LLaVA": "Video-LLaVA's load_pretrained_model builds LanguageBind image and video towers from "
                   "config.mm_image_tower / mm_video_tower, which the study model (one CLIP tower under "
                   "mm_vision_tower, no video tower) does not have, and its pruning ranks video-frame tokens, which "
                   "the study's image questions never produce",
}


# --- inputs -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The assembled model and two evaluation questions on two different images (one padded)."""
    if not (MODEL / "config.json").is_file() or not (MODEL / "model.safetensors").is_file():
        pytest.skip(f"the study model is not assembled at {MODEL}, so no baseline was run on it; "
                    f"bash setup.sh --test (python -m study assemble) writes it")
    from study.data import generate_split

    data = generate_split("eval", tmp_path_factory.mktemp("study") / "eval", n_questions=2, questions_per_image=1,
                          progress=False)
    items = [json.loads(line) for line in (data / "items.jsonl").read_text().splitlines()]
    assert len({tuple(i["image_size"]) for i in items}) == 2, items
    assert any(w != h for w, h in (i["image_size"] for i in items)), "no padded image: the split changed"
    image_start = json.loads((MODEL / "config.json").read_text())["study_model"]["image_start"]
    return {"model": MODEL, "data": data, "items": items, "image_start": image_start}


def interpreter(baseline: Baseline, key: str) -> Path:
    from eval.demo import env_python

    support.require_populated(baseline.upstream)
    py = env_python(baseline.env, key)
    if py is None:
        pytest.skip(f"no environment .venv-{baseline.env}, so {key} was not run on the study model; build it with "
                    f"bash setup.sh --test-env {baseline.env}")
    return py


def driver_args(key: str, study: dict, answers: Path) -> list[str]:
    from study.run import method_args

    args = ["--method", key, "--benchmark", "study", "--data-dir", str(study["data"]), "--model-path",
            str(study["model"]), "--answers-dir", str(answers), "--mode", "off", "--device", "cpu",
            "--max-new-tokens", str(NEW_TOKENS), "--workers", "0"]
    for a in method_args(key, KEEP, study["image_start"]):
        args += ["--method-arg", a]
    return args


@pytest.fixture(scope="module")
def runs(study, tmp_path_factory):
    """runs(key) -> {"upstream": probe result, "ours": probe result}, each run once."""
    memo = {}

    def get(key: str) -> dict:
        if key not in memo:
            baseline = BASELINES[key]
            py = interpreter(baseline, key)
            root = tmp_path_factory.mktemp(f"study-{key}")
            compare.reference_tree(baseline.upstream, root / "upstream" / baseline.upstream,
                                   baseline.reference_patches)
            support.patched_tree(baseline.upstream, root / "ours" / baseline.upstream)
            if baseline.llava_on_path:   # upstream LLaVA as the environment installs it: pristine / patched
                support.pristine_tree("LLaVA", root / "upstream" / "LLaVA")
                support.patched_tree("LLaVA", root / "ours" / "LLaVA")
            memo[key] = {side: compare.run_observed_driver(
                             py, root / side, driver_args(key, study, root / f"{side}-run" / "answers"),
                             root / f"{side}-run", path=[root / side / "LLaVA"] if baseline.llava_on_path else [])
                         for side in ("upstream", "ours")}
        return memo[key]

    return get


# --- the tests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", list(BASELINES))
def test_off_is_bit_identical_to_upstream_on_the_study_model(runs, study, key):
    result = runs(key)
    for side, run in result.items():
        tree = Path(run["modules"]["llava"]).resolve()
        assert f"/{side}/" in str(tree), f"{key} {side} imported llava from {tree}"
    assert [q["span_start"] for q in result["upstream"]["questions"]] == [study["image_start"]] * len(study["items"]), (
        f"{key}: the questions' image start is not the study model's {study['image_start']}")
    compare.assert_off_matches_upstream(result["upstream"], result["ours"], key,
                                        [f"{i['question_id']} {i['image_size']}" for i in study["items"]])


def test_sparsevlm_tree_without_the_depth_patch_is_refused_in_one_line(study, tmp_path):
    """Upstream's range(32) builder cannot load the 30-layer study model (an IndexError mid-load); the adapter
    refuses a tree without patches/SparseVLMs/0004 before loading, in one line naming it (exit 2, no traceback)."""
    baseline = BASELINES["sparsevlm"]
    py = interpreter(baseline, "sparsevlm")
    compare.reference_tree(baseline.upstream, tmp_path / "trees" / baseline.upstream, ("0003", "0005"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS")}
    env.update(EVAL_THIRD_PARTY=str(tmp_path / "trees"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(support.ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([str(py), "-m", "eval.run", *driver_args("sparsevlm", study, tmp_path / "answers")],
                       cwd=support.ROOT, env=env, capture_output=True, text=True, timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert last.startswith("error: ") and "num_hidden_layers=30" in last and "patches/SparseVLMs/0004" in last, last


@pytest.mark.parametrize("name", list(CANNOT_LOAD))
def test_loaders_that_cannot_take_the_study_model(name):
    pytest.skip(f"{name} is not run on the study model: {CANNOT_LOAD[name]}")
