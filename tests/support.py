"""Shared helpers for tests that need upstream code (third_party/<Name>) or a baseline's environment.

Baseline tests never modify third_party/<Name>: they export the pinned tree to a temp folder
(``pristine_tree``), apply our patch series to another copy (``patched_tree``), and run each in a
subprocess (``run_probe``) so that two different ``llava`` packages never meet in one interpreter. Each
baseline's series is checked the same way: it applies at the pin (``apply_series``), within its line budget
(``check_line_budget``), and scripts/apply_patches.sh applies, re-applies and reverses it on a temp superproject
(``check_apply_patches_roundtrip``). ``valid_positions`` / ``padding_positions`` are LLaVA-1.5's padding
geometry, written out here independently of debias_core, for the tests to check debias_core's patches against.
"""
from __future__ import annotations

import json
import os
import shutil
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
                    f"run `git submodule update --init third_party/{name}` (offline: clone it from a local git snapshot and check out the pin)")
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


def pristine_tree(name: str, dest: Path, paths: list[str] | None = None) -> Path:
    """Export third_party/<name> at its pin into ``dest`` (a plain folder, not a repository); ``paths``: only
    those folders/files (eval.upstream.export_tree)."""
    require_populated(name)
    return upstream.export_tree(name, dest, patched=False, paths=paths)


def patch_files(name: str) -> list[Path]:
    return upstream.patch_files(name)


def patched_tree(name: str, dest: Path, paths: list[str] | None = None) -> Path:
    """Pristine export of third_party/<name> with patches/<name>/*.patch applied in order; ``paths``: only those
    folders/files plus every file the series touches (eval.upstream.export_tree)."""
    require_populated(name)
    if not patch_files(name):
        pytest.fail(f"patches/{name}/ has no patch files")
    try:
        return upstream.export_tree(name, dest, patched=True, paths=paths)
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


def valid_positions(size, threshold: float, grid: int = 24, resolution: int = 336) -> set[int]:
    """Raster indices (of the grid × grid visual tokens) whose pad fraction is ≤ ``threshold``, from LLaVA-1.5's
    expand2square geometry (docs/deviations.md) for an image of ``size`` = (W, H) shown at ``resolution`` px,
    written out here independently of debias_core."""
    w, h = size
    s, m = max(w, h), min(w, h)
    lo = (s - m) // 2 * resolution / s
    hi = lo + m * resolution / s
    side = resolution / grid
    cover = [max(0.0, min(side * (k + 1), hi) - max(side * k, lo)) / side for k in range(grid)]
    rows = cover if w >= h else [1.0] * grid
    cols = cover if h > w else [1.0] * grid
    return {grid * r + c for r in range(grid) for c in range(grid) if 1 - rows[r] * cols[c] <= threshold + 1e-12}


def padding_positions(size, threshold: float = 0.5, grid: int = 24, resolution: int = 336) -> set[int]:
    """The other raster indices: the visual tokens that lie on expand2square's padding (``valid_positions``)."""
    return set(range(grid * grid)) - valid_positions(size, threshold, grid, resolution)


# --- the patch series --------------------------------------------------------------------------------------

def _git(*args, cwd=None) -> str:
    """stdout of git (an identity for commits); an AssertionError naming the command and its stderr on failure."""
    r = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=cwd,
                       capture_output=True, text=True)
    if r.returncode:
        raise AssertionError(f"git {' '.join(args)} failed ({r.returncode}) in {cwd}: {r.stderr}")
    return r.stdout


def apply_series(name: str, tree: Path, numbers: list[str] | None = None) -> list[Path]:
    """Apply patches/<name>/*.patch in order to ``tree`` (a pristine export), each first checked with
    ``git apply --check``; ``numbers``: the expected file-number prefixes (["0001", "0002"]). Returns the files."""
    patches = patch_files(name)
    assert patches, f"patches/{name}/ has no 000N-*.patch files"
    if numbers is not None:
        assert [p.name[:4] for p in patches] == numbers, [p.name for p in patches]
    for p in patches:
        check = subprocess.run(["git", "apply", "--check", "--whitespace=nowarn", str(p)], cwd=tree,
                               capture_output=True, text=True)
        assert check.returncode == 0, f"{p.name} does not apply at the pin:\n{check.stderr}"
        _git("apply", "--whitespace=nowarn", str(p), cwd=tree)
    return patches


def check_line_budget(name: str, max_lines: int) -> None:
    """patches/<name> (headers included) is at most ``max_lines`` lines long."""
    lines = sum(len(p.read_text().splitlines()) for p in patch_files(name))
    assert lines <= max_lines, f"patches/{name} has {lines} lines; the budget is {max_lines}"


def series_files(name: str) -> list[str]:
    """Every path the series names (both sides of each ``diff --git a/… b/…`` line), sorted."""
    out = set()
    for p in patch_files(name):
        for line in p.read_text().splitlines():
            if line.startswith("diff --git a/"):
                a, b = line[len("diff --git a/"):].split(" b/", 1)
                out |= {a, b}
    return sorted(out)


