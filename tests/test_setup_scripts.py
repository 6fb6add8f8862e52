"""The researcher's scripts around the evaluation: scripts/slurm/* (with a stand-in sbatch and SLURM's array
variables), scripts/demo.sh in the states a checkout can be in, and setup.sh's choices (which environments
it builds, how, and what it checks first). Nothing here builds an environment or runs a GPU.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.test_run_scripts_video import FAKE_DRIVER, one_error

PY = sys.executable


def clean_env(**env) -> dict:
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "CKPT", "DATA_DIR", "BENCHMARKS", "MODES", "LIMIT", "METHOD", "ENV",
                                 "CHUNKS", "TASKS", "PYTHON", "GPUS", "TREND", "HF_"))}
    full.update(env)
    return full


@pytest.fixture()
def eval_setup(tmp_path):
    """A local checkpoint, the synthetic data, an interpreter that records real eval.run calls, and a `sbatch`
    that records its arguments and answers with job ids 100, 101, ..."""
    subprocess.run([PY, "-m", "eval.synthetic", str(tmp_path / "data")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    (tmp_path / "llava-v1.5-7b").mkdir()
    fake = tmp_path / "python"
    fake.write_text(FAKE_DRIVER.format(py=PY))
    fake.chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(f"""#!/usr/bin/env bash
