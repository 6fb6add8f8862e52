"""Probe for tests/baselines/test_video.py: drives Video-LLaVA's own classes in a fresh interpreter.

    python video_probe.py init DIR               tokenizer, tiny LanguageBind video tower, tiny Video-LLaVA,
                                                 synthetic videos and QA files, all saved under DIR
    python video_probe.py run DIR SPECS_JSON     LlavaLlamaForCausalLM.generate on a real video, per spec
    python video_probe.py eval DIR SPEC_JSON     the eval script's run_inference over the QA files, per chunk

PYTHONPATH must start with a Video-LLaVA tree (pristine or patched export); both load the same saved weights.
torchvision and pytorchvideo are replaced by the stand-ins of video_stubs.py (they cannot be installed against
the local CPU torch); decord, cv2, the LanguageBind video tower, the video processor, the conversation
template, tokenizer_image_token and load_pretrained_model are the real ones. Videos are written here with cv2.

Observation is from outside Video-LLaVA's code: a pre-hook on decoder layer K reads the position ids and cache
length it is handed (the kept tokens keep their original positions), a hook on layer K-1 reads (and for the
constructed checks replaces) the attention map the pruning ranks by, a hook on lm_head keeps the logits, and a
wrapper around prepare_inputs_labels_for_multimodal reads the span that the patched code records.
Prints one JSON line last.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

import transformers  # noqa: F401  (before the stand-ins: transformers probes for torchvision at import)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import video_stubs  # noqa: E402
from probe_support import train_tokenizer  # noqa: E402

video_stubs.install()

torch.set_num_threads(1)

SEED = 1234
FRAMES, PER_FRAME = 8, 257          # LanguageBind video tower: 8 frames x (CLS + 16x16 patches)
SPAN = FRAMES * PER_FRAME           # 2056
QUESTION = "what is the man doing in the video?"
SPM_WORDS = ("a chat between curious human and an artificial intelligence assistant the gives helpful detailed "
             "polite answers to human's questions USER: ASSISTANT: what is color of video in on man doing dog "
             "cat red blue yes no ? . , running jumping playing \n").split(" ")


def _write_video(path: Path, n_frames: int, size=(96, 72), seed=0):
    """A short mp4 (mp4v) with a moving square on a coloured background, written with cv2."""
    import cv2
    rng = np.random.default_rng(seed)
    w, h = size
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 8, (w, h))
    base = rng.integers(0, 256, 3)
    for f in range(n_frames):
        frame = np.empty((h, w, 3), np.uint8)
        frame[:] = (base + 9 * f) % 256
        x = (5 * f) % (w - 16)
        frame[20:36, x:x + 16] = 255 - frame[0, 0]
        out.write(frame)
    out.release()


def init(d: Path) -> dict:
    from videollava.model import LlavaConfig, LlavaLlamaForCausalLM
    from videollava.model.multimodal_encoder.languagebind import LanguageBindVideo, LanguageBindVideoConfig
    torch.manual_seed(SEED)
    d.mkdir(parents=True, exist_ok=True)
    model_dir = d / "Video-LLaVA-tiny"          # load_pretrained_model wants "llava" in the folder name
    model_dir.mkdir(exist_ok=True)
    tok = train_tokenizer(model_dir, SPM_WORDS)
    tower_dir = d / "LanguageBind_Video_merge"  # build_video_tower accepts only this name ending
    tower = LanguageBindVideo(LanguageBindVideoConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=14, projection_dim=32, num_frames=FRAMES, add_time_attn=True,
                           video_decode_backend="decord"),
        projection_dim=32))
    tower.save_pretrained(str(tower_dir), safe_serialization=True)
    # eos_token_id=None: random weights must not stop generation early in the run action.
    cfg = LlavaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, max_position_embeddings=4096, initializer_range=0.2,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None,
                      mm_video_tower=str(tower_dir), mm_image_tower=None, mm_hidden_size=32,
                      mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                      mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad")
    LlavaLlamaForCausalLM(cfg).save_pretrained(str(model_dir), safe_serialization=True)
    videos = d / "videos"
    videos.mkdir(exist_ok=True)
    for i, n in enumerate((24, 13, 40)):
        _write_video(videos / f"vid{i}.mp4", n, seed=i)
    # Video-ChatGPT QA format (test_q.json / test_a.json): answers carry their question's id so alignment shows.
    qs = [{"video_name": f"vid{i % 3}", "question": QUESTION if i % 2 else "what color is the dog?",
           "question_id": f"q{i}"} for i in range(7)]
    (d / "test_q.json").write_text(json.dumps(qs))
    (d / "test_a.json").write_text(json.dumps([{"answer": f"answer-to-{q['question_id']}", "type": 0,
                                                "question_id": q["question_id"]} for q in qs]))
    return {"model": str(model_dir), "tower": str(tower_dir)}


def load(d: Path):
    from transformers import AutoTokenizer
    from videollava.model import LlavaLlamaForCausalLM
    model_dir = d / "Video-LLaVA-tiny"
    tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    tower = model.get_video_tower()
    if not tower.is_loaded:          # what videollava.model.builder.load_pretrained_model does
        tower.load_model()
    return tok, model, tower.video_processor


def prompt_ids(tok, question: str):
    """input_ids [1, L] exactly as run_inference_video_qa.get_model_output builds them."""
    from videollava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from videollava.conversation import conv_templates
    from videollava.mm_utils import tokenizer_image_token
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "".join([DEFAULT_IMAGE_TOKEN] * FRAMES) + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tok, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)


def configure_debias(mode: str, trend=None):
    """mode off|pad|pos|full (pos/full: an exponential trend over the 2,056 video positions unless ``trend``
    names another), or env (leave debias_core to DEBIAS*, as an eval driver does)."""
    import debias_core
    debias_core.reset()
    if mode == "env":
        return
    if mode in ("pos", "full") and trend is None:
        trend = debias_core.ExponentialTrend(a=1.0, b=1e-3, n=SPAN)
    debias_core.configure(mode=mode, trend=trend, method="fastv")


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


def run_one(tok, model, video, spec: dict) -> dict:
    """spec: k (None = pruning off), rank, debias (off|pad|pos|full|env), trend, context (debias_core.sample),
    cache (use_cache), steps (decode steps after prefill), variant (None | ramp | fixed: layer K-1's attention
    replaced by a flat map whose last row over the span is a 1 % recency ramp / a fixed random pattern),
    stale_positions (give decode steps upstream's position = length of the last layer's cache)."""
    import debias_core
    from videollava.constants import IMAGE_TOKEN_INDEX
    cfg, layers = model.config, model.model.layers
    k = spec.get("k")
    for key in ("video_fastv_k", "video_fastv_rank"):
        if hasattr(cfg, key):
            delattr(cfg, key)
    if k is not None:
        cfg.video_fastv_k, cfg.video_fastv_rank = k, spec["rank"]
    configure_debias(spec.get("debias", "off"), spec.get("trend"))
    ids = prompt_ids(tok, QUESTION)
    s0 = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    res = {"s0_input_ids": s0, "n_placeholders": int((ids[0] == IMAGE_TOKEN_INDEX).sum()), "ids_len": ids.shape[1]}
    at_k, raw, logits, hashes, spans, maps = [], [], [], [], [], []
    hooks = [layer.register_forward_hook(   # which layers hand back an attention map, per forward
        lambda module, args, out, i=i: maps.append(i) if len(out) > 1 and torch.is_tensor(out[1]) else None)
        for i, layer in enumerate(layers)]
    kk = k if k is not None and 0 < k < len(layers) else 2   # hook layer 2 when pruning is off or k is invalid

    def on_layer_k(module, args, kwargs):
        pos = kwargs["position_ids"][0]
        pkv = kwargs.get("past_key_value")
        at_k.append({"positions": pos.tolist(), "past": 0 if pkv is None else int(pkv[0].shape[2])})

    def on_layer_k_minus_1(module, args, out):
        attn = out[1] if len(out) > 1 and torch.is_tensor(out[1]) else None   # else (hidden, cache): no map asked
        if attn is None:
            return None
        raw.append(attn[0, :, -1, s0:s0 + SPAN].float().mean(0).tolist())
        variant = spec.get("variant")
        if variant is None:
            return None
        new = torch.full_like(attn, 1e-3)
        if variant == "ramp":
            row = 1e-3 * (1 + 1e-2 * torch.arange(SPAN, dtype=attn.dtype) / (SPAN - 1))
        else:
            row = 1e-3 * (1 + torch.rand(SPAN, generator=torch.Generator().manual_seed(7), dtype=attn.dtype))
        new[..., -1, s0:s0 + SPAN] = row
        return (out[0], new) + tuple(out[2:])

    def on_lm_head(module, args, out):
        hashes.append(_hash(out))
        logits.append(out[0, -1].double().tolist())

    hooks += [layers[kk].register_forward_pre_hook(on_layer_k, with_kwargs=True),
              layers[kk - 1].register_forward_hook(on_layer_k_minus_1),
              model.lm_head.register_forward_hook(on_lm_head)]

    original = model.prepare_inputs_labels_for_multimodal

    def prepare(input_ids, position_ids, attention_mask, past_key_values, labels, images):
        out = original(input_ids, position_ids, attention_mask, past_key_values, labels, images)
        if past_key_values is None:
            span = getattr(model.get_model(), "visual_span", "absent")
            emb = out[4]
            entry = {"span": list(span) if isinstance(span, tuple) else span, "embeds_len": int(emb.shape[1])}
            feats = model.encode_videos(torch.stack(images)).reshape(-1, emb.shape[-1])
            text = model.get_model().embed_tokens(input_ids[0, :s0])
            entry["span_holds_video_features"] = bool(torch.equal(emb[0, s0:s0 + SPAN], feats))
            entry["prefix_is_text"] = bool(torch.equal(emb[0, :s0], text))
            spans.append(entry)
        elif spec.get("stale_positions"):
            out = list(out)
            out[1] = torch.full_like(out[1], past_key_values[-1][-1].shape[-2])
            out = tuple(out)
        return out

    model.prepare_inputs_labels_for_multimodal = prepare
    gen = dict(images=[video], do_sample=False, num_beams=1, max_new_tokens=spec.get("steps", 3) + 1,
               use_cache=spec.get("cache", True))
    try:
        if spec.get("context", True):
            with debias_core.sample(image_size=None, preprocess="none", span_start=s0, span_length=SPAN):
                with torch.inference_mode():
                    out = model.generate(ids, **gen)
        else:
            with torch.inference_mode():
                out = model.generate(ids, **gen)
        res["generated"] = out[0, ids.shape[1]:].tolist()
    except (debias_core.DebiasError, ValueError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        for h in hooks:
            h.remove()
        del model.prepare_inputs_labels_for_multimodal
    kept = [sorted(p - s0 for p in a["positions"] if s0 <= p < s0 + SPAN) for a in at_k]
    res.update(at_k=at_k, kept=kept, raw=raw, logits=logits, logit_hashes=hashes, spans=spans, attention_maps=maps)
    if raw and k is not None:
        rank = min(spec["rank"], SPAN)
        res["expected_off"] = sorted(torch.tensor(raw[0]).topk(rank).indices.tolist())
    return res


def run(d: Path, specs: dict) -> dict:
    tok, model, processor = load(d)
    random.seed(SEED)  # the processor's RandomHorizontalFlipVideo draws from Python's random
    video = processor.preprocess(str(d / "videos" / "vid0.mp4"), return_tensors="pt")["pixel_values"][0]
    out = {"_video_shape": list(video.shape)}
    for name, spec in specs.items():
        out[name] = run_one(tok, model, video, spec)
    return out


def eval_script(d: Path, spec: dict) -> dict:
    """Run the tree's videollava/eval/video/run_inference_video_qa.py (imported from PYTHONPATH's tree) once
    per chunk. spec: chunks, seed (Python's global random state before each chunk), greedy_bypass (probe
    forces do_sample=False, so that upstream's crash does not hide later defects), extra_args."""
    import videollava
    script = Path(videollava.__file__).parent / "eval" / "video" / "run_inference_video_qa.py"
    modspec = importlib.util.spec_from_file_location("run_inference_video_qa", script)
    mod = importlib.util.module_from_spec(modspec)
    modspec.loader.exec_module(mod)
    calls, prefill_lengths = [], []
    loader = mod.load_pretrained_model

    def load_on_cpu(*args, **kwargs):
        tok, model, processor, ctx = loader(*args, device="cpu", **kwargs)   # the script passes no device
        generate = model.generate

        def recorded(*a, **kw):
            calls.append({k: v for k, v in kw.items() if k in ("do_sample", "temperature", "max_new_tokens")})
            if spec.get("greedy_bypass"):
                kw.update(do_sample=False)
                kw.pop("temperature", None)
            kw["max_new_tokens"] = min(kw.get("max_new_tokens", 4), 4)   # keep CPU time small
            return generate(*a, **kw)

        model.generate = recorded
        model.model.layers[2].register_forward_pre_hook(   # tokens that reach layer 2 at each prefill
            lambda module, args: prefill_lengths.append(args[0].shape[1]) if args[0].shape[1] > 1 else None)
        return tok, model, processor, ctx

    mod.load_pretrained_model = load_on_cpu
    out_dir = Path(spec["out"])
    n = spec["chunks"]
    result = {"chunks": [], "calls": calls, "layer2_prefill_lengths": prefill_lengths}
    for k in range(n):
        random.seed(spec.get("seed", 0))
        video_stubs.flips.clear()
        sys.argv = ["run_inference_video_qa.py", "--model_path", str(d / "Video-LLaVA-tiny"), "--cache_dir",
                    str(d / "cache"), "--video_dir", str(d / "videos"), "--gt_file_question", str(d / "test_q.json"),
                    "--gt_file_answers", str(d / "test_a.json"), "--output_dir", str(out_dir), "--output_name",
                    f"{n}_{k}", "--num_chunks", str(n), "--chunk_idx", str(k), "--device", "cpu",
                    *spec.get("extra_args", [])]
        entry = {}
        try:
            mod.run_inference(mod.parse_args())
        except Exception as e:  # noqa: BLE001 (the test asserts on upstream's own error)
            entry["error"] = f"{type(e).__name__}: {e}"
        path = out_dir / f"{n}_{k}.json"
        entry["lines"] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        entry["flips"] = list(video_stubs.flips)
        result["chunks"].append(entry)
    return result


def main(argv):
    action, d = argv[1], Path(argv[2])
    if action == "init":
        res = init(d)
    elif action == "run":
        res = run(d, json.loads(argv[3]))
    elif action == "eval":
        res = eval_script(d, json.loads(argv[3]))
    else:
        raise SystemExit(f"unknown action {action!r}; use init, run or eval")
    import videollava
    res["_env"] = {"videollava": videollava.__file__}
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv)
