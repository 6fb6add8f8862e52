"""FastV patch series (patches/FastV): applies at the pin, and debiases both ranking sites.

Runs in .venv-FastV (envs/cpu/FastV.txt): the FastV transformers fork (4.31.0) and LLaVA 1.1.3 come from
an export of third_party/FastV on PYTHONPATH, once pristine and once patched, each in its own
subprocess (tests/baselines/fastv_probe.py). Geometry is LLaVA-1.5's: 576 visual tokens at s0 = 35,
rank 128, K = 2, prefill + 3 decode steps. Elsewhere (CI's .venv-test, empty third_party) it skips.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.baseline

NAME = "FastV"
PROBE = Path(__file__).with_name("fastv_probe.py")
# The probe needs only these two folders of the FastV repository (the whole tree is 140 MB).
TREE_PATHS = ("src/transformers/src", "src/LLaVA")
MODELING = "src/transformers/src/transformers/models/llama/modeling_llama.py"
SPAN, RANK = 576, 128
NARROW, WIDE, SQUARE = (1000, 101), (640, 200), (500, 500)   # 48 and 192 valid patches (τ = 0.5); none padded
BASE = dict(rank=RANK, agg=2, steps=3)


def _require_env():
    support.require_populated(NAME)
    support.require_transformers("4.31", NAME)
    support.require_module("debias_core", "the FastV patch imports debias_core")


def _git(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=check)


def _export(dest: Path, patched: bool) -> Path:
    """TREE_PATHS of third_party/FastV at its pin (optionally with the series applied) in ``dest``.

    Not support.pristine_tree: third_party/FastV is a sparse checkout whose two large blobs (an A-OKVQA
    .arrow file and a demo GIF) are absent from the object store, so a whole-tree `git archive` fails.
    Blobs missing from the store are excluded here (none of them is code).
    """
    sub, pin = support.THIRD_PARTY / NAME, support.pinned_sha(NAME)
    listing = _git("-C", str(sub), "ls-tree", "-r", pin, "--", *TREE_PATHS).stdout.splitlines()
    entries = [(line.split()[2], line.split("\t", 1)[1]) for line in listing]
    check = subprocess.run(["git", "-C", str(sub), "cat-file", "--batch-check"], capture_output=True, text=True,
                           input="".join(f"{sha}\n" for sha, _ in entries), check=True).stdout.splitlines()
    missing = [path for (_, path), line in zip(entries, check) if line.endswith(" missing")]
    dest.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(sub), "archive", "--format=tar", pin, "--", *TREE_PATHS,
                          *(f":(exclude){p}" for p in missing)], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    if patched:
        patches = support.patch_files(NAME)
        if not patches:
            pytest.fail(f"patches/{NAME}/ has no patch files")
        for p in patches:
            r = _git("apply", "--whitespace=nowarn", str(p), cwd=dest, check=False)
            if r.returncode:
                pytest.fail(f"{p.name} does not apply to {NAME} at its pin:\n{r.stderr}")
    return dest


def _pythonpath(tree: Path) -> list[Path]:
    return [tree / p for p in TREE_PATHS]


def _probe(tree: Path, *args, env=None) -> dict:
    return support.run_probe(PROBE, _pythonpath(tree), list(args), env=env, timeout=600)


def _specs(specs: dict) -> str:
    return json.dumps({name: dict(BASE, **spec) for name, spec in specs.items()})


LLAMA_SPECS = {
    **{f"{d}-{m}-{tag}": dict(mode=m, debias=d, image=list(size))
       for m in ("mask", "inplace") for d in ("off", "pad", "full") for tag, size in (("narrow", NARROW), ("wide", WIDE))},
    **{f"ramp-{d}-{m}": dict(mode=m, debias=d, image=list(SQUARE), ramp=True)
       for m in ("mask", "inplace") for d in ("off", "pos")},
    "off-mask-nocontext": dict(mode="mask", debias="off", image=list(NARROW), context=False),
    "full-mask-nocontext": dict(mode="mask", debias="full", image=list(NARROW), context=False),
}
LLAVA_SPECS = {
    "off": dict(mode="mask", debias="off", image=list(WIDE)),
    "env": dict(mode="mask", debias="env", image=list(NARROW)),   # DEBIAS* as an eval driver sets them
}
DRIVER_ENV = {"DEBIAS": "full", "DEBIAS_TREND": "paper:fastv", "DEBIAS_METHOD": "fastv"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Probe results: {(tree, kind): {spec name: result}} for tree ∈ pristine/patched, kind ∈ llama/llava."""
    _require_env()
    base = tmp_path_factory.mktemp("fastv")
    trees = {t: _export(base / t, patched=(t == "patched")) for t in ("pristine", "patched")}
    weights = base / "weights"
    weights.mkdir()
    for kind in ("llama", "llava"):
        _probe(trees["pristine"], "init", kind, str(weights))
    out = {}
    for t, tree in trees.items():
        out[t, "llama"] = _probe(tree, "run", "llama", str(weights), _specs(LLAMA_SPECS))
        out[t, "llava"] = _probe(tree, "run", "llava", str(weights), _specs(LLAVA_SPECS), env=DRIVER_ENV)
        assert out[t, "llama"]["_env"]["modeling_llama"].startswith(str(tree)), out[t, "llama"]["_env"]
        assert out[t, "llama"]["_env"]["calls_debias_core"] == (t == "patched")
    return out


