"""The assembled study checkpoint: LLaVA's own loader reads it, its forward equals the training-time model's, the
image start is where LLaVA's tokenizer_image_token puts the image, and the study runs end to end (CI-sized)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llava")

from study import checkpoint as C, model as M  # noqa: E402

MODEL = C.DEFAULT_OUT


def need_model():
    if not (MODEL / "study.json").is_file():
        pytest.skip(f"{MODEL} is not assembled (bash setup.sh --test assembles it): the checkpoint was not tested")


def test_committed_weights_match_their_manifest():
    manifest = json.loads((C.WEIGHTS / "manifest.json").read_text())
    assert C.sha256(C.WEIGHTS / "trained.safetensors") == manifest["files"]["trained.safetensors"]["sha256"]
    assert C.trained_file() == C.WEIGHTS / "trained.safetensors"


def test_llava_forward_equals_the_training_model(tmp_path):
    need_model()
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from study import train as T

    out = C.assemble(tmp_path / "llava-study-fp32", dtype="float32", log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(str(out), use_fast=False)   # as load_pretrained_model asks
    model = LlavaLlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32, attn_implementation="eager")
    tower = model.get_vision_tower()
    tower.load_model()
    image = Image.new("RGB", (300, 200), (200, 40, 40))
    question = "What color is the circle?\n" + M.ANSWER_SUFFIX
    ids = tokenizer_image_token(M.vicuna_prompt(question), tok, M.IMAGE_TOKEN_INDEX, return_tensors="pt")
    assert ids.tolist() == M.prompt_ids(tok, question)
    assert ids.tolist().index(M.IMAGE_TOKEN_INDEX) == C.image_start(MODEL) == 32
    pixels = process_images([image], tower.image_processor, model.config)
    with torch.no_grad():
        want = model(ids[None], images=pixels).logits[0]
    vlm, _, _, wrapped = T.build("smollm2")
    T.load_trainable(vlm, wrapped, {k: v.float() for k, v in load_file(str(C.trained_file())).items()})
    s0 = C.image_start(MODEL)
    suffix = torch.tensor(ids.tolist()[s0 + 1:])[None]
    with torch.no_grad():
        got = vlm.llm.lm_head(vlm.eval().hidden(ids[:s0], T.pad_and_process(image, T.image_processor())[None],
                                                  suffix, torch.ones_like(suffix)))[0]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


def test_assemble_refuses_foreign_folders_and_names(tmp_path):
    need_model()
    with pytest.raises(C.CheckpointError, match="must contain 'llava'"):
        C.assemble(tmp_path / "study-model")
    other = tmp_path / "llava-other"
    other.mkdir()
    (other / "x").write_text("not a checkpoint")
    with pytest.raises(C.CheckpointError, match="--force"):
        C.assemble(other)


def test_refresh_replaces_a_folder_assembled_from_other_weights(tmp_path):
    """After a pull brings new weights, --refresh re-assembles the folder; without it the folder is refused."""
    need_model()
    from safetensors.torch import load_file, save_file

    state = load_file(str(C.trained_file(None)))
    name = next(k for k in sorted(state) if k.startswith("projector."))
    state[name] = state[name] + 1
    older = tmp_path / "older.safetensors"
    save_file(state, str(older))
    out = tmp_path / "llava-study"
    C.assemble(out, trained=older, log=lambda *a: None)
    before = json.loads((out / "study.json").read_text())["trained_sha256"]
    with pytest.raises(C.CheckpointError, match="other weights"):
        C.assemble(out, log=lambda *a: None)
    C.assemble(out, refresh=True, log=lambda *a: None)
    after = json.loads((out / "study.json").read_text())["trained_sha256"]
    assert before != after == C.sha256(C.trained_file(None))


def test_study_smoke_unpruned_end_to_end(tmp_path):
    """CI-sized: the real checkpoint through the driver (plain LLaVA), scoring and the report, 2 questions.
    Baselines without their environment are left out and listed (their tests run in their own environments)."""
    need_model()
    from study import run as R

    out = tmp_path / "study"
    rc = R.main(["--out", str(out), "--model", str(MODEL), "--methods", "fastv", "--budgets", "64",
                 "--modes", "off", "--controls", "", "--n-eval", "2", "--no-calibrated", "--skip-unavailable"])
    study = json.loads((out / "study.json").read_text())
    assert study["schema"] == "study/1" and study["n_eval"] == 2
    assert study["unpruned_accuracy"] is not None and len(study["unpruned_ci95"]) == 2
    names = {r["name"] for r in study["records"]}
    assert "unpruned" in names
    if "fastv" in study["skipped"]:
        assert rc == 0 and names == {"unpruned"}
    else:   # FastV's environment exists here: its run is in the report with kept-token metrics
        assert "fastv/64/off--" in names
        rec = next(r for r in study["records"] if r["name"] == "fastv/64/off--")
        assert rec["padding_share"] is not None and rec["kept_tokens"] == 64
    assert (out / "report.md").read_text().startswith("# Study results")
    made_with = json.loads((out / "runs" / "unpruned" / "done.json").read_text())["made_with"]
    assert made_with == {"model": R.model_identity(MODEL), "questions": 2}   # what a resume is checked against
