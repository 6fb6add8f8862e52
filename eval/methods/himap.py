"""HiMAP on LLaVA-1.5 (third_party/HiMAP): two pruning stages in the LLM. Before layer K_t keep the R_t visual
tokens the text attends to most (layer K_t−1); before layer K_i keep the R_i of those that the image tokens
attend to most (layer K_i−1). The paper's debias schedule: K_t = 2, R_t = 115, K_i = 8, R_i = 90.

HiMAP ships a modified LLaVA 1.1.3 (src/LLaVA, package ``llava``) on stock transformers 4.31; the ranking sites
are in ``llava/model/language_model/himap.py`` (patches/HiMAP debias both stages). Every decode step re-runs
the whole prompt (``use_cache=False``), both stages included. The shared LLaVA 1.1.3 behaviour (no image_sizes,
image-start check, text-only samples unpruned, EVAL_THIRD_PARTY) is in ``llava113.Llava113Adapter``.
"""
from __future__ import annotations

from ..common import EvalError
from .llava113 import Llava113Adapter

# registry argument -> HiMAP's config key (as src/HiMAP/inference/eval_scivqa.py sets them)
CONFIG_KEYS = {"sys_length": "hmap_v_sys_length", "img_length": "hmap_v_img_length",
               "hmap_v_attn_txt_layer": "hmap_v_attn_txt_layer", "hmap_v_attn_txt_rank": "hmap_v_attn_txt_rank",
               "hmap_v_attn_img_layer": "hmap_v_attn_img_layer", "hmap_v_attn_img_rank": "hmap_v_attn_img_rank"}


class HiMAPAdapter(Llava113Adapter):
    name = "himap"
    sys_length_key = "sys_length"
    image_length_key = "img_length"
    site_module = "llava.model.language_model.himap"

    @classmethod
    def budget_args(cls, keep: int, image_start: int) -> list[str]:
        """The paper's 115 tokens after the text-guided stage and 90 after the image stage, scaled by keep / 128."""
        paper = cls.paper_args()
        return [f"{k}={round(paper[k] * keep / 128)}" for k in ("hmap_v_attn_txt_rank", "hmap_v_attn_img_rank")] + \
            [f"{cls.sys_length_key}={image_start}"]

    @classmethod
    def final_kept(cls, args: dict) -> int:
        return int(args["hmap_v_attn_img_rank"])

    def activate(self):
        lv = super().activate()
        import importlib.util

        if importlib.util.find_spec(self.site_module) is None:
            raise EvalError(f"the llava package at {lv.package_dir} is not HiMAP's (no {self.site_module}); "
                            f"run himap in a fresh process (python -m eval.run) with {self.upstream_dir()}/src/LLaVA "
                            f"first on sys.path")
        return lv

    def loader_kwargs(self, device: str) -> dict:
        """HiMAP's load_pretrained_model ignores ``device`` (device_map "auto"): pin the whole model to it."""
        return {"device_map": {"": device}, "device": device}

    def _check_args(self, n_layers: int, span: int) -> None:
        a = self.args
        kt, ki = a["hmap_v_attn_txt_layer"], a["hmap_v_attn_img_layer"]
        rt, ri = a["hmap_v_attn_txt_rank"], a["hmap_v_attn_img_rank"]
        if not 1 <= kt < ki < n_layers:
            raise EvalError(f"himap: need 1 ≤ hmap_v_attn_txt_layer ({kt}) < hmap_v_attn_img_layer ({ki}) < "
                            f"{n_layers} (this model's decoder layers); HiMAP prunes before each of those layers")
        if not 1 <= ri <= rt <= span:
            raise EvalError(f"himap: need 1 ≤ hmap_v_attn_img_rank ({ri}) ≤ hmap_v_attn_txt_rank ({rt}) ≤ {span} "
                            f"(visual tokens kept by stage 2, stage 1, and the image window)")

    def _enable(self, model) -> None:
        """As HiMAP's eval_scivqa.py: config keys, then reset_hmapv() copies them onto Himap_LlamaModel."""
        cfg = model.config
        cfg.use_hmap_v = True
        for arg, key in CONFIG_KEYS.items():
            setattr(cfg, key, self.args[arg])
        model.model.reset_hmapv()

    def _set_active(self, model, on: bool) -> None:
        model.model.use_hmap_v = on

    def generate_kwargs(self) -> dict:
        # HiMAP reads each stage's attention from layer_outputs[1]: it needs output_attentions and no KV cache.
        return {"use_cache": False, "output_attentions": True}
