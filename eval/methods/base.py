"""The per-method adapter: everything the driver needs to know about one baseline, and nothing else.

The driver (eval.run) is method-agnostic. For each sample it asks the adapter for the image tensor and
the input ids, opens ``debias_core.sample(...)`` itself, and calls ``adapter.generate`` inside it:

    adapter = get_adapter(key, overrides)   # the registry entry's paper defaults + --method-arg overrides
    adapter.activate()                      # sys.path entries inside third_party/<Upstream>; imports its llava
    loaded = adapter.load(model_path, device="cuda")                 # the baseline's own load_pretrained_model
    adapter.configure(loaded)                                        # method settings on the model
    mode = adapter.preprocess_mode("loader")                         # "pad" | "crop" for that eval module
    pixels = adapter.image_tensor(loaded, image, mode)               # [3, R, R]
    ids = adapter.input_ids(loaded, question, has_image=True)        # [1, T] with IMAGE_TOKEN_INDEX at s0
    with debias_core.sample(image_size=image.size, preprocess=..., span_start=s0, grid=g, resolution=R):
        text = adapter.generate(loaded, ids, pixels, image.size, max_new_tokens=128)

Writing an adapter (docs/adding_a_method.md): subclass ``Adapter``, set ``name`` (the method's key in the registry,
debias_core/data/methods.json, whose entry also gives upstream folder, environment, sys.path entries, paper
defaults, budget keys and pad/crop per eval module, and names this class), and override only what differs:

  configure(loaded)          put ``self.args`` where the baseline reads them (config keys, model attributes);
                             e.g. FastV: ``model.config.use_fast_v = True; model.model.reset_fastv()``
  generate_kwargs()          extra ``model.generate`` kwargs, e.g. HiMAP ``{"use_cache": False,
                             "output_attentions": True}``, PDrop ``{"layer_list": ..., ...}``
  passes_image_sizes         False for LLaVA-1.1.3 forks (FastV, HiMAP): their generate rejects image_sizes
  load(...)                  only if the baseline's loader differs (e.g. SparseVLMs' builder flags)
  check_environment()        extra checks (e.g. transformers version) with a one-line EvalError

Rules: an adapter imports upstream code only after ``activate()`` (the driver imports neither llava nor
transformers before it, so a baseline's forked transformers on sys.path wins); it never opens a debias_core context
and never passes image sizes through side channels (the driver's ``debias_core.sample`` scope does that);
it leaves the ranking-site calls to the patch series.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from .. import registry
from ..common import TREE_ENV, EvalError, populate_hint, populated, submodule_state, third_party_dir
from ..registry import MODULES, PREPROCESS  # noqa: F401  (re-exported: the eval modules and preprocessings)


def all_specs() -> dict:
    """key -> registry entry of every method ``python -m eval.run`` runs."""
    return registry.methods()


def method_spec(name: str) -> dict:
    """The registry entry of ``name``; EvalError listing the known methods otherwise."""
    return registry.method(name)


def parse_method_args(pairs: list[str] | None) -> dict:
    """``["k=v", ...]`` from ``--method-arg`` into a dict; values are JSON when they parse, else strings."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise EvalError(f"--method-arg {pair!r} is not key=value (e.g. --method-arg fast_v_attention_rank=64)")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _coerce(name: str, key: str, default: Any, value: Any) -> Any:
    if isinstance(default, list) and isinstance(value, str):
        try:
            value = [json.loads(v) for v in value.split(",") if v.strip()]
        except json.JSONDecodeError:
            raise EvalError(f"{name} argument {key}={value!r} is not a comma-separated list of numbers") from None
    if isinstance(default, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    ok = (isinstance(value, bool) if isinstance(default, bool) else
          isinstance(value, (int, float)) and not isinstance(value, bool) if isinstance(default, float) else
          isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int) else
          isinstance(value, list) if isinstance(default, list) else
          isinstance(value, str) if isinstance(default, str) else True)
    if not ok:
        raise EvalError(f"{name} argument {key}={value!r} should be a {type(default).__name__} like its default "
                        f"{default!r}")
    return value


