"""Train the study model: ``python -m study train --out DIR [--minutes 5] [--vision-minutes 1.5] [--device cuda]``.

What is trained (everything else is SmolLM2-135M-Instruct's pretrained weights, frozen):
- the CLIP-architecture vision tower, from scratch (no pretrained vision weights exist offline);
- the mlp2x_gelu projector;
- rank-8 LoRA on every linear layer of the LLM. The paper's claim is that the positional bias of
  language-to-vision attention is inherited from the LLM, so the LLM keeps its pretrained weights and only gets
  a low-rank update (a frozen LLM could not learn to read a vision tower trained from scratch in minutes;
  full fine-tuning would overwrite the behaviour under study).

Two phases share one time budget (``--minutes``; each phase fixes its step count once its first steps are timed):
1. vision warm-up (``--vision-minutes``): the vision tower and linear read-outs (``AuxHeads``) alone learn each
   patch's colour, shape and glyph from the generator's labels; no LLM in the loop, so steps are cheap and the
   vision features are informative before the LLM first sees them. Learning them through the LLM's answer loss
   was what made training slow.
2. the whole model: answers' cross-entropy + the read-outs' loss, cosine schedule.

Data: ``study.data.training_conversations`` (endless, seeded, disjoint from the calibration and evaluation
splits). Each sample is one image with ``--turns`` questions in one vicuna_v1 conversation, as LLaVA-1.5's own
instruction data has several turns per image; every question ends with LLaVA's answer-format suffix, exactly as
the evaluation question files have it (the first turn is token for token what the evaluation prompt is). The loss
is on the answer tokens and their end-of-sequence tokens only. Several turns give several supervised answers per
forward pass of the 576 visual tokens for about 10 % more tokens. ``--init FILE`` starts from an earlier run's
trained.safetensors (its sha256 is recorded).

Resumable: every ``--save-every`` steps (of either phase) the trainable weights, read-outs, the phase's AdamW
moments and step are written (safetensors + JSON, atomically); rerunning the same command continues from there
(the data stream is reseeded with the step, so no sample repeats the pre-interruption stream). Outputs in DIR:
``trained.safetensors`` (fp16: vision tower ``vision.*``, projector ``projector.*``, LoRA ``lora.*``),
``train.json`` (settings, log, validation accuracy, the read-outs' object-patch accuracy), and ``resume/`` while
training is unfinished.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import model as M

TRAINED = "trained.safetensors"
# Stream seeds far from the written splits' seeds (study.data.SPLIT_SEEDS: 0, 1, 2) and from each other.
TRAIN_SEED = 10_000_000      # + 100_000 * seed + step at which the stream (re)starts
VALIDATION_SEED = 20_000_000  # + seed


# ------------------------------------------------------------------------------------------------ data

def image_processor():
    """LLaVA-1.5's CLIP preprocessing at 336 px (what the saved vision_tower/ folder's processor does)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                              do_center_crop=True, image_mean=list(M.CLIP_MEAN), image_std=list(M.CLIP_STD),
                              resample=3)


def expand2square(image, background):
    """LLaVA's ``expand2square``: paste onto a square of the long side, centred with integer offset (S-m)//2."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return square


def pad_and_process(image, processor) -> torch.Tensor:
    """PIL image -> pixels [3, 336, 336] as LLaVA-1.5's ``process_images`` with image_aspect_ratio "pad"."""
    background = tuple(int(x * 255) for x in processor.image_mean)
    square = expand2square(image.convert("RGB"), background)
    return processor.preprocess(square, return_tensors="pt")["pixel_values"][0]


