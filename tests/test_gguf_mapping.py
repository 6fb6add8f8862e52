"""analysis.gguf_llama on a tiny synthetic GGUF written here with gguf.GGUFWriter, laid out exactly as
llama.cpp's converter (convert_hf_to_gguf.py) lays out a Hugging Face llama: q/k rows permuted, tensors named
blk.N.*, a byte-level BPE vocabulary. Checks: the q/k permutation round trip, the tensor mapping, logits of the
loaded model against the original model and against an independent numpy forward in llama.cpp's convention,
the tokenizer, and clear errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_WHY = ("so the GGUF loader (analysis.gguf_llama: tensor mapping, q/k permutation, tokenizer) was not tested; "
        "install it: pip install -r envs/analysis.txt")
gguf = pytest.importorskip("gguf", reason=f"package gguf is not installed, {_WHY}")
torch = pytest.importorskip("torch", reason=f"package torch is not installed, {_WHY}")
transformers = pytest.importorskip("transformers", reason=f"package transformers is not installed, {_WHY}")

from analysis import gguf_llama as gl  # noqa: E402
from analysis.reference import reference_logits  # noqa: E402
from debias_core.errors import DebiasError  # noqa: E402

CFG = dict(vocab_size=0, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
           tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, hidden_act="silu")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["t h", "th e", "Ġ the", "c a", "ca t", "Ġ cat"]


def llama_cpp_permute(weights, n_head, n_head_kv):
    """Verbatim logic of llama.cpp convert_hf_to_gguf.py LlamaModel.permute (the reference, not our code)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocab():
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIAL + alphabet + merged


def _hf_weights(seed=0):
    """Random HF-layout llama weights (float32)."""
    rng = np.random.default_rng(seed)
    h, f, v = CFG["hidden_size"], CFG["intermediate_size"], len(_vocab())
    kv = h // CFG["num_attention_heads"] * CFG["num_key_value_heads"]
    w = {"model.embed_tokens.weight": rng.normal(0, 1, (v, h)), "model.norm.weight": 1 + 0.1 * rng.normal(size=h)}
    for i in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=h),
                  p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=h),
                  p + "self_attn.q_proj.weight": rng.normal(0, 0.3, (h, h)),
                  p + "self_attn.k_proj.weight": rng.normal(0, 0.3, (kv, h)),
                  p + "self_attn.v_proj.weight": rng.normal(0, 0.3, (kv, h)),
                  p + "self_attn.o_proj.weight": rng.normal(0, 0.3, (h, h)),
                  p + "mlp.gate_proj.weight": rng.normal(0, 0.3, (f, h)),
                  p + "mlp.up_proj.weight": rng.normal(0, 0.3, (f, h)),
                  p + "mlp.down_proj.weight": rng.normal(0, 0.3, (h, f))})
    return {k: v.astype(np.float32) for k, v in w.items()}


