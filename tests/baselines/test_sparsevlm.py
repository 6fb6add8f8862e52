"""SparseVLMs (branch v1.5) debias patches: they apply at the pin, reproduce upstream exactly when off, keep
padding out of every pruning layer (2, 6, 15) and out of the recycled clusters when padding is suppressed,
and debias by original raster position at every layer.

Models run in subprocesses (sparsevlm_probe.py) through LlavaLlamaDynamicForCausalLM.generate, the entry
the eval scripts use, with the pristine or patched tree first on PYTHONPATH. Environment: .venv-SparseVLMs
(envs/cpu/SparseVLMs.txt); flash-attn and CUDA timing are stood in for by the probe (CPU).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import support
from tests.baselines.contract import BaselineContract, Run, pytest_generate_tests  # noqa: F401 (the hook)

pytestmark = pytest.mark.baseline

NAME = "SparseVLMs"
PROBE = Path(__file__).with_name("sparsevlm_probe.py")
TREND = "paper:sparsevlm/gqa"
SCHEDULE = (303, 110, 36)     # retained_tokens=128 (paper setting) at layers 2, 6, 15
LAYERS = (2, 6, 15)
SPAN = 576
PATCH_BUDGET = 340            # lines of the series, headers included (patches/README.md's budget table)
_ENV = {"DEBIAS": "off", "DEBIAS_TREND": "", "DEBIAS_METHOD": "sparsevlm", "DEBIAS_GEOMETRY": "exact"}  # probes set the mode


def _require_env():
    support.require_populated(NAME)
    support.require_transformers("4.37", NAME)
    support.require_module("einops", "SparseVLMs' llava/model/language_model/utils.py imports einops")


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    _require_env()
    root = tmp_path_factory.mktemp("sparsevlm")
    pristine = support.pristine_tree(NAME, root / "pristine")
    patched = support.patched_tree(NAME, root / "patched")
    model = support.run_probe(PROBE, [pristine], ["init", str(root / "weights")], env=_ENV)["model"]
    return {"pristine": pristine, "patched": patched, "model": model, "runs": {}}


def probe(trees, tree: str, mode: str, image: str = "400x200", flat: bool = False) -> dict:
    key = (tree, mode, image, flat)
    if key not in trees["runs"]:
        args = ["run", trees["model"], "--mode", mode, "--image", image]
        args += ["--trend", TREND] if mode in ("pos", "full") else []
        args += ["--flat"] if flat else []
        trees["runs"][key] = support.run_probe(PROBE, [trees[tree]], args, env=_ENV)
    return trees["runs"][key]


def valid_positions(image: str) -> set[int]:
    import debias_core
    w, h = (int(v) for v in image.split("x"))
    from debias_core.presets import pad_threshold
    mask = debias_core.valid_mask(debias_core.pad_fractions((w, h)), pad_threshold("sparsevlm"))
    return {int(i) for i in mask.reshape(-1).nonzero()[0]}


def expected_counts(n_valid: int) -> list[tuple[int, int, int, int]]:
    """(ranked, kept, recycled, clusters) per pruning layer: upstream's rule with the keep count capped to the
    real tokens and the top-30% recycle capped to the real pruned tokens (no merge when there are none)."""
    n, out = SPAN, []
    for k in SCHEDULE:
        kept = min(min(k, n_valid), n - 1)
        real_pruned = min(n, n_valid) - kept
        recycled = min(int((n - kept) * 0.3) + 1, real_pruned) if real_pruned > 0 else 0
        clusters = int(recycled / 10) + 1 if recycled else 0
        out.append((n, kept, recycled, clusters))
        n = kept + clusters
    return out


def counts(run: dict) -> list[tuple[int, int, int, int]]:
    return [(len(s["ranked"]), len(s["kept"]), len(s["recycled"]), s["clusters"]) for s in run["stages"]]


def check_lengths(run: dict) -> None:
    """The sequence shrinks by exactly what each layer pruned: prefill logits and every layer's KV cache."""
    sizes = [SPAN] + [len(s["kept"]) + s["clusters"] for s in run["stages"]]
    other = run["seq_len"] - SPAN
    assert run["logit_shapes"][0][1] == other + sizes[-1]
    decoded = run["new_tokens"] - 1
    for layer, cached in enumerate(run["cache_lengths"]):
        stage = sum(layer > p for p in LAYERS)   # a pruning layer caches its input, prunes its output
        assert cached == other + sizes[stage] + decoded, f"layer {layer}"
    assert run["logits_finite"]
    assert len(run["generated"]) == 1 + run["new_tokens"]


def check_tracking(run: dict) -> None:
    """The positions the patch passes to debias_core at each layer are the original raster positions that the
    probe reconstructs from upstream's own selection (kept ascending, then −1 per cluster)."""
    assert [s["layer"] for s in run["stages"]] == list(LAYERS)
    assert sorted(run["debias_positions"]) == ["0", "1", "2"]
    for i, s in enumerate(run["stages"]):
        assert run["debias_positions"][str(i)] == [s["ranked"]], f"layer {s['layer']}"


# --- the series ---------------------------------------------------------------------------------------------

def test_series_applies_at_pin_and_fits_budget(tmp_path):
    support.require_populated(NAME)
    tree = support.pristine_tree(NAME, tmp_path / "tree")
    for p in support.apply_series(NAME, tree):
        text = p.read_text()
        assert "From: debias maintainers <debias@localhost>" in text and "\nSubject: " in text
    support.check_line_budget(NAME, PATCH_BUDGET)
    for rel in ("llava/model/language_model/score.py", "llava/model/language_model/modelling_sparse_llama.py"):
        assert "debias_core." in (tree / rel).read_text(), rel


