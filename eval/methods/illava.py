"""iLLaVA's LLM stage on LLaVA-1.5 (key ``illava``): the port in patches/LLaVA, run from third_party/LLaVA.

iLLaVA ships no LLaVA-1.5 code; patches/LLaVA adds its LLM-stage merge to upstream LLaVA, off by default
(llava/model/language_model/illava_llama.py). Enabled by config keys, not generate kwargs:
``model.config.illava_llm_k = 2`` (the layer whose input is merged, ranked by layer k−1's last-row attention:
FastV's K = 2 score, hence the FastV trend) and ``model.config.illava_llm_r = 448`` (tokens merged away: 576 − 448
= 128 kept, 127 + the merge host). LLaVA's own loader, process_images (pad) and greedy generate; batch size 1.
The port reads the visual span [s0, s0 + 576) from the driver's ``debias_core.sample(span_start=s0)`` context
(s0 = the IMAGE_TOKEN_INDEX position), so it takes no sys-length argument; a text-only sample (span_start None)
is not merged. The installed llava-torch wheel has no port: this method always runs third_party/LLaVA.
"""
from __future__ import annotations

import importlib

from ..common import EvalError
from .base import Adapter, Loaded

PORT = "llava/model/language_model/illava_llama.py"


class ILLaVAPortAdapter(Adapter):
    name = "illava"

    @classmethod
    def budget_args(cls, keep: int, image_start: int) -> list[str]:
        """iLLaVA merges away ``illava_llm_r`` of the 576 tokens in the LLM: r = 576 - keep."""
        return [f"illava_llm_r={576 - keep}"]

    @classmethod
    def final_kept(cls, args: dict) -> int:
        return 576 - int(args["illava_llm_r"])

    def check_environment(self) -> None:
        super().check_environment()
        if not (self.upstream_dir() / PORT).is_file():
            raise EvalError(f"{self.upstream_dir()} lacks the iLLaVA port ({PORT}, patches/LLaVA); run "
                            f"bash scripts/apply_patches.sh LLaVA")

    def load(self, model_path: str, **kwargs) -> Loaded:
        loaded = super().load(model_path, **kwargs)
        llava_llama = importlib.import_module("llava.model.language_model.llava_llama")
        if not hasattr(llava_llama, "illava_forward"):
            raise EvalError(f"the imported llava ({llava_llama.__file__}) has no iLLaVA port; run bash "
                            f"scripts/apply_patches.sh LLaVA and run illava in a fresh process")
        return loaded

    def configure(self, loaded: Loaded) -> None:
        k, r = self.args["illava_llm_k"], self.args["illava_llm_r"]
        n_layers = len(loaded.model.get_model().layers)
        grid, _ = self.geometry(loaded)
        n = grid * grid
        if not 1 <= k < n_layers:
            raise EvalError(f"illava illava_llm_k={k} must be a layer in 1..{n_layers - 1} (the merge happens before "
                            f"layer k, ranked by layer k-1; this model has {n_layers} layers; default 2)")
        if not 0 <= r < n:
            raise EvalError(f"illava illava_llm_r={r} must merge 0..{n - 1} of the {n} visual tokens "
                            f"({n} - r are kept; default 448 keeps 128)")
        loaded.model.config.illava_llm_k = k
        loaded.model.config.illava_llm_r = r
