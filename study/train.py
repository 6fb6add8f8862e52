"""Train the study model: ``python -m study train --out DIR [--minutes 6] [--device cuda]``.

What is trained (everything else is SmolLM2-135M-Instruct's pretrained weights, frozen):
- the CLIP-architecture vision tower, from scratch (no pretrained vision weights exist offline);
- the mlp2x_gelu projector;
- rank-8 LoRA on every linear layer of the LLM. The paper's claim is that the positional bias of
  language-to-vision attention is inherited from the LLM, so the LLM keeps its pretrained weights and only gets
  a low-rank update (a frozen LLM could not learn to read a vision tower trained from scratch in minutes;
  full fine-tuning would overwrite the behaviour under study).

Data: ``study.data.training_conversations`` (endless, seeded, disjoint from the calibration and evaluation
splits). Each sample is one image with ``--turns`` questions in one vicuna_v1 conversation, as LLaVA-1.5's own
instruction data has several turns per image; every question ends with LLaVA's answer-format suffix, exactly as
the evaluation question files have it (the first turn is token for token what the evaluation prompt is). The loss
is on the answer tokens and their end-of-sequence tokens only. Several turns give several supervised answers per
forward pass of the 576 visual tokens for about 10 % more tokens. ``--init FILE`` starts from an earlier run's trained.safetensors (its sha256 is recorded). Training is time-bounded: after ``--warmup-steps`` the step time is measured and the
total number of steps fixed (and stored), then a cosine schedule runs to it.

Resumable: every ``--save-every`` steps the trainable weights, AdamW moments and step are written
(safetensors + JSON, atomically); rerunning the same command continues from there (the data stream is reseeded
with the step, so no sample repeats the pre-interruption stream). Outputs in DIR: ``trained.safetensors``
(fp16: vision tower ``vision.*``, projector ``projector.*``, LoRA ``lora.*``), ``train.json`` (settings, log,
validation accuracy), and ``resume/`` while training is unfinished.
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
    """(pixels [3, 336, 336], ids [T], labels [T], patch targets [576, 3]) from study.data.training_conversations,
    one stream per worker."""

    def __init__(self, tokenizer, seed: int, prefix_len: int, turns: int):
        self.tokenizer, self.seed, self.prefix_len, self.turns = tokenizer, seed, prefix_len, turns

    def __iter__(self):
        from .data import training_conversations

        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        processor = image_processor()
        for image, turns, objects in training_conversations(self.seed, worker, turns=self.turns):
            ids, labels = conversation_tokens(self.tokenizer, turns, self.prefix_len)
            yield (pad_and_process(image, processor), torch.tensor(ids), torch.tensor(labels),
                   patch_targets(objects, image.size))


def collate(batch, pad_id: int):
    """-> pixels [B, 3, R, R], suffix [B, T] (right-padded), mask [B, T], labels [B, T], patch targets [B, 576, 3]"""
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

    processor = image_processor()
    items = []
    for k, (image, question, answer) in enumerate(training_stream(VALIDATION_SEED + seed, 0)):
        if k == n:
            break
        ids, labels = conversation_tokens(tokenizer, [(question, answer)], prefix_len)
        items.append((pad_and_process(image, processor), torch.tensor(ids), torch.tensor(labels)))
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


def save_resume(folder: Path, vlm, wrapped, opt, step: int, meta: dict) -> None:
    tensors = {f"w.{k}": v for k, v in trainable_state(vlm, wrapped).items()}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        st = opt.state.get(p)
        if st:
            tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].detach().cpu()
            tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu()
            tensors[f"opt.{i}.step"] = torch.as_tensor(st["step"]).float().reshape(1).cpu()
    _save_atomic(tensors, dict(meta, step=step), folder)


def load_resume(folder: Path, vlm, wrapped, opt):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    load_trainable(vlm, wrapped, {k[2:]: v for k, v in tensors.items() if k.startswith("w.")})
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"opt.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p.device),
                            "step": tensors[f"opt.{i}.step"].reshape(()).to(p.device)}
    return meta


# ------------------------------------------------------------------------------------------------ train

SETTINGS_THAT_MATTER = ("llm_source", "batch", "lr_vision", "lr_lora", "seed", "lora_rank", "lora_alpha", "minutes",
                        "max_steps", "rope_theta", "aux_weight", "turns", "init_sha256")


def train(out: Path, *, llm_source: str = "smollm2", gguf=None, minutes: float = 6.0, max_steps: int | None = None,
          batch: int = 64, lr_vision: float = 5e-4, lr_lora: float = 6e-4, seed: int = 0, device: str = "cpu",
          workers: int = 0, warmup_steps: int = 60, aux_weight: float = 1.0, save_every: int = 200, val_every: int = 200,
          val_n: int = 256, turns: int = 3, init: Path | None = None, log=print) -> dict:
    """Train and write DIR/trained.safetensors + DIR/train.json; returns the train.json record."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / TRAINED).exists():
        raise FileExistsError(f"{out / TRAINED} exists: training there finished; choose another --out")
    if turns < 1:
        raise ValueError(f"--turns {turns} must be at least 1")
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
                    aux_background_weight=AuxHeads.BACKGROUND_WEIGHT)
    training = prepare(llm_source, gguf, seed, device, lr_vision=lr_vision, lr_lora=lr_lora, init=init)
    vlm, tokenizer, config, wrapped, opt, prefix, prefix_len, amp = (
        training.vlm, training.tokenizer, training.config, training.wrapped, training.opt, training.prefix,
        training.prefix_len, training.amp)
    cuda = device.startswith("cuda")
    base_lrs = [g["lr"] for g in opt.param_groups]

    resume_dir = out / "resume"
    step, total, history, t_spent = 0, max_steps, [], 0.0
    if resume_dir.exists():
        meta = load_resume(resume_dir, vlm, wrapped, opt)
        if {k: meta["settings"].get(k) for k in SETTINGS_THAT_MATTER} != {k: settings[k] for k in SETTINGS_THAT_MATTER}:
            raise ValueError(f"{resume_dir} was written with other settings ({meta['settings']}); "
                             f"rerun with those or delete {resume_dir}")
        step, total, history, t_spent = meta["step"], meta["total_steps"], meta["history"], meta["seconds"]
        log(f"resuming at step {step} of {total}")

    val = validation_batches(tokenizer, prefix_len, val_n, batch, seed)
    loader = torch.utils.data.DataLoader(Stream(tokenizer, TRAIN_SEED + 100_000 * seed + step, prefix_len, turns), batch_size=batch,
                                         num_workers=workers, collate_fn=functools.partial(collate, pad_id=tokenizer.eos_token_id),
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    t0 = time.time() - t_spent
    it = iter(loader)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr, desc="train")
    while total is None or step < total:
        batch_on_device = [x.to(device, non_blocking=True) for x in next(it)]
        frac = step / total if total else 0.0
        for g, base in zip(opt.param_groups, base_lrs):
            warm = min(1.0, (step + 1) / warmup_steps)
            g["lr"] = base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss, right, aux_loss = training_step(training, batch_on_device, aux_weight)
        step += 1
        bar.update(1)
        if step % 10 == 0:
            history.append({"step": step, "loss": round(float(loss), 4), "aux_loss": round(float(aux_loss), 4),
                            "train_exact": float(right.float().mean()), "seconds": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{float(loss):.3f}", exact=f"{float(right.float().mean()):.2f}")
        if total is None and step == 10:
            if cuda:
                torch.cuda.synchronize()
            t10 = time.time()
        if total is None and step == warmup_steps:
            if cuda:
                torch.cuda.synchronize()
            per_step = (time.time() - t10) / (step - 10)
            total = max(step + 1, int((minutes * 60 - (time.time() - t0)) / per_step) + step)
            bar.total = total
            bar.refresh()
            log(f"{per_step * 1000:.0f} ms/step -> {total} steps in {minutes} min")
        if step % val_every == 0 or step == total:
            acc = validate(vlm, prefix, val, device, amp)
            history.append({"step": step, "val_exact": acc, "seconds": round(time.time() - t0, 1)})
            log(f"step {step}: validation exact match {acc:.3f} (loss {float(loss):.3f})")
            vlm.train()
            vlm.llm.eval()
        if step % save_every == 0 and step < (total or 0):
            save_resume(resume_dir, vlm, wrapped, opt, step,
                        {"settings": settings, "total_steps": total, "history": history,
                         "seconds": time.time() - t0})
    bar.close()
    record = {"settings": settings, "steps": step, "seconds": round(time.time() - t0, 1), "history": history,
              "final_val_exact": next((h["val_exact"] for h in reversed(history) if "val_exact" in h), None),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "llm_config": config}
    state = {k: v.half() for k, v in trainable_state(vlm, wrapped).items()}
    save_file(state, str(out / (TRAINED + ".tmp")))
    os.replace(out / (TRAINED + ".tmp"), out / TRAINED)
    (out / "train.json").write_text(json.dumps(record, indent=1))
    if resume_dir.exists():
        for f in resume_dir.iterdir():
            f.unlink()
        resume_dir.rmdir()
    return record


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
            _, ok = vlm.loss(prefix, pixels.to(device), suffix.to(device), mask.to(device), labels.to(device))
        right += int(ok.sum())
        n += len(ok)
    return right / max(n, 1)
