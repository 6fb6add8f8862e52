"""Probe: a tiny random LLaVA-1.5 through PyramidDrop's own generate, on CPU (run in a subprocess).

PYTHONPATH must start with a PyramidDrop tree (pristine or patched) so that its `llava` package shadows
any installed one. The vision tower is a stub (a learned [576, 64] feature table) — the ranking site only
sees features, so this is enough to reach every pdrop_rank_drop stage; everything after it (projector,
prepare_inputs_labels_for_multimodal_pdrop, pdrop_forward, LlamaForCausalLM.generate) is upstream code.

    python pdrop_probe.py init --weights W.safetensors
    python pdrop_probe.py run --weights W.safetensors --image-size 640 200 --debias off [--trend T] [--flat]

`run` prints one JSON line:
    kept:      per stage, the original raster positions (0..575) of the visual tokens kept, sorted
               (recovered here from the top-k calls, independently of the patch's own bookkeeping)
    k:         per stage, the keep count passed to top-k
    prefill:   per decoder layer, the sequence length it saw at prefill
    decode:    per decode step, per layer, [position id, that layer's KV-cache length before the step]
    sequences: generated token ids;  logits: per step, the 128 fp32 logits (exact float repr)
"""
from __future__ import annotations

import argparse
import json

from probe_support import configure_debias, require_tree_module  # this folder: first on sys.path

LAYER_LIST = [1, 2, 3]
RATIOS = [0.32, 0.16, 0.08]           # the paper's schedule; eval scripts prepend 1.0
PROMPT_PREFIX, PROMPT_SUFFIX = 35, 4  # vicuna_v1: 35 tokens before the image; 4 after
NEW_TOKENS = 4


def build_model():
    import torch
    from torch import nn
    import llava
    from llava.model.language_model.llava_llama_pdrop import LlavaConfig, LlavaLlamaForCausalLM_PDrop
    from llava.model.multimodal_projector.builder import build_vision_projector

    require_tree_module(llava)

    class StubTower(nn.Module):
        """images [B, 3, 336, 336] -> features [B, 576, 64] (a learned table, identical for every image)."""

        def __init__(self):
            super().__init__()
            self.features = nn.Parameter(torch.randn(576, 64))

        def forward(self, images):
            return self.features.to(images.dtype).expand(images.shape[0], -1, -1)

    config = LlavaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         mm_hidden_size=64, mm_projector_type="mlp2x_gelu", image_aspect_ratio="pad",
                         mm_patch_merge_type="flat", tokenizer_padding_side="right",
                         tokenizer_model_max_length=2048)
    config._attn_implementation = "sdpa"  # upstream's inference path; eager breaks pdrop_rank_drop
    model = LlavaLlamaForCausalLM_PDrop(config)
    model.model.vision_tower = StubTower()
    model.model.mm_projector = build_vision_projector(config)
    return model.eval()


def prompt_ids():
    import torch
    from llava.constants import IMAGE_TOKEN_INDEX
    g = torch.Generator().manual_seed(7)
    text = torch.randint(3, 128, (PROMPT_PREFIX + PROMPT_SUFFIX,), generator=g)
    ids = torch.cat([torch.tensor([1]), text[1:PROMPT_PREFIX], torch.tensor([IMAGE_TOKEN_INDEX]), text[PROMPT_PREFIX:]])
    return ids.unsqueeze(0)


def init(args) -> dict:
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = build_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights)
    return {"weights": args.weights}


def _int(position_ids) -> int:
    if position_ids is None:
        return -1
    if isinstance(position_ids, list):  # pdrop_forward turns them into a list after a decode shift
        position_ids = position_ids[0]
    return int(position_ids.reshape(-1)[-1])


def run(args) -> dict:
    configure_debias(args.debias, args.trend, DEBIAS_METHOD="pdrop")  # pdrop: the paper's pad threshold 0.01
    import torch
    import debias_core
    from safetensors.torch import load_file

    model = build_model()
    model.load_state_dict(load_file(args.weights), strict=True)
    if args.flat:  # zero keys in the layers whose Q/K pdrop recomputes: exactly flat (tied) scores
        for layer in LAYER_LIST:
            model.model.layers[layer].self_attn.k_proj.weight.data.zero_()
    model.model.layer_list = list(LAYER_LIST)
    model.model.image_token_ratio_list = [1.0] + RATIOS
    model.generation_config.eos_token_id = None  # always generate NEW_TOKENS tokens

    topk_calls, layer_calls = [], []
    original_topk = torch.Tensor.topk

    def recording_topk(self, k, *a, **kw):
        out = original_topk(self, k, *a, **kw)
        topk_calls.append((int(k), out.indices.clone()))
        return out

    def pre_hook(module, hargs, kwargs):
        hidden = hargs[0] if hargs else kwargs["hidden_states"]
        cache = kwargs.get("past_key_value")
        kv = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        layer_calls.append((module.self_attn.layer_idx, hidden.shape[1], _int(kwargs["position_ids"]), kv))

    for layer in model.model.layers:
        layer.register_forward_pre_hook(pre_hook, with_kwargs=True)

    ids = prompt_ids()
    span_start = int((ids[0] < 0).nonzero()[0])  # the image placeholder's real position (35)
    images = torch.zeros(1, 3, 336, 336)
    torch.Tensor.topk = recording_topk
    try:
        with torch.inference_mode(), debias_core.sample(image_size=tuple(args.image_size), span_start=span_start):
            out = model.generate(ids, images=images, image_sizes=[tuple(args.image_size)], do_sample=False,
                                 max_new_tokens=NEW_TOKENS, use_cache=True, output_scores=True,
                                 return_dict_in_generate=True)
    finally:
        torch.Tensor.topk = original_topk

    n_layers = len(model.model.layers)
    if len(topk_calls) != len(LAYER_LIST) or len(layer_calls) != n_layers * NEW_TOKENS:
        raise SystemExit(f"expected {len(LAYER_LIST)} top-k calls (prefill only) and {n_layers * NEW_TOKENS} layer "
                         f"calls; got {len(topk_calls)} and {len(layer_calls)}")
    positions, kept = torch.arange(576), []
    for k, index in topk_calls:
        positions = positions[index.sort().values]
        kept.append(positions.tolist())
    return {
        "span_start": span_start,
        "kept": kept,
        "k": [k for k, _ in topk_calls],
        "prefill": [length for _, length, _, _ in layer_calls[:n_layers]],
        "decode": [[[pos, kv] for _, _, pos, kv in layer_calls[s * n_layers:(s + 1) * n_layers]]
                   for s in range(1, NEW_TOKENS)],
        "sequences": out.sequences.tolist(),
        "logits": [[float(x) for x in step[0]] for step in out.scores],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["init", "run"])
    p.add_argument("--weights", required=True, help="safetensors file written by `init`")
    p.add_argument("--image-size", type=int, nargs=2, default=[640, 200], metavar=("W", "H"))
    p.add_argument("--debias", default="off", choices=["off", "pad", "pos", "full"])
    p.add_argument("--trend", default=None, help="DEBIAS_TREND, e.g. paper:pdrop/gqa (pos and full)")
    p.add_argument("--flat", action="store_true", help="zero the ranking layers' keys: tied scores")
    args = p.parse_args()
    result = init(args) if args.command == "init" else run(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
