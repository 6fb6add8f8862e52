"""Repository layout (issue 2 §1): upstream projects are gitlinks at their pins, never committed files."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PINS = {  # issue 2 §1 / UPSTREAM.md §1.1
    "third_party/LLaVA": ("https://github.com/haotian-liu/LLaVA", "c121f0432da27facab705978f83c4ada465e46fd"),
    "third_party/FastV": ("https://github.com/pkunlp-icler/FastV", "d1659729b5bf1be225e99ee15783deeea80f63b1"),
    "third_party/PyramidDrop": ("https://github.com/Cooperx521/PyramidDrop", "6444f304aee4b7edcb022839fb9e8cd07859704a"),
    "third_party/SparseVLMs": ("https://github.com/Gumpest/SparseVLMs", "734d9003879689713a132b83297dfad060a5c9af"),
    "third_party/HiMAP": ("https://github.com/ustc-hyin/HiMAP", "6c279e74104073ec4d9f8e5e76c3753e68370de1"),
    "third_party/TokenCarve": ("https://github.com/ShawnTan86/TokenCarve", "a57bd59a214d9010eb1a4decb61b0e3543b7d125"),
    "third_party/iLLaVA": ("https://github.com/hulianyuyy/iLLaVA", "4068149e2cce51d691fe08c0eab80c364c8fcdd9"),
    "third_party/Video-LLaVA": ("https://github.com/PKU-YuanGroup/Video-LLaVA", "984e65bf8e8fd97072258547c4c8061fdd2416b7"),
}


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
    assert branches == {"third_party/SparseVLMs": "v1.5"}   # the pin is on branch v1.5, not main


def test_no_upstream_file_is_tracked_outside_the_gitlinks():
    tracked = git("ls-files").splitlines()
    inside = [p for p in tracked if p.startswith("third_party/") and p not in PINS]
    assert not inside, f"upstream files committed under third_party/: {inside[:5]}"