def square_pixels(image) -> torch.Tensor:
    """PIL image -> uint8 [3, 336, 336]: LLaVA's padding (``expand2square`` with the CLIP mean colour) and the CLIP
    processor's bicubic resize, the part of ``pad_and_process`` that needs the image. ``clip_normalize`` does the
    rest on the device; together they give ``pad_and_process``'s pixels bit for bit (tested). Data workers send a
    quarter of the bytes and spend about half the time of the processor's own path."""
    import numpy as np
    from PIL import Image

    background = tuple(int(x * 255) for x in M.CLIP_MEAN)
    square = expand2square(image.convert("RGB"), background)
    resized = square.resize((336, 336), Image.BICUBIC, reducing_gap=None)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(resized).transpose(2, 0, 1)))


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 CLIP input, with CLIPImageProcessor's arithmetic: rescale by 1/255 in float64
    then cast to float32, then (x - mean) / std in float32."""
    mean, std = _clip_mean_std(pixels.device)
    return ((pixels.double() * (1 / 255)).float() - mean) / std


@functools.lru_cache(maxsize=None)
def _clip_mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std [3, 1, 1] float32 on ``device``, made once (not copied to the device every step)."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device)[:, None, None] for v in (M.CLIP_MEAN, M.CLIP_STD))


def patch_targets(objects, image_size, grid: int = 24, resolution: int = 336) -> torch.Tensor:
    """long [grid², 3]: per patch (raster order, after LLaVA's padding) the colour, shape and glyph class of the
    object whose box holds the patch centre (0 = no object / no glyph). Auxiliary targets for the vision tower."""
    from .data import COLORS, GLYPHS, SHAPES, pad_offset

    colors, shapes = list(COLORS), list(SHAPES)
    dx, dy = pad_offset(image_size)
    side = max(image_size)
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * side / grid       # padded-square pixels
    out = torch.zeros(grid, grid, 3, dtype=torch.long)
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        cols = (centres >= x0 + dx) & (centres < x1 + dx)
        rows = (centres >= y0 + dy) & (centres < y1 + dy)
        cell = rows[:, None] & cols[None, :]
        out[cell, 0] = colors.index(obj["color"]) + 1
        out[cell, 1] = shapes.index(obj["shape"]) + 1
        out[cell, 2] = GLYPHS.index(obj["glyph"]) + 1 if obj["glyph"] else 0
    return out.reshape(grid * grid, 3)


class AuxHeads(torch.nn.Module):
    """Linear read-outs of colour, shape and glyph per patch from the features the projector sees (training only;
    not part of the checkpoint). They give the vision tower, trained from scratch, a dense signal early on.

    Objects cover about a tenth of the patches, so a plain mean over patches is mostly "background" and stops
    teaching once background is recognised; patches of an object weigh 1 and background patches
    ``BACKGROUND_WEIGHT``."""

    BACKGROUND_WEIGHT = 0.1

    def __init__(self, width: int):
        super().__init__()
        from .data import COLORS, GLYPHS, SHAPES

        self.heads = torch.nn.ModuleList([torch.nn.Linear(width, len(COLORS) + 1), torch.nn.Linear(width, len(SHAPES) + 1),
                                          torch.nn.Linear(width, len(GLYPHS) + 1)])

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """features [B, 576, width], targets [B, 576, 3] -> weighted mean cross-entropy of the three read-outs."""
        on_object = targets[..., 0].flatten() > 0
        weight = torch.where(on_object, 1.0, self.BACKGROUND_WEIGHT)
        total = 0.0
        for i, head in enumerate(self.heads):
            ce = torch.nn.functional.cross_entropy(head(features).flatten(0, 1).float(), targets[..., i].flatten(),
                                                   reduction="none")
            total = total + (ce * weight).sum() / weight.sum()
        return total / len(self.heads)

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Share of object patches whose colour and shape the read-outs get right, and of glyph-bearing patches
        whose glyph they get right: how well the vision features already name what is where."""
        where = (targets[..., 0] > 0, targets[..., 0] > 0, targets[..., 2] > 0)
        return {name: float((head(features).argmax(-1) == targets[..., i])[where[i]].float().mean())
                for i, (name, head) in enumerate(zip(("color", "shape", "glyph"), self.heads))}


def conversation_tokens(tokenizer, turns: list[tuple[str, str]], prefix_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of everything after the image in a vicuna_v1 conversation about one image:
    "\n{q1}{suffix} ASSISTANT: {a1}<eos>USER: {q2}{suffix} ASSISTANT: {a2}<eos>..." (LLaVA's separators " " and
    the end-of-sequence token); labels are -100 except on the answers and their end-of-sequence tokens.
    ``suffix`` is LLaVA's "Answer the question using a single word or phrase." line, as in the evaluation files."""
    from .data import LLAVA_ANSWER_SUFFIX

    ids: list[int] = []
    labels: list[int] = []
    for k, (question, answer) in enumerate(turns):
        if k == 0:
            asked = M.prompt_ids(tokenizer, question + LLAVA_ANSWER_SUFFIX)[prefix_len + 1:]
        else:
            asked = tokenizer(f"USER: {question}{LLAVA_ANSWER_SUFFIX} ASSISTANT:").input_ids
        target = M.answer_ids(tokenizer, answer)
        ids += asked + target
        labels += [-100] * len(asked) + target
    return ids, labels


class Stream(torch.utils.data.IterableDataset):
    """(pixels uint8 [3, 336, 336] (``square_pixels``), ids [T], labels [T], patch targets [576, 3]) from
    study.data.training_conversations, one stream per worker."""

    def __init__(self, tokenizer, seed: int, prefix_len: int, turns: int):
        self.tokenizer, self.seed, self.prefix_len, self.turns = tokenizer, seed, prefix_len, turns

    def __iter__(self):
        from .data import training_conversations

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        for image, turns, objects in training_conversations(self.seed, worker, turns=self.turns):
            ids, labels = conversation_tokens(self.tokenizer, turns, self.prefix_len)
            yield square_pixels(image), torch.tensor(ids), torch.tensor(labels), patch_targets(objects, image.size)


class PatchStream(torch.utils.data.IterableDataset):
    """(pixels uint8 [3, 336, 336], patch targets [576, 3]): the vision warm-up's data (no text), one stream per
    worker, from study.data.training_conversations with its own seeds."""

    def __init__(self, seed: int):
        self.seed = seed

    def __iter__(self):
        from .data import training_conversations

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        for image, _, objects in training_conversations(self.seed, worker, turns=1):
            yield square_pixels(image), patch_targets(objects, image.size)


def collate(batch, pad_id: int):
    """-> pixels uint8 [B, 3, R, R], suffix [B, T] (right-padded), mask [B, T], labels [B, T],
    patch targets [B, 576, 3]"""
    pixels = torch.stack([b[0] for b in batch])
    t = max(len(b[1]) for b in batch)
    suffix = torch.full((len(batch), t), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), t), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for i, b in enumerate(batch):
        s, l = b[1], b[2]
        suffix[i, :len(s)], labels[i, :len(l)], mask[i, :len(s)] = s, l, 1
    targets = torch.stack([b[3] for b in batch]) if len(batch[0]) > 3 else None
    return pixels, suffix, mask, labels, targets


def validation_batches(tokenizer, prefix_len: int, n: int, batch: int, seed: int):
    """A fixed validation slice of single questions in the evaluation prompt format (own seed; never the
    evaluation split)."""
    from .data import training_stream

    items = []
    for k, (image, question, answer) in enumerate(training_stream(VALIDATION_SEED + seed, 0)):
        if k == n:
            break
        ids, labels = conversation_tokens(tokenizer, [(question, answer)], prefix_len)
        items.append((square_pixels(image), torch.tensor(ids), torch.tensor(labels)))
    return [collate(items[i:i + batch], tokenizer.eos_token_id) for i in range(0, len(items), batch)]


# ----------------------------------------------------------------------------------------------- model

def build(llm_source: str, gguf=None, seed: int = 0, lora=M.LoraSpec()):
    """(StudyVLM with LoRA, tokenizer, llm config dict, {prefix: LoraLinear})."""
    if llm_source == "smollm2":
        llm, tokenizer, config, _ = M.load_llm(gguf)
    elif llm_source == "tiny":  # tests: a random 2-layer Llama of SmolLM2's shape family, SmolLM2's tokenizer
        llm, tokenizer, config = tiny_llm(gguf, seed)
    else:
        raise ValueError(f"llm source {llm_source!r} is unknown; use smollm2 or tiny")
    llm.requires_grad_(False)
    wrapped = M.add_lora(llm, lora)
    vision = M.build_vision_tower(seed)
    projector = M.build_projector(M.VISION["hidden_size"], config["hidden_size"])
    return M.StudyVLM(llm, vision, projector), tokenizer, config, wrapped


def tiny_llm(gguf, seed):
    """A random LlamaForCausalLM (2 layers, width 64, 4 heads / 2 KV heads) with SmolLM2's real tokenizer."""
    from analysis import gguf_llama
    from analysis.smollm2 import find_gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = gguf_llama.open_gguf(find_gguf(gguf))
    real = gguf_llama.llama_config(reader)
    tokenizer = gguf_llama.build_tokenizer(gguf_llama.tokenizer_spec(reader))
    config = dict(real, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=M.ROPE_THETA, tie_word_embeddings=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**config)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval(), tokenizer, config


def trainable_state(vlm, wrapped) -> dict[str, torch.Tensor]:
    """Every trained tensor under its checkpoint prefix: vision.*, projector.*, lora.* (float32, CPU)."""
    out = {f"vision.{k}": v.detach().float().cpu() for k, v in vlm.vision.state_dict().items()}
    out.update({f"projector.{k}": v.detach().float().cpu() for k, v in vlm.projector.state_dict().items()})
    out.update({f"lora.{k}": v for k, v in M.lora_state(wrapped).items()})
    return out


def load_trainable(vlm, wrapped, state: dict) -> None:
    vlm.vision.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("vision.")})
    vlm.projector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("projector.")})
    for prefix, m in wrapped.items():
        m.lora_a.data.copy_(state[f"lora.{prefix}.lora_a"])
        m.lora_b.data.copy_(state[f"lora.{prefix}.lora_b"])


