"""debias_core on a real (tiny, random) LLaVA-1.5 forward pass, CPU, offline.

A 2-layer LlavaLlamaForCausalLM from llava-torch with a tiny random CLIP tower at the real geometry
(336 px, patch 14: 24×24 = 576 visual tokens) and a CLIPImageProcessor with the OpenAI mean/std is
saved to a temp folder and loaded back through LLaVA's own ``load_pretrained_model``. Two padded,
non-square images go through LLaVA's ``process_images`` (pad = expand2square) and a vicuna_v1 prompt
through ``tokenizer_image_token``; one forward with ``output_attentions=True`` gives the last token's
attention (layer 1, head mean) over the 576 visual tokens, i.e. the score a FastV-style ranking site sees.

Which tokens are padding is read off the processed pixels (an oracle independent of debias_core's
geometry). Checks: mode ``full`` keeps no padding token in the top-k and caps k to the content count;
mode ``off`` selects exactly what plain ``torch.topk`` of the raw scores selects.
"""
from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch

import debias_core as dc
from tests.support import require_module

pytestmark = pytest.mark.usefixtures("clean_debias")

IMAGE_SIZES = [(333, 500), (640, 427)]   # portrait and landscape, both padded by expand2square
K = 450                                  # more than either image has content tokens
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the picture? ASSISTANT: A cat sits on a red chair near the window.",
    "Describe the image in detail. Which colour is the car? How many people are there?",
    "Answer the question using a single word or phrase. Is there a dog in the image? Yes. No.",
]


def train_tokenizer(folder):
    """A tiny LlamaTokenizer from a sentencepiece model trained here (no hub access)."""
    spm = require_module("sentencepiece", "the LLaVA integration test needs sentencepiece for its tokenizer")
    from transformers import LlamaTokenizer
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=buf, vocab_size=400,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    (folder / "spm.model").write_bytes(buf.getvalue())
    tok = LlamaTokenizer(vocab_file=str(folder / "spm.model"), legacy=True)  # legacy=False would need protobuf
    tok.save_pretrained(folder)
    return tok


def build_tiny_llava(root):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    torch.manual_seed(0)
    tower = root / "clip-tiny-336"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=336, patch_size=14, projection_dim=32)).save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
                       do_center_crop=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(tower)

    model_dir = root / "tiny-llava-v1.5"
    model_dir.mkdir()
    tok = train_tokenizer(model_dir)
    config = LlavaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        mm_vision_tower=str(tower), mm_hidden_size=32, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_patch_merge_type="flat", image_aspect_ratio="pad",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, use_mm_proj=True, tokenizer_padding_side="right")
    LlavaLlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


def load_through_llava(model_dir, monkeypatch):
    """LLaVA's own loader. It asks from_pretrained for low_cpu_mem_usage/device_map, which need
    `accelerate`; where that is not installed (the CPU test env), those two loading hints are dropped —
    on a CPU they change how, not what, is loaded."""
    from llava.model.builder import load_pretrained_model
    if importlib.util.find_spec("accelerate") is None:
        from transformers import CLIPVisionModel
        from llava.model import LlavaLlamaForCausalLM
        for cls in (LlavaLlamaForCausalLM, CLIPVisionModel):
            original = cls.from_pretrained.__func__

            def from_pretrained(klass, *args, _original=original, **kwargs):
                kwargs.pop("low_cpu_mem_usage", None)
                kwargs.pop("device_map", None)
                return _original(klass, *args, **kwargs)

            monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))
    return load_pretrained_model(str(model_dir), None, model_dir.name, device="cpu", attn_implementation="eager")


