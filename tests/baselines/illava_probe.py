"""Probe: a tiny random Qwen2 through iLLaVA's Qwen2Model.forward_illava (its transformers 4.46.0 fork), on CPU.

PYTHONPATH must start with an iLLaVA tree's src/transformers-4.46.0/src (pristine or patched) so that the fork
shadows the PyPI wheel. The LLM sees what LLaVA-OneVision gives it: a 14-token qwen_1_5 system prefix, then
729 "visual" embeddings (27×27, random; identical with --flat), then 6 text tokens, as inputs_embeds.
generate goes through Qwen2ForCausalLM.forward_illava exactly as LlavaQwenForCausalLM_training_free.forward
routes it (illava_config and image_token_length passed, no cache_position).

Probe-only stand-in: iLLaVA's merge calls ``values.get_device()``, which is −1 on CPU, and ``.to(-1)`` fails;
while the model runs, ``Tensor.get_device`` returns the device object for CPU tensors.

    python illava_probe.py init --weights W.safetensors
    python illava_probe.py run --weights W.safetensors --image-size 640 200 --debias off [--trend T.json]
                               [--flat] [--no-cache] [--start S] [--no-context]

`run` prints one JSON line:
    kept:     original visual positions (0..728) of the tokens the pruned layer sees, from that layer's
              position ids (recovered here independently of the patch)
    n_kept:   their count; r: the merge count actually used (729 − n_kept)
    prefill:  per decoder layer, the sequence length it saw at prefill
    decode:   per decode step, per layer, [position id, that layer's KV-cache length before the step]
    sequences, logits: generated ids and per-step fp32 logits (with --no-cache: one forward, last-token logits)
"""
from __future__ import annotations

import argparse
import json

from probe_support import configure_debias, require_tree_module  # this folder: first on sys.path

PREFIX, N_IMAGE, SUFFIX = 14, 729, 6  # qwen_1_5 system prefix; SigLIP-so400m/384 27×27 tokens; question
GRID, RESOLUTION = 27, 378            # 27 patches of 14 px (SigLIP's conv covers 378 of the 384 px)
LAYERS, K, KEEP = 3, [2], 0.7         # prune at layer 2 with layer 1's attention; iLLaVA's image keep ratio
NEW_TOKENS = 4
VOCAB = 128


def build_model():
    import torch
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    require_tree_module(transformers, "the fork under test")

    class Entry(Qwen2ForCausalLM):
        """LlavaQwenForCausalLM_training_free.forward's LLM call (llava_qwen_training_free.py L154-170)."""

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                    return_dict=None, cache_position=None, illava_config=None, image_token_length=None, **kwargs):
            return self.forward_illava(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                       use_cache=use_cache, output_attentions=output_attentions,
                                       output_hidden_states=output_hidden_states, return_dict=return_dict,
                                       illava_config=illava_config, image_token_length=image_token_length)

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    config._attn_implementation = "sdpa"  # lmms-eval's default; forward_illava asks layer k-1 for eager weights
    torch.manual_seed(0)
    return Entry(config).eval()


def init(args) -> dict:
    from safetensors.torch import save_file
    model = build_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights)
    return {"weights": args.weights}


def inputs(model, flat: bool):
    import torch
    g = torch.Generator().manual_seed(7)
    text = torch.randint(3, VOCAB, (PREFIX + SUFFIX,), generator=g)
    visual = torch.randn(N_IMAGE, model.config.hidden_size, generator=g)
    if flat:
        visual = visual[:1].expand(N_IMAGE, -1)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([embed(text[:PREFIX]), visual, embed(text[PREFIX:])]).unsqueeze(0)
    return embeds, torch.ones(embeds.shape[:2], dtype=torch.long)


