"""analysis.study's FastV-style pruned forward on a tiny random LlamaForCausalLM (no download): the layer
loop equals the model, pruning keeps original positions (checked against transformers' own masked forward),
and the prompt builder puts the needle where it is asked to."""
import numpy as np
import pytest

_WHY = "so the SmolLM2 study's pruned forward (analysis.study) was not tested; pip install -r envs/analysis.txt"
torch = pytest.importorskip("torch", reason=f"package torch is not installed, {_WHY}")
transformers = pytest.importorskip("transformers", reason=f"package transformers is not installed, {_WHY}")

from analysis import study  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   attn_implementation="eager")
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).eval()


def _final_logits(model, h):
    return model.lm_head(model.model.norm(h))


def test_layer_loop_equals_the_model(tiny):
    ids = torch.randint(0, 64, (2, 20))
    pos = torch.arange(20).expand(2, -1)
    with torch.no_grad():
        h, attn = study.run_layers(tiny, tiny.model.embed_tokens(ids), pos, 0, 3, attn_layer=1)
        ref = tiny(ids, output_attentions=True)
    torch.testing.assert_close(_final_logits(tiny, h), ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref.attentions[1], atol=1e-6, rtol=1e-5)


def test_pruning_keeps_original_positions(tiny):
    """Pruning before layer 0 = transformers' forward over the whole sequence with the dropped tokens
    masked out (an independent implementation): kept tokens must get identical logits."""
    ids = torch.randint(0, 64, (1, 30))
    span_start, span = 4, 20
    keep_idx = torch.tensor([[0, 3, 4, 9, 15, 19]])                # span-relative, sorted
    pos = torch.arange(30)[None]
    with torch.no_grad():
        h0 = tiny.model.embed_tokens(ids)
        hp, pp = study.prune_span(h0, pos, span_start, span, keep_idx)
        with pytest.raises(IndexError):                            # why full_rope exists (transformers 4.37)
            study.run_layers(tiny, hp, pp, 0, 3)
        with study.full_rope(tiny, 30):
            out, _ = study.run_layers(tiny, hp, pp, 0, 3)
        mask = torch.zeros(1, 30, dtype=torch.long)
        kept_abs = pp[0]
        mask[0, kept_abs] = 1
        ref = tiny(ids, attention_mask=mask).logits[0, kept_abs]
    expected = torch.cat([torch.arange(4), keep_idx[0] + 4, torch.arange(24, 30)])
    assert kept_abs.tolist() == expected.tolist()
    torch.testing.assert_close(_final_logits(tiny, out)[0], ref, atol=1e-5, rtol=1e-5)
    assert tiny.model.layers[0].self_attn.rotary_emb.__class__.__name__ == "LlamaRotaryEmbedding"  # restored


def test_keeping_every_token_changes_nothing(tiny):
    ids = torch.randint(0, 64, (2, 26))
    pos = torch.arange(26).expand(2, -1)
    with torch.no_grad():
        h, _ = study.run_layers(tiny, tiny.model.embed_tokens(ids), pos, 0, 1)
        full, _ = study.run_layers(tiny, h, pos, 1, 3)
        hp, pp = study.prune_span(h, pos, 3, 20, torch.arange(20).expand(2, -1))
        with study.full_rope(tiny, 26):
            pruned, _ = study.run_layers(tiny, hp, pp, 1, 3)
    torch.testing.assert_close(pruned, full)


def test_answer_check_is_teacher_forced_greedy(tiny):
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        seq = ids
        for _ in range(2):                                         # plain greedy decoding, two steps
            seq = torch.cat([seq, tiny(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        greedy = seq[:, 12:]
        h, _ = study.run_layers(tiny, tiny.model.embed_tokens(seq), torch.arange(14)[None], 0, 3)
        assert study.answer_correct(tiny, h, 12, greedy).tolist() == [True]
        assert study.answer_correct(tiny, h, 12, (greedy + 1) % 64).tolist() == [False]


class _CharTok:
    """Stand-in tokenizer: one id per character (enough to check prompt assembly)."""

    def __call__(self, text, add_special_tokens=False):
        class R:
            input_ids = [ord(c) % 1000 for c in text]
        return R()


def test_prompt_layout_and_needle_slots():
    cfg = study.StudyConfig(span=200, needle_positions=(0, 50, 170))
    p = study.Prompts(_CharTok(), cfg)
    rng = np.random.default_rng(0)
    f = p.filler("evaluation", rng)
    assert len(f) == 200
    nid, ans, at = p.needle("owl")
    assert [nid[i] for i in at] == ans and len(at) == len(" owl")
    ids = p.build(f[:50] + nid + f[50: 200 - len(nid)], ans)
    s0 = len(p.prefix)
    assert ids[s0 + 50: s0 + 50 + len(nid)] == nid and len(ids) == s0 + 200 + len(p.suffix) + len(ans)
    slots = study.needle_slots(cfg, len(nid))
    assert slots == list(cfg.needle_positions)
    with pytest.raises(ValueError, match="do not fit"):
        study.needle_slots(study.StudyConfig(span=200, needle_positions=(0, 199)), len(nid))
    cal = set(map(tuple, p.pools["calibration"]))
    assert not cal & set(map(tuple, p.pools["evaluation"]))           # calibration and evaluation text disjoint
