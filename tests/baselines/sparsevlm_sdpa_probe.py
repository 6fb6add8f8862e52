"""sparsevlm_probe.py with the attention of SparseVLMs' pruning layers (LlamaDynamicvitFlashAttention2.
_flash_attention_forward) left to the tree under test instead of the probe's SDPA stand-in:

    python sparsevlm_sdpa_probe.py fallback run OUT --mode off ...   # the tree's own code (patches/SparseVLMs/0003:
                                                                     # PyTorch SDPA when flash-attn is absent)
    python sparsevlm_sdpa_probe.py eager run OUT --mode off ...      # a reference: attention written out
                                                                     # (softmax(q k^T * scale + causal) v), fp32

Everything else is sparsevlm_probe.py's (model, CPU stand-ins for CUDA events, observation); its JSON line
gains "attention" and "flash_attn_importable".
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import torch

import sparsevlm_probe


def _eager_flash(self, query_states, key_states, value_states, attention_mask, query_length, dropout=0.0,
                 softmax_scale=None):
    """flash_attn_func's maths, written out. q/k/v [B, L, H, D] -> [B, Lq, H, D]; causal, bottom-right aligned."""
    if attention_mask is not None:
        raise RuntimeError("the eager reference handles unpadded batches only")
    q, k, v = (t.transpose(1, 2).float() for t in (query_states, key_states, value_states))
    lq, lk = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * (softmax_scale or 1 / math.sqrt(q.shape[-1]))
    if self.is_causal and lq > 1:
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(query_states.dtype).transpose(1, 2)


def main() -> None:
    attention, argv = sys.argv[1], sys.argv[2:]
    assert attention in ("fallback", "eager"), attention
    stand_ins = sparsevlm_probe._install_cpu_stand_ins

    def install(mod):
        own = mod.LlamaDynamicvitFlashAttention2.__dict__.get("_flash_attention_forward")
        stand_ins(mod)                                   # CUDA events etc., and the probe's SDPA stand-in ...
        cls = mod.LlamaDynamicvitFlashAttention2
        if attention == "eager":
            cls._flash_attention_forward = _eager_flash
        elif own is not None:
            cls._flash_attention_forward = own           # ... replaced by the tree's own method
        else:
            del cls._flash_attention_forward             # pristine tree: transformers' flash-attn path

    sparsevlm_probe._install_cpu_stand_ins = install
    printed = []
    real_print = print

    def capture(*a, **k):
        printed.append(a)

    import builtins
    builtins.print = capture
    try:
        sparsevlm_probe.main(argv)
    finally:
        builtins.print = real_print
    result = json.loads(printed[-1][0])
    result.update(attention=attention, flash_attn_importable=importlib.util.find_spec("flash_attn") is not None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