@dataclass
class Loaded:
    """What ``load`` returns: LLaVA's 4-tuple plus the model name (used as ``model_id``)."""
    tokenizer: Any
    model: Any
    image_processor: Any
    context_len: int
    model_name: str
    device: str
    dtype: Any


class Adapter:
    name: ClassVar[str] = ""
    needs_upstream: ClassVar[bool] = True     # False: may run from an installed package (llava-torch)
    passes_image_sizes: ClassVar[bool] = True  # LLaVA >= 1.2 generate(image_sizes=...)

    def __init__(self, overrides: dict | None = None):
        spec = method_spec(self.name)
        self.upstream: str = spec["upstream"]
        self.env: str = spec["env"]
        self.sys_path: list[str] = list(spec["sys_path"])
        self.trend_method: str | None = spec["trend_method"]
        self.budget_keys: list[str] = list(spec["budget_keys"])
        self.preprocess: dict = dict(spec["preprocess"])
        self.args: dict = dict(spec["args"])
        for key, value in (overrides or {}).items():
            if key not in self.args:
                raise EvalError(f"{self.name} has no argument {key!r}; its arguments are "
                                f"{', '.join(f'{k}={v!r}' for k, v in self.args.items()) or 'none'}")
            self.args[key] = _coerce(self.name, key, self.args[key], value)
        self.llava: SimpleNamespace | None = None

    # ---------------------------------------------------------------- environment
    def upstream_dir(self) -> Path:
        """third_party/<Upstream>, or an exported, patched copy under $EVAL_THIRD_PARTY."""
        return third_party_dir(self.upstream)

    def sys_path_entries(self) -> list[Path]:
        """Folders inside third_party/<Upstream> put first on sys.path by ``activate``."""
        return [self.upstream_dir() / p if p else self.upstream_dir() for p in self.sys_path]

    def check_environment(self) -> None:
        """Raise EvalError (one line: what is missing and how to get it) if this method cannot run here."""
        if self.needs_upstream and not populated(self.upstream):
            raise EvalError(f"{self.upstream_dir()} is not populated, so {self.name} cannot run; "
                            f"run {populate_hint(self.upstream)} then bash scripts/apply_patches.sh {self.upstream}")
        missing = [p for p in self.sys_path_entries() if not p.is_dir()]
        if self.needs_upstream and missing and os.environ.get(TREE_ENV):
            raise EvalError(f"{TREE_ENV}={os.environ[TREE_ENV]} has no {missing[0]}: export third_party/{self.upstream} "
                            f"there (python -c 'from eval.upstream import export_tree; ...') or unset {TREE_ENV}")

    def _use_upstream_tree(self) -> bool:
        return self.needs_upstream

    def activate(self) -> SimpleNamespace:
        """Put the baseline's code first on sys.path and import the LLaVA pieces the driver uses."""
        if self.llava is not None:
            return self.llava
        self.check_environment()
        if self._use_upstream_tree():
            for entry in reversed(self.sys_path_entries()):
                if str(entry) not in sys.path:
                    sys.path.insert(0, str(entry))
            loaded = sys.modules.get("llava")
            if loaded is not None and not any(str(Path(loaded.__file__).resolve()).startswith(str(e.resolve()))
                                              for e in self.sys_path_entries()):
                raise EvalError(f"a different llava package ({loaded.__file__}) is already imported; run "
                                f"{self.name} in a fresh process (python -m eval.run)")
        try:
            constants = importlib.import_module("llava.constants")
            conversation = importlib.import_module("llava.conversation")
            mm_utils = importlib.import_module("llava.mm_utils")
            builder = importlib.import_module("llava.model.builder")
        except ImportError as e:
            raise EvalError(f"cannot import {self.name}'s llava package ({e}); activate its environment "
                            f"(envs/venv-{self.env}: bash setup.sh --only {self.env}) and make sure {self.upstream_dir()} "
                            f"is populated") from e
        self.llava = SimpleNamespace(
            IMAGE_TOKEN_INDEX=constants.IMAGE_TOKEN_INDEX, DEFAULT_IMAGE_TOKEN=constants.DEFAULT_IMAGE_TOKEN,
            DEFAULT_IM_START_TOKEN=constants.DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN=constants.DEFAULT_IM_END_TOKEN,
            conv_templates=conversation.conv_templates, tokenizer_image_token=mm_utils.tokenizer_image_token,
            process_images=getattr(mm_utils, "process_images", None),
            get_model_name_from_path=mm_utils.get_model_name_from_path,
            load_pretrained_model=builder.load_pretrained_model,
            package_dir=str(Path(importlib.import_module("llava").__file__).parent))
        return self.llava

    def upstream_state(self) -> str:
        """For the log header: the submodule's sha (and whether patches are applied)."""
        return f"third_party/{self.upstream} {submodule_state(self.upstream)}"

    # ---------------------------------------------------------------- model
    def load(self, model_path: str, *, model_base: str | None = None, device: str = "cuda",
             dtype=None) -> Loaded:
        """Load through the baseline's own ``load_pretrained_model``. dtype None: fp16 on CUDA, fp32 on CPU."""
        import torch

        lv = self.activate()
        model_name = lv.get_model_name_from_path(model_path)
        tokenizer, model, image_processor, context_len = lv.load_pretrained_model(
            model_path, model_base, model_name, **self.loader_kwargs(device))
        if dtype is None:
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
        if model.dtype != dtype:
            model = model.to(dtype=dtype)
        model.eval()
        return Loaded(tokenizer, model, image_processor, context_len, model_name, device, dtype)

    def loader_kwargs(self, device: str) -> dict:
        """Keyword arguments for the baseline's ``load_pretrained_model`` beside the path, base and name."""
        return {"device": device}

    def configure(self, loaded: Loaded) -> None:
        """Enable the method on the loaded model with ``self.args`` (plain LLaVA: nothing to do)."""

    def generate_kwargs(self) -> dict:
        """Extra ``model.generate`` kwargs the method needs."""
        return {}

    def geometry(self, loaded: Loaded) -> tuple[int, int]:
        """(grid, resolution) of the vision tower: (24, 336) for LLaVA-1.5."""
        cfg = loaded.model.get_vision_tower().config
        return cfg.image_size // cfg.patch_size, cfg.image_size

    # ---------------------------------------------------------------- per sample
    def preprocess_mode(self, module: str) -> str:
        if module not in self.preprocess:
            raise EvalError(f"{self.name} has no preprocessing entry for eval module {module!r} "
                            f"(known: {', '.join(self.preprocess)})")
        return self.preprocess[module]

    def image_tensor(self, loaded: Loaded, image, mode: str):
        """Float tensor [3, R, R] for a PIL RGB image: ``pad`` = LLaVA's process_images (expand2square when the
        config says pad), ``crop`` = the CLIP processor's resize + centre crop (LLaVA 1.1.3 model_vqa)."""
        if mode == "pad":
            if self.llava.process_images is None:
                raise EvalError(f"{self.name}'s llava has no process_images; use crop preprocessing")
            return self.llava.process_images([image], loaded.image_processor, loaded.model.config)[0]
        if mode == "crop":
            return loaded.image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        raise EvalError(f"preprocessing {mode!r} is unknown; use one of {', '.join(PREPROCESS)}")

    def debias_preprocess(self, loaded: Loaded, mode: str) -> str:
        """debias_core's preprocess name for the pixels fed: "pad" only where LLaVA really pads the image."""
        if mode == "crop":
            return "none"
        aspect = getattr(loaded.model.config, "image_aspect_ratio", None)
        if aspect and "anyres" in str(aspect):
            raise EvalError(f"checkpoint uses image_aspect_ratio={aspect!r} (LLaVA-1.6); this driver evaluates "
                            f"LLaVA-1.5 (pad) checkpoints")
        return "pad" if aspect == "pad" else "none"

    def input_ids(self, loaded: Loaded, question: str, *, has_image: bool, conv_mode: str = "vicuna_v1"):
        """LongTensor [1, T]: the conversation prompt with IMAGE_TOKEN_INDEX where the image goes."""
        lv = self.llava
        qs = question
        if has_image:
            if getattr(loaded.model.config, "mm_use_im_start_end", False):
                qs = lv.DEFAULT_IM_START_TOKEN + lv.DEFAULT_IMAGE_TOKEN + lv.DEFAULT_IM_END_TOKEN + "\n" + qs
            else:
                qs = lv.DEFAULT_IMAGE_TOKEN + "\n" + qs
        if conv_mode not in lv.conv_templates:
            raise EvalError(f"conv mode {conv_mode!r} is unknown to {self.name}'s llava; LLaVA-1.5 uses vicuna_v1")
        conv = lv.conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], qs)
        conv.append_message(conv.roles[1], None)
        ids = lv.tokenizer_image_token(conv.get_prompt(), loaded.tokenizer, lv.IMAGE_TOKEN_INDEX, return_tensors="pt")
        return ids.unsqueeze(0)

    def span_start(self, input_ids) -> int | None:
        """Sequence index of the first visual token: where IMAGE_TOKEN_INDEX sits (None without an image)."""
        hits = (input_ids[0] == self.llava.IMAGE_TOKEN_INDEX).nonzero()
        return int(hits[0, 0]) if len(hits) else None

    def generate(self, loaded: Loaded, input_ids, image_tensor, image_size, *, max_new_tokens: int) -> str:
        """Greedy decoding (T = 0, one beam) as LLaVA's eval modules; returns the stripped answer text."""
        import torch

        kwargs = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, use_cache=True)
        if image_tensor is not None:
            kwargs["images"] = image_tensor.unsqueeze(0).to(device=loaded.device, dtype=loaded.dtype)
            if self.passes_image_sizes:
                kwargs["image_sizes"] = [image_size]
        elif self.passes_image_sizes:
            kwargs["images"], kwargs["image_sizes"] = None, None
        kwargs.update(self.generate_kwargs())
        ids = input_ids.to(loaded.device)
        with torch.inference_mode():
            out = loaded.model.generate(ids, **kwargs)
        if out.shape[1] >= ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids):
            out = out[:, ids.shape[1]:]  # LLaVA 1.1.x returns prompt + answer
        return loaded.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()

    # ---------------------------------------------------------------- budgets (the study model)
    @classmethod
    def budget_args(cls, keep: int, image_start: int) -> list[str]:
        """``--method-arg`` values with which the method keeps about ``keep`` visual tokens at its last ranking
        stage: the paper's settings scaled by keep / 128 (128 is FastV's paper budget). ``image_start`` is the
        model's first visual position (the study model's is 32, LLaVA-1.5-7B's 35). Used by ``python -m study``."""
        raise NotImplementedError(f"{cls.name}: no budget_args (docs/adding_a_method.md, 'The study')")

    @classmethod
    def paper_args(cls) -> dict:
        """The paper's settings (the registry's ``args``): what ``budget_args`` scales."""
        return dict(method_spec(cls.name)["args"])

    @classmethod
    def supports_budget(cls, keep: int) -> bool:
        """Whether ``budget_args(keep, ...)`` is a setting the method defines."""
        return True

    @classmethod
    def final_kept(cls, args: dict) -> int:
        """Visual tokens the last ranking stage keeps under ``args`` (the registry's defaults with the run's
        overrides, typed), before any padding cap."""
        raise NotImplementedError(f"{cls.name}: no final_kept (docs/adding_a_method.md, 'The study')")

    # ---------------------------------------------------------------- labels
    def budget(self) -> str:
        """Budget label for paths and metadata, e.g. '128', '2-10-20_0.32-0.16-0.08'; 'all' = no pruning."""
        if not self.budget_keys:
            return "all"
        parts = []
        for k in self.budget_keys:
            v = self.args[k]
            parts.append("-".join(str(x) for x in v) if isinstance(v, list) else str(v))
        return "_".join(parts)


def import_adapter(path: str) -> type[Adapter]:
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)


def adapter_class(key: str) -> type[Adapter]:
    """The adapter class the registry names for method ``key``, plugins included (importing it imports no
    upstream code)."""
    return registry.adapter_class(key)
