"""Repository layout: upstream projects are gitlinks at the pins the method registry declares, never committed
files."""
import shutil
import subprocess
from pathlib import Path

import pytest

from eval import registry

REPO = Path(__file__).resolve().parents[1]

# what the method registry declares: every upstream at its pin (eval.registry; debias_core/data/methods.json)
PINS = {f"third_party/{name}": (u["url"], u["pin"]) for name, u in registry.upstreams().items()}
BRANCHES = {f"third_party/{name}": u["branch"] for name, u in registry.upstreams().items() if "branch" in u}


def git(*args) -> str:
    if not shutil.which("git") or not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout (or git is missing), so the submodule layout was not tested")
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def test_third_party_holds_gitlinks_only_at_the_pins():
    entries = {}
    for line in git("ls-files", "-s", "--", "third_party").splitlines():
        meta, path = line.split("\t", 1)
        mode, sha, stage = meta.split()
        assert mode == "160000", f"{path} is committed as a file (mode {mode}), not a submodule gitlink"
        assert stage == "0", f"{path} has a merge conflict (stage {stage})"
        entries[path] = sha
    assert entries == {path: sha for path, (_, sha) in PINS.items()}


def test_gitmodules_matches_the_gitlinks():
    listing = git("config", "-f", ".gitmodules", "--list")
    conf = dict(line.split("=", 1) for line in listing.splitlines())
    sections = {k.split(".")[1] for k in conf if k.startswith("submodule.")}
    assert len(sections) == len(PINS)
    seen = {}
    for name in sections:
        path = conf[f"submodule.{name}.path"]
        seen[path] = conf[f"submodule.{name}.url"]
    assert seen == {path: url for path, (url, _) in PINS.items()}
    branches = {conf[f"submodule.{n}.path"]: conf[k] for n in sections for k in [f"submodule.{n}.branch"] if k in conf}
    assert branches == BRANCHES   # e.g. SparseVLMs' pin is on branch v1.5, not main


def test_no_upstream_file_is_tracked_outside_the_gitlinks():
    tracked = git("ls-files").splitlines()
    inside = [p for p in tracked if p.startswith("third_party/") and p not in PINS]
    assert not inside, f"upstream files committed under third_party/: {inside[:5]}"
