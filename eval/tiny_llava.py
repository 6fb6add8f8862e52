"""A tiny random LLaVA-1.5 saved to disk, loadable offline through LLaVA's own ``load_pretrained_model``.

    from eval.tiny_llava import build_tiny_llava
    path = build_tiny_llava("/tmp/tiny-llava")          # the folder name must contain "llava"
    tokenizer, model, image_processor, _ = load_pretrained_model(path, None, "tiny-llava", device="cpu")

What is saved (nothing is downloaded):
  <out_dir>/                  LlavaLlamaForCausalLM (2 decoder layers, hidden 64, eager attention),
                              config as llava-v1.5: image_aspect_ratio "pad", mm_vision_select_layer −2,
                              patch features, mlp2x_gelu projector, no <im_start>/<im_end>/<im_patch> tokens
  <out_dir>/tokenizer.model   a sentencepiece model trained here on a few sentences (LlamaTokenizer, slow)
  <out_dir>/vision_tower/     a random CLIPVisionModel with the real LLaVA-1.5 geometry (image 336, patch 14,
                              so 24×24 = 576 visual tokens) and a CLIPImageProcessor with OpenAI's mean/std

``mm_vision_tower`` in config.json is the vision tower's absolute path, so the folder is not relocatable:
build it where it will be used (it takes about a second). config.json's ``tiny_llava`` entry records the seed
and ``image_start``: the index of the image placeholder in a vicuna_v1 prompt with this tokenizer (35 for the
real LLaVA-1.5 tokenizer; FastV/HiMAP/TokenCarve take it as their sys length).

The checkpoint format is that of the ``llava`` package that builds it. Built inside a baseline's environment
with its LLaVA 1.1.3 on sys.path (``python -m eval.tiny_llava DIR --method fastv``), it is saved as the released
llava-v1.5 checkpoints were (LLaVA 1.1.3, transformers 4.31: ``model_type`` "llava", rotary buffers saved),
which every baseline's loader and LLaVA ≥ 1.2 read.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

# OpenAI CLIP normalisation (clip-vit-large-patch14-336), as LLaVA-1.5 uses it.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")

# Text the tokenizer is trained on: LLaVA's vicuna_v1 prompt pieces plus the vocabulary of the demo benchmark.
_CORPUS = [
    SYSTEM, "USER: ASSISTANT:", "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Is there a red circle in the image? Is there a blue square in the image? yes no",
    "Is there a green triangle in the image? Is there a yellow circle? Is there a purple square?",
    "What color is the shape? What shape is it? The answer is A. B. C. D.",
    "a photo of a cat on a table, a dog in the park, a car on the street, a person with a hat.",
    "The image shows a large object on the left and a small object on the right.",
    "0 1 2 3 4 5 6 7 8 9 ten eleven twelve hundred",
]


def _train_tokenizer(out_dir: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(_CORPUS * 4) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tok"), vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            num_threads=1, minloglevel=2, hard_vocab_limit=False)
        shutil.copy(Path(tmp) / "tok.model", out_dir / "tokenizer.model")


def _image_start(tokenizer) -> int:
    """Index of IMAGE_TOKEN_INDEX in the input ids of a vicuna_v1 prompt (as LLaVA's eval modules build it)."""
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\nIs there a red circle in the image?")
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX).index(IMAGE_TOKEN_INDEX)


def image_start(model_dir) -> int:
    """The recorded ``image_start`` of a model built here (see the module docstring)."""
    path = Path(model_dir) / "config.json"
    try:
        return int(json.loads(path.read_text())["tiny_llava"]["image_start"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} has no tiny_llava.image_start ({e!r}); rebuild the model with "
                         f"python -m eval.tiny_llava {model_dir}") from None


def build_tiny_llava(out_dir, *, layers: int = 2, hidden: int = 64, heads: int = 4, vision_layers: int = 2,
                     attn_implementation: str | None = "eager",
                     vision_hidden: int = 32, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Save a tiny random LLaVA-1.5 (LLM, projector, CLIP tower, processor, tokenizer) into ``out_dir``.

    Returns the absolute model path. ``out_dir``'s name must contain "llava" (LLaVA's loader picks the
    model class by name). Same seed → same weights. The LLM has ``layers`` decoder layers and uses eager
    attention so ``output_attentions=True`` returns real attention probabilities.
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaTokenizer
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    out = Path(out_dir).resolve()
    if "llava" not in out.name.lower():
        raise ValueError(f"model folder name {out.name!r} must contain 'llava': LLaVA's load_pretrained_model "
                         f"chooses the model class from the name (e.g. {out.parent / 'tiny-llava'})")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    tower_dir = out / "vision_tower"
    vcfg = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                            num_hidden_layers=vision_layers, num_attention_heads=2, image_size=336, patch_size=14,
                            projection_dim=vision_hidden)
    CLIPVisionModel(vcfg).save_pretrained(tower_dir)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3).save_pretrained(tower_dir)

    _train_tokenizer(out, vocab_size)
    tok = LlamaTokenizer(str(out / "tokenizer.model"), legacy=True, add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(out)
    n_vocab = len(tok)
    image_start = _image_start(tok)

    cfg = LlavaConfig(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, torch_dtype="float16",
        mm_vision_tower=str(tower_dir), mm_hidden_size=vision_hidden, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
        image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False,
        tokenizer_model_max_length=2048, tokenizer_padding_side="right", use_cache=True,
        attn_implementation=attn_implementation or "eager")
    model = LlavaLlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    # from_pretrained picks sdpa unless the saved config asks for eager; record the choice explicitly
    # (attn_implementation=None: no key, as in the released LLaVA-1.5 checkpoints; each method picks its own).
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    data.pop("_attn_implementation", None)
    if attn_implementation:
        data["_attn_implementation"] = attn_implementation
    data["tiny_llava"] = {"seed": seed, "image_start": image_start,
                          "note": "random weights built by eval.tiny_llava for tests and the demo"}
    cfg_path.write_text(json.dumps(data, indent=2))
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=2, help="decoder layers (a method pruning before layer K needs > K)")
    p.add_argument("--hidden", type=int, default=64, help="LLM hidden size (TokenCarve's SVD needs >= 576)")
    p.add_argument("--attn", default="eager", help="saved attention implementation; 'default' saves none (as the "
                                                    "released checkpoints: transformers then picks sdpa)")
    p.add_argument("--method", default=None,
                   help="build with this method's llava package (its adapter's activate(): third_party/<Name>, or "
                        "EVAL_THIRD_PARTY), i.e. in the checkpoint format that baseline's loader reads")
    a = p.parse_args()
    if a.method:
        import sys

        from eval.common import EvalError
        from eval.methods import get_adapter
        try:
            get_adapter(a.method).activate()
        except EvalError as e:
            sys.exit(f"error: {e}")
    print(build_tiny_llava(a.out_dir, seed=a.seed, layers=a.layers, hidden=a.hidden,
                           attn_implementation=None if a.attn == "default" else a.attn))
