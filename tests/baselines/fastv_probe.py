"""Probe for FastV (run in a subprocess by tests/baselines/test_fastv.py, never imported by pytest).

PYTHONPATH must put an exported FastV tree first: <tree>/src/transformers/src (the FastV transformers
fork, 4.31.0) and <tree>/src/LLaVA (LLaVA 1.1.3). The same probe runs the pristine and the patched tree.

    fastv_probe.py init KIND DIR        KIND = llama | llava: seeded tiny random model saved as safetensors
    fastv_probe.py run KIND DIR SPECS   SPECS = JSON {name: spec}; prints one JSON line {name: result}

Geometry is LLaVA-1.5's: 576 visual tokens starting at s0 = 35 (the vicuna_v1 position), then text.
``llama`` drives the fork's LlamaForCausalLM.generate on token ids; ``llava`` drives LLaVA 1.1.3's
LlavaLlamaForCausalLM.generate on a real padded PIL image through process_images (pad) and a real
CLIPVisionTower loaded from a tiny local CLIP checkpoint (so no hub access and no stub).

spec keys: mode = mask | inplace; debias = off | pad | pos | full | env (env: leave debias_core to
DEBIAS*, as an eval driver does); image = [W, H]; rank; agg (K); steps (decode steps after prefill);
ramp (replace layer K-1's attention by a flat row with a tiny recency ramp: a constructed check);
context (open debias_core.sample around generate; default true).

Observation is by hooks only: the kept visual tokens are read from what FastV hands decoder layer K
(the attention mask's last row in mask mode, the position ids in in-place mode); logits from lm_head.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

SPAN_START = 35     # vicuna_v1: the system prompt up to "USER:" is 35 tokens
SPAN = 576          # 24×24 CLIP patches
TEXT = 5            # text tokens after the image ("\n" + question)
VOCAB = 96
SEED = 1234
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def llama_kwargs():
    # eos_token_id=None: random weights must not stop generation early.
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=2048, initializer_range=0.2,
                pad_token_id=0, bos_token_id=1, eos_token_id=None)


def init(kind: str, out: Path) -> dict:
    torch.manual_seed(SEED)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        model = LlamaForCausalLM(LlamaConfig(**llama_kwargs()))
        model.save_pretrained(out / "llama", safe_serialization=True)
        return {"saved": str(out / "llama")}
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=2, image_size=336, patch_size=14,
                                            projection_dim=32))
    clip.save_pretrained(out / "clip", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out / "clip")
    config = LlavaConfig(**llama_kwargs(), mm_vision_tower=str(out / "clip"), mm_hidden_size=32,
                         mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                         mm_vision_select_feature="patch", image_aspect_ratio="pad",
                         mm_use_im_start_end=False, mm_use_im_patch_token=False)
    LlavaLlamaForCausalLM(config).save_pretrained(out / "llava", safe_serialization=True)
    return {"saved": str(out / "llava")}


def load(kind: str, d: Path):
    if kind == "llama":
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM.from_pretrained(d / "llama", torch_dtype=torch.float32), None
    from llava.model import LlavaLlamaForCausalLM
    model = LlavaLlamaForCausalLM.from_pretrained(d / "llava", torch_dtype=torch.float32)
    tower = model.get_vision_tower()
    if not tower.is_loaded:        # what llava.model.builder.load_pretrained_model does
        tower.load_model()
    return model, tower.image_processor


def inputs(kind: str, model, processor, image_size):
    """input_ids [1, L] (and images for llava) with the visual span at SPAN_START."""
    g = torch.Generator().manual_seed(SEED + 1)
    if kind == "llama":
        ids = torch.randint(3, VOCAB, (1, SPAN_START + SPAN + TEXT), generator=g)
        return ids, {}
    import numpy as np
    from PIL import Image
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images
    ids = torch.randint(3, VOCAB, (1, SPAN_START + 1 + TEXT), generator=g)
    ids[0, 0] = 1
    ids[0, SPAN_START] = IMAGE_TOKEN_INDEX
    w, h = image_size
    pixels = np.random.default_rng(SEED).integers(0, 256, (h, w, 3), dtype=np.uint8)
    images = process_images([Image.fromarray(pixels)], processor, model.config)
    return ids, {"images": images}


def pixel_padding(image) -> list:
    """Raster indices of the patches made only of expand2square's fill colour, read from the pixels.

    image: float [3, 336, 336] as process_images returns it (normalised with CLIP mean/std).
    """
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    fill = (torch.floor(mean * 255) / 255 - mean) / std          # expand2square pastes int(255·mean)
    patches = (image - fill[:, None, None]).abs().reshape(3, 24, 14, 24, 14).amax(dim=(0, 2, 4))
    return (patches.reshape(-1) < 0.05).nonzero().flatten().tolist()


def image_start(kind: str, ids) -> int:
    if kind == "llama":
        return SPAN_START
    from llava.constants import IMAGE_TOKEN_INDEX
    return int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])


def configure_debias(name: str):
    import debias_core
    debias_core.reset()
    if name == "env":
        return
    trend = "paper:fastv" if name in ("pos", "full") else None
    debias_core.configure(mode=name, trend=trend, method="fastv")


def run_one(kind: str, model, processor, spec: dict) -> dict:
    import debias_core
    cfg = model.config
    s0_ids, extra = inputs(kind, model, processor, spec["image"])
    s0 = image_start(kind, s0_ids)
    # as FastV's inference_*.py do: config keys, then reset_fastv(); sys length = the real image start
    cfg.use_fast_v = True
    cfg.fast_v_inplace = spec["mode"] == "inplace"
    cfg.fast_v_sys_length = s0
    cfg.fast_v_image_token_length = SPAN
    cfg.fast_v_attention_rank = spec["rank"]
    cfg.fast_v_agg_layer = spec["agg"]
    model.model.reset_fastv()
    configure_debias(spec["debias"])
    layers = model.model.layers
    k = spec["agg"]
    kept, logits, hashes = [], [], []

    def on_layer_k(module, args, kwargs):
        if spec["mode"] == "mask":
            row = kwargs["attention_mask"][0, 0, -1, s0:s0 + SPAN]
            kept.append((row == 0).nonzero().flatten().tolist())
        else:
            pos = kwargs["position_ids"][0]
            kept.append((pos[(pos >= s0) & (pos < s0 + SPAN)] - s0).tolist())

    def on_lm_head(module, args, out):
        hashes.append(hashlib.sha256(out.detach().float().contiguous().numpy().tobytes()).hexdigest())
        logits.append(out[0, -1].double().tolist())

    def ramp(module, args, out):
        attn = out[1]
        flat = torch.full_like(attn, 1e-3)
        flat[..., -1, s0:s0 + SPAN] = 1e-3 * (1 + 1e-2 * torch.arange(SPAN, dtype=attn.dtype) / (SPAN - 1))
        return (out[0], flat) + tuple(out[2:])

    hooks = [layers[k].register_forward_pre_hook(on_layer_k, with_kwargs=True),
             model.lm_head.register_forward_hook(on_lm_head)]
    if spec.get("ramp"):
        hooks.append(layers[k - 1].register_forward_hook(ramp))
    result = {"span_start": s0}
    if "images" in extra:
        result["pixel_padding"] = pixel_padding(extra["images"][0])
    try:
        gen = dict(max_new_tokens=spec["steps"] + 1, do_sample=False, output_attentions=True,
                   use_cache=spec["mode"] == "mask", **extra)
        if spec.get("context", True):
            with debias_core.sample(image_size=tuple(spec["image"]), span_start=s0):
                with torch.inference_mode():
                    out = model.generate(s0_ids, **gen)
        else:
            with torch.inference_mode():
                out = model.generate(s0_ids, **gen)
        result["generated"] = out[0, s0_ids.shape[1]:].tolist()
    except debias_core.DebiasError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        for h in hooks:
            h.remove()
    result.update(kept=kept, logits=logits, logit_hashes=hashes)
    return result


def main(argv):
    action, kind, d = argv[1], argv[2], Path(argv[3])
    import transformers
    if action == "init":
        res = init(kind, d)
    else:
        import transformers.models.llama.modeling_llama as ml
        model, processor = load(kind, d)
        model.eval()
        res = {name: run_one(kind, model, processor, spec) for name, spec in json.loads(argv[4]).items()}
        res["_env"] = {"transformers_file": transformers.__file__, "modeling_llama": ml.__file__,
                       "calls_debias_core": "debias_core" in Path(ml.__file__).read_text()}
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv)
