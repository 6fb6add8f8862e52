"""Shared bits of the eval package: the error type, repository paths, git state, path-safe names."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = ROOT / "third_party"   # the submodules
TREE_ENV = "EVAL_THIRD_PARTY"


def third_party_dir(name: str) -> Path:
    """Where upstream <name>'s code is taken from: third_party/<name>, or <$EVAL_THIRD_PARTY>/<name> — a folder of
    exported, patched trees (eval/upstream.py) that tests, the demo and the GPU benchmark run instead of the
    submodules, which they never modify. Read at each call, so setting the variable takes effect at once."""
    root = os.environ.get(TREE_ENV)
    return (Path(root).resolve() if root else THIRD_PARTY) / name


class EvalError(RuntimeError):
    """A user-facing error: the message names the bad value or missing path and how to fix it."""


def git(path: Path, *args: str) -> str | None:
    """Output of ``git -C path args`` (stripped), or None when path is not a git checkout."""
    try:
        r = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def project_state() -> str:
    """'<sha>' or '<sha>+dirty' of this repository ('unknown' outside a git checkout)."""
    sha = git(ROOT, "rev-parse", "HEAD")
    if sha is None:
        return "unknown"
    dirty = git(ROOT, "status", "--porcelain", "--ignore-submodules=all", "--untracked-files=no")
    return sha + ("+dirty" if dirty else "")


def populated(name: str) -> bool:
    """A checked-out submodule, or (under EVAL_THIRD_PARTY) a non-empty exported tree."""
    path = third_party_dir(name)
    if os.environ.get(TREE_ENV):
        return path.is_dir() and any(path.iterdir())
    return (path / ".git").exists()


def submodule_state(name: str) -> str:
    """'<sha>' of third_party/<name>, '+modified' when its work tree differs (e.g. patches applied)."""
    path = third_party_dir(name)
    if not populated(name):
        return "not populated"
    if not (path / ".git").exists():
        return f"exported tree at {path} ({TREE_ENV})"
    sha = git(path, "rev-parse", "HEAD") or "unknown"
    dirty = git(path, "status", "--porcelain", "--untracked-files=no")
    return sha + ("+modified (patches applied?)" if dirty else "")


def slug(text: str) -> str:
    """A path-safe rendering: 'paper:himap/gqa' -> 'paper-himap-gqa'."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")
    return s or "x"


def check_writable(option: str, path, *, is_file: bool = False) -> None:
    """Refuse an output folder (or, ``is_file``, an output file's folder) that cannot be created or written: a
    file in the way, a read-only file system, no permission. Checked before anything is computed; creates nothing."""
    target = Path(path).expanduser().resolve()
    folder = target.parent if is_file else target
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise EvalError(f"{option} {path} cannot be created: {folder} is a file, not a folder; pick another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EvalError(f"{option} {path} cannot be written: {folder} is not writable (permissions or a read-only "
                        f"file system); pick another path")


def check_device(spec: str) -> None:
    """Refuse a --device that torch cannot parse or that this machine does not have (cuda without a usable GPU,
    cuda:<k> beyond the visible devices), before anything is loaded or written."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise EvalError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise EvalError(f"--device {spec!r}: the driver runs on cpu or cuda[:<index>], not {device.type}")
    if not torch.cuda.is_available():
        raise EvalError(f"--device {spec}: no usable CUDA device here (torch.cuda.is_available() is False; torch "
                        f"{torch.__version__}); use --device cpu or run on a machine with a GPU")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise EvalError(f"--device {spec}: this machine shows {count} CUDA device(s) (cuda:0..cuda:{count - 1}, "
                        f"after CUDA_VISIBLE_DEVICES); pick one of them")


def populate_hint(name: str) -> str:
    return (f"git submodule update --init third_party/{name} "
            f"(offline: clone it from a local git snapshot and check out the pin)")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_path(path: str, *, what: str = "a LLaVA-1.5 folder", example: str = "liuhaotian/llava-v1.5-7b",
                     env: str = "CKPT") -> None:
    """A local checkpoint folder, or a hub id (which must be in the cache when HF_HUB_OFFLINE is set)."""
    if Path(path).expanduser().exists():
        return
    if not HUB_ID.match(path):
        raise EvalError(f"checkpoint {path} does not exist; set {env}/--model-path to {what} or a hub id such as "
                        f"{example}")
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        try:
            from huggingface_hub import snapshot_download
            snapshot_download(path, local_files_only=True)
        except Exception:
            raise EvalError(f"checkpoint {path} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
                            f"download it first (huggingface-cli download {path}) or point {env} at a local "
                            f"folder") from None


def environment_python(env: str) -> Path | None:
    """The interpreter of environment ``env`` as setup.sh builds it (envs/venv-<env>, envs/conda-<env> or
    .venv-<env>), or None."""
    for cand in (ROOT / "envs" / f"venv-{env}" / "bin" / "python", ROOT / "envs" / f"conda-{env}" / "bin" / "python",
                 ROOT / f".venv-{env}" / "bin" / "python"):
        if cand.exists():
            return cand
    return None
