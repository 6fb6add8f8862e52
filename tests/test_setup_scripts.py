"""The researcher's scripts around the evaluation: scripts/slurm/* (with a stand-in sbatch and SLURM's array
variables), scripts/demo.sh in the states a checkout can be in, and setup.sh's choices (which environments
it builds, how, and what it checks first). Nothing here builds an environment or runs a GPU.
"""
import json
import os
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