def _padding(size) -> set:
    import numpy as np

    import debias_core
    valid = debias_core.valid_mask(debias_core.pad_fractions(size), 0.5).reshape(-1)
    return set(np.flatnonzero(~valid).tolist())


def _ok(result: dict) -> dict:
    assert "error" not in result, result["error"]
    assert len(result["kept"]) == 1 + BASE["steps"], "expected a ranking at prefill and at every decode step"
    return result


# --- the series applies ------------------------------------------------------------------------------

def test_series_applies_at_the_pin(tmp_path):
    _require_env()
    patches = support.patch_files(NAME)
    assert patches, f"patches/{NAME}/ has no 000N-*.patch files"
    tree = _export(tmp_path / "tree", patched=False)
    for p in patches:
        r = _git("apply", "--check", str(p), cwd=tree, check=False)
        assert r.returncode == 0, f"{p.name} does not apply at the pin:\n{r.stderr}"
        _git("apply", "--whitespace=nowarn", str(p), cwd=tree)
    text = (tree / MODELING).read_text()
    assert text.count("debias_core.debias(last_layer_attention_avg_last_tok_image)") == 2   # both sites
    assert text.count(".topk(debias_core.keep_cap(ATTENTION_RANK))") == 2
    assert "np.load" not in text


def test_apply_patches_script_applies_reapplies_and_reverses(tmp_path):
    """scripts/apply_patches.sh on a temp superproject whose third_party/FastV is a shared clone at the pin."""
    _require_env()
    script = support.ROOT / "scripts" / "apply_patches.sh"
    assert script.exists(), "scripts/apply_patches.sh is missing (it belongs to the foundation issue)"
    sub, pin = support.THIRD_PARTY / NAME, support.pinned_sha(NAME)
    root = tmp_path / "super"
    shutil.copytree(support.ROOT / "scripts", root / "scripts")
    shutil.copytree(support.PATCHES / NAME, root / "patches" / NAME)
    ident = ["-c", "user.name=t", "-c", "user.email=t@localhost"]
    _git("init", "-q", str(root))
    _git("update-index", "--add", "--cacheinfo", f"160000,{pin},third_party/{NAME}", cwd=root)
    _git(*ident, "commit", "-q", "-m", "pin", cwd=root)
    clone = root / "third_party" / NAME
    _git("clone", "-q", "--shared", "--no-checkout", str(sub), str(clone))
    # Same sparse checkout as the submodule (its absent blobs cannot be checked out).
    sparse = Path(_git("rev-parse", "--git-path", "info/sparse-checkout", cwd=sub).stdout.strip())
    sparse = sparse if sparse.is_absolute() else sub / sparse
    if sparse.exists():
        (clone / ".git" / "info").mkdir(exist_ok=True)
        shutil.copy(sparse, clone / ".git" / "info" / "sparse-checkout")
        _git("config", "core.sparseCheckout", "true", cwd=clone)
    _git("checkout", "-q", "--detach", pin, cwd=clone)

    def script_run(*args):
        r = subprocess.run(["bash", str(root / "scripts" / "apply_patches.sh"), *args, NAME], cwd=root,
                           capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
        return r.returncode, r.stdout + r.stderr

    def status():
        return _git("status", "--porcelain", cwd=clone, check=False).stdout.strip()

    rc, out = script_run("--check")
    assert rc == 0, out
    rc, out = script_run()
    assert rc == 0, out
    assert "debias_core.keep_cap" in (clone / MODELING).read_text()
    assert status() == f"M {MODELING}"
    rc, out = script_run()
    assert rc == 0 and "already applied" in out, out
    rc, out = script_run("--reverse")
    assert rc == 0, out
    assert status() == "" and "debias_core" not in (clone / MODELING).read_text()
    assert _git("rev-parse", "HEAD", cwd=clone).stdout.strip() == pin


# --- DEBIAS=off is upstream, bit for bit ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["off-mask-narrow", "off-inplace-narrow", "off-mask-wide", "off-inplace-wide",
                                  "off-mask-nocontext", "ramp-off-mask", "ramp-off-inplace"])
