"""The eval driver: ``python -m eval.run --method M --benchmark B --model-path CKPT --data-dir DATA_DIR``.

Runs inside the method's own environment. Per sample: the adapter prepares the image (pad or centre crop,
as that baseline's LLaVA eval module does) and the vicuna_v1 prompt; the driver opens
``debias_core.sample(image_size=(W, H), preprocess=..., span_start=<IMAGE_TOKEN_INDEX position>)`` around the
adapter's greedy ``generate`` and appends the answer (LLaVA jsonl, metadata: method, mode, budget, trend).

Debias settings: ``--mode`` (else env DEBIAS, else off), ``--trend`` (else env DEBIAS_TREND, else the paper's
preset for this method and benchmark; ``calibrated:<file>`` for a fitted one); the pad threshold follows the
method (DEBIAS_METHOD) unless DEBIAS_PAD_THRESHOLD overrides it. Chunks: ``--num-chunks N --chunk-idx k``, then
``python -m eval.merge --run-dir DIR`` (a single-chunk run merges itself).

Resume: rerun the same command; answered questions are skipped. The run folder's run.json records every setting
that can change an answer — benchmark, question file and the SHA-256 of its bytes, method and its arguments,
budget, debias mode, trend and the SHA-256 of the trend file (of a preset's parameters), pad threshold and
geometry (modes pad/full), checkpoint path and base, conv mode, max new tokens, --limit and --num-chunks
(eval/runinfo.py) — and a resume or another chunk under a different value of any of them is refused with the
differing settings, old and new values: use another --answers-dir, or delete that folder's answer files and
run.json to start over.

Exit status (also in --help):
  0    every run asked for is answered (and merged when single-chunk)
  2    bad input — an unknown method, benchmark, mode or preset; a bad environment value (DEBIAS*,
       e.g. DEBIAS_CHECK=maybe); an impossible option (--max-new-tokens 0, --num-chunks 0, --chunk-idx out
       of range); a device this machine lacks; a missing checkpoint or dataset; an unwritable --answers-dir or
       --record; a malformed answers file; a resume under other settings — as one ``error: ...`` line on stderr
       naming the value and the fix. All of these are checked before the model is loaded or anything is written.
  130  interrupted (Ctrl-C): every answer written so far is complete and kept; rerun the same command to resume.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import uuid
from pathlib import Path

from .answers import AnswerLog, chunk_file, get_chunk, merge, read_answers
from .benchmarks import REGISTRY, get_benchmark
from .common import ROOT, EvalError, check_device, check_model_path, check_writable
from .methods import get_adapter, method_names, parse_method_args
from . import runinfo
from debias_core.cli import OneLineParser
from debias_core.errors import DebiasError

DEBIAS_MODES = ("off", "pad", "pos", "full")


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m eval.run", description=__doc__.split("\n")[0],
                      epilog=__doc__[__doc__.index("Resume:"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"one of {', '.join(method_names())}")
    p.add_argument("--benchmark", required=True, help=f"one or more (comma-separated) of {', '.join(REGISTRY)}")
    p.add_argument("--model-path", required=True, help="checkpoint folder or hub id (liuhaotian/llava-v1.5-7b)")
    p.add_argument("--model-base", default=None)
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR"),
                   help="LLaVA's playground/data/eval (env DATA_DIR)")
    p.add_argument("--answers-dir", default=str(ROOT / "outputs" / "answers"))
    p.add_argument("--mode", default=None, help="debias mode(s), comma-separated: off,pad,pos,full (env DEBIAS; "
                                                "default off)")
    p.add_argument("--trend", default=None, help="paper:<method>/<bench>, calibrated:<file> (env DEBIAS_TREND)")
    p.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a paper default of the method (repeatable)")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions (smoke tests)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: as LLaVA's module (128 / 1024)")
    p.add_argument("--conv-mode", default="vicuna_v1")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--workers", type=int, default=None, help="image-loading workers (default 2 on CUDA, 0 on CPU)")
    p.add_argument("--fsync", action="store_true", help="fsync after every answer (survives power loss too)")
    p.add_argument("--no-merge", action="store_true", help="do not write merge.jsonl after a single-chunk run")
    p.add_argument("--record", type=Path, default=None, metavar="FILE.npz",
                   help="record the raw ranking scores at the patch sites (for python -m debias_core.calibrate); "
                        "one benchmark and one mode, a fresh run; with chunks, one file per chunk (FILE.<k>.npz)")
    p.add_argument("--check-only", action="store_true",
                   help="check method, environment, data, trends and checkpoint; print the run folders; load nothing")
    return p.parse_args(argv)


def resolve_debias(mode_arg: str | None, trend_arg: str | None, adapter, bench) -> tuple[str, str | None]:
    """Mode and trend from flags, then environment, then the paper default for (method, benchmark)."""
    from debias_core.presets import method_name, resolve_trend

    mode = (mode_arg or (os.environ.get("DEBIAS") or "").strip() or "off").strip().lower()  # empty = unset
    if mode not in DEBIAS_MODES:
        raise EvalError(f"debias mode {mode!r} is unknown; use one of {', '.join(DEBIAS_MODES)}")
    trend = trend_arg or (os.environ.get("DEBIAS_TREND") or "").strip() or None
    if trend is not None:
        resolve_trend(trend)  # a bad --trend is an error in every mode, never silently unused
    if mode in ("pos", "full") and trend is None:
        m = adapter.trend_method
        if m is None:
            raise EvalError(f"method {adapter.name} has no paper trend; mode {mode} needs --trend "
                            f"(e.g. paper:fastv or calibrated:<file>)")
        from .registry import paper_trend_name

        trend = paper_trend_name(adapter.name, bench.preset)
        if trend is None:
            raise EvalError(f"the paper has no {m} trend for {bench.title}; pass --trend calibrated:<file> "
                            f"(python -m debias_core.calibrate) or another preset")
    env_method = os.environ.get("DEBIAS_METHOD")
    if env_method and adapter.trend_method and method_name(env_method) != adapter.trend_method:
        raise EvalError(f"DEBIAS_METHOD={env_method} disagrees with --method {adapter.name} "
                        f"({adapter.trend_method}); unset it")
    return mode, (trend if mode in ("pos", "full") else None)


def _first(batch):
    return batch[0]


class _Prepared:
    """Dataset for DataLoader workers: image loading, preprocessing and tokenisation off the main thread."""

    def __init__(self, samples, adapter, loaded, module_mode, conv_mode):
        self.samples, self.adapter, self.loaded = samples, adapter, loaded
        self.mode, self.conv_mode = module_mode, conv_mode

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        image = s.load_image()
        pixels = self.adapter.image_tensor(self.loaded, image, self.mode) if image is not None else None
        ids = self.adapter.input_ids(self.loaded, s.question, has_image=image is not None, conv_mode=self.conv_mode)
        return i, (image.size if image is not None else None), pixels, ids


def answer_record(sample, text: str, model_name: str, metadata: dict) -> dict:
    """LLaVA's answer line (model_vqa_mmbench's field order when the sample has options)."""
    rec = {"question_id": sample.question_id}
    if "round_id" in sample.extra:
        rec["round_id"] = sample.extra["round_id"]
    rec["prompt"] = sample.prompt
    rec["text"] = text
    for k in ("options", "option_char"):
        if k in sample.extra:
            rec[k] = sample.extra[k]
    rec.update(answer_id=uuid.uuid4().hex, model_id=model_name, metadata=metadata)
    return rec


def _split(value: str | None) -> list:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def run(args: argparse.Namespace) -> list[Path]:
    """Run every (benchmark, mode) asked for, loading the model once; returns the run folders."""
    import debias_core

    adapter = get_adapter(args.method, parse_method_args(args.method_arg))
    benches = [get_benchmark(b) for b in _split(args.benchmark)]
    if not benches:
        raise EvalError("--benchmark is empty; name one or more of " + ", ".join(REGISTRY))
    modes = _split(args.mode) or [None]
    adapter.check_environment()
    check_model_path(args.model_path)
    model_name = Path(args.model_path.rstrip("/")).name
    if model_name.startswith("checkpoint-"):
        model_name = Path(args.model_path.rstrip("/")).parent.name + "_" + model_name

    check_options(args)
    plans = []  # everything is checked before the model is loaded or anything is written
    for bench in benches:
        samples = load_samples_checked(bench, args)
        question_file = bench.questions_path(args.data_dir)
        question_sha = runinfo.file_sha256(question_file)
        for m in modes:
            mode, trend = resolve_debias(m, args.trend, adapter, bench)
            st = _configure(mode, trend, adapter)
            rdir = runinfo.run_dir(args.answers_dir, model_name, bench.key, adapter.name, adapter.budget(), mode,
                                   trend)
            pads = st.suppress_padding  # threshold and geometry change answers only where padding is suppressed
            info = {
                "benchmark": bench.key, "method": adapter.name, "method_args": adapter.args,
                "budget": adapter.budget(), "mode": mode, "trend": trend, "trend_sha256": runinfo.trend_sha256(trend),
                "pad_threshold": st.pad_threshold if pads else None,
                "geometry": ("exact" if st.exact_geometry else "official") if pads else None,
                "model_path": args.model_path, "model_base": args.model_base, "model_name": model_name,
                "conv_mode": args.conv_mode, "max_new_tokens": args.max_new_tokens or bench.max_new_tokens,
                "limit": args.limit, "question_file": str(question_file), "question_sha256": question_sha,
                "data_dir": str(args.data_dir), "num_chunks": args.num_chunks,
                "note": ("plain LLaVA has no ranking site: the debias mode cannot change its answers"
                         if adapter.trend_method is None and mode != "off" else None),
            }
            runinfo.check_same_run(rdir / "run.json", info)  # a resume under other settings stops here
            read_answers(chunk_file(rdir, args.num_chunks, args.chunk_idx), id_field="question_id")
            plans.append((bench, samples, mode, trend, info, rdir))
    if args.record is not None:
        if len(plans) != 1:
            raise EvalError(f"--record takes one benchmark and one mode (got {len(benches)} benchmark(s) x "
                            f"{len(modes)} mode(s)); record the calibration set alone, usually with --mode off")
        if args.record.suffix != ".npz":
            raise EvalError(f"--record {args.record} must end in .npz")
        check_writable("--record", args.record, is_file=True)
    check_writable("--answers-dir", args.answers_dir)
    if args.check_only:
        return [p[-1] for p in plans]

    device = args.device or _default_device()
    adapter.activate()
    loaded, dirs = None, []
    for bench, samples, mode, trend, info, rdir in plans:
        _configure(mode, trend, adapter)
        chunk = get_chunk(samples, args.num_chunks, args.chunk_idx)
        max_new = info["max_new_tokens"]
        runinfo.write_or_check(rdir / "run.json", info)
        path = chunk_file(rdir, args.num_chunks, args.chunk_idx)
        log = AnswerLog(path, fsync=args.fsync)
        try:
            todo = [s for s in chunk if _key(s) not in log.done]
            head = runinfo.header(info, upstream=adapter.upstream_state(), device=device,
                                  chunk=f"chunk {args.chunk_idx + 1}/{args.num_chunks} of {len(chunk)} questions",
                                  todo=len(todo), done=len(chunk) - len(todo))
            sys.stderr.write(head)
            with open(path.with_suffix(".log"), "a") as f:
                f.write(head)
            if todo:
                session = _recording_session(args, info, done=len(chunk) - len(todo), rdir=rdir)
                if loaded is None:
                    loaded = adapter.load(args.model_path, model_base=args.model_base, device=device)
                    adapter.configure(loaded)
                _generate_all(args, adapter, bench, todo, log, loaded, max_new, info, total=len(chunk),
                              session=session)
        finally:
            log.close()
        if args.num_chunks == 1 and not args.no_merge:
            merge(rdir, [s.question_id for s in samples], 1)
        dirs.append(rdir)
    return dirs


def _configure(mode: str, trend: str | None, adapter):
    """debias_core settings of one run, from the flags and the DEBIAS* environment only (never from earlier
    settings of this process): the method's paper pad threshold unless DEBIAS_PAD_THRESHOLD overrides it."""
    import debias_core
    from debias_core.config import check_env
    from debias_core.presets import pad_threshold as paper_pad_threshold

    _, threshold, geometry, checks, _ = check_env()
    if threshold is None:
        threshold = paper_pad_threshold(adapter.trend_method)
    return debias_core.configure(mode=mode, trend=trend, method=adapter.trend_method, pad_threshold=threshold,
                                 geometry=geometry, checks=checks)


