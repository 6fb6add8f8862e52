"""``python -m study.train_speed``: time one training step of the study model, variant by variant (a benchmark for
choosing how ``study.train`` runs on a GPU; nothing here asserts a timing).

Every variant runs ``study.train.training_step`` as ``study.train.prepare`` sets it up (vision tower, projector,
LoRA'd SmolLM2 in bf16 under autocast, auxiliary heads, AdamW, gradient clipping) on the same real collated batch
from the training stream:

    masked-fp32lora  the step before 2026-12-06: padding masked, LoRA input copied to float32 (monkeypatched back)
    masked           padding masked; LoRA without the copy
    unmasked         no attention mask (right padding needs none under causal attention; study.model.hidden)
    compiled         unmasked, with torch.compile on the language model

Writes ``train_speed.json`` (ms/step: median and quartiles of the timed steps; peak memory; compile seconds)
under --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("masked-fp32lora", "masked", "unmasked", "compiled")


def fp32_lora_forward(self, x):
    """LoraLinear.forward as it was: the input copied to the factors' dtype (float32) first."""
    return self.base(x) + (x.to(self.lora_a.dtype) @ self.lora_a.T @ self.lora_b.T).to(x.dtype) * self.scale


def time_variant(variant: str, *, gguf, batch: int, steps: int, warmup: int, turns: int, device: str,
                 llm_source: str = "smollm2") -> dict:
    """Median ms of ``study.train.training_step`` (set up by ``study.train.prepare``, default learning rates) over
    ``steps`` steps after ``warmup``, all on one batch."""
    from . import model as M
    from . import train as T

    training = T.prepare(llm_source, gguf, 0, device, lr_vision=5e-4, lr_lora=6e-4)
    stream = iter(T.Stream(training.tokenizer, T.TRAIN_SEED, training.prefix_len, turns))
    batch_on_device = [x.to(device) for x in T.collate([next(stream) for _ in range(batch)],
                                                       training.tokenizer.eos_token_id)]
    restore = M.LoraLinear.forward
    if variant == "masked-fp32lora":
        M.LoraLinear.forward = fp32_lora_forward
    if variant == "compiled":
        training.vlm.llm.model = torch.compile(training.vlm.llm.model)
    cuda = device.startswith("cuda")
    times, first_loss, compile_s = [], None, None
    try:
        for i in range(warmup + steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss, _, _ = T.training_step(training, batch_on_device, mask_padding=variant.startswith("masked"))
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if i == 0:
                first_loss = float(loss)
                compile_s = round(dt, 1) if variant == "compiled" else None
            if i >= warmup:
                times.append(dt * 1000)
    finally:
        M.LoraLinear.forward = restore
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"variant": variant, "ms_per_step": round(statistics.median(times), 1),
            "quartiles_ms": [round(q[0], 1), round(q[2], 1)], "steps_timed": steps, "first_loss": first_loss,
            "tokens_per_sample": training.prefix_len + 576 + batch_on_device[1].shape[1], "compile_s": compile_s,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if cuda else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.train_speed", description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--gguf", default=None)
    p.add_argument("--llm", default="smollm2", choices=("smollm2", "tiny"),
                   help="tiny: a random two-layer LLM (a CPU check of the script, not a timing)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("outputs/train-speed"))
    a = p.parse_args(argv)
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        print(f"error: --variants {','.join(unknown)}: choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for v in a.variants.split(","):
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        try:
            r = time_variant(v, gguf=a.gguf, batch=a.batch, steps=a.steps, warmup=a.warmup, turns=a.turns,
                             device=a.device, llm_source=a.llm)
        except Exception as e:  # noqa: BLE001 - a variant that fails (e.g. no compiler) is reported, not fatal
            r = {"variant": v, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(r), flush=True)
        results.append(r)
        (a.out / "train_speed.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
             "torch": torch.__version__, "batch": a.batch, "turns": a.turns, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
