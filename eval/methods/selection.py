"""Base adapter for a method that keeps a subset of plain LLaVA-1.5's visual tokens before the language model.

A subclass implements one function, ``select``, and needs no patch series: ``configure`` wraps the loaded model's
``encode_images`` (CLIP features → projector, [B, N, D]) so that the language model receives only the rows
``select`` keeps, in their original raster order. LLaVA then builds the prompt, attention mask, positions and
KV cache around the shorter image span exactly as it does for the full one. The driver's
``debias_core.sample(...)`` scope is open around every ``generate``, so ``select`` may call
``debias_core.debias(scores)`` (raster positions 0..N−1) and ``debias_core.keep_cap(k)`` directly.

    class TopNorm(TokenSelectionAdapter):                       # a registry entry names "my_file.py:TopNorm"
        name = "topnorm"
        def select(self, features):                             # [B, N, D] -> LongTensor [B, k]
            scores = debias_core.debias(features.norm(dim=-1))  # [B, N] float32; padding -inf in pad/full
            return scores.topk(debias_core.keep_cap(self.args["keep"]), dim=-1).indices

Walkthrough: docs/adding_a_method.md. The text-only samples of a benchmark never reach ``select`` (no image).
"""
from __future__ import annotations

from ..common import EvalError
from .base import Loaded
from .llava import LlavaAdapter


class TokenSelectionAdapter(LlavaAdapter):
    """Plain LLaVA (third_party/LLaVA, else the installed llava-torch) with ``select`` choosing the visual tokens."""

    def select(self, features):
        """Indices of the visual tokens to keep: LongTensor [B, k] (any order; k ≥ 1, the same for every row)
        from the projected image features ``features`` [B, N, D] (N = grid², raster order)."""
        raise NotImplementedError(f"{type(self).__name__} must implement select(features) -> indices [B, k]")

    def configure(self, loaded: Loaded) -> None:
        model = loaded.model
        if getattr(model, "_selection_adapter", None) is not None:
            raise EvalError(f"the model is already configured for {model._selection_adapter}; load it again")
        encode_images = model.encode_images

        def encode_and_select(images):
            features = encode_images(images)                       # [B, N, D]
            keep = self.select(features)
            if keep.dim() != 2 or keep.shape[0] != features.shape[0] or not 1 <= keep.shape[1] <= features.shape[1]:
                raise EvalError(f"{self.name}: select returned indices of shape {tuple(keep.shape)}; expected "
                                f"[{features.shape[0]}, k] with 1 ≤ k ≤ {features.shape[1]}")
            keep = keep.sort(dim=-1).values                        # the language model sees raster order
            return features.gather(1, keep.unsqueeze(-1).expand(-1, -1, features.shape[-1]))

        model.encode_images = encode_and_select                     # instance attribute: LLaVA calls self.encode_images
        model._selection_adapter = self.name
