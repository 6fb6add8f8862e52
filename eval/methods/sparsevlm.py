"""SparseVLMs (key ``sparsevlm``): text-guided visual-token sparsification, from third_party/SparseVLMs (v1.5).

What SparseVLMs' own eval modules do (llava/eval/model_vqa_loader.py L84–115; model_vqa_science.py and
model_vqa_mmbench.py alike), reproduced here:
  - ``load_pretrained_model(path, base, name)`` with its default ``dynamic_sparse=True`` →
    ``LlavaLlamaDynamicForCausalLM``, plus one fp16 ``LlamaDynamicvitFlashAttention2`` per layer (builder.py
    L112–121; upstream's loop is range(32), LLaVA-1.5-7B's depth; patches/SparseVLMs/0004 makes it follow the
    checkpoint's num_hidden_layers, so the 30-layer study model loads too);
  - ``generate(..., retained_tokens=128)``: a GENERATE KWARG picking score.py's schedule (64, 128 or 192 →
    keep 303 / 110 / 36 at layers 2 / 6 / 15 for 128); greedy only: with ``do_sample=True`` upstream's copied
    ``generate`` routes to HF ``sample()``, which never prunes, so this adapter never samples;
  - pad preprocessing (``process_images``) in every module; text-only questions (ScienceQA) pass
    ``images=None`` and are never pruned.
SparseVLMs finds the image start in ``input_ids`` itself (``pre_prompt_length_list``): no sys-length argument.
The pruning layers run flash-attn's kernel where transformers enabled flash-attn, and otherwise the same attention in
PyTorch SDPA (patches/SparseVLMs/0003; the kernel, not the maths, differs). Only a tree without that patch and without
flash-attn is refused. The decoder layers assert sdpa attention (transformers 4.37's default for LLaVA-1.5).
Upstream times every forward with CUDA events and puts decode position ids on the current CUDA device; on a CPU a
tree without patches/SparseVLMs/0005 (timing only where CUDA is, position ids on the model's device) is refused.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
from pathlib import Path

from ..common import EvalError
from .base import Adapter, Loaded

FLASH_ATTN = "flash-attn 2.3.3"
FLASH_HINT = (f"install {FLASH_ATTN} on a CUDA machine (pip install flash-attn==2.3.3 --no-build-isolation; "
              f"envs/SparseVLMs.txt, bash setup.sh --only SparseVLMs)")
UPSTREAM_BUILDER_LAYERS = 32  # llava/model/builder.py L114 at the pin: for i in range(32)


def checkpoint_config(model_path: str) -> dict | None:
    """config.json of a local checkpoint folder (None for a hub id: nothing to check before loading)."""
    path = Path(model_path).expanduser() / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def builder_follows_config(load_pretrained_model) -> bool:
    """True when SparseVLMs' ``load_pretrained_model`` attaches its attention modules to config.num_hidden_layers
    layers (patches/SparseVLMs/0004), False for upstream's fixed range(32)."""
    return "range(model.config.num_hidden_layers)" in inspect.getsource(load_pretrained_model)


class SparseVLMAdapter(Adapter):
    name = "sparsevlm"
    # SparseVLMs' own schedule (its score.py): visual tokens left after its last ranking layer per budget
    LAST_STAGE_KEPT = {192: 110, 128: 36, 64: 17}

    @classmethod
    def budget_args(cls, keep: int, image_start: int) -> list[str]:
        """SparseVLMs defines its schedule for ``retained_tokens`` 192, 128 and 64 only."""
        return [f"retained_tokens={keep}"]

    @classmethod
    def supports_budget(cls, keep: int) -> bool:
        return keep in cls.LAST_STAGE_KEPT

    @classmethod
    def final_kept(cls, args: dict) -> int:
        return cls.LAST_STAGE_KEPT[int(args["retained_tokens"])]

    def check_environment(self) -> None:
        super().check_environment()   # flash-attn is optional: patches/SparseVLMs/0003 falls back to PyTorch SDPA

    def load(self, model_path: str, *, model_base: str | None = None, device: str = "cuda", dtype=None) -> Loaded:
        lv = self.activate()
        sparse = importlib.import_module("llava.model.language_model.modelling_sparse_llama")
        if not device.startswith("cuda") and not hasattr(sparse, "_timing_event"):
            raise EvalError(f"this SparseVLMs tree times its forward with CUDA events and cannot run on {device!r}; "
                            f"run bash scripts/apply_patches.sh SparseVLMs (patches/SparseVLMs/0005) or use a GPU")
        cfg = checkpoint_config(model_path)
        if cfg is not None:
            where = Path(model_path) / "config.json"
            layers = cfg.get("num_hidden_layers")
            if layers != UPSTREAM_BUILDER_LAYERS and not builder_follows_config(lv.load_pretrained_model):
                raise EvalError(f"{where} has num_hidden_layers={layers}, but this SparseVLMs tree's builder attaches "
                                f"its attention modules to exactly {UPSTREAM_BUILDER_LAYERS} layers (upstream's "
                                f"range(32)); run bash scripts/apply_patches.sh SparseVLMs (patches/SparseVLMs/0004)")
            if cfg.get("_attn_implementation", "sdpa") != "sdpa":
                raise EvalError(f"{where} asks for _attn_implementation={cfg['_attn_implementation']!r}; SparseVLMs' "
                                f"decoder layers only support sdpa: remove that key (LLaVA-1.5 checkpoints do not "
                                f"set it, so transformers picks sdpa)")
        loaded = super().load(model_path, model_base=model_base, device=device, dtype=dtype)
        if type(loaded.model).__name__ != "LlavaLlamaDynamicForCausalLM":
            raise EvalError(f"SparseVLMs' loader returned {type(loaded.model).__name__}, not "
                            f"LlavaLlamaDynamicForCausalLM; the checkpoint name {loaded.model_name!r} must contain "
                            f"'llava' (and neither 'mpt', 'mistral' nor 'lora')")
        if "_flash_attention_forward" not in vars(sparse.LlamaDynamicvitFlashAttention2):
            llama = importlib.import_module("transformers.models.llama.modeling_llama")
            if getattr(llama, "flash_attn_func", None) is None:
                raise EvalError("third_party/SparseVLMs lacks patches/SparseVLMs/0003 (the SDPA fallback) and "
                                f"flash-attn is not enabled; run bash scripts/apply_patches.sh SparseVLMs, or {FLASH_HINT}")
        return loaded

    def configure(self, loaded: Loaded) -> None:
        score = importlib.import_module("llava.model.language_model.score")
        retained = self.args["retained_tokens"]
        if retained not in score.sparse_token_dict:
            raise EvalError(f"sparsevlm retained_tokens={retained!r} has no schedule in SparseVLMs' score.py; use one "
                            f"of {', '.join(map(str, sorted(score.sparse_token_dict)))} (the paper: 128)")

    def generate_kwargs(self) -> dict:
        return {"retained_tokens": self.args["retained_tokens"]}
