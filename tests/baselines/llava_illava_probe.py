"""Probe: a tiny random LLaVA-1.5 (eval/tiny_llava.py, 3 decoder layers) through upstream LLaVA's own loader,
process_images, tokenizer_image_token and LlavaLlamaForCausalLM.generate, with or without the iLLaVA port of
patches/LLaVA (run in a subprocess; PYTHONPATH must start with a LLaVA tree, pristine or patched).

Probe-only stand-in: .venv-test has no `accelerate`, so the loader's low_cpu_mem_usage/device_map hints are
dropped (on a CPU they change how, not what, is loaded). The model is cast to fp32 after loading.

    python llava_illava_probe.py init OUT
    python llava_illava_probe.py run OUT --image-size 640 200 [--illava] [--debias off] [--trend T] [--flat]
                                     [--text-only] [--no-cache] [--attn eager|sdpa]

`run` prints one JSON line:
    span_start: s0, the IMAGE_TOKEN_INDEX position in input_ids
    kept:       original visual positions (0..575) of the tokens layer K sees at (the first) prefill, from its
                position ids (recovered here, independently of the port)
    prefill:    per decoder layer, the sequence length it saw at (the first) prefill
    decode:     per decode step, per layer, [position id, that layer's KV-cache length before the step]
    sequences, logits: generated ids and per-step fp32 logits
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from probe_support import configure_debias, require_tree_module  # this folder: first on sys.path

LAYERS, K, R = 3, 2, 576 - 128  # the port's defaults: layer 2 (FastV's K), 128 visual tokens kept
NEW_TOKENS = 4
ROOT = Path(__file__).resolve().parents[2]


def check_tree():
    import llava
    require_tree_module(llava)


def init(out: Path) -> dict:
    check_tree()
    sys.path.insert(0, str(ROOT))
    from eval.tiny_llava import build_tiny_llava
    return {"model": str(build_tiny_llava(out / "tiny-llava", layers=LAYERS))}


def load(model_dir: Path, attn: str):
    import torch
    from llava.model.builder import load_pretrained_model
    if importlib.util.find_spec("accelerate") is None:
        from transformers import CLIPVisionModel
        from llava.model import LlavaLlamaForCausalLM
        for cls in (LlavaLlamaForCausalLM, CLIPVisionModel):
            original = cls.from_pretrained.__func__

            def from_pretrained(klass, *args, _original=original, **kwargs):
                kwargs.pop("low_cpu_mem_usage", None)
                kwargs.pop("device_map", None)
                return _original(klass, *args, **kwargs)

            cls.from_pretrained = classmethod(from_pretrained)
    tokenizer, model, processor, _ = load_pretrained_model(str(model_dir), None, model_dir.name, device="cpu",
                                                           attn_implementation=attn)
    return tokenizer, model.to(torch.float32).eval(), processor


def run(args) -> dict:
    configure_debias(args.debias, args.trend)
    check_tree()
    import numpy as np
    import torch
    from PIL import Image
    import debias_core
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    tokenizer, model, processor = load(args.out / "tiny-llava", args.attn)
    if args.illava:
        model.config.illava_llm_k, model.config.illava_llm_r = K, R
    if args.flat:  # zero layer K-1's keys: the last token's attention is exactly uniform (tied scores)
        model.model.layers[K - 1].self_attn.k_proj.weight.data.zero_()
    model.generation_config.eos_token_id = None  # always generate NEW_TOKENS tokens

    question = "What color is the shape? Answer the question using a single word or phrase."
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], question if args.text_only else DEFAULT_IMAGE_TOKEN + "\n" + question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    size = tuple(args.image_size)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pixels = None if args.text_only else process_images([image], processor, model.config).to(torch.float32)
    s0 = None if args.text_only else int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])

    calls = []

    def pre_hook(module, hargs, kwargs):
        hidden = hargs[0] if hargs else kwargs["hidden_states"]
        cache = kwargs.get("past_key_value")
        kv = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        calls.append((hidden.shape[1], kwargs["position_ids"][0].tolist(), kv))

    for layer in model.model.layers:
        layer.register_forward_pre_hook(pre_hook, with_kwargs=True)

    extra = {} if args.text_only else {"images": pixels, "image_sizes": [size]}
    with torch.inference_mode(), debias_core.sample(image_size=None if args.text_only else size, span_start=s0):
        out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, use_cache=not args.no_cache,
                             output_scores=True, return_dict_in_generate=True, **extra)

    if len(calls) != LAYERS * NEW_TOKENS:
        raise SystemExit(f"expected {LAYERS * NEW_TOKENS} decoder-layer calls, got {len(calls)}")
    kept = [] if s0 is None else [p - s0 for p in calls[K][1] if s0 <= p < s0 + 576]
    return {
        "span_start": s0,
        "kept": kept,
        "prefill": [length for length, _, _ in calls[:LAYERS]],
        "decode": [[[pos[-1], kv] for _, pos, kv in calls[s * LAYERS:(s + 1) * LAYERS]] for s in range(1, NEW_TOKENS)],
        "sequences": out.sequences.tolist(),
        "logits": [[float(x) for x in step[0]] for step in out.scores],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["init", "run"])
    p.add_argument("out", type=Path, help="folder holding the tiny model (written by `init`)")
    p.add_argument("--image-size", type=int, nargs=2, default=[640, 200], metavar=("W", "H"))
    p.add_argument("--illava", action="store_true", help=f"enable the port: illava_llm_k={K}, illava_llm_r={R}")
    p.add_argument("--debias", default="off", choices=["off", "pad", "pos", "full"])
    p.add_argument("--trend", default=None, help="DEBIAS_TREND (pos and full), e.g. paper:fastv")
    p.add_argument("--flat", action="store_true", help="zero layer K-1's keys: tied scores")
    p.add_argument("--text-only", action="store_true", help="no image (span_start None): nothing to prune")
    p.add_argument("--no-cache", action="store_true", help="generate with use_cache=False (prefill every step)")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    args = p.parse_args()
    print(json.dumps(init(args.out) if args.command == "init" else run(args)))


if __name__ == "__main__":
    main()
