"""Run identity and the log header.

A run folder ``<answers-dir>/<model>/<benchmark>/<method>-<budget>/<mode tag>/`` holds ``run.json`` (what
was asked: these fields must match for a resumed or sibling chunk to append there), the chunk answer files,
``<N>_<k>.log`` (one header per start), ``merge.jsonl`` and ``score.json``.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from .common import EvalError, project_state, slug

# Fields that define a run; a resumed run must agree on all of them.
IDENTITY = ("benchmark", "method", "method_args", "budget", "mode", "trend", "model_path", "model_base",
            "conv_mode", "max_new_tokens", "limit", "question_file", "num_chunks")


def mode_tag(mode: str, trend: str | None) -> str:
    """'off', or '<mode>-<trend slug>' so that runs with different trends never share a folder."""
    return mode if mode == "off" or trend is None else f"{mode}-{slug(trend)}"


def run_dir(answers_dir, model_name: str, benchmark: str, method: str, budget: str, mode: str,
            trend: str | None) -> Path:
    return Path(answers_dir) / slug(model_name) / benchmark / f"{method}-{slug(budget)}" / mode_tag(mode, trend)


def write_or_check(path: Path, info: dict, identity: tuple = IDENTITY, folder_option: str = "--answers-dir",
                   created: dict | None = None) -> None:
    """Create the run file (``info`` plus ``created``, atomically), or check that an existing one describes
    the same run: the ``identity`` fields must match."""
    path = Path(path)
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in identity if old.get(k) != info.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there vs {info.get(k)!r} now" for k in diff)
            raise EvalError(f"{path.parent} holds answers of a different run ({shown}); use another "
                            f"{folder_option} or remove that folder")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # chunks start together: each writes its own temp file
    tmp.write_text(json.dumps({**info, **(created or {})}, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path} does not exist: {path.parent} is not a run folder written by eval.run")
    return json.loads(path.read_text())


def header(info: dict, *, upstream: str, device: str, chunk: str, todo: int, done: int) -> str:
    """Human-readable header written at the top of every run start (stderr and the chunk's .log)."""
    import torch

    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    lines = [
        f"=== eval.run {time.strftime('%Y-%m-%d %H:%M:%S')} ===",
        f"method     {info['method']}  args {json.dumps(info['method_args'], sort_keys=True)}",
        f"budget     {info['budget']}",
        f"mode       {info['mode']}  (DEBIAS; pad threshold {info['pad_threshold']})",
        f"trend      {info['trend'] if info['trend'] else '(none: mode ' + info['mode'] + ' uses no positional trend)'}",
        f"benchmark  {info['benchmark']}  ({info['question_file']}, {chunk}, {done} answered, {todo} to do)",
        f"model      {info['model_path']}" + (f"  base {info['model_base']}" if info.get("model_base") else ""),
        f"project    {project_state()}",
        f"upstream   {upstream}",
        f"software   python {platform.python_version()}, torch {torch.__version__}, transformers {tf}; "
        f"device {device}",
        f"decoding   greedy (T=0, 1 beam), conv {info['conv_mode']}, max_new_tokens {info['max_new_tokens']}",
    ]
    if info.get("note"):
        lines.append(f"note       {info['note']}")
    return "\n".join(lines) + "\n"