n=$(wc -l < "{tmp_path}/sbatch.log" 2>/dev/null || echo 0)
{PY} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "{tmp_path}/sbatch.log"
echo $((100 + n))
""")
    (bindir / "sbatch").chmod(0o755)
    env = clean_env(PYTHON=str(fake), CKPT=str(tmp_path / "llava-v1.5-7b"), DATA_DIR=str(tmp_path / "data"),
                    BENCHMARKS="synthetic_wide", MODES="off", ANSWERS_DIR=str(tmp_path / "answers"),
                    FAKE_LOG=str(tmp_path / "driver.jsonl"), METHOD="llava", ENV="LLaVA",
                    PATH=f"{bindir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(ROOT))
    return tmp_path, env


def lines(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def bash(script: str, env: dict, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script)], env=env, cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=300)


# ------------------------------------------------------------------ SLURM
def test_submit_resubmits_one_task_with_the_evaluation_chunk_count(eval_setup):
    tmp, env = eval_setup
    r = bash("scripts/slurm/submit.sh", {**env, "CHUNKS": "8", "TASKS": "5"})
    assert r.returncode == 0, r.stdout + r.stderr
    array, merge = lines(tmp / "sbatch.log")
    assert "--array=5" in array and any(a.startswith("--export=") and ",CHUNKS=8" in a for a in array), array
    assert "--dependency=afterany:100" in merge and any(",CHUNKS=8" in a for a in merge), merge
    assert "tasks 5 of 8" in r.stdout


def test_submit_whole_array_and_bad_tasks(eval_setup):
    tmp, env = eval_setup
    r = bash("scripts/slurm/submit.sh", {**env, "CHUNKS": "4"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--array=0-3" in lines(tmp / "sbatch.log")[0]
    one_error(bash("scripts/slurm/submit.sh", {**env, "CHUNKS": "4", "TASKS": "4"}),
              "TASKS=4 names task 4, outside 0..3 for CHUNKS=4")
    one_error(bash("scripts/slurm/submit.sh", {**env, "CHUNKS": "4", "TASKS": "a"}), "TASKS=a is not a list")


def array_env(env: dict, task: int, lo: int, hi: int, **extra) -> dict:
    return {**env, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(lo),
            "SLURM_ARRAY_TASK_MAX": str(hi), "SLURM_ARRAY_TASK_COUNT": str(hi - lo + 1), **extra}


def test_a_resubmitted_task_runs_its_chunk_of_the_whole_evaluation(eval_setup):
    tmp, env = eval_setup
    r = bash("scripts/slurm/eval_array.sbatch", array_env(env, 5, 5, 5, CHUNKS="8"))
    assert r.returncode == 0, r.stdout + r.stderr
    argv = lines(tmp / "driver.jsonl")[0]
    assert argv[argv.index("--num-chunks") + 1] == "8" and argv[argv.index("--chunk-idx") + 1] == "5", argv


def test_array_task_without_chunks(eval_setup):
    tmp, env = eval_setup
    r = bash("scripts/slurm/eval_array.sbatch", array_env(env, 2, 0, 3))       # the whole array: its size
    assert r.returncode == 0, r.stdout + r.stderr
    argv = lines(tmp / "driver.jsonl")[0]
    assert argv[argv.index("--num-chunks") + 1] == "4"
    one_error(bash("scripts/slurm/eval_array.sbatch", array_env(env, 5, 5, 5)), "is not the whole evaluation",
              "CHUNKS=")
    assert len(lines(tmp / "driver.jsonl")) == 1


def test_merge_job_names_what_to_resubmit(eval_setup):
    tmp, env = eval_setup
    r = bash("scripts/slurm/merge_score.sbatch", {**env, "CHUNKS": "8"})      # no chunk was ever answered
    assert r.returncode == 1, r.stdout + r.stderr
    assert "TASKS=<their indices> CHUNKS=8" in r.stderr and "submit.sh" in r.stderr


# ------------------------------------------------------------------ setup.sh (with a stand-in interpreter)
FAKE_PY = r'''#!/usr/bin/env bash
# Stands in for python3.10 and every environment's python: `-m venv DIR` makes DIR/bin/python (this script),
# `-m pip ...` records its arguments and the requirement files it is given, `-c 'import wheel|ninja'` answers
# from FAKE_HAS_WHEEL / FAKE_HAS_NINJA; anything else fails (e.g. the up-to-date probe).
if [[ $1 == -m && $2 == venv ]]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [[ $1 == -m && $2 == pip ]]; then
  echo "pip ${*:3}" >> "$FAKE_LOG"
  args=("${@:3}")
  for i in "${!args[@]}"; do
    if [[ ${args[i]} == -r ]]; then sed 's/^/  | /' "${args[i+1]}" >> "$FAKE_LOG"; fi
  done
  exit 0
fi
if [[ $1 == -c ]]; then
  case $2 in
    *wheel*) [[ -n ${FAKE_HAS_WHEEL:-} ]]; exit ;;
    *ninja*) [[ -n ${FAKE_HAS_NINJA:-} ]]; exit ;;
  esac
fi
exit 1
'''


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout


@pytest.fixture()
def setup_copy(tmp_path):
    """setup.sh, scripts/lib and envs/ in a scratch project whose third_party/iLLaVA and SparseVLMs are small git
    repositories (iLLaVA's transformers fork tracks its transformers.egg-info, as upstream's does)."""
    root = tmp_path / "proj"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "setup.sh", root / "setup.sh")
    shutil.copytree(ROOT / "scripts" / "lib", root / "scripts" / "lib")
    shutil.copytree(ROOT / "envs", root / "envs")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    _git(root, "init", "-q")
    for name, files in {"iLLaVA": ["src/LLaVA-OneVision/setup.py", "src/lmms_eval-0.2.4/setup.py",
                                   "src/transformers-4.46.0/setup.py",
                                   "src/transformers-4.46.0/src/transformers.egg-info/PKG-INFO"],
                        "SparseVLMs": ["pyproject.toml"]}.items():
        sub = root / "third_party" / name
        for f in files:
            (sub / f).parent.mkdir(parents=True, exist_ok=True)
            (sub / f).write_text(f"{f}\n")
        _git(sub, "init", "-q")
        _git(sub, "add", "-f", ".")
        _git(sub, "commit", "-qm", "upstream")
    fake = tmp_path / "python3.10"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    log = tmp_path / "pip.log"
    bindir = tmp_path / "bin"                      # PATH without nvcc or ninja
    bindir.mkdir()
    for tool in ("git", "bash", "sha256sum", "cut", "grep", "awk", "sort", "mktemp", "rm", "cp", "mkdir", "cat",
                 "basename", "dirname", "tr", "head", "sed", "nproc", "env"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "MAX_JOBS", "CONDA_EXE")}
    env.update(PYTHON310=str(fake), FAKE_LOG=str(log), PATH=str(bindir))
    return root, env, log


def setup_run(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "setup.sh"), "--no-submodules", "--no-patches", "--venv", *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_setup_builds_no_environment_nobody_uses():
    r = subprocess.run(["bash", str(ROOT / "setup.sh"), "--dry-run", "--no-submodules", "--no-patches", "--venv"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "venv-analysis" not in r.stdout and "envs/analysis.txt" not in r.stdout
    assert "venv-FastV" in r.stdout
    r = subprocess.run(["bash", str(ROOT / "setup.sh"), "--dry-run", "--only", "analysis"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "no GPU environment list envs/analysis.txt" in r.stderr


def test_setup_upgrades_pip_and_never_writes_into_illava(setup_copy):
    root, env, log = setup_copy
    sub = root / "third_party" / "iLLaVA"
    r = setup_run(root, env, "--only", "iLLaVA")
    assert r.returncode == 0, r.stdout + r.stderr
    calls = log.read_text()
    assert calls.splitlines()[0] == "pip install --upgrade pip", calls
    listed = [l[4:] for l in calls.splitlines() if l.startswith("  | ")]
    assert "-e third_party/iLLaVA/src/LLaVA-OneVision" in listed
    assert not any("transformers-4.46.0" in l and l.startswith("-e") for l in listed), listed
    copy = [l for l in listed if l.endswith("third_party_iLLaVA_src_transformers-4.46.0")]
    assert len(copy) == 1, listed
    assert _git(sub, "status", "--porcelain", "--ignored") == ""


@pytest.mark.parametrize("have,missing", [({}, "the environment lacks the wheel package"),
                                          ({"FAKE_HAS_WHEEL": "1"}, "ninja is not installed"),
                                          ({"FAKE_HAS_WHEEL": "1", "FAKE_HAS_NINJA": "1"},
                                           "no CUDA compiler")])
def test_setup_checks_flash_attn_prerequisites_first(setup_copy, have, missing):
    root, env, log = setup_copy
    req = root / "envs" / "SparseVLMs.txt"
    req.write_text(re.sub(r"(?m)^flash_attn.*$", "flash_attn==2.3.3", req.read_text()))   # a mandatory line
    r = setup_run(root, {**env, **have}, "--only", "SparseVLMs")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"SparseVLMs: cannot build flash-attn: {missing}" in r.stderr
    assert "pip install --no-build-isolation" not in log.read_text()


def test_setup_builds_flash_attn_when_it_can(setup_copy, tmp_path):
    root, env, log = setup_copy
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (cuda / "bin" / "nvcc").chmod(0o755)
    r = setup_run(root, {**env, "FAKE_HAS_WHEEL": "1", "FAKE_HAS_NINJA": "1", "CUDA_HOME": str(cuda)},
                  "--only", "SparseVLMs")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pip install --no-build-isolation flash_attn==2.3.3" in log.read_text()
    assert "MAX_JOBS=" in r.stdout


# ------------------------------------------------------------------ scripts/demo.sh
def test_demo_model_is_deep_enough_for_every_method():
    """The tiny model has a layer past every layer index a method's defaults name (iLLaVA's illava_llm_k
    included: it merges before layer k, so k must be < the number of layers)."""
    from eval.demo import demo_layers
    from eval.methods import ADAPTERS, method_spec
    for m in ADAPTERS:
        layers = demo_layers([m])
        for key, value in method_spec(m)["args"].items():
            if "layer" in key or key == "illava_llm_k":
                for v in value if isinstance(value, list) else [value]:
                    assert v < layers, (m, key, v, layers)


def _no_baseline_envs() -> dict:
    """DEMO_PYTHON_<KEY> pointing nowhere for every method with its own environment (all but plain LLaVA's)."""
    from eval.registry import methods
    return {f"DEMO_PYTHON_{key.upper()}": "/nonexistent/python"
            for key, spec in methods().items() if spec["env"] != "LLaVA"}


@pytest.mark.parametrize("state", ["submodules-unpopulated", "llava-populated"])
def test_demo_runs_with_only_the_test_environment(tmp_path, state):
    """`bash scripts/demo.sh` with the test environment only (no baseline environment), third_party/ either
    unpopulated (EVAL_THIRD_PARTY: an empty folder) or as checked out here (iLLaVA's port then runs on LLaVA)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_PYTHON_", "EVAL_THIRD_PARTY", "DEBIAS"))}
    env.update(_no_baseline_envs(), PYTHON=PY, OUT=str(tmp_path / "demo"))
    if state == "submodules-unpopulated":
        (tmp_path / "empty").mkdir()
        env["EVAL_THIRD_PARTY"] = str(tmp_path / "empty")
    else:
        from eval.common import populated
        if not populated("LLaVA"):
            pytest.skip("third_party/LLaVA is not populated here, so the demo with the iLLaVA port was not tested")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--images", "1"], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "demo: done" in r.stdout and (tmp_path / "demo" / "report" / "kept_tokens.png").is_file()
    if state == "llava-populated":
        assert "demo: [3/5] driver: illava" in r.stdout


# ------------------------------------------------------------------ scripts/check_envs.sh (offline, stand-in pip)
FAKE_PY310 = r'''#!/usr/bin/env bash
# Stands in for python3.10 and its venv: `pip install --dry-run --report R -r LIST` writes a report whose torch
# is FAKE_TORCH_VERSION with FAKE_TORCH_RUNTIME as its CUDA runtime requirement and records LIST; the verdict
# script (stdin) runs on the test interpreter.
if [[ $1 == -c ]]; then echo 3.10; exit 0; fi
if [[ $1 == -m && $2 == venv ]]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [[ $1 == -m && $2 == pip ]]; then
  args=("$@"); report='' list=''
  for i in "${!args[@]}"; do
    [[ ${args[i]} == --report ]] && report=${args[i+1]}
    [[ ${args[i]} == -r ]] && list=${args[i+1]}
  done
  [[ -n $list ]] && cat "$list" >> "$FAKE_LOG"
  [[ -n $report ]] && @PY@ -c 'import json, os, sys
req = [os.environ["FAKE_TORCH_RUNTIME"]] if os.environ.get("FAKE_TORCH_RUNTIME") else []
json.dump({"install": [{"metadata": {"name": "torch", "version": os.environ["FAKE_TORCH_VERSION"],
           "requires_dist": req}, "download_info": {"url": "https://example/torch.whl"}}]}, open(sys.argv[1], "w"))' "$report"
  exit 0
fi
exec @PY@ "$@"
'''


@pytest.mark.parametrize("version,runtime,ok", [
    ("2.0.1", "nvidia-cuda-runtime-cu11==11.7.99; platform_system == \"Linux\"", False),
    ("2.1.2", "nvidia-cuda-runtime-cu12==12.1.105; platform_system == \"Linux\"", True),
    ("2.0.1+cu118", "", True),
    ("2.0.1+cu117", "", False),
    ("2.1.2+cpu", "", False),
])
def test_check_envs_accepts_only_cuda_118_or_newer_torch(tmp_path, version, runtime, ok):
    fake = tmp_path / "python3.10"
    fake.write_text(FAKE_PY310.replace("@PY@", PY))
    fake.chmod(0o755)
    log = tmp_path / "lists.txt"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "check_envs.sh"), "HiMAP"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHON310": str(fake), "FAKE_LOG": str(log),
                                         "FAKE_TORCH_VERSION": version, "FAKE_TORCH_RUNTIME": runtime})
    assert r.returncode == (0 if ok else 1), r.stdout + r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("ok   HiMAP: torch " if ok else "FAIL HiMAP: "), line
    if not ok and "cpu" not in version:
        assert "no sm_90 (Hopper) code" in line
    listed = log.read_text()
    assert "# no-deps" not in listed and "-e third_party/" not in listed    # resolved from copies, as setup.sh
    assert "torch==2.1.2" in listed