def test_off_is_upstream_exactly(runs, name):
    up, ours = _ok(runs["pristine", "llama"][name]), _ok(runs["patched", "llama"][name])
    assert ours["kept"] == up["kept"]
    assert ours["logit_hashes"] == up["logit_hashes"], "logits differ from the unpatched fork (fp32, CPU)"
    assert ours["generated"] == up["generated"]
    assert all(len(k) == RANK for k in ours["kept"])


def test_off_is_upstream_exactly_through_llava(runs):
    up, ours = _ok(runs["pristine", "llava"]["off"]), _ok(runs["patched", "llava"]["off"])
    assert (ours["kept"], ours["logit_hashes"], ours["generated"]) == (up["kept"], up["logit_hashes"], up["generated"])


# --- pad / full: no padding survives, the keep count is capped ----------------------------------------------

@pytest.mark.parametrize("mode", ["mask", "inplace"])
@pytest.mark.parametrize("debias", ["pad", "full"])
@pytest.mark.parametrize("tag,size", [("narrow", NARROW), ("wide", WIDE)], ids=["narrow", "wide"])
def test_no_padding_survives_and_cap(runs, mode, debias, tag, size):
    padding = _padding(size)
    cap = min(RANK, SPAN - len(padding))
    off = _ok(runs["patched", "llama"][f"off-{mode}-{tag}"])
    assert any(set(k) & padding for k in off["kept"]), "the check is vacuous: upstream kept no padding here"
    res = _ok(runs["patched", "llama"][f"{debias}-{mode}-{tag}"])
    for step, kept in enumerate(res["kept"]):
        assert not set(kept) & padding, f"step {step}: padding tokens kept: {sorted(set(kept) & padding)[:10]}"
        assert len(kept) == cap, f"step {step}: kept {len(kept)} tokens, expected min({RANK}, valid) = {cap}"


def test_debias_without_sample_context_names_the_fix(runs):
    res = runs["patched", "llama"]["full-mask-nocontext"]
    assert "sample context" in res.get("error", ""), res.get("error")


# --- pos: flat scores -> earliest positions -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["mask", "inplace"])
def test_pos_moves_the_kept_set_to_earlier_positions(runs, mode):
    """Layer K-1's attention is replaced (in the probe) by a flat row with a 1 % recency ramp."""
    off = _ok(runs["patched", "llama"][f"ramp-off-{mode}"])
    pos = _ok(runs["patched", "llama"][f"ramp-pos-{mode}"])
    for step in range(len(off["kept"])):
        assert off["kept"][step] == list(range(SPAN - RANK, SPAN)), "upstream should keep the latest tokens"
        assert pos["kept"][step] == list(range(RANK)), "the FastV trend should keep the earliest tokens"


# --- the real entry: LLaVA 1.1.3 generate -------------------------------------------------------------------

def test_llava_generate_with_cache_debiases_every_step(runs):
    """LlavaLlamaForCausalLM.generate(use_cache=True, output_attentions=True) on a real padded image
    (process_images pad, CLIPVisionTower from a tiny local checkpoint), DEBIAS=full from the environment,
    inside debias_core.sample(image_size, span_start=<image token position>)."""
    res = _ok(runs["patched", "llava"]["env"])
    off = runs["patched", "llava"]["off"]
    padding = _padding(NARROW)
    assert res["span_start"] == 35
    pixels = set(res["pixel_padding"])
    assert pixels and pixels <= padding, "the geometry's padding does not cover the fill-colour patches"
    for step, kept in enumerate(res["kept"]):
        assert len(kept) == SPAN - len(padding) == 48
        assert not set(kept) & padding and not set(kept) & pixels
    assert len(res["generated"]) == 1 + BASE["steps"]
    assert res["kept"] != off["kept"]