def write_gguf(path, hf, *, quantize=False, arch="llama", drop=None):
    """Write ``hf`` weights the way llama.cpp's converter does (names, q/k permutation, metadata)."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    heads, kv = CFG["num_attention_heads"], CFG["num_key_value_heads"]
    w = GGUFWriter(str(path), arch)
    w.add_block_count(CFG["num_hidden_layers"])
    w.add_context_length(CFG["max_position_embeddings"])
    w.add_embedding_length(CFG["hidden_size"])
    w.add_feed_forward_length(CFG["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(CFG["rms_norm_eps"])
    w.add_rope_freq_base(CFG["rope_theta"])
    w.add_rope_dimension_count(CFG["hidden_size"] // heads)
    w.add_vocab_size(len(_vocab()))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(_vocab())
    w.add_token_types([3] * len(SPECIAL) + [1] * (len(_vocab()) - len(SPECIAL)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    inverse = {v: k for k, v in gl._LAYER_MAP.items()}
    for name, arr in hf.items():
        if name in names:
            g = names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{inverse[rest]}"
            if rest == "self_attn.q_proj.weight":
                arr = llama_cpp_permute(arr, heads, heads)
            elif rest == "self_attn.k_proj.weight":
                arr = llama_cpp_permute(arr, heads, kv)
        if g == drop:
            continue
        if quantize and arr.ndim == 2:
            w.add_tensor(g, quants.quantize(arr, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 6), half=st.integers(1, 5), cols=st.integers(1, 4))
def test_unpermute_inverts_llama_cpp_permute(heads, half, cols):
    w = np.arange(heads * 2 * half * cols, dtype=np.float64).reshape(heads * 2 * half, cols)
    assert np.array_equal(gl.unpermute_qk(llama_cpp_permute(w, heads, heads), heads), w)
    assert np.array_equal(gl.permute_qk(w, heads), llama_cpp_permute(w, heads, heads))
    if heads > 1 and half > 1:                  # a real reordering: undoing it is not a no-op
        assert not np.array_equal(llama_cpp_permute(w, heads, heads), w)


def test_permutation_rejects_odd_head_sizes():
    with pytest.raises(DebiasError, match="even size"):
        gl.unpermute_qk(np.zeros((6, 2)), 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = _hf_weights()
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf)
    return hf, path


def test_metadata_and_exact_tensor_mapping(tiny):
    hf, path = tiny
    config, state = gl.read_llama_gguf(path)
    eps = config.pop("rms_norm_eps")
    assert eps == pytest.approx(CFG["rms_norm_eps"], rel=1e-6)          # stored as float32
    assert config == {k: v for k, v in CFG.items() if k != "rms_norm_eps"} | {"vocab_size": len(_vocab())}
    assert set(state) == set(hf)
    for k in hf:
        np.testing.assert_array_equal(state[k], hf[k], err_msg=k)
    _, wrong = gl.read_llama_gguf(path, undo_permutation=False)
    assert not np.array_equal(wrong["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    assert not np.array_equal(wrong["model.layers.1.self_attn.k_proj.weight"], hf["model.layers.1.self_attn.k_proj.weight"])


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor([ids])).logits[0].double().numpy()


def test_loaded_model_equals_the_original_and_the_llama_cpp_style_reference(tiny):
    hf, path = tiny
    config, state = gl.read_llama_gguf(path)
    model = gl.build_model(config, state)
    original = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    original.load_state_dict({**{k: torch.from_numpy(v) for k, v in hf.items()},
                              "lm_head.weight": torch.from_numpy(hf["model.embed_tokens.weight"])}, strict=False)
    ids = [5, 70, 120, 33, 200, 9, 17, 240, 61, 100, 3, 44]
    mine = _logits(model, ids)
    np.testing.assert_allclose(mine, _logits(original, ids), atol=1e-4)
    tensors = gl.gguf_tensors(gl.open_gguf(path))                      # file layout, q/k still permuted
    ref = reference_logits(tensors, config, ids)
    np.testing.assert_allclose(mine, ref, atol=1e-3)
    wrong = gl.build_model(config, gl.hf_state_dict(tensors, config, undo_permutation=False))
    assert np.abs(_logits(wrong, ids) - ref).max() > 1e-2              # the check can fail


def test_quantised_tensors_are_dequantised(tmp_path):
    from gguf import GGMLQuantizationType, quants

    hf = _hf_weights(seed=1)
    path = write_gguf(tmp_path / "q8.gguf", hf, quantize=True)
    _, state = gl.read_llama_gguf(path)
    q = hf["model.layers.1.self_attn.q_proj.weight"]
    expect = quants.dequantize(quants.quantize(q, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(state["model.layers.1.self_attn.q_proj.weight"], expect)
    np.testing.assert_allclose(state["model.layers.1.self_attn.q_proj.weight"], q, atol=0.02)


def test_tokenizer_from_gguf_metadata(tiny):
    _, path = tiny
    tok = gl.build_tokenizer(gl.tokenizer_spec(gl.open_gguf(path)))
    ids = tok("the cat 42", add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:2] == ["the", "Ġcat"] and pieces[-2:] == ["4", "2"]   # merges applied; digits split singly
    assert tok.decode(ids) == "the cat 42"
    assert tok("<|im_start|>x", add_special_tokens=False).input_ids[0] == 1


def test_errors_name_the_problem(tmp_path, tiny):
    hf, _ = tiny
    with pytest.raises(DebiasError, match="does not exist"):
        gl.open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(DebiasError, match="architecture 'gpt2'"):
        gl.open_gguf(write_gguf(tmp_path / "arch.gguf", hf, arch="gpt2"))
    with pytest.raises(DebiasError, match="lacks tensors"):
        gl.read_llama_gguf(write_gguf(tmp_path / "drop.gguf", hf, drop="blk.1.ffn_up.weight"))
