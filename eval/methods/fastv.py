"""FastV on LLaVA-1.5 (third_party/FastV): after decoder layer K−1, keep the R visual tokens the last prompt
token attends to most (mask mode: re-ranked at every decode step; the paper's K = 2, R = 128).

FastV ships LLaVA 1.1.3 (src/LLaVA) over its own transformers 4.31 fork (src/transformers/src), where the
ranking site lives (LlamaModel.forward; patches/FastV debias it). What FastV shares with HiMAP (also a LLaVA
1.1.3 fork) is in ``llava113.Llava113Adapter``.
"""
from __future__ import annotations

from ..common import EvalError
from .llava113 import Llava113Adapter


class FastVAdapter(Llava113Adapter):
    name = "fastv"
    sys_length_key = "fast_v_sys_length"
    image_length_key = "fast_v_image_token_length"
    site_module = "transformers.models.llama.modeling_llama"

    @classmethod
    def budget_args(cls, keep: int, image_start: int) -> list[str]:
        return [f"fast_v_attention_rank={round(cls.paper_args()['fast_v_attention_rank'] * keep / 128)}",
                f"{cls.sys_length_key}={image_start}"]

    @classmethod
    def final_kept(cls, args: dict) -> int:
        return int(args["fast_v_attention_rank"])

    def activate(self):
        lv = super().activate()
        import transformers.models.llama.modeling_llama as ml

        fork = self.upstream_dir() / "src" / "transformers" / "src"
        if not hasattr(ml.LlamaModel, "reset_fastv"):
            raise EvalError(f"transformers was imported from {ml.__file__}, not from FastV's fork ({fork}), so "
                            f"FastV cannot run; run it in a fresh process (python -m eval.run) with nothing "
                            f"importing transformers before the adapter's activate()")
        return lv

    def _check_args(self, n_layers: int, span: int) -> None:
        k, r = self.args["fast_v_agg_layer"], self.args["fast_v_attention_rank"]
        if not 1 <= k < n_layers:
            raise EvalError(f"fastv: fast_v_agg_layer={k} must be in 1..{n_layers - 1} for this {n_layers}-layer "
                            f"model (FastV prunes before layer K, ranking with layer K−1's attention)")
        if not 1 <= r <= span:
            raise EvalError(f"fastv: fast_v_attention_rank={r} must be in 1..{span} (visual tokens kept)")

    def _enable(self, model) -> None:
        """As FastV's inference scripts: config keys, then reset_fastv() copies them onto the LlamaModel."""
        cfg = model.config
        cfg.use_fast_v = True
        for key in ("fast_v_inplace", "fast_v_sys_length", "fast_v_image_token_length", "fast_v_attention_rank",
                    "fast_v_agg_layer"):
            setattr(cfg, key, self.args[key])
        model.model.reset_fastv()

    def _set_active(self, model, on: bool) -> None:
        model.model.use_fast_v = on

    def generate_kwargs(self) -> dict:
        # FastV reads layer K−1's attention from the layer outputs: without output_attentions that slot holds
        # the KV cache. In-place mode shortens the sequence, which upstream supports only without the cache.
        return {"use_cache": not self.args["fast_v_inplace"], "output_attentions": True}