def test_apply_patches_script_applies_reapplies_and_reverses(tmp_path):
    support.check_apply_patches_roundtrip(NAME, tmp_path)


# --- the model: the baseline contract (tests/baselines/contract.py) -----------------------------------------

def _run(run: dict, real_only: bool = False) -> Run:
    """A probe result in the contract's terms: each pruning layer's kept tokens, then its recycled ones. A cluster
    (recycled tokens merged into one; position −1 in the probe) is no padding: it gets its own negative id, so
    clusters count and never look like a token kept twice. ``real_only``: original positions only."""
    ids = iter(range(-1, -10 ** 6, -1))
    kept = [[p if p >= 0 else next(ids) for p in s[what] if p >= 0 or not real_only]
            for s in run["stages"] for what in ("kept", "recycled")]
    return Run(kept=kept, tokens=run["generated"], logits={},
               extra={k: run[k] for k in ("stages", "logits_sha256", "logit_shapes", "cache_lengths")})


@pytest.fixture(scope="module")
def results(trees):
    """What the contract's hooks receive: the probe's trees and memo."""
    return trees


class TestContract(BaselineContract):
    pytestmark = [pytest.mark.slow]
    off_cases = ["400x200"]
    padded_cases = [f"{mode}-{image}" for mode in ("pad", "full") for image in ("400x200", "640x360")]
    pos_cases = ["flat"]

    def off_pair(self, trees, image):
        """The logits are compared by their sha256 (Run.extra), bit for bit."""
        up, ours = probe(trees, "pristine", "off", image), probe(trees, "patched", "off", image)
        assert "patched" in ours["tree"] and "pristine" in up["tree"]
        return _run(up), _run(ours)

    def check_off(self, trees, image, up, ours):
        run = probe(trees, "patched", "off", image)
        assert probe(trees, "pristine", "off", image)["debias_positions"] == {}  # pristine never calls debias_core
        check_tracking(run)
        check_lengths(run)
        assert counts(run) == expected_counts(SPAN)
        # upstream keeps and recycles padding here (303 > 288 real tokens): the padding checks below can fail
        valid = valid_positions(image)
        assert sum(p >= 0 and p not in valid for p in run["stages"][0]["kept"]) >= SCHEDULE[0] - len(valid)

    def padded(self, trees, case):
        """400x200 has 288 real tokens (< 303: the keep cap bites and layer 2 recycles nothing); 640x360 has 336
        (layer 2 may recycle only 33 real tokens, not 82)."""
        mode, image = case.split("-")
        run = _run(probe(trees, "patched", mode, image))
        clusters = {p for kept in run.kept for p in kept if p < 0}
        expected = [n for _, kept, recycled, _ in expected_counts(len(valid_positions(image)))
                    for n in (kept, recycled)]
        return run, valid_positions(image) | clusters, expected

    def check_padded(self, trees, case, run, valid):
        mode, image = case.split("-")
        raw = probe(trees, "patched", mode, image)
        assert raw["mode"] == mode
        assert counts(raw) == expected_counts(len(valid_positions(image)))
        check_tracking(raw)
        check_lengths(raw)

    def pos_pair(self, trees, case):
        """Zero queries at the pruning layers make every visual score equal; the positional weight then keeps and
        recycles the earliest original positions at every layer. Upstream's tie-breaking keeps others. Compared:
        each layer's kept original positions."""
        off, pos = probe(trees, "patched", "off", flat=True), probe(trees, "patched", "pos", flat=True)
        return (Run(kept=_run(off, real_only=True).kept[::2]), Run(kept=_run(pos, real_only=True).kept[::2]))

    def check_pos(self, trees, case, off_run, pos_run):
        pos, off = probe(trees, "patched", "pos", flat=True), probe(trees, "patched", "off", flat=True)
        # the construction really is flat: relative spread at float32 rounding level, far below the weight step
        # between neighbouring positions (1 - exp(-b) ≈ 2.3e-3 for paper:sparsevlm/gqa)
        for run in (pos, off):
            for stage, spread in run["raw_score_spread"].items():
                assert spread[0] < 1e-6, f"stage {stage}: raw scores are not flat (relative spread {spread[0]})"
        for s in pos["stages"]:
            real = sorted(p for p in s["ranked"] if p >= 0)
            kept = sorted(p for p in s["kept"] if p >= 0)
            assert kept == real[:len(kept)], f"layer {s['layer']}"
            pruned = sorted(set(real) - set(kept))
            recycled = sorted(p for p in s["recycled"] if p >= 0)
            assert recycled == pruned[:len(recycled)], f"layer {s['layer']} recycle"
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        assert pos["stages"][0]["kept"] != off["stages"][0]["kept"]
        assert mean(pos["stages"][0]["kept"]) < mean(off["stages"][0]["kept"])
        assert counts(pos) == counts(off) == expected_counts(SPAN)
        check_tracking(pos)

    def entry(self, trees):
        """Real entry: generate on the patched model, DEBIAS=full, a padded image."""
        return _run(probe(trees, "patched", "full", "400x200"))

    def check_entry(self, trees, run):
        raw = probe(trees, "patched", "full", "400x200")
        assert raw["logits_finite"] and len(raw["generated"]) == 1 + raw["new_tokens"]
