"""The paper presets regenerate the official repo's 41 published weight vectors to ≤ 1e-12.

Reference: third_party/attention-bias/playground/data/weight/<Method>/<file>.npy (the official repository at its
pin), file names as published (MME.npy vs mme.npy, mm-vet.npy vs mmvet.npy). Skips with a message where that
submodule is not populated.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from debias_core import BENCHMARKS, resolve_trend

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "third_party" / "attention-bias" / "playground" / "data" / "weight"
TOLERANCE = 1e-12

METHOD_DIRS = {"HiMAP": "himap", "PyramidDrop": "pdrop", "SparseVLMs": "sparsevlm", "TokenCarve": "tokencarve"}
FILE_TO_BENCHMARK = {"mm-vet": "mmvet", "MME": "mme"}   # published spellings -> ours


def expected_files() -> dict[str, str]:
    """relative .npy path -> preset name, for all 41 published files."""
    out = {"FastV/weight.npy": "paper:fastv"}
    published = {  # per method folder, the spelling of the two inconsistent names
        "HiMAP": {"mme": "MME", "mmvet": "mm-vet"},
        "PyramidDrop": {"mme": "MME", "mmvet": "mm-vet"},
        "SparseVLMs": {"mme": "mme", "mmvet": "mmvet"},
        "TokenCarve": {"mme": "MME", "mmvet": "mmvet"},
    }
    for folder, method in METHOD_DIRS.items():
        for b in BENCHMARKS:
            out[f"{folder}/{published[folder].get(b, b)}.npy"] = f"paper:{method}/{b}"
    return out


def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} is absent, so the presets were not compared with the official weight files "
                    f"(git submodule update --init third_party/attention-bias fetches them)")
    return REFERENCE


def load(path: Path) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    assert arr.dtype == np.float64 and arr.shape == (576,), f"{path}: {arr.dtype} {arr.shape}"
    return arr


def test_the_41_files_are_exactly_the_ones_we_map():
    ref = reference_dir()
    found = {p.relative_to(ref).as_posix() for p in ref.rglob("*.npy")}
    assert found == set(expected_files()), f"unmapped: {found - set(expected_files())}, " \
                                           f"missing: {set(expected_files()) - found}"
    assert len(found) == 41


@pytest.mark.parametrize("rel, preset", sorted(expected_files().items()))
def test_preset_regenerates_the_published_vector(rel, preset):
    ref = load(reference_dir() / rel)
    ours = resolve_trend(preset).weights(576)
    assert ours.dtype == np.float64
    err = np.abs(ours - ref).max()
    assert err <= TOLERANCE, f"{preset} vs {rel}: max |Δ| = {err:.3g}"


@pytest.mark.parametrize("rel", ["HiMAP/mm-vet.npy", "SparseVLMs/mmvet.npy", "TokenCarve/MME.npy"])
def test_published_spellings_also_resolve_as_benchmark_names(rel):
    """`paper:himap/mm-vet` (the published file name) names the same preset as `paper:himap/mmvet`."""
    folder, name = rel[:-4].split("/")
    ref = load(reference_dir() / rel)
    err = np.abs(resolve_trend(f"paper:{METHOD_DIRS[folder]}/{name}").weights() - ref).max()
    assert err <= TOLERANCE


def test_cli_weights_regenerates_every_file(tmp_path):
    """The CLI's `weights` command for all 41 (in-process: its main() with the same argv)."""
    from debias_core.cli import main
    ref_dir = reference_dir()
    for i, (rel, preset) in enumerate(sorted(expected_files().items())):
        out = tmp_path / f"{i:02d}.npy"
        assert main(["weights", "--preset", preset, "--out", str(out)]) == 0
        got = np.load(out, allow_pickle=False)
        assert got.dtype == np.float64 and got.shape == (576,)
        assert np.abs(got - load(ref_dir / rel)).max() <= TOLERANCE, f"CLI {preset} vs {rel}"


@pytest.mark.parametrize("rel, preset", [("FastV/weight.npy", "paper:fastv"),
                                         ("PyramidDrop/mm-vet.npy", "paper:pdrop/mmvet")])
def test_python_m_debias_core_weights(rel, preset, tmp_path):
    """The same through `python -m debias_core weights` in a fresh interpreter."""
    ref = load(reference_dir() / rel)
    out = tmp_path / "w.npy"
    r = subprocess.run([sys.executable, "-m", "debias_core", "weights", "--preset", preset, "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = np.load(out, allow_pickle=False)
    assert got.dtype == np.float64 and np.abs(got - ref).max() <= TOLERANCE
