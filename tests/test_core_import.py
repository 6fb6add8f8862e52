"""debias_core needs torch and numpy only: it must import in every baseline's environment (transformers
4.31 forks, 4.37.2, iLLaVA's 4.46 fork), so it may not import transformers, llava or anything else."""
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCKED = ["transformers", "llava", "videollava", "accelerate", "PIL", "sentencepiece", "tokenizers",
           "huggingface_hub", "safetensors", "einops", "timm", "hypothesis", "pytest", "scipy"]

PROBE = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name} (debias_core must need torch and numpy only)")
            return None

    sys.meta_path.insert(0, Block())
    import debias_core, debias_core.cli
    import torch
    debias_core.configure(mode="full", trend="paper:fastv")
    with debias_core.sample(image_size=(640, 480)):
        out = debias_core.debias(torch.rand(576))
        assert debias_core.keep_cap(500) == 432
    assert debias_core.cli.main(["padmask", "--image-size", "640x480", "--json"]) == 0
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("ok", out.shape[0])
""")


def test_imports_with_only_torch_and_numpy():
    r = subprocess.run([sys.executable, "-c", PROBE, ",".join(BLOCKED)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "ok 576"


def test_the_blocker_works():
    """Guard against a vacuous probe: the same finder does stop an import of transformers."""
    code = PROBE.split("import debias_core")[0] + "import transformers\n"
    r = subprocess.run([sys.executable, "-c", code, "transformers"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "blocked import of transformers" in r.stderr


def test_declared_dependencies():
    import tomllib
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert sorted(meta["project"]["dependencies"]) == ["numpy", "torch"]
