"""A random-weight LLaVA-1.5-7B checkpoint on disk, loadable by every baseline's own load_pretrained_model.

Latency does not depend on weight values, so the benchmark builds the real architecture (Vicuna-7B LLM,
CLIP ViT-L/14-336 tower, mlp2x_gelu projector) with random fp16 weights directly on the GPU and saves it
in the llava-v1.5-7b layout (config.json as published, safetensors shards, a local vision tower). The
tokenizer is the tiny sentencepiece one from eval.tiny_llava: the benchmark feeds token ids directly.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

# liuhaotian/llava-v1.5-7b config.json (mm_vision_tower replaced by the local random tower).
LLAVA_V15_7B = {
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
    "initializer_range": 0.02, "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000,
    "image_aspect_ratio": "pad", "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2, "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False,
    "use_mm_proj": True, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
    "transformers_version": "4.31.0",
}
# A tiny variant with the same geometry (24×24 patches) and depth (SparseVLMs' builder attaches its attention
# modules to exactly 32 layers; PyramidDrop ranks at layer 20), for CPU smoke runs of the benchmark script.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=1000)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def llm_shapes(cfg: dict) -> dict:
    """Parameter name -> shape of LlavaLlamaForCausalLM (what the published checkpoint holds)."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h),
              "model.mm_projector.0.weight": (h, cfg["mm_hidden_size"]), "model.mm_projector.0.bias": (h,),
              "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{name}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (f, h)
        shapes[p + "mlp.up_proj.weight"] = (f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def build(out_dir, *, device: str = "cuda", seed: int = 0, overrides: dict | None = None,
          clip_overrides: dict | None = None) -> Path:
    """Write the checkpoint into ``out_dir`` (its name must contain "llava"); returns its absolute path.
    ``overrides``/``clip_overrides`` shrink it for a CPU smoke test."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from eval.tiny_llava import CLIP_MEAN, CLIP_STD, build_tiny_llava

    out = Path(out_dir).resolve()
    if (out / "bench_checkpoint.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    cfg = dict(LLAVA_V15_7B, **(overrides or {}))
    tower = out / "vision_tower"
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    vision = CLIPVisionModel(CLIPVisionConfig(**dict(CLIP_L14_336, **(clip_overrides or {})))).to(device, dtype)
    vision.save_pretrained(tower, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3).save_pretrained(tower)
    cfg["mm_hidden_size"] = vision.config.hidden_size
    cfg["mm_vision_tower"] = str(tower)
    del vision

    shard, shard_bytes, index, n = {}, 0, {}, 0
    for name, shape in llm_shapes(cfg).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, device=device, dtype=dtype)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, device=device, dtype=dtype)
        else:
            t = torch.randn(shape, device=device, dtype=dtype, generator=gen).mul_(cfg["initializer_range"])
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes > 2 << 30:
            n += 1
            _save(save_file, shard, out / f"model-{n:05d}.safetensors", index)
            shard, shard_bytes = {}, 0
    if shard:
        n += 1
        _save(save_file, shard, out / f"model-{n:05d}.safetensors", index)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer: eval.tiny_llava's offline sentencepiece one
        tiny = build_tiny_llava(Path(tmp) / "tiny-llava")
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (tiny / f).exists():
                shutil.copy(tiny / f, out / f)
    (out / "bench_checkpoint.json").write_text(json.dumps({"seed": seed, "random": True, "config": "llava-v1.5-7b"}))
    return out


def _save(save_file, shard: dict, path: Path, index: dict) -> None:
    save_file({k: v.contiguous().cpu() for k, v in shard.items()}, str(path), metadata={"format": "pt"})
    index.update({k: path.name for k in shard})
