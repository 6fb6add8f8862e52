"""The study model's pieces: exact KV-head expansion and LoRA merge, the checkpoint round trip through LLaVA's own
classes, training (smoke, resume), controls, kept-token metrics, statistics, the exact-match scorer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from study import controls, model as M, selection, stats  # noqa: E402


def tiny_llama(kv_heads=2, heads=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, rope_theta=M.ROPE_THETA)
    return LlamaForCausalLM(cfg).eval(), cfg


def test_expand_kv_heads_computes_the_same_attention():
    from transformers import LlamaForCausalLM

    gqa, cfg = tiny_llama(kv_heads=2)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        want = gqa(ids).logits
    state = M.expand_kv_heads(gqa.state_dict(), 4, 2, 2)
    cfg.num_key_value_heads = 4
    mha = LlamaForCausalLM(cfg).eval()
    mha.load_state_dict(state)
    with torch.no_grad():
        got = mha(ids).logits
    assert state["model.layers.0.self_attn.k_proj.weight"].shape[0] == 4 * 16
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_expand_kv_heads_keeps_head_order():
    w = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2 * 3, 2)   # 2 KV heads of dim 3, in = 2
    out = M.expand_kv_heads({"model.layers.0.self_attn.k_proj.weight": w,
                             "model.layers.0.self_attn.v_proj.weight": w}, 4, 2, 1)
    k = out["model.layers.0.self_attn.k_proj.weight"].reshape(4, 3, 2)
    assert torch.equal(k[0], k[1]) and torch.equal(k[2], k[3]) and not torch.equal(k[1], k[2])
    with pytest.raises(ValueError, match="evenly"):
        M.expand_kv_heads({}, 4, 3, 1)


def test_merged_lora_equals_the_wrapped_model():
    from transformers import LlamaForCausalLM

    wrapped_model, cfg = tiny_llama()
    base_state = {k: v.clone() for k, v in wrapped_model.state_dict().items()}
    wrapped = M.add_lora(wrapped_model, M.LoraSpec())
    assert len(wrapped) == 2 * len(M.LORA_TARGETS)
    for m in wrapped.values():
        torch.nn.init.normal_(m.lora_b, std=0.05)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        want = wrapped_model(ids).logits
    merged = M.merge_lora(base_state, M.lora_state(wrapped), M.LoraSpec())
    plain = LlamaForCausalLM(cfg).eval()
    plain.load_state_dict(merged)
    with torch.no_grad():
        got = plain(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              base_state["model.layers.0.self_attn.q_proj.weight"])


def test_lora_starts_as_the_identity():
    model, _ = tiny_llama()
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        before = model(ids).logits
    M.add_lora(model, M.LoraSpec())
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before)


def _tiny_vlm(seed=0):
    llm, cfg = tiny_llama(seed=seed)
    llm.requires_grad_(False)
    wrapped = M.add_lora(llm, M.LoraSpec())
    for m in wrapped.values():
        torch.nn.init.normal_(m.lora_b, std=0.05)
    vision = M.build_vision_tower(seed)
    return M.StudyVLM(llm, vision, M.build_projector(M.VISION["hidden_size"], cfg.hidden_size)).eval()


def test_training_loss_without_a_padding_mask_equals_the_masked_one():
    """Right-padded suffixes under causal attention: the loss, the exact-match flags and the gradients are the
    same with no attention mask (training's fast path) as with the padding masked; and the padding is really
    there (the masked and unmasked states of padded positions differ), so the test can fail."""
    vlm = _tiny_vlm()
    torch.manual_seed(1)
    prefix = torch.randint(0, 97, (5,))
    pixels = torch.randn(3, 3, 336, 336)
    lengths = [9, 4, 6]
    suffix = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    labels = torch.full((3, 9), -100)
    for i, n in enumerate(lengths):
        suffix[i, :n] = torch.randint(1, 97, (n,))
        mask[i, :n] = 1
        labels[i, n - 2:n] = suffix[i, n - 2:n]
    results = []
    for mask_padding in (True, False):
        vlm.zero_grad(set_to_none=True)
        loss, right = vlm.loss(prefix, pixels, suffix, mask, labels, mask_padding=mask_padding)
        loss.backward()
        results.append((loss.detach(), right, vlm.projector[0].weight.grad.clone()))
    (l1, r1, g1), (l2, r2, g2) = results
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    assert torch.equal(r1, r2)
    torch.testing.assert_close(g2, g1, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        h_masked = vlm.hidden(prefix, pixels, suffix, mask, mask_padding=True)
        h_plain = vlm.hidden(prefix, pixels, suffix, mask, mask_padding=False)
    lead = h_masked.shape[1] - suffix.shape[1]
    assert not torch.allclose(h_masked[1, lead + 4:], h_plain[1, lead + 4:])   # padding: states differ
    torch.testing.assert_close(h_plain[1, :lead + 4], h_masked[1, :lead + 4], atol=1e-5, rtol=1e-5)


def test_lora_under_autocast_computes_what_the_fp32_copy_did():
    """LoraLinear no longer copies its input to float32 under autocast (autocast casts the factors back to its
    dtype anyway): same output as the float32 round trip, bit for bit."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    lora = M.LoraLinear(base, M.LoraSpec())
    torch.nn.init.normal_(lora.lora_b, std=0.1)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora(x)
        want = base(x) + (x.float() @ lora.lora_a.T @ lora.lora_b.T).to(x.dtype) * lora.scale
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    with torch.no_grad():   # without autocast a float32 LoRA still takes a float32 input (CPU training)
        y = M.LoraLinear(torch.nn.Linear(16, 8), M.LoraSpec())(torch.randn(2, 16))
    assert y.dtype == torch.float32


# ------------------------------------------------------------------------------------------- controls

def test_grid_priority_spreads_every_budget():
    pr = controls.grid_priority(24)
    assert sorted(pr.tolist()) == list(range(1, 577))
    top = np.argsort(-pr, kind="stable")
    first144 = {(int(p) // 24, int(p) % 24) for p in top[:144]}
    assert first144 == {(r, c) for r in range(0, 24, 2) for c in range(0, 24, 2)}
    for k in (16, 32, 64, 128):
        rows = np.array([int(p) // 24 for p in top[:k]])
        bands = [np.sum(rows < 8), np.sum((rows >= 8) & (rows < 16)), np.sum(rows >= 16)]
        assert max(bands) - min(bands) <= k // 4, (k, bands)


def test_random_control_is_seeded_per_sample():
    a = controls.random_scores(576, 0, 3)
    assert np.array_equal(a, controls.random_scores(576, 0, 3))
    assert not np.array_equal(a, controls.random_scores(576, 0, 4))
    assert not np.array_equal(a, controls.random_scores(576, 1, 3))
    assert controls.parse("random:2") == ("random", 2) and controls.parse("grid") == ("grid", 0)
    with pytest.raises(ValueError, match="unknown"):
        controls.parse("uniform")


# ------------------------------------------------------------------------------------------ selection

def _recording(rows_by_stage, samples):
    from debias_core.calibrate import Recording
    from debias_core.recorder import Recorder

    rec = Recorder()
    row_sample = {}
    for stage, rows in rows_by_stage.items():
        for sample_index, pos, raw in rows:
            rec.rows.setdefault(stage, []).append((np.asarray(pos, dtype=np.int64), np.asarray(raw, dtype=np.float64)))
            row_sample.setdefault(stage, []).append(sample_index)
    return Recording(rec, samples, row_sample)


def _ctx(qid, size):
    return {"question_id": qid, "image_size": list(size), "preprocess": "pad", "grid": 24, "resolution": 336,
            "span_start": 10, "span_length": 576}


def test_kept_sets_take_survivors_from_the_next_stage_and_topk_at_the_last():
    rng = np.random.default_rng(0)
    raw0 = rng.random(576)
    survivors = np.sort(rng.choice(576, 100, replace=False))
    raw1 = rng.random(100)
    rec = _recording({0: [(0, np.arange(576), raw0), (0, np.arange(576), rng.random(576))],   # 2nd row: decode
                      1: [(0, survivors, raw1)]}, [_ctx("q0", (336, 336))])
    kept = selection.kept_sets(rec, mode="off", trend=None, method_key="pdrop", trend_method="pdrop", final_k=20)
    assert kept["q0"].stages[0] == survivors.tolist()
    assert kept["q0"].stages[1] == sorted(survivors[np.argsort(-raw1)[:20]].tolist())


def test_kept_sets_in_full_mode_never_keep_padding():
    rng = np.random.default_rng(1)
    raw = rng.random(576)
    raw[:24 * 8] += 10          # the top rows (padding of a wide image) get the highest raw scores
    rec = _recording({0: [(0, np.arange(576), raw)]}, [_ctx("q0", (1000, 300))])
    off = selection.kept_sets(rec, mode="off", trend=None, method_key="fastv", trend_method="fastv", final_k=64)
    full = selection.kept_sets(rec, mode="full", trend="paper:fastv", method_key="fastv", trend_method="fastv",
                               final_k=64)
    assert selection.padding_share(off["q0"].stages[-1], (1000, 300)) > 0.9
    assert selection.padding_share(full["q0"].stages[-1], (1000, 300)) == 0.0
    assert len(full["q0"].stages[-1]) == 64


def test_evidence_recall_and_budgets():
    assert selection.evidence_recall([1, 2, 3], [2, 3, 4, 5]) == 0.5
    assert selection.evidence_recall([1], []) is None
    assert selection.final_budget("fastv", {"fast_v_attention_rank": 64}) == 64
    assert selection.final_budget("sparsevlm", {"retained_tokens": 128}) == 36
    assert selection.final_budget("illava", {"illava_llm_r": 448}) == 128
    with pytest.raises(ValueError):
        selection.final_budget("nope", {})


# ---------------------------------------------------------------------------------------------- stats

def test_bootstrap_interval_contains_the_mean_and_narrows():
    x = np.random.default_rng(0).random(400) < 0.7
    lo, hi = stats.bootstrap_ci(x)
    assert lo < 100 * x.mean() < hi
    lo2, hi2 = stats.bootstrap_ci(np.tile(x, 4))
    assert hi2 - lo2 < hi - lo


def test_paired_difference_sees_only_discordant_questions():
    a = np.array([1, 1, 0, 0] * 50)
    same = stats.paired_difference(a, a)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["discordant"] == 0
    b = a.copy()
    b[2::4] = 1                  # 50 more right answers of 200
    d = stats.paired_difference(a, b)
    assert d["diff"] == pytest.approx(25.0) and d["ci95"][0] > 15
    with pytest.raises(ValueError):
        stats.paired_difference([1], [1, 0])


# ------------------------------------------------------------------------------------------- scoring

def test_exact_match_uses_llava_normalisation():
    from eval.scoring import answer_normalizer, exact_match

    key = {"a": ["yes"], "b": ["red"], "c": ["k"], "d": ["two", "2"]}
    answers = [{"question_id": "a", "text": "Yes."}, {"question_id": "b", "text": "Red"},
               {"question_id": "c", "text": "x"}, {"question_id": "d", "text": "2"}]
    res = exact_match(answers, key, answer_normalizer())
    assert res["correct"] == {"a": True, "b": True, "c": False, "d": True}
    assert res["accuracy"] == 75.0


def test_custom_benchmark_scores_a_run(tmp_path):
    from eval.benchmarks import get_benchmark
    from eval.scoring import score_exact_match

    (tmp_path / "answers.jsonl").write_text('{"question_id": 1, "answer": "blue"}\n'
                                            '{"question_id": 2, "answer": ["no"]}\n')
    merged = tmp_path / "merge.jsonl"
    merged.write_text('{"question_id": 1, "text": "Blue"}\n{"question_id": 2, "text": "yes"}\n')
    res = score_exact_match(get_benchmark("custom"), tmp_path, tmp_path, merged)
    assert res["accuracy"] == 50.0 and res["n"] == 2
    assert json.loads((tmp_path / "correct.json").read_text()) == {"1": True, "2": False}
    (tmp_path / "answers.jsonl").write_text("not json\n")
    from eval.common import EvalError
    with pytest.raises(EvalError, match="line 1"):
        score_exact_match(get_benchmark("custom"), tmp_path, tmp_path, merged)


# ----------------------------------------------------------------------------------------------- plan

def test_plan_covers_modes_trends_budgets_and_controls(tmp_path):
    from study import run as R

    jobs = R.plan(["fastv", "sparsevlm"], [128, 32], ["off", "pad", "pos", "full"], ["random:0", "grid"], 32,
                  tmp_path)
    names = {j.name for j in jobs}
    assert "unpruned" in names and "fastv/32/full-calibrated" in names and "fastv/32/pos-paper" in names
    assert "sparsevlm/32/off--" not in names                       # SparseVLMs has no 32-token schedule
    assert {j.name for j in jobs if j.kind == "control"} == {"control-random0/128/off--", "control-random0/32/off--",
                                                             "control-grid/128/off--", "control-grid/32/off--"}
    fv = next(j for j in jobs if j.name == "fastv/32/off--")
    assert "fast_v_sys_length=32" in fv.method_args and "fast_v_attention_rank=32" in fv.method_args
    assert R.method_args("pdrop", 128, 32) == ["image_token_ratio_list=0.3200,0.1600,0.0800"]


def test_run_refuses_unknown_methods(capsys):
    from study import run as R

    assert R.main(["--methods", "fastv,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_patch_targets_follow_llava_padding():
    from study.train import patch_targets

    # 400 x 200 pads to 400 x 400 with the content at rows 100..299; a box at the content's top-left corner
    t = patch_targets([{"box": (0, 0, 100, 50), "color": "red", "shape": "star", "glyph": "A"}], (400, 200))
    grid = t.reshape(24, 24, 3)
    rows, cols = grid[..., 0].nonzero(as_tuple=True)
    assert sorted(set(rows.tolist())) == [6, 7, 8] and sorted(set(cols.tolist())) == [0, 1, 2, 3, 4, 5]
    assert grid[6, 0].tolist() == [1, 5, 1]            # red = 1st colour, star = 5th shape, "A" = 1st glyph
    assert int(grid[:6].sum()) == 0 and int(grid[9:].sum()) == 0
