"""``python -m study.vision_sweep``: the vision warm-up alone (``study.train.warm_up_vision``: vision tower + patch
read-outs, no LLM), once per batch:learning-rate setting, each from the same fresh tower for the same time. An
experiment for choosing the warm-up's settings; it needs no GGUF (no LLM, no tokenizer), so it can run on a GPU
machine before SmolLM2 has arrived there.

Writes ``vision_sweep.json`` under --out: per setting the history (auxiliary loss, object-patch accuracy of colour,
shape and glyph on a fixed set, seconds spent waiting for data) and the steps done.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def run_setting(batch: int, lr: float, *, seconds: float, workers: int, device: str, val_n: int, val_every: int,
                warmup_steps: int = 50, seed: int = 0) -> dict:
    from . import model as M
    from . import train as T

    torch.manual_seed(seed)
    vision = M.build_vision_tower(seed).to(device)
    aux = T.AuxHeads(M.VISION["hidden_size"]).to(device)
    cuda = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    t = T.Training(vlm=M.StudyVLM(None, vision, None), tokenizer=None, config={}, wrapped={}, aux=aux, opt=None,
                   prefix=torch.empty(0, dtype=torch.long, device=device), prefix_len=0, amp=amp)
    state = {"vision_step": 0, "vision_total": None, "history": []}
    settings = {"vision_lr": lr, "vision_batch": batch, "vision_minutes": seconds / 60, "seed": seed}
    aux_val = T.patch_validation(seed, val_n)
    t0 = time.time()
    T.warm_up_vision(t, T.vision_optimizer(t, lr), state, lambda opt: None, settings, aux_val,
                     clock=lambda: time.time() - t0, cuda=cuda, workers=workers, val_every=val_every, save_every=10 ** 9, log=print,
                     warmup_steps=warmup_steps)
    return {"batch": batch, "lr": lr, "steps": state["vision_step"], "seconds": round(time.time() - t0, 1),
            "images_per_s": round(state["vision_step"] * batch / (time.time() - t0), 1),
            "history": state["history"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study.vision_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="128:1e-3,128:2e-3,256:2e-3", help="batch:lr,... (default %(default)s)")
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--device", default="cuda")
    p.add_argument("--val-n", type=int, default=256)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=50,
                   help="learning-rate warm-up steps; the step count is fixed from their timing (default 50)")
    p.add_argument("--out", type=Path, default=Path("outputs/vision-sweep"))
    a = p.parse_args(argv)
    try:
        settings = [(int(b), float(lr)) for b, lr in (x.split(":") for x in a.settings.split(","))]
    except ValueError:
        print(f"error: --settings {a.settings!r}: write batch:lr pairs separated by commas, e.g. 128:1e-3,256:2e-3",
              file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for batch, lr in settings:
        results.append(run_setting(batch, lr, seconds=a.seconds, workers=a.workers, device=a.device, val_n=a.val_n,
                                   val_every=a.val_every, warmup_steps=a.warmup_steps))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "history"}), flush=True)
        (a.out / "vision_sweep.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
             "torch": torch.__version__, "seconds_each": a.seconds, "workers": a.workers, "results": results},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