def check_options(args) -> None:
    """Numeric options and the device, before anything is loaded or written."""
    for option, value, least in (("--max-new-tokens", args.max_new_tokens, 1), ("--num-chunks", args.num_chunks, 1),
                                 ("--limit", args.limit, 1), ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise EvalError(f"{option} {value} must be ≥ {least}")
    if not 0 <= args.chunk_idx < args.num_chunks:
        raise EvalError(f"--chunk-idx {args.chunk_idx} is outside 0..{args.num_chunks - 1} for --num-chunks "
                        f"{args.num_chunks}")
    if args.device is not None:
        check_device(args.device)


def load_samples_checked(bench, args):
    from .questions import load_samples

    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit {args.limit} must be ≥ 1")
    return load_samples(bench, args.data_dir, args.limit)


def _key(sample) -> str:
    from .answers import qid_key
    return qid_key(sample.question_id)


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _record_path(args) -> Path:
    return args.record if args.num_chunks == 1 else args.record.with_suffix(f".{args.chunk_idx}.npz")


def _recording_session(args, info, *, done: int, rdir: Path):
    """A RecordingSession for --record, or None. Refuses a resumed run: the skipped answers' scores would be
    missing from the recording."""
    if args.record is None:
        return None
    from debias_core.calibrate import RecordingSession

    if done:
        raise EvalError(f"--record needs a fresh run, but {done} questions are already answered in {rdir}; "
                        f"their scores would be missing: use another --answers-dir")
    return RecordingSession(meta={"question_file": info["question_file"], "benchmark": info["benchmark"],
                                  "model": info["model_name"], "method": info["method"], "mode": info["mode"],
                                  "budget": info["budget"], "chunk": f"{args.chunk_idx}/{args.num_chunks}"})


def _generate_all(args, adapter, bench, todo, log, loaded, max_new, info, total, session=None):
    import debias_core
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    device = loaded.device
    grid, resolution = adapter.geometry(loaded)
    module_mode = adapter.preprocess_mode(bench.module)
    debias_pre = adapter.debias_preprocess(loaded, module_mode)
    workers = args.workers if args.workers is not None else (2 if device.startswith("cuda") else 0)
    loader = DataLoader(_Prepared(todo, adapter, loaded, module_mode, args.conv_mode), batch_size=1,
                        collate_fn=_first, num_workers=workers, shuffle=False)
    meta = {"method": adapter.name, "mode": info["mode"], "budget": info["budget"], "trend": info["trend"],
            "preprocess": module_mode}
    bar = tqdm(total=total, initial=total - len(todo), unit="sample", dynamic_ncols=True, file=sys.stderr,
               desc=f"{adapter.name}/{bench.key}/{info['mode']}")
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        stack.callback(bar.close)  # also on Ctrl-C or an error: the error line then starts a line of its own
        if session is not None:
            stack.enter_context(session)
        for n, (i, size, pixels, ids) in enumerate(loader, 1):
            sample = todo[i]
            s0 = adapter.span_start(ids) if pixels is not None else None
            context = dict(image_size=size, preprocess=debias_pre if size else "none", grid=grid,
                           resolution=resolution, span_start=s0)
            scope = (session.sample(**context, info={"question_id": sample.question_id,
                                                          "image": str(sample.image_path or "")})
                     if session is not None else debias_core.sample(**context))
            with scope:
                text = adapter.generate(loaded, ids, pixels, size, max_new_tokens=max_new)
            log.append(answer_record(sample, text, loaded.model_name, meta))
            bar.update(1)
            if session is not None and (n % 50 == 0 or n == len(todo)):
                session.save(_record_path(args))  # rewritten as it grows: a killed run keeps what it recorded
    rate = len(todo) / max(time.time() - t0, 1e-9)
    sys.stderr.write(f"answered {len(todo)} questions ({rate:.2f} samples/s)\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dirs = run(args)
    except (EvalError, DebiasError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # past the checks: e.g. the disk filled up or a folder vanished mid-run
        print(f"error: {e.filename or ''}: {e.strerror or e}; every answer written so far is kept, fix that and "
              f"rerun the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C); every answer written so far is complete and kept: rerun the same "
              "command to resume", file=sys.stderr)
        return 130
    for d in dirs:
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
