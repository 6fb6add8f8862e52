"""Probe for TokenCarve (run in a subprocess by tests/baselines/test_tokencarve.py).

    python tokencarve_probe.py init DIR --tree T [--llava]      seeded tiny weights, saved once (safetensors)
    python tokencarve_probe.py run DIR --tree T --entry lm|llava --size W H [options]   prints one JSON line

``--tree`` is an exported TokenCarve tree (pristine or patched). Its two files are loaded with importlib as
transformers.models.llama.{configuration,modeling}_llama_tc and registered under the stock module names,
the in-process equivalent of TokenCarve/config.py (which copies them over site-packages; never run here).
``--entry llava`` needs upstream LLaVA (package ``llava``) on PYTHONPATH; it builds LlavaLlamaForCausalLM on
TokenCarve's Llama, as TokenCarve's loader gets it, and calls its generate with a padded image.

Mode (DEBIAS, DEBIAS_TREND, DEBIAS_METHOD) comes from the environment; the probe opens
``debias_core.sample(image_size=(W, H), span_start=s0)`` around generate, as the eval driver will.

Observation only (no behaviour change) unless ``--ramp`` is given:
  topk       every prefill top-k over the 576-token image window: {"k", "indices"} (AV, SV, fused in order)
  keep       LlamaModel.token_carve_img_index right after prefill (sorted kept sequence indices)
  keep_end   the same after the last decode step (original positions of the decoded tokens appended)
  layer_len  sequence length entering each decoder layer at prefill
  kv_len     key-cache length per layer after generate
  logits     lm_head output at the last position, per forward (prefill + decode steps)
  pixel_pad  (llava) per-patch fraction of processed pixels equal to the padding colour, raster order
``--ramp D`` replaces, at prefill, the last query row of layer K-1's attention over the image window by
1 + D*i (i = 0..575): content-flat scores with a recency trend, to check what the positional weight does.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

VOCAB, HIDDEN, LAYERS, HEADS, INTER = 512, 640, 4, 4, 256   # hidden >= 576: TokenCarve's SVD needs it
CLIP_HIDDEN = 32
IMAGE_TOKENS, TEXT_TOKENS, IMAGE_TOKEN_INDEX = 576, 20, -200


def install_tokencarve(tree: Path):
    """Load TokenCarve's Llama files under transformers.models.llama without touching site-packages."""
    import transformers.models.llama  # noqa: F401  (the package their relative imports need)
    for name in ("configuration_llama", "modeling_llama"):
        stock = f"transformers.models.llama.{name}"
        if stock in sys.modules:
            raise RuntimeError(f"{stock} was imported before TokenCarve's copy could replace it")
        spec = importlib.util.spec_from_file_location(f"{stock}_tc", tree / "TokenCarve" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = sys.modules[stock] = module
        spec.loader.exec_module(module)
    import transformers
    if not hasattr(transformers.LlamaModel, "reset_token_carve_parameter"):
        raise RuntimeError("transformers.LlamaModel is not TokenCarve's")
    return transformers


def llm_config_kwargs():
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048)


def llava_config(clip_dir: Path):
    from llava.model.language_model.llava_llama import LlavaConfig
    return LlavaConfig(**llm_config_kwargs(), mm_vision_tower=str(clip_dir), mm_hidden_size=CLIP_HIDDEN,
                       mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                       mm_patch_merge_type="flat", image_aspect_ratio="pad", mm_use_im_start_end=False)


def build_llava(clip_dir: Path):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    model = LlavaLlamaForCausalLM(llava_config(clip_dir))
    model.get_model().get_vision_tower().load_model()
    return model


def init(out: Path, tree: Path, with_llava: bool):
    from safetensors.torch import save_file
    transformers = install_tokencarve(tree)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "llm.safetensors").exists():
        torch.manual_seed(0)
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llm_config_kwargs()))
        save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / "llm.safetensors"))
    if with_llava and not (out / "projector.safetensors").exists():
        clip_dir = out / "clip"
        torch.manual_seed(1)
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=336, patch_size=14, projection_dim=CLIP_HIDDEN))
        clip.save_pretrained(clip_dir, safe_serialization=True)
        transformers.CLIPImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
            image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
        ).save_pretrained(clip_dir)
        torch.manual_seed(2)
        model = build_llava(clip_dir)
        state = {k: v for k, v in model.state_dict().items() if "mm_projector" in k}
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "projector.safetensors"))
    print(json.dumps({"ok": True}))


def set_token_carve(model, sys_length: int, nums: int, mode: int, weight: float):
    """What TokenCarve_model_vqa_loader.eval_model does after load_pretrained_model."""
    cfg = model.config
    cfg.use_token_carve = True
    cfg.token_carve_sys_length = sys_length
    cfg.token_carve_image_token_length = IMAGE_TOKENS
    cfg.token_carve_work_layer = 2
    cfg.token_carve_image_token_rank = int(nums / 2 * 3)
    cfg.token_carve_merge_token_nums = int(nums / 2)
    cfg.token_carve_SV_AV_mode = mode
    cfg.token_carve_SV_AV_weight = weight
    model.model.reset_token_carve_parameter()


