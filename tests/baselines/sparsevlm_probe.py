"""Probe for SparseVLMs (v1.5): run a tiny random sparse LLaVA-1.5 through its real ``generate`` and report
what each pruning layer kept, in original raster positions.

Run in a fresh interpreter with an exported SparseVLMs tree (pristine or patched) first on PYTHONPATH:

    python sparsevlm_probe.py init OUT                  # tiny CLIP tower + tiny 16-layer model, saved (safetensors)
    python sparsevlm_probe.py run OUT --mode off --image 400x200 [--trend paper:sparsevlm/gqa] [--flat]

``run`` prints one JSON line last. Everything here is probe-side; the patches stay untouched:
  * CPU stand-ins: SDPA for flash-attn's ``_flash_attention_forward``,
    a dummy ``torch.cuda.Event``/``synchronize``, ``Tensor.cuda`` as the identity (decode-time position ids);
  * observation: wrappers around ``attn_postprocess_topk`` (the kept mask per pruning layer),
    ``Tensor.topk`` (the recycle pick, the only 1-D ``.topk`` in the forward) and ``cluster_and_merge``
    (cluster count); a forward hook on ``lm_head`` (logits); ``debias_core.recording()`` (the positions the
    patch passes to ``debias``). Original positions are reconstructed here from upstream's observable
    selection, independently of the patch's own tracking.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SEED = 0
VOCAB = 256
N_LAYERS = 16             # pruning layers are hard-coded at 2, 6 and 15 (score.layer_dict)
PRUNING_LAYERS = (2, 6, 15)
PREFIX = 35               # vicuna_v1 system prompt up to "USER:" → image placeholder at index 35
TEXT = 20                 # question tokens after the image
RETAINED = 128            # paper setting: keep 303 / 110 / 36 at layers 2 / 6 / 15
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def init(out: Path) -> dict:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from llava.model.language_model.sparse_llava_llama import LlavaConfig, LlavaLlamaDynamicForCausalLM

    torch.manual_seed(SEED)
    clip = out / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=336, patch_size=14, projection_dim=32)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(clip)
    cfg = LlavaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, initializer_range=0.1,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, mm_vision_tower=str(clip), mm_hidden_size=32,
                      mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                      mm_patch_merge_type="flat", image_aspect_ratio="pad", use_mm_proj=True,
                      tokenizer_model_max_length=2048)
    cfg._attn_implementation = "sdpa"   # LlamaDynamicvitDecoderLayer asserts it
    model = LlavaLlamaDynamicForCausalLM(cfg)
    model.save_pretrained(out / "model", safe_serialization=True)
    return {"model": str(out / "model")}


def _install_cpu_stand_ins(mod) -> None:
    class _Event:
        def __init__(self, *a, **k): pass
        def record(self, *a, **k): pass
        def elapsed_time(self, other): return 0.0

    def _sdpa_flash(self, query_states, key_states, value_states, attention_mask, query_length, dropout=0.0,
                    softmax_scale=None):
        """flash_attn_func stand-in. q/k/v [B, L, H, D] → [B, Lq, H, D]; causal, bottom-right aligned (flash-attn ≥ 2.1)."""
        if attention_mask is not None:
            raise RuntimeError("probe stand-in handles unpadded batches only (attention_mask is None upstream for B=1)")
        q, k, v = (t.transpose(1, 2) for t in (query_states, key_states, value_states))
        causal = self.is_causal and q.shape[2] > 1   # prefill: Lq == Lk; decode: one query sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal,
                                              scale=softmax_scale).transpose(1, 2)

    mod.LlamaDynamicvitFlashAttention2._flash_attention_forward = _sdpa_flash
    torch.cuda.Event = _Event
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self


def _load(model_dir: str, flat: bool):
    import llava.model.language_model.modelling_sparse_llama as mod
    from llava.model.language_model.sparse_llava_llama import LlavaLlamaDynamicForCausalLM

    model = LlavaLlamaDynamicForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", torch_dtype=torch.float32)
    # llava/model/builder.py L113-120, in fp32 (bit-exact CPU comparison) and over the real layer count (not 32)
    for i, layer in enumerate(model.model.layers):
        layer.add_module("flash_attn", mod.LlamaDynamicvitFlashAttention2(config=model.config, layer_idx=i))
        state = layer.flash_attn.state_dict()
        for key, value in layer.self_attn.state_dict().items():
            if key in state:
                state[key] = value
        layer.flash_attn.load_state_dict(state)
    if flat:   # zero queries at the pruning layers: uniform attention, so every visual token gets the same score
        for i in PRUNING_LAYERS:
            torch.nn.init.zeros_(model.model.layers[i].flash_attn.q_proj.weight)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    model.generation_config.eos_token_id = None   # always run the requested number of decode steps
    model.generation_config.pad_token_id = 0
    return mod, model.eval()


def _observe(mod):
    calls = []
    orig_score, orig_cluster, orig_topk = mod.attn_postprocess_topk, mod.cluster_and_merge, torch.Tensor.topk

    def score(*args, **kwargs):
        mask, s_flag, relation = orig_score(*args, **kwargs)
        calls.append({"layer": int(args[5]), "mask": mask[0].clone(), "recycle": None, "clusters": 0, "merged": 0})
        return mask, s_flag, relation

    def cluster(x, cluster_num):
        calls[-1]["clusters"], calls[-1]["merged"] = int(cluster_num), int(x.shape[1])
        return orig_cluster(x, cluster_num)

    def topk(self, *args, **kwargs):
        res = orig_topk(self, *args, **kwargs)
        if calls and self.dim() == 1:
            calls[-1]["recycle"] = res[1].clone()
        return res

    mod.attn_postprocess_topk, mod.cluster_and_merge, torch.Tensor.topk = score, cluster, topk
    return calls


def _stages(calls) -> list[dict]:
    """Replay upstream's selection on original positions: kept (ascending), then −1 per recycled cluster."""
    pos, out = list(range(576)), []
    for c in calls:
        mask = c["mask"].tolist()
        if len(mask) != len(pos):
            raise RuntimeError(f"layer {c['layer']} ranked {len(mask)} tokens, expected {len(pos)}")
        kept = [p for p, m in zip(pos, mask) if m]
        pruned = [p for p, m in zip(pos, mask) if not m]
        recycled = [pruned[i] for i in c["recycle"].tolist()] if c["recycle"] is not None else []
        if len(recycled) != c["merged"]:
            raise RuntimeError(f"layer {c['layer']}: recycle pick {len(recycled)} != merged {c['merged']}")
        out.append({"layer": c["layer"], "ranked": pos, "kept": kept, "recycled": recycled, "clusters": c["clusters"]})
        pos = kept + [-1] * c["clusters"]
    return out


