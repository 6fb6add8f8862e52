"""Carrying the benchmark to a GPU machine with no network (the project's `device` tool).

Here (network to PyPI, populated third_party/):   python -m bench.carry prepare .carry/bench
There (Python 3.12, its own torch):               python -m bench.latency --carry .carry/bench --out $OUT

prepare: wheels for the two transformers stacks (4.37.2 for LLaVA, PyramidDrop, SparseVLMs, TokenCarve and
the iLLaVA port; 4.31.0 for HiMAP and FastV's fork) and exports of each upstream at its pin with our series
applied (only the Python packages the benchmark imports). FastV's fork is 4.31.0 plus three files
(generation/utils.py and the llama modelling/config files), so only those travel and the fork is
reassembled there from the 4.31.0 wheel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from eval import registry

ROOT = Path(__file__).resolve().parents[1]
# one wheel set per transformers version a benchmarked upstream runs (the registry's "transformers")
WHEELS = {"437": ["transformers==4.37.2", "tokenizers==0.15.2", "huggingface-hub==0.23.5", "accelerate==0.21.0"],
          "431": ["transformers==4.31.0", "huggingface-hub==0.23.5", "accelerate==0.21.0"]}
# a transformers fork inside an upstream (FastV's): only the files of it its bench_tree lists travel; install()
# reassembles the rest from the wheel of the same version
FORK = "src/transformers/src/transformers"
CALL = "_call"  # the job timing the debias call alone: runs in the reference method's stack


def trees() -> dict:
    """upstream -> the paths of it the benchmark exports (the registry's bench_tree)."""
    return {name: u["bench_tree"] for name, u in registry.upstreams().items() if u.get("bench_tree")}


def stack(method: str) -> str:
    """The wheel set (a key of WHEELS) that runs ``method`` (or CALL): its upstream's transformers version."""
    key = registry.reference_method() if method == CALL else method
    version = registry.upstreams()[registry.method(key)["upstream"]]["transformers"]
    tag = _wheel_tag(version)
    if tag not in WHEELS:
        raise registry.RegistryError(f"{key} runs transformers {version}, for which bench/carry.py carries no "
                                     f"wheels (it has {', '.join(WHEELS)})")
    return tag


def _wheel_tag(version: str) -> str:
    """'4.37.2' -> '437' (a key of WHEELS)."""
    return "".join(version.split(".")[:2])


def prepare(out: Path, python_version: str = "3.12") -> None:
    from eval.upstream import export_tree

    out = Path(out)
    wheels = out / "wheels"
    for stack, specs in WHEELS.items():
        dest = wheels / stack
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python_version, "--implementation", "cp",
                        *(x for plat in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                          for x in ("--platform", plat)), "-d", str(dest), *specs], check=True)
    for name, paths in trees().items():
        dest = out / "trees" / name
        if dest.exists():
            shutil.rmtree(dest)
        export_tree(name, dest, paths=paths)
        for pyc in dest.rglob("__pycache__"):
            shutil.rmtree(pyc)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2 ** 20:.1f} MiB")


def install(carry: Path, site_root: Path = Path("/tmp/bench-site")) -> dict:
    """Install each stack's wheels into its own --target folder; reassemble FastV's fork. Returns the sites."""
    sites = {}
    for tag in WHEELS:
        site = site_root / tag
        if not (site / "transformers").exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--target", str(site), *map(str, sorted((Path(carry) / "wheels" / tag).glob("*.whl")))],
                           check=True)
        sites[tag] = site
    for name, paths in trees().items():
        fork = Path(carry) / "trees" / name / FORK
        fork_files = [p[len(FORK) + 1:] for p in paths if p.startswith(FORK + "/")]
        if fork_files and fork.exists() and not (fork / "__init__.py").exists():
            overlay = {f: (fork / f).read_bytes() for f in fork_files}
            shutil.copytree(sites[_wheel_tag(registry.upstreams()[name]["transformers"])] / "transformers", fork,
                            dirs_exist_ok=True)
            for f, data in overlay.items():
                (fork / f).write_bytes(data)
    return sites


def environment(carry: Path, method: str, site_root: Path = Path("/tmp/bench-site")) -> dict:
    tag = stack(method)
    env = {"PYTHONPATH": os.pathsep.join([str(site_root / tag), str(ROOT)]),
           "EVAL_THIRD_PARTY": str(Path(carry).resolve() / "trees")}
    if tag == "431":
        env["BENCH_HIDE_TOKENIZERS"] = "1"
    return {"python": sys.executable, "env": env}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.carry")
    p.add_argument("action", choices=["prepare", "install"])
    p.add_argument("dir", type=Path)
    a = p.parse_args()
    prepare(a.dir) if a.action == "prepare" else print(install(a.dir))
