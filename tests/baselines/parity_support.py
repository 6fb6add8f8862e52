"""Helpers for the parity tests: the authors' official repository (third_party/attention-bias) and its code.

The official repository publishes one patch per baseline (``patches/<Name>.patch``, first ranking stage only)
and its weight vectors (``playground/data/weight/<Name>/*.npy``). These helpers export a baseline's pin with
that patch applied, and pull the official padding-mask code out of the patches so that it runs verbatim.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests import support

OFFICIAL = "attention-bias"
OFFICIAL_PIN = "e75ebe7bb999a2aae4ebb1c99e7ab332a8e8ce54"


def require_official() -> Path:
    """third_party/attention-bias at its pin, or skip saying what was not tested."""
    path = support.THIRD_PARTY / OFFICIAL
    if not (path / ".git").exists() or not (path / "patches").is_dir():
        pytest.skip(f"third_party/{OFFICIAL} (the authors' official code) is not populated, so parity with it was "
                    f"not tested; run `git submodule update --init third_party/{OFFICIAL}`")
    return path


def official_patch(name: str) -> Path:
    return require_official() / "patches" / f"{name}.patch"


def added_blocks(patch: Path, file: str) -> list[str]:
    """The runs of consecutive '+' lines the patch adds to ``file`` (a path inside the baseline), as source text."""
    blocks, current, inside = [], [], False
    for line in patch.read_text().splitlines() + ["diff --git end"]:
        if inside and line.startswith("+") and not line.startswith("+++"):
            current.append(line[1:])
            continue
        if current:
            blocks.append("\n".join(current))
            current = []
        if line.startswith("diff --git "):
            inside = line.endswith(f" b/{file}")
    return blocks


def official_function(name: str, file: str, function: str):
    """Execute the official patch's definition of ``function`` (added to ``file``) and return it."""
    for block in added_blocks(official_patch(name), file):
        match = re.search(rf"^(?P<indent>[ \t]*)def {function}\(.*?(?=^(?P=indent)\S|\Z)", block, re.M | re.S)
        if match:
            break
    else:
        raise AssertionError(f"the official {name} patch defines no {function} in {file}")
    body = "\n".join(line[len(match["indent"]):] for line in match.group(0).splitlines())
    namespace: dict = {}
    exec("import numpy as np\n" + body, namespace)  # noqa: S102 - the authors' published code, pinned
    return namespace[function]


def official_thresholds(name: str, file: str) -> set[float]:
    """The thresholds the official patch passes to generate_pad_mask at its (uncommented) call sites."""
    calls = [line for block in added_blocks(official_patch(name), file) for line in block.splitlines()
             if "generate_pad_mask(" in line and "def " not in line and not line.lstrip().startswith("#")]
    return {float(t) for line in calls for t in re.findall(r"threshold=([0-9.]+)", line)}


def official_tree(name: str, dest: Path, paths: list[str] | None = None, include: list[str] | None = None) -> Path:
    """The pin of third_party/<name> exported to ``dest`` (``paths``: only those folders/files) with the official
    patch applied (``include``: only its hunks for files matching these patterns); fails when it does not apply."""
    support.pristine_tree(name, dest, paths=paths)
    patch = official_patch(name)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(Path(dest).resolve().parent))
    only = [f"--include={p}" for p in include or paths or []]
    r = subprocess.run(["git", "apply", "--whitespace=nowarn", *only, str(patch)], cwd=dest, capture_output=True,
                       text=True, env=env)
    if r.returncode:
        pytest.fail(f"the official {name} patch does not apply to the pin: {r.stderr.strip()}")
    return Path(dest)


def official_patch_applies(name: str, tmp: Path) -> tuple[bool, str]:
    """(whether the official patch applies to a clean export of the pin, git's message)."""
    tree = support.pristine_tree(name, tmp)
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(Path(tmp).resolve().parent))
    r = subprocess.run(["git", "apply", "--check", "--whitespace=nowarn", str(official_patch(name))], cwd=tree,
                       capture_output=True, text=True, env=env)
    return r.returncode == 0, r.stderr.strip()


def require_env_python(name: str, transformers_prefix: str) -> str:
    """The interpreter of the baseline's CPU environment (.venv-<name> in the repository root) when it has the
    transformers the baseline needs; otherwise skip saying what was not tested and how to build it."""
    python = support.ROOT / f".venv-{name}" / "bin" / "python"
    why = f"parity of our {name} full mode with the official {name} code was not tested"
    if not python.exists():
        pytest.skip(f"{why}: no {name} CPU environment at {python}; build it with `bash setup.sh --test-env {name}`")
    r = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('transformers'))"],
                       capture_output=True, text=True)
    version = r.stdout.strip()
    if r.returncode or not version.startswith(transformers_prefix):
        pytest.skip(f"{why}: {python} has transformers {version or '(none)'}, not {transformers_prefix}x; "
                    f"rebuild it with `bash setup.sh --test-env {name}`")
    return str(python)


def write_weight_file(preset: str, length: int, path: Path) -> Path:
    """The .npy weight vector the official code loads, written from our preset (float64 [length])."""
    import numpy as np

    import debias_core
    np.save(path, np.asarray(debias_core.resolve_trend(preset).weights(length), dtype=np.float64))
    return path