def run(args) -> dict:
    configure_debias(args.debias, args.trend)
    import contextlib
    import torch
    import debias_core
    from safetensors.torch import load_file

    model = build_model()
    model.load_state_dict(load_file(args.weights), strict=True)
    if args.flat:  # layer K-1's keys all zero: every query sees exactly uniform attention (tied scores)
        for layer in (k - 1 for k in K):
            model.model.layers[layer].self_attn.k_proj.weight.data.zero_()
            model.model.layers[layer].self_attn.k_proj.bias.data.zero_()
    model.generation_config.eos_token_id = None  # always generate NEW_TOKENS tokens
    illava_config = {"illava_llm_k": list(K), "illava_llm_r": KEEP, "illava_track_llm_source": False,
                     "illava_llm_image_token_start_index": args.start}

    calls = []

    def pre_hook(module, hargs, kwargs):
        hidden = hargs[0] if hargs else kwargs["hidden_states"]
        cache = kwargs.get("past_key_value")
        kv = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        calls.append((module.self_attn.layer_idx, hidden.shape[1], kwargs["position_ids"][0].tolist(), kv))

    for layer in model.model.layers:
        layer.register_forward_pre_hook(pre_hook, with_kwargs=True)

    embeds, mask = inputs(model, args.flat)
    ctx = contextlib.nullcontext() if args.no_context else debias_core.sample(
        image_size=tuple(args.image_size), preprocess="pad", grid=GRID, resolution=RESOLUTION,
        span_start=PREFIX, span_length=N_IMAGE)
    get_device = torch.Tensor.get_device
    torch.Tensor.get_device = lambda t: t.device if t.device.type == "cpu" else get_device(t)
    try:
        with torch.inference_mode(), ctx:
            if args.no_cache:
                out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                            illava_config=illava_config, image_token_length=N_IMAGE)
                sequences, logits = [], [out.logits[0, -1].tolist()]
            else:
                out = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                                     max_new_tokens=NEW_TOKENS, use_cache=True, output_scores=True,
                                     return_dict_in_generate=True, illava_config=illava_config,
                                     image_token_length=N_IMAGE)
                sequences = out.sequences.tolist()
                logits = [[float(x) for x in step[0]] for step in out.scores]
    finally:
        torch.Tensor.get_device = get_device

    steps = 1 if args.no_cache else NEW_TOKENS
    if len(calls) != LAYERS * steps:
        raise SystemExit(f"expected {LAYERS * steps} decoder-layer calls, got {len(calls)}")
    pruned = calls[K[0]][2]  # position ids the first pruned layer sees at prefill
    kept = [p - PREFIX for p in pruned if PREFIX <= p < PREFIX + N_IMAGE]  # the true span: 14 prefix tokens
    return {
        "kept": kept,
        "n_kept": len(kept),
        "r": N_IMAGE - len(kept),
        "prefill": [length for _, length, _, _ in calls[:LAYERS]],
        "decode": [[[pos[-1], kv] for _, _, pos, kv in calls[s * LAYERS:(s + 1) * LAYERS]] for s in range(1, steps)],
        "sequences": sequences,
        "logits": logits,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["init", "run"])
    p.add_argument("--weights", required=True, help="safetensors file written by `init`")
    p.add_argument("--image-size", type=int, nargs=2, default=[640, 200], metavar=("W", "H"))
    p.add_argument("--debias", default="off", choices=["off", "pad", "pos", "full"])
    p.add_argument("--trend", default=None, help="DEBIAS_TREND (pos and full): a trend JSON file")
    p.add_argument("--flat", action="store_true", help="one visual embedding everywhere, zero layer K-1 keys")
    p.add_argument("--no-cache", action="store_true", help="one forward with use_cache=False (the no-cache site)")
    p.add_argument("--start", type=int, default=PREFIX, help="upstream's illava_llm_image_token_start_index (the true start is 14)")
    p.add_argument("--no-context", action="store_true", help="run without a debias_core sample context")
    args = p.parse_args()
    result = init(args) if args.command == "init" else run(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