def shared_clone_at_pin(name: str, dest: Path) -> Path:
    """``git clone --shared`` of third_party/<name>, checked out (detached) at its pin with the submodule's own
    sparse-checkout patterns: a snapshot-populated submodule lacks some blobs (FastV's .arrow data, demo GIFs
    in HiMAP, LLaVA and Video-LLaVA), which must then stay out of the work tree too."""
    src = require_populated(name)
    _git("clone", "-q", "--shared", "--no-checkout", str(src), str(dest))

    def sparse_file(repo: Path) -> Path:
        path = Path(_git("rev-parse", "--git-path", "info/sparse-checkout", cwd=repo).strip())
        return path if path.is_absolute() else repo / path

    if sparse_file(src).is_file():
        target = sparse_file(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sparse_file(src), target)
        _git("config", "core.sparseCheckout", "true", cwd=dest)
    _git("checkout", "-q", "--detach", pinned_sha(name), cwd=dest)
    return dest


def check_apply_patches_roundtrip(name: str, tmp_path: Path, contains: dict[str, str] | None = None,
                                  files: list[str] | None = None) -> None:
    """scripts/apply_patches.sh on a temp superproject (scripts/, patches/<name>, .gitmodules and a gitlink
    third_party/<name> at the pin, committed) whose third_party/<name> is ``shared_clone_at_pin``:

    - ``--check`` succeeds and changes nothing;
    - applying changes exactly the files the series names (``git status``: modified, or untracked where the
      series adds a file; nothing staged), each to its content in a patched export (eval.upstream);
    - applying again succeeds, says "already applied" and changes nothing;
    - ``--reverse`` restores every file (an added one is gone), ``git status`` is clean and HEAD is the pin.

    ``contains``: {file: text} that each file must contain once applied and no longer once reversed; ``files``:
    the files the series must change, all of them and no other."""
    script = ROOT / "scripts" / "apply_patches.sh"
    assert script.exists(), "scripts/apply_patches.sh is missing (it belongs to the foundation issue)"
    require_populated(name)
    pin = pinned_sha(name)
    root = tmp_path / "super"
    shutil.copytree(ROOT / "scripts", root / "scripts")
    shutil.copytree(PATCHES / name, root / "patches" / name)
    (root / ".gitmodules").write_text(f'[submodule "third_party/{name}"]\n\tpath = third_party/{name}\n'
                                      f"\turl = {THIRD_PARTY / name}\n")
    _git("init", "-q", str(root))
    _git("update-index", "--add", "--cacheinfo", f"160000,{pin},third_party/{name}", cwd=root)
    _git("add", ".gitmodules", "scripts", "patches", cwd=root)
    _git("commit", "-q", "-m", "layout", cwd=root)
    clone = shared_clone_at_pin(name, root / "third_party" / name)

    names = series_files(name)
    assert names, f"patches/{name}/ names no file"
    assert files is None or names == sorted(files), f"patches/{name} changes {names}, not {sorted(files)}"
    files = names
    at_pin = _git("ls-tree", "-r", "--name-only", pin, "--", *files, cwd=clone).split()
    expected_tree = patched_tree(name, tmp_path / "expected", paths=at_pin or None)  # + the files the series adds

    def state(tree: Path) -> dict:
        return {f: (tree / f).read_bytes() if (tree / f).is_file() else None for f in files}

    def differing(now: dict, want: dict) -> list[str]:
        return [f for f in files if now[f] != want[f]]

    def status() -> list[str]:
        return sorted(_git("status", "--porcelain", "--untracked-files=all", cwd=clone).splitlines())

    def script_run(*args) -> str:
        r = subprocess.run(["bash", str(root / "scripts" / "apply_patches.sh"), *args, name], cwd=root,
                           capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"apply_patches.sh {' '.join(args)} {name} failed ({r.returncode}): {out}"
        return out

    pristine, expected = state(clone), state(expected_tree)
    unchanged = [f for f in files if f not in differing(pristine, expected)]
    assert not unchanged, f"patches/{name} names {unchanged} but leaves them as at the pin"
    changed = sorted(f"{'??' if pristine[f] is None else ' D' if expected[f] is None else ' M'} {f}" for f in files)
    assert status() == [], f"the clone at the pin is not clean: {status()}"

    script_run("--check")
    assert not differing(state(clone), pristine), f"--check changed {differing(state(clone), pristine)}"
    assert status() == [], f"--check changed the checkout: {status()}"
    script_run()
    assert not differing(state(clone), expected), \
        f"once applied, {differing(state(clone), expected)} differ from the patched export"
    assert status() == changed, f"once applied, git status is {status()}, not {changed}"
    staged = _git("diff", "--cached", "--name-only", cwd=clone)
    assert staged == "", f"apply_patches.sh staged {staged.split()} in third_party/{name}"
    for f, text in (contains or {}).items():
        assert text in (clone / f).read_text(), f"{f} lacks {text!r} once applied"
    again = script_run()
    assert "already applied" in again, f"re-apply did not report 'already applied': {again}"
    assert not differing(state(clone), expected), f"re-applying changed {differing(state(clone), expected)}"
    assert status() == changed, f"after re-applying, git status is {status()}, not {changed}"
    script_run("--reverse")
    assert not differing(state(clone), pristine), f"--reverse left {differing(state(clone), pristine)} changed"
    assert status() == [], f"after --reverse, git status is {status()}"
    for f, text in (contains or {}).items():
        assert not (clone / f).exists() or text not in (clone / f).read_text(), f"{f} keeps {text!r} once reversed"
    head = _git("rev-parse", "HEAD", cwd=clone).strip()
    assert head == pin, f"after --reverse, HEAD is {head}, not the pin {pin}"