# ---------------------------------------------------------------------------------------------- resume

def _save_atomic(tensors: dict, meta: dict, folder: Path) -> None:
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        folder.rename(old)
        tmp.rename(folder)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(folder)


def save_resume(folder: Path, t: "Training", opt, meta: dict) -> None:
    """Trainable weights, auxiliary heads, ``opt``'s AdamW moments (the optimiser of the phase under way) and meta."""
    tensors = {f"w.{k}": v for k, v in trainable_state(t.vlm, t.wrapped).items()}
    tensors.update({f"aux.{k}": v.detach().float().cpu() for k, v in t.aux.state_dict().items()})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].detach().cpu()
            tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu()
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"]).float().reshape(1).cpu()
    _save_atomic(tensors, meta, folder)


def read_resume_meta(folder: Path) -> dict:
    return json.loads((folder / "state.json").read_text())


def load_resume(folder: Path, t: "Training", opt) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "state.safetensors"))
    load_trainable(t.vlm, t.wrapped, {k[2:]: v for k, v in tensors.items() if k.startswith("w.")})
    t.aux.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("aux.")})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"opt.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p.device),
                            "step": tensors[f"opt.{i}.step"].reshape(()).to(p.device)}


# ------------------------------------------------------------------------------------------------ train

SETTINGS_THAT_MATTER = ("llm_source", "batch", "lr_vision", "lr_lora", "seed", "lora_rank", "lora_alpha", "minutes",
                        "max_steps", "rope_theta", "aux_weight", "turns", "init_sha256", "vision_minutes",
                        "vision_max_steps", "vision_batch", "vision_lr")
