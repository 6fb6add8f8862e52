"""An independent numpy forward pass of a llama GGUF model, in llama.cpp's own conventions.

It reads the dequantised tensors in the file's layout (q/k rows as llama.cpp stores them) and applies
llama.cpp's "normal" RoPE, which rotates adjacent pairs (x[2j], x[2j+1]) by angle p·θ^(−2j/d). The
transformers model built by analysis.gguf_llama uses rotate-half RoPE on un-permuted rows instead; the two
agree only if ``unpermute_qk`` is right, which is what ``compare`` checks.

    logits = reference_logits(tensors, config, ids)     # float64 [T, vocab]
"""
from __future__ import annotations

import numpy as np


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_adjacent(x: np.ndarray, theta: float) -> np.ndarray:
    """x [T, heads, d]: rotate pairs (2j, 2j+1) by angle t·θ^(−2j/d) (llama.cpp LLAMA_ROPE_TYPE_NORM)."""
    t, _, d = x.shape
    ang = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]   # [T, d/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def reference_logits(tensors: dict, config: dict, ids, *, layers: int | None = None) -> np.ndarray:
    """Logits float64 [T, vocab] for token ids [T], from GGUF-named tensors (analysis.gguf_llama.gguf_tensors)."""
    g = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    ids = np.asarray(ids, dtype=np.int64)
    x = g["token_embd.weight"][ids]
    t = len(ids)
    d = x.shape[1] // heads
    causal = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(config["num_hidden_layers"] if layers is None else layers):
        p = f"blk.{i}."
        h = _rmsnorm(x, g[p + "attn_norm.weight"], eps)
        q = _rope_adjacent((h @ g[p + "attn_q.weight"].T).reshape(t, heads, d), theta)
        k = _rope_adjacent((h @ g[p + "attn_k.weight"].T).reshape(t, kv, d), theta)
        v = (h @ g[p + "attn_v.weight"].T).reshape(t, kv, d)
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)  # q head j uses kv head j // group
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + causal
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(t, heads * d) @ g[p + "attn_output.weight"].T
        h = _rmsnorm(x, g[p + "ffn_norm.weight"], eps)
        gate = h @ g[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ g[p + "ffn_up.weight"].T)) @ g[p + "ffn_down.weight"].T
    x = _rmsnorm(x, g["output_norm.weight"], eps)
    return x @ g.get("output.weight", g["token_embd.weight"]).T


def compare(model, tensors: dict, config: dict, ids) -> dict:
    """HF model vs the numpy reference on ids [T]: max |Δlogit|, and whether every position's argmax agrees."""
    import torch

    with torch.no_grad():
        hf = model(torch.as_tensor([list(ids)])).logits[0].double().numpy()
    ref = reference_logits(tensors, config, ids)
    return {"max_abs_logit_diff": float(np.abs(hf - ref).max()),
            "logit_scale": float(np.abs(ref).max()),
            "argmax_agree": float((hf.argmax(-1) == ref.argmax(-1)).mean())}
