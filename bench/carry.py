"""Carrying the benchmark to a GPU machine with no network (the project's `device` tool).

Here (network to PyPI, populated third_party/):   python -m bench.carry prepare .carry/bench
There (Python 3.12, its own torch):               python -m bench.latency --carry .carry/bench --out $OUT
The study's bundle (study/carry.py: the same wheels and trees, installed into /tmp/study-site) serves too:
                                                  python -m bench.latency --carry .carry/study --site /tmp/study-site
Trees alone (e.g. one the bundle lacks):          python -m bench.carry trees .carry/study [NAME...]

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
SITE_ROOT = Path("/tmp/bench-site")


def trees() -> dict:
    """upstream -> the paths of it the benchmark exports (the registry's bench_tree)."""
    return {name: u["bench_tree"] for name, u in registry.upstreams().items() if u.get("bench_tree")}


def fork_files(name: str | None = None) -> list[str]:
    """The files of a transformers fork the benchmark carries (of upstream ``name``, or of every one), relative
    to FORK (the rest comes from the wheel)."""
    return [p[len(FORK) + 1:] for n, paths in trees().items() if name in (None, n) for p in paths
            if p.startswith(FORK + "/")]


# every fork file carried (reassemble_forks takes each upstream's own: fork_files(name))
FORK_FILES = tuple(fork_files())


def stack(method: str) -> str:
    """The wheel set (a key of WHEELS) that runs ``method`` (or CALL): its upstream's transformers version."""
    key = registry.reference_method() if method == CALL else method
    every = registry.methods(driver=None)
    if key not in every:
        raise registry.RegistryError(f"method {key!r} is unknown; use one of {', '.join(every)}")
    version = registry.upstreams()[every[key]["upstream"]]["transformers"]
    tag = _wheel_tag(version)
    if tag not in WHEELS:
        raise registry.RegistryError(f"{key} runs transformers {version}, for which bench/carry.py carries no "
                                     f"wheels (it has {', '.join(WHEELS)})")
    return tag


def _wheel_tag(version: str) -> str:
    """'4.37.2' -> '437' (a key of WHEELS)."""
    return "".join(version.split(".")[:2])


def prepare(out: Path, python_version: str = "3.12") -> None:
    out = Path(out)
    wheels = out / "wheels"
    for stack, specs in WHEELS.items():
        dest = wheels / stack
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python_version, "--implementation", "cp",
                        *(x for plat in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                          for x in ("--platform", plat)), "-d", str(dest), *specs], check=True)
    export_trees(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2 ** 20:.1f} MiB")


def export_trees(out: Path, names: list[str] | None = None) -> None:
    """out/trees/<Name>: each benchmarked upstream (or those in ``names``) at its pin with our series (only its
    bench_tree paths)."""
    from eval.upstream import export_tree

    unknown = sorted(set(names or []) - set(trees()))
    if unknown:
        raise registry.RegistryError(f"upstream(s) {', '.join(unknown)} have no bench_tree in the registry; the "
                                     f"benchmark carries {', '.join(trees())}")
    for name, paths in trees().items():
        if names and name not in names:
            continue
        dest = Path(out) / "trees" / name
        if dest.exists():
            shutil.rmtree(dest)
        export_tree(name, dest, paths=paths)
        for pyc in dest.rglob("__pycache__"):
            shutil.rmtree(pyc)


def install(carry: Path, site_root: Path = SITE_ROOT) -> dict:
    """Install each stack's wheels into its own --target folder; reassemble FastV's fork. Returns the sites."""
    sites = {}
    for tag in WHEELS:
        site = site_root / tag
        if not (site / "transformers").exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--target", str(site), *map(str, sorted((Path(carry) / "wheels" / tag).glob("*.whl")))],
                           check=True)
        sites[tag] = site
    reassemble_forks(carry, sites)
    return sites


def reassemble_forks(carry: Path, sites: dict) -> None:
    """A carried transformers fork holds only the files its baseline changed (FORK_FILES): the rest comes from
    the installed wheel of its stack, copied under them once."""
    for name in trees():
        fork = Path(carry) / "trees" / name / FORK
        tag = _wheel_tag(registry.upstreams()[name]["transformers"])
        if fork.exists() and not (fork / "__init__.py").exists() and tag in sites:
            overlay = {f: (fork / f).read_bytes() for f in fork_files(name)}
            shutil.copytree(Path(sites[tag]) / "transformers", fork, dirs_exist_ok=True)
            for f, data in overlay.items():
                (fork / f).write_bytes(data)


def environment(carry: Path, method: str, site_root: Path = SITE_ROOT) -> dict:
    """{"python", "env"} of ``method``'s worker: its stack's site (and a "common" site of packages every stack
    shares, where the bundle has one: the study's), the repository, the carried trees."""
    tag = stack(method)
    sites = [site_root / tag] + ([site_root / "common"] if (site_root / "common").is_dir() else [])
    env = {"PYTHONPATH": os.pathsep.join([*map(str, sites), str(ROOT)]),
           "EVAL_THIRD_PARTY": str(Path(carry).resolve() / "trees")}
    if tag == "431":
        env["BENCH_HIDE_TOKENIZERS"] = "1"
    return {"python": sys.executable, "env": env}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.carry")
    p.add_argument("action", choices=["prepare", "install", "trees"])
    p.add_argument("dir", type=Path)
    p.add_argument("names", nargs="*", help="trees: only these upstreams (default: every one the benchmark runs)")
    a = p.parse_args()
    if a.action == "prepare":
        prepare(a.dir)
    elif a.action == "trees":
        try:
            export_trees(a.dir, a.names)
        except registry.RegistryError as e:
            sys.exit(f"error: {e}")
    else:
        print(install(a.dir))