VISION_WARMUP_SEED = TRAIN_SEED + 50_000  # + 100_000 * seed + warm-up step at which the patch stream (re)starts


def lr_factor(step: int, total: int | None, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to 0.1 at step ``total`` (unknown yet: 1)."""
    warm = min(1.0, (step + 1) / warmup_steps)
    frac = step / total if total else 0.0
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


class StepBudget:
    """Fixes a time-bounded phase's step count: from step 10 to ``warmup_steps`` the time per step is measured, and
    the steps that fit before ``deadline`` seconds of training time follow from it."""

    def __init__(self, warmup_steps: int, deadline: float, clock, cuda: bool):
        self.warmup_steps, self.deadline, self.clock, self.cuda, self.t10 = warmup_steps, deadline, clock, cuda, None

    def after(self, step: int) -> int | None:
        """Call after each step; returns the total step count once it is known (at ``warmup_steps``)."""
        if step in (10, self.warmup_steps) and self.cuda:
            torch.cuda.synchronize()
        if step == 10:
            self.t10 = self.clock()
        if step == self.warmup_steps and self.t10 is not None:
            self.per_step = (self.clock() - self.t10) / (step - 10)
            return max(step + 1, int((self.deadline - self.clock()) / self.per_step) + step)
        return None

    def total(self, step: int, total: int | None, bar, log, phase: str) -> int | None:
        """The phase's step count after ``step``: ``total`` once known, else what ``after`` fixes (shown on the
        progress bar and logged)."""
        if total is not None:
            return total
        fixed = self.after(step)
        if fixed is not None:
            bar.total = fixed
            bar.refresh()
            log(f"{phase}: {self.per_step * 1000:.0f} ms/step -> {fixed} steps by {self.deadline / 60:g} min")
        return fixed


def train(out: Path, *, llm_source: str = "smollm2", gguf=None, minutes: float = 6.0, max_steps: int | None = None,
          batch: int = 64, lr_vision: float = 5e-4, lr_lora: float = 6e-4, seed: int = 0, device: str = "cpu",
          workers: int = 0, warmup_steps: int = 60, aux_weight: float = 1.0, save_every: int = 200, val_every: int = 200,
          val_n: int = 256, turns: int = 3, init: Path | None = None, vision_minutes: float = 0.0,
          vision_max_steps: int | None = None, vision_batch: int = 128, vision_lr: float = 1e-3,
          log=print) -> dict:
    """Train and write DIR/trained.safetensors + DIR/train.json; returns the train.json record.

    Two phases share the ``minutes`` budget (training time, from the first step; model loading not counted):
    1. vision warm-up (``vision_minutes`` or ``vision_max_steps``; none when both are 0/None): the vision tower and
       the auxiliary read-outs alone learn each patch's colour, shape and glyph (``warm_up_vision``), with no LLM
       in the loop, so its steps cost a few milliseconds and the data generator sets the pace;
    2. the whole model (answers' cross-entropy + auxiliary loss) until ``minutes`` or ``max_steps``."""
    from safetensors.torch import save_file

    out = Path(out)
    if turns < 1:
        raise ValueError(f"--turns {turns} must be at least 1")
    if vision_minutes < 0 or vision_minutes >= minutes and max_steps is None:
        raise ValueError(f"--vision-minutes {vision_minutes} must be at least 0 and below --minutes {minutes}")
    if (out / TRAINED).exists():
        raise FileExistsError(f"{out / TRAINED} exists: training there finished; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    spec = M.LoraSpec()
    init_sha256 = None
    if init is not None:
        from debias_core.calibrate import file_sha256

        if not Path(init).is_file():
            raise FileNotFoundError(f"--init {init}: no such file; pass a trained.safetensors of an earlier run")
        init_sha256 = file_sha256(Path(init))
    settings = dict(llm_source=llm_source, batch=batch, lr_vision=lr_vision, lr_lora=lr_lora, seed=seed, aux_weight=aux_weight,
                    lora_rank=spec.rank, lora_alpha=spec.alpha, minutes=minutes, max_steps=max_steps,
                    rope_theta=M.ROPE_THETA, vision=M.VISION, lora_targets=list(M.LORA_TARGETS), turns=turns,
                    init=str(init) if init else None, init_sha256=init_sha256,
                    aux_background_weight=AuxHeads.BACKGROUND_WEIGHT, vision_minutes=vision_minutes,
                    vision_max_steps=vision_max_steps, vision_batch=vision_batch, vision_lr=vision_lr)
    started = time.time()
    training = prepare(llm_source, gguf, seed, device, lr_vision=lr_vision, lr_lora=lr_lora, init=init)
    cuda = device.startswith("cuda")
    vision_phase = bool(vision_max_steps) or vision_minutes > 0

    resume_dir = out / "resume"
    state = {"phase": "vision" if vision_phase else "joint", "vision_step": 0, "vision_total": vision_max_steps,
             "step": 0, "total_steps": max_steps, "history": [], "seconds": 0.0}
    if resume_dir.exists():
        meta = read_resume_meta(resume_dir)
        if {k: meta["settings"].get(k) for k in SETTINGS_THAT_MATTER} != {k: settings[k] for k in SETTINGS_THAT_MATTER}:
            raise ValueError(f"{resume_dir} was written with other settings ({meta['settings']}); "
                             f"rerun with those or delete {resume_dir}")
        state.update({k: meta[k] for k in state if k in meta})
        log(f"resuming the {state['phase']} phase at step "
            f"{state['vision_step'] if state['phase'] == 'vision' else state['step']}")
    aux_val = patch_validation(seed, min(val_n, 256))
    val = validation_batches(training.tokenizer, training.prefix_len, val_n, batch, seed)
    t0 = time.time() - state["seconds"]
    clock = lambda: time.time() - t0  # noqa: E731 - training time, continued across resumes

    vision_opt = vision_optimizer(training, vision_lr) if state["phase"] == "vision" else None
    if resume_dir.exists():   # weights, read-outs and the moments of the phase under way at the interruption
        load_resume(resume_dir, training, vision_opt or training.opt)

    def save(opt):
        save_resume(resume_dir, training, opt, dict(state, settings=settings, seconds=clock()))

    if vision_opt is not None:
        warm_up_vision(training, vision_opt, state, save, settings, aux_val, clock=clock, cuda=cuda, workers=workers,
                       val_every=val_every, save_every=save_every, log=log)
        state["phase"] = "joint"
    run_joint_phase(training, state, save, settings, val, aux_val, clock=clock, cuda=cuda, workers=workers,
                    warmup_steps=warmup_steps, val_every=val_every, save_every=save_every, log=log)

    history = state["history"]
    vision_history = [h for h in history if h.get("phase") == "vision"]
    record = {"settings": settings, "steps": state["step"], "vision_steps": state["vision_step"],
              "seconds": round(clock(), 1), "wall_seconds_with_loading": round(time.time() - started, 1),
              "history": history,
              "final_val_exact": next((h["val_exact"] for h in reversed(history) if "val_exact" in h), None),
              "vision_warmup": {"steps": state["vision_step"], "batch": vision_batch,
                                "seconds": next((h["seconds"] for h in reversed(vision_history)), 0.0),
                                "final_aux_accuracy": next((h["aux_accuracy"] for h in reversed(vision_history)
                                                            if "aux_accuracy" in h), None)} if vision_phase else None,
              "final_aux_accuracy": next((h["aux_accuracy"] for h in reversed(history) if "aux_accuracy" in h), None),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "llm_config": training.config}
    weights = {k: v.half() for k, v in trainable_state(training.vlm, training.wrapped).items()}
    save_file(weights, str(out / (TRAINED + ".tmp")))
    os.replace(out / (TRAINED + ".tmp"), out / TRAINED)
    (out / "train.json").write_text(json.dumps(record, indent=1))
    if resume_dir.exists():
        for f in resume_dir.iterdir():
            f.unlink()
        resume_dir.rmdir()
    return record


def _loader(dataset, batch: int, workers: int, collate_fn=None):
    return torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate_fn,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def patch_validation(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed set of ``n`` images for the auxiliary accuracy (own seed, never a written split):
    (pixels uint8 [n, 3, 336, 336], patch targets [n, 576, 3])."""
    import itertools

    items = list(itertools.islice(PatchStream(VALIDATION_SEED + seed), n))
    return torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])


@torch.no_grad()
def aux_accuracy(t: "Training", validation, device, chunk: int = 64) -> dict[str, float]:
    """``AuxHeads.accuracy`` over ``patch_validation``'s images (the vision tower in eval mode, then back)."""
    pixels, targets = validation
    t.vlm.vision.eval()
    features = []
    for i in range(0, len(pixels), chunk):
        with t.amp:
            features.append(t.vlm.patch_features(clip_normalize(pixels[i:i + chunk].to(device))).float())
    t.vlm.vision.train()
    return {k: round(v, 4) for k, v in t.aux.accuracy(torch.cat(features), targets.to(device)).items()}


def vision_optimizer(t: "Training", lr: float) -> torch.optim.AdamW:
    """The warm-up's own AdamW over the vision tower and the read-outs (the joint phase starts ``t.opt`` afresh)."""
    params = list(t.vlm.vision.parameters()) + list(t.aux.parameters())
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.05)


def warm_up_vision(t: "Training", opt, state: dict, save, settings: dict, aux_val, *, clock, cuda: bool,
                   workers: int, val_every: int, save_every: int, log, warmup_steps: int = 50) -> None:
    """Phase 1: the vision tower (and the auxiliary read-outs) alone learn the patch targets; advances
    ``state['vision_step']`` to its total (fixed by the time budget ``settings['vision_minutes']`` or
    ``settings['vision_max_steps']``) with ``opt`` (``vision_optimizer``); ``save(opt)`` writes the resume state."""
    from tqdm import tqdm

    device = t.prefix.device
    params = [p for g in opt.param_groups for p in g["params"]]
    step, total = state["vision_step"], state["vision_total"]
    budget = StepBudget(warmup_steps, settings["vision_minutes"] * 60, clock, cuda)
    seed = VISION_WARMUP_SEED + 100_000 * settings["seed"] + step
    it = iter(_loader(PatchStream(seed), settings["vision_batch"], workers))
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr, desc="vision warm-up")
    waited = 0.0
    t.vlm.vision.train()
    while total is None or step < total:
        t_wait = time.time()
        pixels, targets = (x.to(device, non_blocking=True) for x in next(it))
        waited += time.time() - t_wait
        for g in opt.param_groups:
            g["lr"] = settings["vision_lr"] * lr_factor(step, total, warmup_steps)
        with t.amp:
            loss = t.aux.loss(t.vlm.patch_features(clip_normalize(pixels)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        total = budget.total(step, total, bar, log, "vision warm-up")
        if step % 10 == 0:
            state["history"].append({"phase": "vision", "step": step, "aux_loss": round(loss.item(), 4),
                                     "seconds": round(clock(), 1), "data_wait_s": round(waited, 1)})
            bar.set_postfix(aux_loss=f"{loss.item():.3f}")
        if step % val_every == 0 or step == total:
            acc = aux_accuracy(t, aux_val, device)
            state["history"].append({"phase": "vision", "step": step, "aux_accuracy": acc,
                                     "seconds": round(clock(), 1)})
            log(f"vision warm-up step {step}: object-patch accuracy {acc}")
        state["vision_step"], state["vision_total"] = step, total
        if step % save_every == 0 and step < (total or 0):
            save(opt)
    bar.close()
    save(opt)   # an interruption before the joint phase's first save then resumes there, not inside the warm-up


def run_joint_phase(t: "Training", state: dict, save, settings: dict, val, aux_val, *, clock, cuda: bool,
                    workers: int, warmup_steps: int, val_every: int, save_every: int, log) -> None:
    """Phase 2: answers' cross-entropy + auxiliary loss on the whole trainable model until ``settings['minutes']``
    of training time (or ``settings['max_steps']``); validation exact match every ``val_every`` steps."""
    from tqdm import tqdm

    device = t.prefix.device
    base_lrs = [g["lr"] for g in t.opt.param_groups]
    step, total = state["step"], state["total_steps"]
    budget = StepBudget(warmup_steps, settings["minutes"] * 60, clock, cuda)
    seed = TRAIN_SEED + 100_000 * settings["seed"] + step
    it = iter(_loader(Stream(t.tokenizer, seed, t.prefix_len, settings["turns"]), settings["batch"], workers,
                      functools.partial(collate, pad_id=t.tokenizer.eos_token_id)))
    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr, desc="train")
    waited = 0.0
    while total is None or step < total:
        t_wait = time.time()
        batch_on_device = [x.to(device, non_blocking=True) for x in next(it)]
        waited += time.time() - t_wait
        for g, base in zip(t.opt.param_groups, base_lrs):
            g["lr"] = base * lr_factor(step, total, warmup_steps)
        loss, right, aux_loss = training_step(t, batch_on_device, settings["aux_weight"])
        step += 1
        bar.update(1)
        total = budget.total(step, total, bar, log, "whole model")
        if step % 10 == 0:
            state["history"].append({"step": step, "loss": round(loss.item(), 4), "aux_loss": round(aux_loss.item(), 4),
                                     "train_exact": float(right.float().mean()), "seconds": round(clock(), 1),
                                     "data_wait_s": round(waited, 1)})
            bar.set_postfix(loss=f"{loss.item():.3f}", exact=f"{float(right.float().mean()):.2f}")
        state["step"], state["total_steps"] = step, total
        if step % val_every == 0 or step == total:
            acc = validate(t.vlm, t.prefix, val, device, t.amp)
            state["history"].append({"step": step, "val_exact": acc, "aux_accuracy": aux_accuracy(t, aux_val, device),
                                     "seconds": round(clock(), 1)})
            log(f"step {step}: validation exact match {acc:.3f} (loss {float(loss):.3f})")
            t.vlm.train()
            t.vlm.llm.eval()
        if step % save_every == 0 and step < (total or 0):
            save(t.opt)
    bar.close()


@dataclass
class Training:
    """What a training step needs, set up as ``train`` runs it (``prepare``)."""
    vlm: M.StudyVLM
    tokenizer: object
    config: dict
    wrapped: dict            # {prefix: LoraLinear}
    aux: AuxHeads
    opt: torch.optim.Optimizer
    prefix: torch.Tensor     # [P] the prompt's tokens before the image
    prefix_len: int
    amp: object              # autocast context: bf16 on CUDA, off on CPU


def prepare(llm_source: str, gguf, seed: int, device: str, *, lr_vision: float, lr_lora: float,
            init: Path | None = None) -> Training:
    """The model (``init``: an earlier run's trained.safetensors loaded), auxiliary heads and AdamW on ``device``.
    On CUDA the frozen LLM runs in bf16 under autocast; LoRA, vision tower and projector train in fp32."""
    torch.manual_seed(seed)
    vlm, tokenizer, config, wrapped = build(llm_source, gguf, seed, M.LoraSpec())
    if init is not None:
        from safetensors.torch import load_file

        load_trainable(vlm, wrapped, {k: v.float() for k, v in load_file(str(init)).items()})
    cuda = device.startswith("cuda")
    if cuda:
        vlm.llm.to(torch.bfloat16)
        for m in wrapped.values():
            m.lora_a.data, m.lora_b.data = m.lora_a.data.float(), m.lora_b.data.float()
    vlm.to(device)
    prefix_ids = M.prompt_ids(tokenizer, "x")
    prefix_len = prefix_ids.index(M.IMAGE_TOKEN_INDEX)
    aux = AuxHeads(M.VISION["hidden_size"]).to(device)
    groups = [{"params": list(vlm.vision.parameters()) + list(vlm.projector.parameters()) + list(aux.parameters()),
               "lr": lr_vision, "weight_decay": 0.05},
              {"params": [p for m in wrapped.values() for p in (m.lora_a, m.lora_b)], "lr": lr_lora,
               "weight_decay": 0.0}]
    vlm.train()
    vlm.llm.eval()  # no dropout in Llama anyway; keeps the frozen base in inference mode
    return Training(vlm, tokenizer, config, wrapped, aux, torch.optim.AdamW(groups, betas=(0.9, 0.98)),
                    torch.tensor(prefix_ids[:prefix_len], device=device), prefix_len,
                    torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False))


def training_step(t: Training, batch, aux_weight: float = 1.0, mask_padding: bool = False):
    """One optimiser step on a collated batch on the device (pixels, suffix, mask, labels, patch targets)
    -> (answer loss, exact match [B] bool, auxiliary loss)."""
    pixels, suffix, mask, labels, targets = batch
    pixels = clip_normalize(pixels)
    with t.amp:
        loss, right, features = t.vlm.loss(t.prefix, pixels, suffix, mask, labels, return_features=True,
                                           mask_padding=mask_padding)
        aux_loss = t.aux.loss(features, targets)
    t.opt.zero_grad(set_to_none=True)
    (loss + aux_weight * aux_loss).backward()
    torch.nn.utils.clip_grad_norm_([p for g in t.opt.param_groups for p in g["params"]], 1.0)
    t.opt.step()
    return loss, right, aux_loss


@torch.no_grad()
def validate(vlm, prefix, batches, device, amp) -> float:
    """Teacher-forced exact match on the answer (= greedy exact match: every argmax equals the answer token)."""
    vlm.eval()
    right = n = 0
    for pixels, suffix, mask, labels, _ in batches:
        with amp:
            _, ok = vlm.loss(prefix, clip_normalize(pixels.to(device)), suffix.to(device), mask.to(device),
                             labels.to(device))
        right += int(ok.sum())
        n += len(ok)
    return right / max(n, 1)