def run(a) -> dict:
    import debias_core
    from PIL import Image
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images

    torch.set_num_threads(1)
    debias_core.configure(mode=a.mode, trend=a.trend, method="sparsevlm")
    mod, model = _load(a.model, a.flat)
    _install_cpu_stand_ins(mod)
    calls = _observe(mod)
    logits = []
    model.lm_head.register_forward_hook(lambda m, i, o: logits.append(o.detach().clone()))

    w, h = (int(v) for v in a.image.split("x"))
    rng = np.random.default_rng(SEED)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    images = process_images([image], model.get_vision_tower().image_processor, model.config)
    g = torch.Generator().manual_seed(SEED)
    ids = torch.cat([torch.tensor([1]), torch.randint(3, VOCAB, (PREFIX - 1,), generator=g),
                     torch.tensor([IMAGE_TOKEN_INDEX]), torch.randint(3, VOCAB, (TEXT,), generator=g)])[None]
    span_start = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])

    torch.manual_seed(SEED)   # cluster_and_merge adds torch.rand noise
    with debias_core.sample(image_size=image.size, span_start=span_start), debias_core.recording() as rec, \
            torch.inference_mode():
        out = model.generate(ids, images=images, image_sizes=[image.size], retained_tokens=RETAINED, do_sample=False,
                             num_beams=1, max_new_tokens=a.new_tokens, use_cache=True, output_scores=True,
                             return_dict_in_generate=True)
    digest = hashlib.sha256()
    for t in logits:
        digest.update(t.float().contiguous().numpy().tobytes())
    return {
        "tree": sys.modules["llava"].__file__,
        "mode": debias_core.settings().mode,
        "span_start": span_start,
        "image_size": list(image.size),
        "stages": _stages(calls),
        "debias_positions": {str(s): [p.tolist() for p, _ in rows] for s, rows in rec.rows.items()},
        "raw_score_spread": {str(s): [float(np.ptp(v) / np.abs(v).max()) for _, v in rows] for s, rows in rec.rows.items()},
        "seq_len": int(ids.shape[1]) - 1 + 576,   # the image placeholder becomes 576 visual tokens
        "new_tokens": a.new_tokens,
        "logits_sha256": digest.hexdigest(),
        "logit_shapes": [list(t.shape) for t in logits],
        "logits_finite": all(bool(torch.isfinite(t).all()) for t in logits),
        "cache_lengths": [int(layer[0].shape[2]) for layer in out.past_key_values],
        "generated": out.sequences[0].tolist(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init").add_argument("out", type=Path)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("--mode", default="off", choices=["off", "pad", "pos", "full"])
    r.add_argument("--trend", default=None, help="e.g. paper:sparsevlm/gqa (needed by pos/full)")
    r.add_argument("--image", default="400x200", help="original image WxH (pad preprocessing)")
    r.add_argument("--flat", action="store_true", help="zero the queries at the pruning layers (flat scores)")
    r.add_argument("--new-tokens", type=int, default=3)
    a = p.parse_args(argv)
    result = init(a.out) if a.cmd == "init" else run(a)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
