"""Run identity and the log header.

A run folder ``<answers-dir>/<model>/<benchmark>/<method>-<budget>/<mode tag>/`` holds ``run.json`` (what
was asked: these fields must match for a resumed or sibling chunk to append there), the chunk answer files,
``<N>_<k>.log`` (one header per start), ``merge.jsonl`` and ``score.json``.

``IDENTITY`` lists every setting that can change an answer; a resume (or another chunk) under a different
value of any of them is refused, naming each differing setting with its recorded and its new value:

  benchmark, question_file, question_sha256   the question file's path and the SHA-256 of its bytes
  method, method_args, budget                 the pruning method and every argument it runs with
  mode, trend, trend_sha256                   debias mode; trend spec and the SHA-256 of the trend file's bytes
                                              (presets: of the preset's parameters as JSON); None in off/pad
  pad_threshold, geometry                     DEBIAS_PAD_THRESHOLD (or the method's) and DEBIAS_GEOMETRY; None in
                                              off/pos, where no padding is suppressed
  model_path, model_base, conv_mode, max_new_tokens, limit, num_chunks

A run.json written before a field existed lacks it; such a run is refused too ("not recorded"), since
nothing shows that its answers used today's value.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from .common import EvalError, project_state, slug

# Fields that define a run; a resumed run must agree on all of them.
IDENTITY = ("benchmark", "method", "method_args", "budget", "mode", "trend", "trend_sha256", "pad_threshold",
            "geometry", "model_path", "model_base", "conv_mode", "max_new_tokens", "limit", "question_file",
            "question_sha256", "num_chunks")


from debias_core.calibrate import file_sha256  # noqa: E402,F401  (re-exported: eval.run hashes question files)


def trend_sha256(spec: str | None) -> str | None:
    """SHA-256 of what the trend spec reads: the trend file's bytes, or a preset's parameters as canonical JSON
    (so a preset whose published parameters were corrected is a different trend too). None without a trend."""
    if spec is None:
        return None
    from debias_core.presets import resolve_trend

    if spec.startswith("paper:"):
        text = json.dumps(resolve_trend(spec).to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
    return file_sha256(spec[len("calibrated:"):] if spec.startswith("calibrated:") else spec)


def differences(old: dict, info: dict, identity: tuple = IDENTITY) -> list[str]:
    """'<field>: <old> there vs <new> now' for each identity field that differs ('not recorded there' when the
    old run file predates the field)."""
    return [f"{k}: {old[k]!r} there vs {info.get(k)!r} now" if k in old else
            f"{k}: not recorded there (an older run file) vs {info.get(k)!r} now"
            for k in identity if k not in old or old[k] != info.get(k)]


def check_same_run(path: Path, info: dict, identity: tuple = IDENTITY, folder_option: str = "--answers-dir") -> bool:
    """True when ``path`` exists and describes the same run; False when it does not exist yet; EvalError naming
    every differing setting (old and new value) and the fix otherwise. Writes nothing."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"{path} is not a readable run file ({e}); delete the folder {path.parent} or use another "
                        f"{folder_option}") from None
    if not isinstance(old, dict):
        raise EvalError(f"{path} is not a run file (not a JSON object); delete the folder {path.parent} or use "
                        f"another {folder_option}")
    diff = differences(old, info, identity)
    if diff:
        raise EvalError(f"{path.parent} holds answers of a different run ({'; '.join(diff)}); resuming would mix "
                        f"answers of two settings: use another {folder_option}, or delete that folder's answer "
                        f"files and run.json to start over")
    return True


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
    if check_same_run(path, info, identity, folder_option):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # chunks start together: each writes its own temp file
    tmp.write_text(json.dumps({**info, **(created or {})}, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path} does not exist: {path.parent} is not a run folder written by eval.run")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"{path} is not a readable run file ({e}); rerun eval.run into a fresh folder") from None
    if not isinstance(info, dict):
        raise EvalError(f"{path} is not a run file (not a JSON object); rerun eval.run into a fresh folder")
    return info


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
        f"mode       {info['mode']}  (DEBIAS" + (f"; pad threshold {info['pad_threshold']}, geometry {info['geometry']}"
                                            if info.get("pad_threshold") is not None else "") + ")",
        f"trend      " + (f"{info['trend']}  (sha256 {str(info.get('trend_sha256'))[:12]})" if info['trend'] else
                             f"(none: mode {info['mode']} uses no positional trend)"),
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

