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
- SparseVLMs: 0003 (PyTorch SDPA where flash-attn is absent) and 0004 (its builder attaches the attention module
  to ``num_hidden_layers`` layers; upstream's ``range(32)`` cannot load a 30-layer model);
- the iLLaVA port (LLaVA): 0001, the port itself (upstream LLaVA has no iLLaVA stage to compare with).
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

pytestmark = [pytest.mark.baseline, pytest.mark.slow]

PROBE = Path(__file__).with_name("study_probe.py")
MODEL = support.ROOT / "models" / "llava-smollm2-study"
KEEP = 64                 # visual tokens kept (the study's --quick budget; SparseVLMs has a 64 schedule)
NEW_TOKENS = 4


@dataclass(frozen=True)
class Baseline:
    upstream: str                         # third_party/<upstream>, patches/<upstream>
    env: str                              # .venv-<env> (LLaVA: this interpreter, as the demo and study run it)
    reference_patches: tuple = ()         # patch numbers applied to the pin to make the reference run at all
    cpu_cuda_stand_ins: bool = False      # study_probe.py --cpu-cuda-stand-ins
    llava_on_path: bool = False           # runs on upstream LLaVA's package (TokenCarve): that tree on PYTHONPATH


BASELINES = {
    "fastv": Baseline("FastV", "FastV"),
    "pdrop": Baseline("PyramidDrop", "PyramidDrop"),
    "sparsevlm": Baseline("SparseVLMs", "SparseVLMs", ("0003", "0004"), cpu_cuda_stand_ins=True),
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
    return {"model": MODEL, "data": data, "items": items}


def interpreter(baseline: Baseline, key: str) -> Path:
    from eval.demo import env_python

    support.require_populated(baseline.upstream)
    py = env_python(baseline.env, key)
    if py is None:
        pytest.skip(f"no environment .venv-{baseline.env}, so {key} was not run on the study model; build it with "
                    f"bash setup.sh --test-env {baseline.env}")
    return py


def reference_tree(baseline: Baseline, dest: Path) -> Path:
    """The pin, plus the patches in ``reference_patches`` (applied in order)."""
    tree = support.pristine_tree(baseline.upstream, dest)
    chosen = [p for p in support.patch_files(baseline.upstream) if p.name[:4] in baseline.reference_patches]
    assert [p.name[:4] for p in chosen] == list(baseline.reference_patches), chosen
    for p in chosen:
        r = subprocess.run(["git", "apply", "--whitespace=nowarn", str(p)], cwd=tree, capture_output=True, text=True,
                           env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent)))
        assert r.returncode == 0, f"{p.name} does not apply to the {baseline.upstream} pin:\n{r.stderr}"
    return tree


def driver_args(key: str, study: dict, answers: Path) -> list[str]:
    from study.run import method_args

    image_start = json.loads((study["model"] / "config.json").read_text())["study_model"]["image_start"]
    args = ["--method", key, "--benchmark", "study", "--data-dir", str(study["data"]), "--model-path",
            str(study["model"]), "--answers-dir", str(answers), "--mode", "off", "--device", "cpu",
            "--max-new-tokens", str(NEW_TOKENS), "--workers", "0"]
    for a in method_args(key, KEEP, image_start):
        args += ["--method-arg", a]
    return args


def run_probe(py: Path, baseline: Baseline, key: str, study: dict, trees: Path, out: Path) -> dict:
    """The driver under study_probe.py with EVAL_THIRD_PARTY=``trees``, DEBIAS=off; its observations + answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS")}
    llava = [str(trees / "LLaVA")] if baseline.llava_on_path else []
    env.update(DEBIAS="off", EVAL_THIRD_PARTY=str(trees), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(llava + [str(support.ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    observed, answers = out / "observed.json", out / "answers"
    flags = ["--cpu-cuda-stand-ins"] if baseline.cpu_cuda_stand_ins else []
    r = subprocess.run([str(py), str(PROBE), str(observed), *flags, "--", *driver_args(key, study, answers)],
                       cwd=support.ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{key} on {trees}: the driver exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    result = json.loads(observed.read_text())
    run_dir = Path(r.stdout.strip().splitlines()[-1])
    result["answers"] = [{k: a[k] for k in ("question_id", "text")}
                         for a in map(json.loads, (run_dir / "merge.jsonl").read_text().splitlines())]
    return result


@pytest.fixture(scope="module")
def runs(study, tmp_path_factory):
    """runs(key) -> {"upstream": probe result, "ours": probe result}, each run once."""
    memo = {}

    def get(key: str) -> dict:
        if key not in memo:
            baseline = BASELINES[key]
            py = interpreter(baseline, key)
            root = tmp_path_factory.mktemp(f"study-{key}")
            reference_tree(baseline, root / "upstream" / baseline.upstream)
            support.patched_tree(baseline.upstream, root / "ours" / baseline.upstream)
            if baseline.llava_on_path:   # upstream LLaVA as the environment installs it: pristine / patched
                support.pristine_tree("LLaVA", root / "upstream" / "LLaVA")
                support.patched_tree("LLaVA", root / "ours" / "LLaVA")
            memo[key] = {side: run_probe(py, baseline, key, study, root / side, root / f"{side}-run")
                         for side in ("upstream", "ours")}
        return memo[key]

    return get


# --- the tests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", list(BASELINES))
def test_off_is_bit_identical_to_upstream_on_the_study_model(runs, study, key):
    result = runs(key)
    upstream, ours = result["upstream"], result["ours"]
    for side, run in result.items():
        assert run["exit"] == 0, f"{key} {side}: eval.run exited {run['exit']}"
        tree = Path(run["modules"]["llava"]).resolve()
        assert f"/{side}/" in str(tree), f"{key} {side} imported llava from {tree}"
        assert [q["span_start"] for q in run["questions"]] == [32, 32], f"{key} {side}: image start is not SmolLM2's 32"
    assert len(upstream["questions"]) == len(ours["questions"]) == len(study["items"])
    for i, (up, us) in enumerate(zip(upstream["questions"], ours["questions"])):
        where = f"{key}, question {i} ({study['items'][i]['image_size']})"
        assert any(len(s) > 1 for s in up["selections"]), f"{where}: upstream ranked nothing, so nothing was compared"
        assert len(us["selections"]) == len(up["selections"]), f"{where}: {len(us['selections'])} rankings, upstream {len(up['selections'])}"
        for n, (a, b) in enumerate(zip(up["selections"], us["selections"])):
            assert b == a, f"{where}: ranking {n} selected other indices than upstream"
        assert us["logit_shapes"] == up["logit_shapes"], f"{where}: sequence lengths differ from upstream"
        assert us["logits_sha256"] == up["logits_sha256"], f"{where}: logits differ from upstream"
    assert ours["answers"] == upstream["answers"], f"{key}: answers differ from upstream"


@pytest.mark.parametrize("name", list(CANNOT_LOAD))
def test_loaders_that_cannot_take_the_study_model(name):
    pytest.skip(f"{name} is not run on the study model: {CANNOT_LOAD[name]}")
