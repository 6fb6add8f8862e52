"""Load a Llama-architecture GGUF file (llama.cpp's format) into transformers' LlamaForCausalLM.

    config, state = read_llama_gguf(path)          # LlamaConfig fields (dict), {hf_name: float32 ndarray}
    model = build_model(config, state)             # LlamaForCausalLM, eval mode, eager attention
    tok = build_tokenizer(path)                    # PreTrainedTokenizerFast from the GGUF's BPE vocab

llama.cpp's converter (convert_hf_to_gguf.py, ``LlamaModel.permute``) reorders the rows of the q and k
projections so that its "normal" RoPE, which rotates adjacent pairs (x[2j], x[2j+1]), equals Hugging Face's
rotate-half RoPE, which rotates (x[j], x[j + d/2]). Per head of d rows: HF row j·… ↔ GGUF row order
``reshape(heads, 2, d/2, in).swapaxes(1, 2)``. ``unpermute_qk`` undoes it; ``permute_qk`` is the converter's
own transform (used by tests to write a synthetic GGUF). Without the undo the model still runs but every
attention score is wrong — analysis.reference checks it against an independent numpy forward in llama.cpp's
own convention.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from debias_core.errors import DebiasError

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter transform of a q or k projection [heads·d, in] (HF layout → GGUF layout)."""
    _check_rows(w, heads)
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of ``permute_qk``: GGUF layout [heads·d, in] → HF layout."""
    _check_rows(w, heads)
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_rows(w, heads):
    if w.shape[0] % (2 * heads):
        raise DebiasError(f"projection with {w.shape[0]} rows cannot be split into {heads} heads of even size")


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise DebiasError(f"GGUF file lacks metadata {key!r}; is it a llama-architecture model?")
    return f.contents()


def open_gguf(path):
    import gguf  # optional dependency of the analysis tools only

    path = Path(path)
    if not path.is_file():
        raise DebiasError(f"GGUF file {str(path)!r} does not exist")
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise DebiasError(f"{path.name} has architecture {arch!r}; only 'llama' GGUF files are supported")
    return reader


def llama_config(reader) -> dict:
    """LlamaConfig keyword arguments from GGUF metadata."""
    a = "llama."
    heads = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    rope_dim = int(_field(reader, a + "rope.dimension_count", hidden // heads))
    if rope_dim != hidden // heads:
        raise DebiasError(f"partial RoPE (rope.dimension_count {rope_dim} ≠ head size {hidden // heads}) "
                          f"is not supported by LlamaForCausalLM")
    names = {t.name for t in reader.tensors}
    vocab = int(_field(reader, a + "vocab_size", len(_field(reader, "tokenizer.ggml.tokens", [0]))))
    return dict(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_hidden_layers=int(_field(reader, a + "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, a + "attention.head_count_kv", heads)),
        rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, a + "context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        hidden_act="silu",
    )


def gguf_tensors(reader) -> dict:
    """{gguf_name: float32 [rows, cols] or [n]} dequantised, in the file's (llama.cpp) layout."""
    from gguf import quants

    out = {}
    for t in reader.tensors:
        arr = quants.dequantize(np.asarray(t.data), t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (the input dim) first
        out[t.name] = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
    return out


def hf_state_dict(tensors: dict, config: dict, *, undo_permutation: bool = True) -> dict:
    """Map GGUF tensors to LlamaForCausalLM names, undoing the q/k row permutation.

    ``undo_permutation=False`` exists only to demonstrate (tests, study) what goes wrong without it.
    """
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    state, unknown = {}, []
    for name, arr in tensors.items():
        if name in _GLOBAL_MAP:
            state[_GLOBAL_MAP[name]] = arr
            continue
        parts = name.split(".", 2)
        if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _LAYER_MAP:
            unknown.append(name)
            continue
        if undo_permutation and parts[2] == "attn_q.weight":
            arr = unpermute_qk(arr, heads)
        elif undo_permutation and parts[2] == "attn_k.weight":
            arr = unpermute_qk(arr, kv)
        state[f"model.layers.{int(parts[1])}.{_LAYER_MAP[parts[2]]}"] = arr
    if unknown:
        raise DebiasError(f"GGUF tensors with no LlamaForCausalLM counterpart: {unknown[:5]}; "
                          f"this loader handles plain llama models only")
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{v}" for i in range(config["num_hidden_layers"]) for v in _LAYER_MAP.values()}
    missing = sorted(expected - set(state))
    if missing:
        raise DebiasError(f"GGUF file lacks tensors for {missing[:5]} ({len(missing)} missing)")
    return state


def read_llama_gguf(path, *, undo_permutation: bool = True) -> tuple[dict, dict]:
    reader = open_gguf(path)
    config = llama_config(reader)
    return config, hf_state_dict(gguf_tensors(reader), config, undo_permutation=undo_permutation)


def build_model(config: dict, state: dict):
    """LlamaForCausalLM (float32, eval, eager attention so attention weights can be read)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config, attn_implementation="eager")
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    tensors = {k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in state.items()}
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise DebiasError(f"state dict does not fit LlamaForCausalLM: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # non-persistent buffers (RoPE tables) were created on meta: rebuild them on the CPU
    for layer in model.model.layers:
        rot = layer.self_attn.rotary_emb
        fresh = type(rot)(rot.dim, max_position_embeddings=rot.max_position_embeddings, base=rot.base)
        layer.self_attn.rotary_emb = fresh
    return model.eval()


# ------------------------------------------------------------------------------------------ tokenizer

def tokenizer_spec(reader) -> dict:
    """The GGUF's BPE tokenizer as plain data: tokens, token types, merges, special ids, pre-tokenizer."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise DebiasError(f"tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    return {
        "tokens": list(_field(reader, "tokenizer.ggml.tokens")),
        "token_type": [int(t) for t in _field(reader, "tokenizer.ggml.token_type")],
        "merges": list(_field(reader, "tokenizer.ggml.merges")),
        "pre": str(_field(reader, "tokenizer.ggml.pre", "default")),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
    }


_CONTROL = 3  # llama.cpp token type: control (special) token


def build_tokenizer(spec: dict):
    """PreTrainedTokenizerFast: byte-level BPE; the 'smollm'/'starcoder' pre-tokenizer splits digits singly."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(spec["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if spec["pre"] in ("smollm", "starcoder", "refact", "codeshell"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif spec["pre"] in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise DebiasError(f"pre-tokenizer {spec['pre']!r} is not supported; add its split rule to build_tokenizer")
    tok.decoder = decoders.ByteLevel()
    special = [spec["tokens"][i] for i, t in enumerate(spec["token_type"]) if t == _CONTROL]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["tokens"][spec["bos_token_id"]],
                                   eos_token=spec["tokens"][spec["eos_token_id"]])


def save_tokenizer_spec(spec: dict, path) -> None:
    Path(path).write_text(json.dumps(spec))