def pixel_padding(pixel_values, grid=24, patch=14, tol=0.05, threshold=0.5):
    """bool [576] per processed image: patch is padding when > threshold of its pixels are the
    normalised CLIP-mean background (≈ 0 in every channel). pixel_values: [3, 336, 336]."""
    bg = (pixel_values.float().abs() < tol).all(dim=0)                      # [336, 336]
    frac = bg.reshape(grid, patch, grid, patch).float().mean(dim=(1, 3))    # [24, 24]
    return (frac > threshold).reshape(-1)


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    require_module("llava", "the LLaVA integration test needs llava-torch==1.2.2.post1 (installed --no-deps)")
    require_module("transformers", "the LLaVA integration test needs transformers 4.37.2")
    from PIL import Image
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    mp = pytest.MonkeyPatch()
    try:
        torch.manual_seed(0)
        root = tmp_path_factory.mktemp("tiny-llava")
        tokenizer, model, processor, _ = load_through_llava(build_tiny_llava(root), mp)
    finally:
        mp.undo()
    assert model.config.image_aspect_ratio == "pad" and model.get_vision_tower().num_patches == 576

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(160, 256, (h, w, 3), dtype=np.uint8)) for w, h in IMAGE_SIZES]
    pixels = process_images(images, processor, model.config)                 # [2, 3, 336, 336]

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\nWhat is in the picture?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    input_ids = ids.unsqueeze(0).repeat(len(images), 1)
    s0 = int((ids == IMAGE_TOKEN_INDEX).nonzero()[0, 0])

    with torch.inference_mode():
        out = model(input_ids=input_ids, images=pixels.to(dtype=model.dtype), image_sizes=[im.size for im in images],
                    output_attentions=True, use_cache=False, return_dict=True)
    assert len(out.attentions) == 2
    attn = out.attentions[1]                                                  # [B, heads, L, L]
    assert attn.shape[-1] == ids.numel() - 1 + 576                           # placeholder -> 576 tokens
    scores = attn[:, :, -1, s0:s0 + 576].mean(dim=1)                          # [B, 576], fp16
    return {"scores": scores, "s0": s0, "padding": torch.stack([pixel_padding(p) for p in pixels]),
            "dtype": model.dtype}


def test_forward_gives_attention_over_the_visual_span(llava_run):
    scores = llava_run["scores"]
    assert scores.shape == (2, 576) and scores.dtype == llava_run["dtype"] == torch.float16
    assert torch.isfinite(scores).all() and (scores > 0).all()
    assert llava_run["s0"] > 0


def test_pixel_oracle_agrees_with_the_geometry(llava_run):
    """Sanity of the oracle itself (exact geometry: counts match for real pixels)."""
    for b, size in enumerate(IMAGE_SIZES):
        geometry = ~torch.from_numpy(dc.valid_mask(dc.pad_fractions(size), 0.5).reshape(-1))
        assert torch.equal(llava_run["padding"][b], geometry), size
    assert llava_run["padding"].sum(dim=1).tolist() == [576 - 384, 576 - 384]


@pytest.mark.parametrize("trend", ["paper:fastv", "paper:himap/gqa"])
def test_full_keeps_no_padding_and_caps_k(llava_run, trend):
    dc.configure(mode="full", trend=trend, method="fastv" if trend == "paper:fastv" else "himap")
    scores, padding = llava_run["scores"], llava_run["padding"]
    for b, size in enumerate(IMAGE_SIZES):
        raw_top = torch.topk(scores[b].float(), K).indices
        assert padding[b][raw_top].any()          # the raw selection does take padding (K > content)
        with dc.sample(image_size=size, span_start=llava_run["s0"]):
            k = dc.keep_cap(K)
            top = torch.topk(dc.debias(scores[b]), k).indices
        content = int((~padding[b]).sum())
        assert k == content < K
        assert not padding[b][top].any(), f"{size}: padding tokens {top[padding[b][top]].tolist()} kept"
        assert sorted(top.tolist()) == sorted(torch.nonzero(~padding[b]).flatten().tolist())


def test_full_on_the_batch_with_per_sample_contexts(llava_run):
    dc.configure(mode="full", trend="paper:himap/gqa")
    scores, padding = llava_run["scores"], llava_run["padding"]
    with dc.sample(image_size=IMAGE_SIZES, span_start=llava_run["s0"]):
        out = dc.debias(scores)
        ks = [dc.keep_cap(200, sample=b) for b in range(2)]
        k = dc.keep_cap(K)
    assert ks == [200, 200] and k == 384
    assert torch.equal(torch.isneginf(out), padding)
    top = torch.topk(out, 200, dim=1).indices
    assert not torch.gather(padding, 1, top).any()
    # among content tokens the positional weight changes the order relative to raw attention
    raw_top = torch.topk(scores.float().masked_fill(padding, float("-inf")), 200, dim=1).indices
    assert not torch.equal(top.sort(dim=1).values, raw_top.sort(dim=1).values)


def test_off_equals_plain_topk(llava_run):
    dc.configure(mode="off")
    scores = llava_run["scores"]
    for b, size in enumerate(IMAGE_SIZES):
        with dc.sample(image_size=size, span_start=llava_run["s0"]):
            debiased = dc.debias(scores[b])
            k = dc.keep_cap(K)
        assert debiased is scores[b] or torch.equal(debiased, scores[b])
        assert k == K
        ours, plain = torch.topk(debiased, k), torch.topk(scores[b], K)
        assert torch.equal(ours.indices, plain.indices) and torch.equal(ours.values, plain.values)
    row = scores[0]
    assert dc.debias(row) is row
