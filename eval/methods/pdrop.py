"""PyramidDrop (key ``pdrop``): LLaVA-1.5 dropping visual tokens in stages, from third_party/PyramidDrop.

What PDrop's own eval modules do (llava/eval/model_vqa_loader.py L79–96; model_vqa_science.py and
model_vqa_mmbench.py alike), reproduced here:
  - ``load_pretrained_model(path, base, name, pdrop_infer=True)`` → ``LlavaLlamaForCausalLM_PDrop``;
  - the schedule is set as MODEL ATTRIBUTES, not generate kwargs: ``model.model.layer_list = [2, 10, 20]`` and
    ``model.model.image_token_ratio_list = [1.0, 0.32, 0.16, 0.08]`` (the scripts pass three ratios and the module
    prepends 1.0, the full image before the first stage) → 576 → 184 → 92 → 46 visual tokens;
  - greedy ``generate(images=..., image_sizes=[...])``; pad preprocessing (``process_images``) in every module;
  - text-only questions (ScienceQA): ``images=None``; the ranking never runs (no image position).
PDrop finds the image start in ``input_ids`` itself, so it takes no sys-length argument to check.
Attention: sdpa (transformers 4.37's default for LLaVA-1.5 checkpoints) or flash-attn; with eager attention the
4-D mask reaches ``pdrop_rank_drop``, which cannot take it, so a checkpoint asking for eager is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..common import EvalError
from .base import Adapter, Loaded


def checkpoint_config(model_path: str) -> dict | None:
    """config.json of a local checkpoint folder (None for a hub id: nothing to check before loading)."""
    path = Path(model_path).expanduser() / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


class PDropAdapter(Adapter):
    name = "pdrop"

    @classmethod
    def budget_args(cls, keep: int, image_start: int) -> list[str]:
        """The paper's ratios 0.32 / 0.16 / 0.08 after layers 2 / 10 / 20, scaled by keep / 128."""
        ratios = cls.paper_args()["image_token_ratio_list"]
        return ["image_token_ratio_list=" + ",".join(f"{r * keep / 128:.4f}" for r in ratios)]

    @classmethod
    def final_kept(cls, args: dict) -> int:
        return int(576 * float(args["image_token_ratio_list"][-1]))

    def load(self, model_path: str, *, model_base: str | None = None, device: str = "cuda", dtype=None) -> Loaded:
        cfg = checkpoint_config(model_path)
        attn = (cfg or {}).get("_attn_implementation")
        if attn == "eager":
            raise EvalError(f"{Path(model_path) / 'config.json'} asks for _attn_implementation='eager', which "
                            f"PyramidDrop's ranking (pdrop_rank_drop) cannot run; remove that key (LLaVA-1.5 "
                            f"checkpoints do not set it, so transformers picks sdpa)")
        loaded = super().load(model_path, model_base=model_base, device=device, dtype=dtype)
        if type(loaded.model).__name__ != "LlavaLlamaForCausalLM_PDrop":
            raise EvalError(f"PyramidDrop's loader returned {type(loaded.model).__name__}, not "
                            f"LlavaLlamaForCausalLM_PDrop; the checkpoint name {loaded.model_name!r} must contain "
                            f"'llava' (and neither 'mpt', 'mistral' nor 'lora')")
        return loaded

    def loader_kwargs(self, device: str) -> dict:
        return {"device": device, "pdrop_infer": True}  # PyramidDrop's own loader flag for its model class

    def configure(self, loaded: Loaded) -> None:
        layers, ratios = list(self.args["layer_list"]), list(self.args["image_token_ratio_list"])
        n_layers = len(loaded.model.model.layers)
        if len(layers) != len(ratios):
            raise EvalError(f"pdrop layer_list={layers} and image_token_ratio_list={ratios} need one ratio per layer")
        if not all(isinstance(x, int) for x in layers) or layers != sorted(set(layers)) or not (
                layers and 0 < layers[0] and layers[-1] < n_layers):
            raise EvalError(f"pdrop layer_list={layers} must be increasing layer indices in 1..{n_layers - 1} "
                            f"(this model has {n_layers} decoder layers; the paper uses 2,10,20)")
        if not all(0 < r <= 1 for r in ratios):
            raise EvalError(f"pdrop image_token_ratio_list={ratios} must be fractions in (0, 1] of the 576 visual "
                            f"tokens (the paper: 0.32,0.16,0.08; 1.0 for the full image is prepended here)")
        model = loaded.model.model
        model.layer_list = layers
        model.image_token_ratio_list = [1.0] + [float(r) for r in ratios]
