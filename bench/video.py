"""The latency benchmark's Video-LLaVA workload (a method eval.video_qa drives, so it has no eval adapter).

The model is Video-LLaVA's own LlavaLlamaForCausalLM from the patched tree (third_party/Video-LLaVA or
$EVAL_THIRD_PARTY/Video-LLaVA) with the benchmark's random LLaVA-1.5-7B weights: Video-LLaVA-7B's LLM and
projector have the same shapes (Vicuna-7B, mlp2x_gelu from 1024 features), so the checkpoint's shards are linked,
not copied, into ``<ckpt>-video/`` beside a Video-LLaVA config. The LanguageBind video tower is built in memory
with random fp16 weights: the CLIP tower's dimensions (ViT-L/14, or the tiny one) at 224 px with 8 frames and
temporal attention, i.e. 8 × 257 = 2,056 visual tokens. Input: a random [3, 8, 224, 224] clip fed as a tensor
(the video processor, decord and LoRA are not used, so their imports may be stand-ins: video_imports), after the
35-token prefix of the llava_v1 template, with Video-LLaVA's 8 <image> placeholders, then 40 question tokens.
Pruning: FastV at layer K keeping R of the 2,056 tokens (the registry's video args; run_video.sh's defaults);
mode full debiases with a synthetic exponential trend over the 2,056 positions (no video trend is published;
latency does not depend on its values).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

from eval import registry
from eval.common import EvalError, submodule_state, third_party_dir

from .workload import PREFIX, SUFFIX, synthetic_ids

FRAMES, FRAME_SIZE = 8, 224   # LanguageBind_Video_merge: 8 frames of 224 × 224, patch 14 -> 1 + 256 tokens each
TOWER_NAME = "LanguageBind_Video_merge"  # Video-LLaVA's build_video_tower accepts only a name ending in this
# what Video-LLaVA imports only for its processors (video files, LoRA): the benchmark feeds tensors
PROCESSOR_IMPORTS = ("cv2", "decord", "peft", "torchvision", "torchvision.transforms",
                     "torchvision.transforms._transforms_video", "pytorchvideo", "pytorchvideo.data",
                     "pytorchvideo.data.encoded_video", "pytorchvideo.transforms")


def workload(name: str, ckpt: Path, device: str) -> "VideoWorkload":
    return VideoWorkload(name, ckpt, device)


class VideoWorkload:
    def __init__(self, name: str, ckpt: Path, device: str):
        import torch

        entry = registry.method(name, driver=None)
        self.name, self.device, self.upstream = name, device, entry["upstream"]
        self.k, self.rank = _pruning(entry)
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.stand_ins = video_imports(third_party_dir(self.upstream))
        self.model = load_model(video_checkpoint(Path(ckpt)), device, self.dtype)
        self.model.config.video_fastv_k, self.model.config.video_fastv_rank = self.k, self.rank
        tower = self.model.get_video_tower()
        self.span = FRAMES * (tower.num_patches + 1)
        self.clip = torch.randn(3, FRAMES, FRAME_SIZE, FRAME_SIZE, generator=torch.Generator().manual_seed(0)
                                ).to(device, self.dtype)
        constants = importlib.import_module("videollava.constants")
        self.ids = synthetic_ids(constants.IMAGE_TOKEN_INDEX, self.model.config.vocab_size, FRAMES).to(device)
        from debias_core import ExponentialTrend
        self.trend = ExponentialTrend(a=1.0, b=0.002, n=self.span)
        self.trend_method = name  # debias_core takes the method's settings from its registry entry, as eval.video_qa
        self.input = (f"random {FRAMES}-frame {FRAME_SIZE}×{FRAME_SIZE} clip, prompt {PREFIX} + {self.span} + "
                      f"{SUFFIX} tokens, FastV at layer {self.k} keeping {self.rank}; full: a synthetic exponential "
                      f"trend over the {self.span} positions" + (f"; stand-ins for {', '.join(self.stand_ins)}"
                                                                  if self.stand_ins else ""))

    def upstream_state(self) -> str:
        return f"third_party/{self.upstream} {submodule_state(self.upstream)}"

    def sample(self):
        import debias_core
        return debias_core.sample(preprocess="none", span_start=PREFIX, span_length=self.span)

    def generate(self, new_tokens: int) -> None:
        import torch
        with torch.inference_mode():
            self.model.generate(self.ids, images=[self.clip], do_sample=False, num_beams=1,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True)


def _pruning(entry: dict) -> tuple[int, int]:
    args = entry.get("args", {})
    if "fastv_k" not in args or "fastv_rank" not in args:
        raise EvalError(f"the registry's method {entry['key']!r} has no args fastv_k and fastv_rank (the FastV "
                        f"layer and kept tokens its patch series prunes with); add them to its entry in "
                        f"{registry.REGISTRY_FILE.relative_to(registry.ROOT)}")
    return args["fastv_k"], args["fastv_rank"]


def video_imports(tree: Path) -> list[str]:
    """Put the Video-LLaVA tree first on sys.path; register a stand-in for each processor import that fails
    here (a StandIn). Returns the names stood in for."""
    if not (tree / "videollava" / "model").is_dir():
        raise EvalError(f"{tree} has no videollava/model; populate it (git submodule update --init "
                        f"third_party/Video-LLaVA, bash scripts/apply_patches.sh Video-LLaVA) or carry it "
                        f"(python -m bench.carry trees DIR)")
    sys.path.insert(0, str(tree))
    stood_in = []
    for name in PROCESSOR_IMPORTS:
        try:
            importlib.import_module(name)
        except Exception:  # absent, or built for another torch: the benchmark never calls it
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
            _stand_in(name)
            stood_in.append(name)
    return stood_in


class StandIn:
    """Whatever is asked of a stand-in module: any attribute, call or subclassing gives another stand-in
    (Video-LLaVA's processor modules call some at import, e.g. decord.bridge.set_bridge); nothing of it runs in
    the benchmark, which feeds tensors."""

    def __init__(self, name: str = "stand-in", *args, **kwargs):
        self._name = name if isinstance(name, str) else "stand-in"

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return StandIn(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        return StandIn(f"{self._name}()")

    def __mro_entries__(self, bases):
        return (StandIn,)


def _stand_in(name: str) -> None:
    module = types.ModuleType(name)
    module.__getattr__ = lambda attr: StandIn(f"{name}.{attr}") if not attr.startswith("__") else _no(attr)
    module.__path__ = []
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)  # find_spec() asks for it
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)


def _no(attr: str):
    raise AttributeError(attr)


def video_checkpoint(ckpt: Path) -> Path:
    """``<ckpt>-video/``: the Video-LLaVA config over the LLaVA checkpoint's shards and tokenizer (links) and the
    video tower's config (LanguageBind: CLIP's vision dimensions at 224 px, 8 frames, temporal attention)."""
    out = ckpt.parent / f"{ckpt.name}-video"
    tower = out / TOWER_NAME
    if (out / "config.json").exists():
        return out
    tower.mkdir(parents=True, exist_ok=True)
    _tower_config(ckpt / "vision_tower" / "config.json").save_pretrained(str(tower))
    for f in ckpt.iterdir():
        if f.name.endswith((".safetensors", ".json", ".model")) and f.name != "config.json":
            (out / f.name).unlink(missing_ok=True)
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("mm_vision_tower", None)
    # 3072: Video-LLaVA's training scripts' --tokenizer_model_max_length (LLaVA-1.5's 2048 would cut the prompt)
    cfg.update(mm_video_tower=str(tower.resolve()), mm_image_tower=None, mm_vision_select_feature="patch",
               tokenizer_model_max_length=3072)
    (out / "config.json.tmp").write_text(json.dumps(cfg, indent=2))
    os.replace(out / "config.json.tmp", out / "config.json")  # last: a half-built folder is rebuilt
    return out


def _tower_config(clip_config: Path):
    from videollava.model.multimodal_encoder.languagebind import LanguageBindVideoConfig

    clip = json.loads(clip_config.read_text())
    vision = {k: clip[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "projection_dim")}
    # the text model is built with the tower class but never run (Video-LLaVA keeps only vision_model): tiny
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77)
    return LanguageBindVideoConfig(
        text_config=text, projection_dim=vision["projection_dim"],
        vision_config=dict(vision, image_size=FRAME_SIZE, patch_size=14, num_frames=FRAMES, add_time_attn=True,
                           lora_r=0, hidden_act="gelu", video_decode_backend="decord"))


def load_model(path: Path, device: str, dtype):
    """Video-LLaVA's LlavaLlamaForCausalLM with the video tower in place, as videollava.model.builder's
    load_pretrained_model leaves it, except that the tower's weights are random and no video processor is
    made (the benchmark feeds tensors)."""
    import torch
    from videollava.model import LlavaLlamaForCausalLM
    from videollava.model.multimodal_encoder.languagebind import LanguageBindVideo, LanguageBindVideoConfig

    model = LlavaLlamaForCausalLM.from_pretrained(str(path), torch_dtype=dtype, low_cpu_mem_usage=True).to(device)
    tower = model.get_video_tower()
    cfg = LanguageBindVideoConfig.from_pretrained(tower.video_tower_name)
    with torch.device(device):
        tower.video_tower = LanguageBindVideo(cfg).vision_model.to(dtype).requires_grad_(False)
    tower.is_loaded = True
    return model.eval()
