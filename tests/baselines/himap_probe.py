"""Probe for tests/baselines/test_himap.py: drives HiMAP's own LLaVA-1.1.3 model class in a fresh interpreter.

    python himap_probe.py init ROOT SPECS_JSON           # tiny random LLaVAs + CLIP tower + tokenizer, saved
    python himap_probe.py run ROOT OUT_DIR CASES_JSON      # generate (prefill + decode steps) per case
    python himap_probe.py entry MODEL_DIR OUT_DIR CASE_JSON  # the eval path: load_pretrained_model → generate

PYTHONPATH must start with a HiMAP tree's ``src/LLaVA`` (pristine or patched): both trees load the same saved
weights. Everything is observed from outside HiMAP's code: forward pre-hooks on the decoder layers read the
``position_ids`` HiMAP passes after each pruning stage (the original sequence index of every kept token), a hook
on ``lm_head`` keeps the logits, and ``debias_core.recording()`` keeps what the patched sites handed to
debias_core. Prints one JSON line last.
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import debias_core
from probe_support import train_tokenizer  # this folder: first on sys.path

SPM_WORDS = ("a chat between curious human and an artificial intelligence assistant the gives helpful detailed "
             "polite answers to human's questions USER: ASSISTANT: what is color of image in on picture left right "
             "describe cat dog red blue yes no ? . , \n").split(" ")


def _prompt(question: str) -> str:
    from llava.conversation import conv_templates
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def _input_ids(tok, question: str) -> tuple[torch.Tensor, int]:
    """[1, T] ids with IMAGE_TOKEN_INDEX, and s0 = the index of that placeholder (first visual token)."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token
    ids = tokenizer_image_token(_prompt(question), tok, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    where = (ids[0] == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    if len(where) != 1:
        raise SystemExit(f"expected one image placeholder in the prompt ids, found {len(where)}")
    return ids, where[0]


def init_one(model_dir: Path, spec: dict, tok_files: Path | None) -> dict:
    """Save a tiny LLaVA (HiMAP's LlavaLlamaForCausalLM: 3 Llama layers, hidden 64, 4 heads) with a tiny CLIP
    ViT at the real 336 px / patch 14 geometry (24×24 = 576 visual tokens) and a real tokenizer.

    spec: {"seed", "R_t", "R_i", "variant": "random" | "flat" | "recency"}. ``flat`` zeroes layer 0's query
    projection: every text→image attention of the stage-1 layer is then exactly equal (tied scores).
    ``recency`` makes the stage-1 scores rise strictly and slowly with image position (a small recency bias):
    identical image embeddings, and query/key both on the lowest RoPE frequency, so the score falls with the
    query-key distance.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    torch.manual_seed(spec["seed"])
    model_dir.mkdir(parents=True, exist_ok=True)
    clip_dir = model_dir / "clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=336, patch_size=14, projection_dim=32)).save_pretrained(str(clip_dir))
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(str(clip_dir))
    if tok_files is None:
        tok = train_tokenizer(model_dir, SPM_WORDS)
    else:
        from transformers import LlamaTokenizer
        tok = LlamaTokenizer(vocab_file=str(tok_files), legacy=True)
        tok.save_pretrained(str(model_dir))
    _, s0 = _input_ids(tok, "what is the color of the dog?")
    cfg = LlavaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=2048, use_cache=False,
                      mm_vision_tower=str(clip_dir.resolve()), mm_hidden_size=32, mm_vision_select_layer=-2,
                      mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu", image_aspect_ratio="pad",
                      mm_use_im_start_end=False, mm_use_im_patch_token=False,
                      use_hmap_v=True, hmap_v_sys_length=s0, hmap_v_img_length=576,
                      hmap_v_attn_txt_layer=1, hmap_v_attn_txt_rank=spec["R_t"],
                      hmap_v_attn_img_layer=2, hmap_v_attn_img_rank=spec["R_i"])
    model = LlavaLlamaForCausalLM(cfg).eval()
    variant = spec.get("variant", "random")
    with torch.no_grad():
        attn0 = model.model.layers[0].self_attn
        if variant == "flat":
            attn0.q_proj.weight.zero_()
        elif variant == "recency":
            # Channel 0 is 1 for every token (text: embedding column; image: projector bias); the other channels
            # are small noise for text and 0 for image tokens, so after RMSNorm channel 0 is ≈ 8. q and k read
            # only channel 0 into dim 7 of each head (RoPE pair 7/15, the slowest frequency θ ≈ 3.2e-4 rad per
            # position): q = 1, k = 64, score = 64/√16·cos(θ·distance) = 16·cos(θ·distance), softly recent.
            model.model.embed_tokens.weight[:, 0] = 1.0
            proj_out = model.model.mm_projector[-1]
            proj_out.weight.zero_()
            proj_out.bias.zero_()
            proj_out.bias[0] = 1.0
            attn0.q_proj.weight.zero_()
            attn0.k_proj.weight.zero_()
            for h in range(cfg.num_attention_heads):
                attn0.q_proj.weight[h * 16 + 7, 0] = 1.0 / 8
                attn0.k_proj.weight[h * 16 + 7, 0] = 8.0
        elif variant != "random":
            raise SystemExit(f"unknown variant {variant!r}; use random, flat or recency")
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return {"s0": s0, "vocab": len(tok)}


def init(root: Path, specs: dict) -> dict:
    """One model folder root/llava-tiny-<name> per spec (the name must contain "llava" for HiMAP's loader)."""
    out, tok_files = {}, None
    for name, spec in specs.items():
        model_dir = root / f"llava-tiny-{name}"
        out[name] = init_one(model_dir, spec, tok_files)
        tok_files = tok_files or model_dir / "spm.model"
    return out


def _image(size, seed: int) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pixel_valid(pixels: torch.Tensor, processor) -> list[int]:
    """Raster indices of 14-px patches of the processed [3, 336, 336] image that are ≤ 50 % pad colour."""
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    pad = (torch.tensor([int(255 * m) for m in processor.image_mean]).view(3, 1, 1) / 255 - mean) / std
    is_pad = ((pixels.float() - pad).abs() < 0.02).all(0).float()           # [336, 336]
    frac = is_pad.view(24, 14, 24, 14).mean((1, 3)).flatten()
    return (frac <= 0.5).nonzero().flatten().tolist()


class _Observer:
    """Per forward: kept original positions after stage 1 and stage 2, full length, logits."""

    def __init__(self, model):
        self.forwards, self.logits = [], []
        cfg = model.config
        layers = model.get_model().layers
        self.handles = [
            layers[0].register_forward_pre_hook(self._start, with_kwargs=True),
            layers[cfg.hmap_v_attn_txt_layer].register_forward_pre_hook(self._stage("stage1"), with_kwargs=True),
            layers[cfg.hmap_v_attn_img_layer].register_forward_pre_hook(self._stage("stage2"), with_kwargs=True),
            model.lm_head.register_forward_hook(lambda m, a, out: self.logits.append(out.detach().clone())),
        ]

    def _start(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.forwards.append({"length": int(hidden.shape[1])})

    def _stage(self, name):
        def hook(module, args, kwargs):
            self.forwards[-1][name] = kwargs["position_ids"][0].tolist()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _generate(model, tok, processor, case: dict, dtype) -> dict:
    from llava.mm_utils import process_images
    img = _image(case["image_size"], case.get("image_seed", 0))
    if case.get("preprocess", "pad") == "pad":
        pixels = process_images([img], processor, model.config)         # expand2square + CLIP processor
    else:
        pixels = processor.preprocess(img, return_tensors="pt")["pixel_values"]   # centre crop (model_vqa.py)
    ids, s0 = _input_ids(tok, case.get("question", "what is the color of the dog?"))
    if s0 != model.config.hmap_v_sys_length:
        raise SystemExit(f"image placeholder at {s0} but hmap_v_sys_length={model.config.hmap_v_sys_length}")
    debias_core.configure(mode=case["mode"], trend=case.get("trend"), method="himap")
    obs = _Observer(model)
    n_new = case.get("new_tokens", 3)
    # "no_context": DEBIAS=off needs no per-sample context (an eval driver may skip it)
    context = (contextlib.nullcontext() if case.get("no_context") else
               debias_core.sample(image_size=tuple(case["image_size"]), span_start=s0,
                                  preprocess=case.get("preprocess", "pad")))
    try:
        with context, debias_core.recording() as rec, torch.inference_mode():
            out = model.generate(ids, images=pixels.to(dtype), do_sample=False, max_new_tokens=n_new,
                                 min_new_tokens=n_new, use_cache=False, output_attentions=True)
    finally:
        obs.close()
    img_len = model.config.hmap_v_img_length
    forwards = []
    for f in obs.forwards:
        row = {"length": f["length"]}
        for name in ("stage1", "stage2"):
            pos = f.get(name, [])
            row[name] = [p - s0 for p in pos if s0 <= p < s0 + img_len]
            row[name + "_text"] = sum(1 for p in pos if p >= s0 + img_len)
            row[name + "_sys"] = sum(1 for p in pos if p < s0)
        forwards.append(row)
    recorded = {str(st): [{"positions": p.tolist(), "n": len(s)} for p, s in rec.rows[st]] for st in rec.stages}
    # the kept set each patched site should produce from what it recorded (debias_core applied here, same mode)
    expected = {}
    with debias_core.sample(image_size=tuple(case["image_size"]), span_start=s0, preprocess=case.get("preprocess", "pad")):
        for st in rec.stages:
            k_cfg = model.config.hmap_v_attn_txt_rank if st == 0 else model.config.hmap_v_attn_img_rank
            rows = []
            for p, s in rec.rows[st]:
                k = debias_core.keep_cap(min(k_cfg, len(s)))
                d = debias_core.debias(torch.from_numpy(s).float(), torch.from_numpy(p), stage=st)
                rows.append(sorted(p[d.topk(k).indices.numpy()].tolist()))
            expected[str(st)] = rows
    return {"s0": s0, "input_ids": ids[0].tolist(), "generated": out[0, ids.shape[1]:].tolist(),
            "forwards": forwards, "recorded": recorded, "expected": expected,
            "pixel_valid": _pixel_valid(pixels[0], processor) if case.get("preprocess", "pad") == "pad" else None,
            "logits": obs.logits}


def _load_fp32(model_dir: Path):
    from transformers import AutoTokenizer
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    model = LlavaLlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    tower = model.get_vision_tower()
    tower.load_model()
    return model, AutoTokenizer.from_pretrained(str(model_dir), use_fast=False), tower.image_processor


def run(root: Path, out_dir: Path, cases: list) -> dict:
    """fp32 models loaded with from_pretrained (HiMAP's class); one generate per case (case["model"] = name)."""
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    models, results = {}, {}
    for case in cases:
        if case["model"] not in models:
            models[case["model"]] = _load_fp32(root / f"llava-tiny-{case['model']}")
        model, tok, processor = models[case["model"]]
        r = _generate(model, tok, processor, case, torch.float32)
        logits = r.pop("logits")
        save_file({f"forward{i}": t[0].contiguous() for i, t in enumerate(logits)}, str(out_dir / f"{case['name']}.safetensors"))
        r["logits_file"] = str(out_dir / f"{case['name']}.safetensors")
        results[case["name"]] = r
    return results


def entry(model_dir: Path, out_dir: Path, case: dict) -> dict:
    """The eval driver's path (HiMAP's eval_scivqa.py on CPU): load_pretrained_model, set the HiMAP config on
    model.config, reset_hmapv(), then generate with use_cache=False and output_attentions=True."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model
    tok, model, processor, _ = load_pretrained_model(str(model_dir), None, get_model_name_from_path(str(model_dir)),
                                                     device_map="cpu", device="cpu")
    model.config.use_hmap_v = True
    model.config.hmap_v_attn_txt_rank = case["R_t"]
    model.config.hmap_v_attn_img_rank = case["R_i"]
    model.model.reset_hmapv()
    r = _generate(model, tok, processor, case, torch.float16)
    logits = r.pop("logits")
    r["dtype"] = str(logits[0].dtype)
    r["finite"] = all(bool(torch.isfinite(t).all()) for t in logits)
    return r


def main(argv):
    cmd = argv[0]
    if cmd == "init":
        out = init(Path(argv[1]), json.loads(argv[2]))
    elif cmd == "run":
        out = run(Path(argv[1]), Path(argv[2]), json.loads(Path(argv[3]).read_text()))
    elif cmd == "entry":
        out = entry(Path(argv[1]), Path(argv[2]), json.loads(argv[3]))
    else:
        raise SystemExit(f"unknown command {cmd!r}; use init, run or entry")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
