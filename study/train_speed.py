"""``python -m study.train_speed``: time one training step of the study model, variant by variant (a benchmark for
choosing how ``study.train`` runs on a GPU; nothing here asserts a timing).

Every variant runs the step ``study.train`` runs (vision tower, projector, LoRA'd SmolLM2 in bf16 under autocast,
auxiliary heads, AdamW) on the same real collated batch from the training stream:

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
    import functools

    from . import model as M
    from . import train as T

    torch.manual_seed(0)
    vlm, tokenizer, config, wrapped = T.build(llm_source, gguf, 0, M.LoraSpec())
    cuda = device.startswith("cuda")
    if cuda:   # as study.train: the frozen base in bf16 under autocast, the trained parts in fp32
        vlm.llm.to(torch.bfloat16)
    vlm.to(device)
    aux = T.AuxHeads(M.VISION["hidden_size"]).to(device)
    params = list(vlm.vision.parameters()) + list(vlm.projector.parameters()) + list(aux.parameters()) + \
        [p for m in wrapped.values() for p in (m.lora_a, m.lora_b)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    prefix_ids = M.prompt_ids(tokenizer, "x")
    prefix_len = prefix_ids.index(M.IMAGE_TOKEN_INDEX)
    prefix = torch.tensor(prefix_ids[:prefix_len], device=device)
    stream = iter(T.Stream(tokenizer, T.TRAIN_SEED, prefix_len, turns))
    pixels, suffix, mask, labels, targets = (x.to(device) for x in T.collate([next(stream) for _ in range(batch)],
                                                                              tokenizer.eos_token_id))
    restore = M.LoraLinear.forward
    if variant == "masked-fp32lora":
        M.LoraLinear.forward = fp32_lora_forward
    compile_s = None
    if variant == "compiled":
        vlm.llm.model = torch.compile(vlm.llm.model)
    loss_fn = functools.partial(vlm.loss, mask_padding=variant.startswith("masked"), return_features=True)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    times, first_loss = [], None
    try:
        for i in range(warmup + steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with amp:
                loss, _, features = loss_fn(prefix, pixels, suffix, mask, labels)
                aux_loss = aux.loss(features, targets)
            opt.zero_grad(set_to_none=True)
            (loss + aux_loss).backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if i == 0:
                first_loss = float(loss)
            if i == 0 and variant == "compiled":
                compile_s = round(dt, 1)
            if i >= warmup:
                times.append(dt * 1000)
    finally:
        M.LoraLinear.forward = restore
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"variant": variant, "ms_per_step": round(statistics.median(times), 1),
            "quartiles_ms": [round(q[0], 1), round(q[2], 1)], "steps_timed": steps, "first_loss": first_loss,
            "tokens_per_sample": prefix_len + 576 + suffix.shape[1], "compile_s": compile_s,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 1) if device.startswith("cuda") else None}


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
