"""Exporting an upstream tree at its pin, with our patch series applied, to a plain folder.

Nothing here touches third_party/<Name>: tests, the demo and the GPU benchmark run patched code from such
exports (point the eval driver at a folder of them with EVAL_THIRD_PARTY).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .common import ROOT, EvalError

PATCHES = ROOT / "patches"
SUBMODULES = ROOT / "third_party"


def pinned_sha(name: str) -> str:
    """The gitlink of third_party/<name> in this repository's HEAD."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "HEAD", f"third_party/{name}"],
                         capture_output=True, text=True, check=True).stdout.split()
    if len(out) < 3:
        raise EvalError(f"third_party/{name} is not a submodule of this repository")
    return out[2]


def absent_blobs(repo: Path, commit: str) -> list[str]:
    """Files of ``commit`` whose blobs the local object store lacks (sparse snapshots leave out large
    binaries such as FastV's .arrow data); exports leave them out too. None of them is code."""
    listing = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", commit], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    blobs = [(line.split()[2], line.split("\t", 1)[1]) for line in listing if line.split()[1] == "blob"]
    check = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch-check"], capture_output=True, text=True,
                           input="".join(f"{sha}\n" for sha, _ in blobs), check=True).stdout.splitlines()
    return [path for (_, path), answer in zip(blobs, check) if answer.endswith("missing")]


def patch_files(name: str) -> list[Path]:
    return sorted((PATCHES / name).glob("[0-9][0-9][0-9][0-9]-*.patch"))


def export_tree(name: str, dest: Path, *, patched: bool = True, paths: list[str] | None = None) -> Path:
    """Write third_party/<name> at its pin into ``dest``, then apply patches/<name>/*.patch in order when
    ``patched``. ``paths`` limits the export to those folders/files plus every file the series touches.
    Raises EvalError naming what failed."""
    src = SUBMODULES / name
    if not (src / ".git").exists():
        raise EvalError(f"third_party/{name} is not populated; run git submodule update --init third_party/{name}")
    pin = pinned_sha(name)
    if paths and patched:
        touched = {line.split(" b/", 1)[1] for p in patch_files(name) for line in p.read_text().splitlines()
                   if line.startswith("diff --git a/")}
        # files the series creates do not exist at the pin; the rest must be exported for the patch to apply
        at_pin = set(subprocess.run(["git", "-C", str(src), "ls-tree", "-r", "--name-only", pin, "--", *touched],
                                    capture_output=True, text=True, check=True).stdout.split())
        paths = sorted(set(paths) | at_pin)
    excludes = [f":(exclude,literal){p}" for p in absent_blobs(src, pin)]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(src), "archive", "--format=tar", pin, "--", *(paths or ["."]),
                              *excludes], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    if patched:
        for p in patch_files(name):
            only = [f"--include={pattern}" for q in paths or [] for pattern in (q, f"{q}/*")]
            if only:  # new files the series adds also belong to the export
                only += [f"--include={line.split(' b/', 1)[1]}" for line in p.read_text().splitlines()
                         if line.startswith("diff --git a/")]
            # no repository discovery above dest: inside another work tree, git apply would resolve the
            # patch's paths against that repository and silently skip them
            env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(dest.resolve().parent))
            r = subprocess.run(["git", "apply", "--verbose", "--whitespace=nowarn", *only, str(p)], cwd=dest,
                               capture_output=True, text=True, env=env)
            if r.returncode == 0 and "Applied patch" not in r.stderr and not only:
                raise EvalError(f"{p.name} changed nothing in the {name} export at {dest}:\n{r.stderr}")
            if r.returncode:
                raise EvalError(f"{p.name} does not apply to the {name} export at its pin:\n{r.stderr}")
    return dest