def pixel_pad_fraction(pixels: torch.Tensor, image_processor) -> list:
    """[3, 336, 336] normalised pixels -> per-patch fraction equal to expand2square's fill colour."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    fill = (torch.tensor([int(m * 255) for m in image_processor.image_mean]).view(3, 1, 1) / 255 - mean) / std
    is_fill = ((pixels - fill).abs() < 0.02).all(0).float()          # [336, 336]
    return is_fill.view(24, 14, 24, 14).mean((1, 3)).reshape(-1).tolist()


def run(args):
    from safetensors.torch import load_file
    import debias_core
    transformers = install_tokencarve(args.tree)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    s0 = args.sys_length
    result = {}
    if args.entry == "lm":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llm_config_kwargs()))
        model.load_state_dict(load_file(str(args.dir / "llm.safetensors")))
        seq = s0 + IMAGE_TOKENS + TEXT_TOKENS
        embeds = torch.from_numpy(rng.standard_normal((1, seq, HIDDEN)).astype(np.float32))
        gen_inputs = dict(inputs_embeds=embeds)
    else:
        from PIL import Image
        from llava.mm_utils import process_images
        model = build_llava(args.dir / "clip")
        state = load_file(str(args.dir / "llm.safetensors"))
        state.update(load_file(str(args.dir / "projector.safetensors")))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("vision_tower" not in k for k in missing):
            raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        w, h = args.size
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        processor = model.get_model().get_vision_tower().image_processor
        pixels = process_images([image], processor, model.config)
        result["pixel_pad"] = pixel_pad_fraction(pixels[0], processor)
        ids = rng.integers(3, VOCAB, s0 + 1 + TEXT_TOKENS)
        ids[s0] = IMAGE_TOKEN_INDEX
        gen_inputs = dict(inputs=torch.from_numpy(ids).unsqueeze(0), images=pixels, image_sizes=[tuple(args.size)])
    model.eval()
    set_token_carve(model, s0, args.nums, args.sv_av_mode, args.sv_av_weight)
    inner = model.get_model() if args.entry == "llava" else model.model
    work = inner.token_carve_work_layer

    topk_calls, layer_len, logits, keep = [], [], [], {}
    prefill = {"on": True}
    original_topk = torch.Tensor.topk

    def recording_topk(self, k, *a, **kw):
        out = original_topk(self, k, *a, **kw)
        if prefill["on"] and self.dim() == 1 and self.shape[0] == IMAGE_TOKENS:
            topk_calls.append({"k": int(k), "indices": out.indices.tolist()})
        return out

    torch.Tensor.topk = recording_topk

    def before_layer(module, layer_args):
        hidden = layer_args[0]
        if hidden.shape[1] > 1:
            layer_len.append(int(hidden.shape[1]))
            if module is inner.layers[work]:
                keep["prefill"] = inner.token_carve_img_index.tolist()
        elif module is inner.layers[-1]:
            prefill["on"] = False

    for layer in inner.layers:
        layer.register_forward_pre_hook(before_layer)
    model.lm_head.register_forward_hook(lambda m, i, o: logits.append(o[0, -1].tolist()))
    if args.ramp:
        ramp = 1.0 + args.ramp * torch.arange(IMAGE_TOKENS, dtype=torch.float32)

        def flat_with_recency(module, layer_args, out):
            if out[1] is None or out[1].shape[-2] == 1:
                return out
            attn = out[1].clone()
            attn[:, :, -1, s0:s0 + IMAGE_TOKENS] = (ramp / ramp.sum()).to(attn.dtype)
            return (out[0], attn, *out[2:])

        inner.layers[work - 1].register_forward_hook(flat_with_recency)

    with torch.inference_mode(), debias_core.sample(image_size=tuple(args.size), span_start=s0):
        out = model.generate(**gen_inputs, max_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
                             use_cache=True, output_attentions=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
    torch.Tensor.topk = original_topk
    result.update(topk=topk_calls, keep=keep.get("prefill"), keep_end=inner.token_carve_img_index.tolist(),
                  layer_len=layer_len, kv_len=[int(kv[0].shape[-2]) for kv in out.past_key_values],
                  logits=logits, tokens=out.sequences[0].tolist(), work_layer=work)
    print(json.dumps(result))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=("init", "run"))
    p.add_argument("dir", type=Path)
    p.add_argument("--tree", type=Path, required=True)
    p.add_argument("--llava", action="store_true", help="init: also save a tiny CLIP tower and projector")
    p.add_argument("--entry", choices=("lm", "llava"), default="lm")
    p.add_argument("--size", type=int, nargs=2, default=(640, 200), metavar=("W", "H"))
    p.add_argument("--sys-length", type=int, default=35)
    p.add_argument("--nums", type=int, default=64)
    p.add_argument("--sv-av-mode", type=int, default=0)
    p.add_argument("--sv-av-weight", type=float, default=0.5)
    p.add_argument("--ramp", type=float, default=0.0)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.action == "init":
        init(args.dir, args.tree, args.llava)
    else:
        run(args)


if __name__ == "__main__":
    main()
