"""Shared helpers for tests that need upstream code (third_party/<Name>) or a baseline's environment.

Baseline tests never modify third_party/<Name>: they export the pinned tree to a temp folder
(``pristine_tree``), apply our patch series to another copy (``patched_tree``), and run each in a
subprocess (``run_probe``) so that two different ``llava`` packages never meet in one interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval import upstream

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = ROOT / "third_party"
PATCHES = ROOT / "patches"
SHARED = ROOT.parent / "shared"


def pinned_sha(name: str) -> str:
    return upstream.pinned_sha(name)


def require_populated(name: str) -> Path:
    """Path of third_party/<name>, or skip saying what was not tested and how to populate it."""
    path = THIRD_PARTY / name
    if not (path / ".git").exists():
        pytest.skip(f"third_party/{name} is not populated, so the {name} patches and model were not tested; "
                    f"run `git submodule update --init third_party/{name}` (or ../shared/tools/populate-third-party)")
    return path


def require_module(module: str, why: str, env: str | None = None):
    """Import ``module`` or skip naming the environment that has it (``env``: a baseline Name)."""
    try:
        return __import__(module)
    except ImportError as e:
        build = f"bash setup.sh --test-env {env}" if env else "bash setup.sh --test"
        pytest.skip(f"{why}: this interpreter lacks {module!r} ({e}); build the environment that has it "
                    f"({build}) and run bash scripts/test.sh, which runs every built one")


def require_transformers(prefix: str, name: str):
    import importlib.metadata as md
    try:
        version = md.version("transformers")
    except md.PackageNotFoundError:
        version = None
    if not version or not version.startswith(prefix):
        pytest.skip(f"{name} needs transformers {prefix}x but this environment has {version}; "
                    f"build it with `bash setup.sh --test-env {name}` and run scripts/test.sh")


def pristine_tree(name: str, dest: Path) -> Path:
    """Export third_party/<name> at its pin into ``dest`` (a plain folder, not a repository)."""
    require_populated(name)
    return upstream.export_tree(name, dest, patched=False)


def patch_files(name: str) -> list[Path]:
    return upstream.patch_files(name)


def patched_tree(name: str, dest: Path) -> Path:
    """Pristine export of third_party/<name> with patches/<name>/*.patch applied in order."""
    require_populated(name)
    if not patch_files(name):
        pytest.fail(f"patches/{name}/ has no patch files")
    try:
        return upstream.export_tree(name, dest, patched=True)
    except upstream.EvalError as e:
        pytest.fail(str(e))


def run_probe(script: Path, pythonpath: list[Path], args: list[str], *, env: dict | None = None,
              python: str | None = None, timeout: int = 900) -> dict:
    """Run ``script`` in a fresh interpreter with ``pythonpath`` first; it prints one JSON line last."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(p) for p in pythonpath] + [str(ROOT)])
    full_env.update(env or {})
    r = subprocess.run([python or sys.executable, str(script), *args], capture_output=True, text=True,
                       env=full_env, timeout=timeout)
    if r.returncode:
        raise AssertionError(f"{script.name} {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
