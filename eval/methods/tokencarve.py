"""TokenCarve (key ``tokencarve``): SVD- and attention-ranked token carving on upstream LLaVA-1.5.

TokenCarve ships no package, only its own copy of transformers 4.37.2's Llama
(third_party/TokenCarve/TokenCarve/{configuration,modeling}_llama.py); its loader
(TokenCarve/TokenCarve_model_vqa_loader.py) runs upstream LLaVA (package ``llava``, third_party/LLaVA, installed in
the TokenCarve environment) on it. Upstream's TokenCarve/config.py COPIES the two files over site-packages; this
adapter never does: ``activate`` loads them with importlib under ``transformers.models.llama`` before ``llava`` is
imported, so LLaVA's Llama is TokenCarve's in this process only. Then, as ``eval_model`` (L99–110):

    config.use_token_carve = True; token_carve_sys_length = 35 (the official scripts' 36 is off by one: the image
    starts at index 35 of the vicuna_v1 prompt); token_carve_image_token_length = 576; token_carve_work_layer = 2;
    token_carve_image_token_rank = int(nums / 2 * 3); token_carve_merge_token_nums = int(nums / 2) (nums = 64);
    token_carve_SV_AV_mode = 0; token_carve_SV_AV_weight = 0.5; model.model.reset_token_carve_parameter()

and ``generate(..., output_attentions=True, use_cache=True)``, greedy, pad preprocessing. TokenCarve carves the
fixed window [sys_length, sys_length + 576): every image sample's image start in ``input_ids`` is checked against
``token_carve_sys_length`` (EvalError naming both when they differ).

Text-only samples: there is nothing to carve, and TokenCarve's ``LlamaModel.forward`` cannot run them: it takes any
forward under 150 positions for a decode step (modeling_llama.py L1087, slicing ``input_ids``, which is None under
LLaVA's ``inputs_embeds``) and would carve a longer one at the fixed window. They are answered by transformers' own
``LlamaModel.forward`` (the installed 4.37.2 file) on the same model and weights: LLaVA-1.5 unpruned.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import sys
import types
from pathlib import Path

from ..common import EvalError, populated, third_party_dir
from .base import Adapter, Loaded

LLAMA = "transformers.models.llama"
FILES = ("configuration_llama", "modeling_llama")  # configuration first: modeling imports it
STOCK = f"{LLAMA}._stock_modeling_llama"
SV_AV_MODES = {0: "fusion (the paper)", 1: "SV only", 2: "AV only"}


class TokenCarveAdapter(Adapter):
    name = "tokencarve"

    @classmethod
    def budget_args(cls, keep: int, image_start: int) -> list[str]:
        """The paper's 64 kept tokens scaled by keep / 128."""
        nums = round(cls.paper_args()["token_carve_image_token_nums"] * keep / 128)
        return [f"token_carve_image_token_nums={nums}", f"token_carve_sys_length={image_start}"]

    @classmethod
    def final_kept(cls, args: dict) -> int:
        return int(args["token_carve_image_token_nums"])

    def __init__(self, overrides: dict | None = None):
        super().__init__(overrides)
        self._stock_forward = None

    # ------------------------------------------------------------ environment
    def tokencarve_dir(self) -> Path:
        return self.upstream_dir() / "TokenCarve"

    def _use_upstream_tree(self) -> bool:
        return False  # `llava` is upstream LLaVA from the environment; TokenCarve's two files are loaded by path

    def check_environment(self) -> None:
        super().check_environment()
        missing = [f"{f}.py" for f in FILES if not (self.tokencarve_dir() / f"{f}.py").is_file()]
        if missing:
            raise EvalError(f"{self.tokencarve_dir()} lacks {', '.join(missing)}; populate third_party/TokenCarve "
                            f"at its pin and run bash scripts/apply_patches.sh TokenCarve")
        try:
            version = md.version("transformers")
        except md.PackageNotFoundError:
            version = None
        if not (version or "").startswith("4.37."):
            raise EvalError(f"TokenCarve's Llama is a copy of transformers 4.37.2's but this environment has "
                            f"transformers {version}; use the TokenCarve environment (bash setup.sh --only TokenCarve)")
        if importlib.util.find_spec("llava") is None and populated("LLaVA"):
            # as the GPU environment's `pip install -e third_party/LLaVA` (or the exported tree under EVAL_THIRD_PARTY)
            sys.path.insert(0, str(third_party_dir("LLaVA")))
            importlib.invalidate_caches()
        if importlib.util.find_spec("llava") is None:
            raise EvalError("TokenCarve runs on upstream LLaVA (package llava), which is not importable here; in the "
                            "TokenCarve environment: pip install --no-deps -e third_party/LLaVA (envs/TokenCarve.txt)")

    def activate(self):
        if self.llava is None:
            self.check_environment()
            self._install_llama()
        return super().activate()

    def _install_llama(self) -> None:
        """Register TokenCarve's two files as transformers.models.llama.{configuration,modeling}_llama."""
        package = importlib.import_module(LLAMA)  # lazy package: imports neither file
        stock_file = Path(package.__file__).with_name("modeling_llama.py")
        if "token_carve" in stock_file.read_text():
            raise EvalError(f"{stock_file} is TokenCarve's (TokenCarve/config.py was run in this environment); "
                            f"restore it with pip install --force-reinstall --no-deps transformers==4.37.2 "
                            f"(this adapter loads TokenCarve's files itself, from {self.tokencarve_dir()})")
        for name in FILES:
            target = f"{LLAMA}.{name}"
            if target in sys.modules:
                if getattr(sys.modules[target], "__file__", None) == str(self.tokencarve_dir() / f"{name}.py"):
                    continue
                raise EvalError(f"{target} was imported before TokenCarve's copy could replace it; run tokencarve "
                                f"in a fresh process (python -m eval.run)")
            spec = importlib.util.spec_from_file_location(target, self.tokencarve_dir() / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[target] = module
            try:
                spec.loader.exec_module(module)
            except Exception:
                del sys.modules[target]
                raise
            setattr(package, name, module)
        if not hasattr(importlib.import_module("transformers").LlamaModel, "reset_token_carve_parameter"):
            raise EvalError("transformers.LlamaModel is not TokenCarve's after loading its modeling_llama.py")

    def upstream_state(self) -> str:
        llava = self.llava.package_dir if self.llava else "not imported yet"
        return f"{super().upstream_state()}; llava from {llava}"

    # ------------------------------------------------------------ model
    def configure(self, loaded: Loaded) -> None:
        a, model = self.args, loaded.model
        if not hasattr(model.model, "reset_token_carve_parameter"):
            raise EvalError(f"the loaded {type(model).__name__} does not run on TokenCarve's Llama; load it through "
                            f"this adapter's activate() in a fresh process")
        grid, _ = self.geometry(loaded)
        n_img, nums = a["token_carve_image_token_length"], a["token_carve_image_token_nums"]
        n_layers, hidden = len(model.model.layers), model.config.hidden_size
        if n_img != grid * grid:
            raise EvalError(f"tokencarve token_carve_image_token_length={n_img} but the vision tower gives "
                            f"{grid}×{grid} = {grid * grid} visual tokens")
        if a["token_carve_work_layer"] != 2 or n_layers < 3:
            raise EvalError(f"tokencarve token_carve_work_layer={a['token_carve_work_layer']} on {n_layers} layers: "
                            f"TokenCarve re-prunes the KV cache of exactly two earlier layers (modeling_llama.py "
                            f"L1229, range(2)), so only work layer 2 (of >= 3 layers) runs correctly")
        if not 2 <= nums or int(nums / 2 * 3) > n_img:
            raise EvalError(f"tokencarve token_carve_image_token_nums={nums}: TokenCarve ranks int(nums * 1.5) of "
                            f"the {n_img} visual tokens, so nums must be in 2..{n_img * 2 // 3} (the paper: 64)")
        if a["token_carve_SV_AV_mode"] not in SV_AV_MODES:
            raise EvalError(f"tokencarve token_carve_SV_AV_mode={a['token_carve_SV_AV_mode']} is not one of "
                            + ", ".join(f"{k} = {v}" for k, v in SV_AV_MODES.items()))
        if hidden < n_img:
            raise EvalError(f"TokenCarve's SVD needs hidden_size >= {n_img} visual tokens; the model has {hidden}")
        cfg = model.config
        cfg.use_token_carve = True
        cfg.token_carve_sys_length = a["token_carve_sys_length"]
        cfg.token_carve_image_token_length = n_img
        cfg.token_carve_work_layer = a["token_carve_work_layer"]
        cfg.token_carve_image_token_rank = int(nums / 2 * 3)
        cfg.token_carve_merge_token_nums = int(nums / 2)
        cfg.token_carve_SV_AV_mode = a["token_carve_SV_AV_mode"]
        cfg.token_carve_SV_AV_weight = float(a["token_carve_SV_AV_weight"])
        model.model.reset_token_carve_parameter()

    def generate_kwargs(self) -> dict:
        return {"output_attentions": True}  # as TokenCarve's loader (its Llama forces attentions anyway)

    # ------------------------------------------------------------ per sample
    def generate(self, loaded: Loaded, input_ids, image_tensor, image_size, *, max_new_tokens: int) -> str:
        if image_tensor is None:
            return self._generate_text_only(loaded, input_ids, max_new_tokens=max_new_tokens)
        s0, sys_length = self.span_start(input_ids), self.args["token_carve_sys_length"]
        if s0 != sys_length:
            raise EvalError(f"the image starts at index {s0} of input_ids but token_carve_sys_length={sys_length}: "
                            f"TokenCarve would carve the wrong window; pass --method-arg token_carve_sys_length={s0} "
                            f"(35 for LLaVA-1.5's vicuna_v1 prompt)")
        return super().generate(loaded, input_ids, image_tensor, image_size, max_new_tokens=max_new_tokens)

    def _generate_text_only(self, loaded: Loaded, input_ids, *, max_new_tokens: int) -> str:
        """transformers' own LlamaModel.forward for this generate (see the module doc), then TokenCarve's again."""
        llama = loaded.model.get_model()
        for layer in llama.layers:
            layer.self_attn.keep_index_map = None  # a previous image sample's carved positions
        llama.forward = types.MethodType(self._stock_llama_forward(), llama)
        try:
            return super().generate(loaded, input_ids, None, None, max_new_tokens=max_new_tokens)
        finally:
            del llama.forward

    def _stock_llama_forward(self):
        if self._stock_forward is None:
            package = importlib.import_module(LLAMA)
            spec = importlib.util.spec_from_file_location(STOCK, Path(package.__file__).with_name("modeling_llama.py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[STOCK] = module
            spec.loader.exec_module(module)
            self._stock_forward = module.LlamaModel.forward
        return self._stock_forward
