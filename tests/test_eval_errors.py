"""Clear one-line errors for missing paths and bad settings; paper defaults and method arguments (no model)."""
import json
import os
import subprocess
import sys

import pytest

from eval import run as driver
from eval.common import EvalError
from eval.methods import get_adapter, method_spec, parse_method_args
from eval.synthetic import build_synthetic
from tests.support import ROOT


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalerr")
    build_synthetic(root / "data", images=2)
    model = root / "tiny-llava"
    model.mkdir()  # a folder is enough for the checks (--check-only loads nothing)
    return root


def check(data, *extra, answers=None):
    args = ["--method", "llava", "--benchmark", "synthetic_wide", "--model-path", str(data / "tiny-llava"),
            "--data-dir", str(data / "data"), "--answers-dir", str(answers or data / "answers"), "--check-only",
            *extra]
    return driver.run(driver.parse_args(args))


def test_check_only_lists_run_folders(data):
    dirs = check(data, "--benchmark", "synthetic_wide,synthetic_tall", "--mode", "off,full", "--trend", "paper:fastv")
    assert [d.relative_to(data / "answers").as_posix() for d in dirs] == [
        "tiny-llava/synthetic_wide/llava-all/off", "tiny-llava/synthetic_wide/llava-all/full-paper-fastv",
        "tiny-llava/synthetic_tall/llava-all/off", "tiny-llava/synthetic_tall/llava-all/full-paper-fastv"]
    assert not (data / "answers").exists()  # nothing written


@pytest.mark.parametrize("extra,message", [
    (["--data-dir", "/nonexistent/eval"], r"/nonexistent/eval/synthetic/wide does not exist; .*python -m eval.synthetic"),
    (["--model-path", "/nonexistent/llava-v1.5-7b"], r"checkpoint /nonexistent/llava-v1.5-7b does not exist"),
    (["--benchmark", "gqa"], r"GQA: .*/gqa does not exist; download LLaVA's eval data"),
    (["--benchmark", "nope"], r"benchmark 'nope' is unknown"),
    (["--mode", "full"], r"method llava has no paper trend; mode full needs --trend"),
    (["--mode", "sideways"], r"debias mode 'sideways' is unknown"),
    (["--method-arg", "fast_v_attention_rank=64"], r"llava has no argument 'fast_v_attention_rank'"),
    (["--method", "nope"], r"method 'nope' is unknown"),
    (["--num-chunks", "2", "--chunk-idx", "2"], r"--chunk-idx 2 is outside 0..1"),
    (["--limit", "0"], r"--limit 0 must be ≥ 1"),
])
def test_bad_settings_name_the_value(data, extra, message):
    with pytest.raises(EvalError, match=message):
        check(data, *extra)


def test_offline_hub_id_not_in_cache(data, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(EvalError, match="liuhaotian/llava-v1.5-7b is not in the Hugging Face cache"):
        check(data, "--model-path", "liuhaotian/llava-v1.5-7b")


def test_resume_into_a_folder_of_another_run_is_refused(data, tmp_path):
    from eval import runinfo

    rdir = check(data, answers=tmp_path)[0]
    runinfo.write_or_check(rdir / "run.json", {"benchmark": "synthetic_wide", "method": "llava", "max_new_tokens": 9})
    with pytest.raises(EvalError, match="holds answers of a different run .*max_new_tokens: 9 there vs 128 now"):
        runinfo.write_or_check(rdir / "run.json", {"benchmark": "synthetic_wide", "method": "llava",
                                                   "max_new_tokens": 128})


def test_cli_exit_code_and_one_line_error(data):
    r = subprocess.run([sys.executable, "-m", "eval.run", "--method", "llava", "--benchmark", "synthetic_wide",
                        "--model-path", "/nonexistent/ckpt", "--data-dir", str(data / "data")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: checkpoint /nonexistent/ckpt does not exist; set CKPT/"
                                             "--model-path to a LLaVA-1.5 folder or a hub id such as "
                                             "liuhaotian/llava-v1.5-7b"]


def _script(cmd, env):
    return subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)


@pytest.mark.parametrize("cmd,env,message", [
    ("source scripts/lib/common.sh; method_python NoSuchEnv", {"PYTHON": ""},
     r"^error: no environment for NoSuchEnv: .*envs/venv-NoSuchEnv .*bash setup.sh --only NoSuchEnv"),
    ("bash scripts/run_llava.sh", {"CKPT": "/nonexistent/ckpt"}, r"^error: checkpoint /nonexistent/ckpt does not exist"),
    ("bash scripts/run_llava.sh", {"CKPT": "liuhaotian/llava-v1.5-7b", "DATA_DIR": "/nonexistent/data"},
     r"^error: dataset folder DATA_DIR=/nonexistent/data does not exist"),
])
def test_run_scripts_stop_with_one_line(cmd, env, message, tmp_path):
    if env.get("CKPT") == "liuhaotian/llava-v1.5-7b":   # a downloaded hub checkpoint: the next check is the data
        snap = tmp_path / "hub" / "models--liuhaotian--llava-v1.5-7b" / "snapshots" / "0"
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
        env = {**env, "HF_HUB_CACHE": str(tmp_path / "hub")}
    r = _script(cmd, {"PYTHON": sys.executable, **env})
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert __import__("re").search(message, r.stderr.strip()), r.stderr


def test_run_script_passes_sys_length_35(data):
    """FastV's run script: the official 36 was off by one; the driver must receive 35."""
    r = _script("source scripts/lib/common.sh; eval_args fastv; printf '%s\\n' \"${EVAL_ARGS[@]}\"",
                {"CKPT": str(data / "tiny-llava"), "DATA_DIR": str(data / "data"), "METHOD_ARGS": "fast_v_attention_rank=64"})
    assert r.returncode == 0, r.stderr
    args = r.stdout.split()
    assert args[args.index("fast_v_sys_length=35") - 1] == "--method-arg"
    assert "fast_v_attention_rank=64" in args
    assert args[args.index("--benchmark") + 1] == "gqa,mmbench,mmbench_cn,mme,mmvet,pope,scienceqa,textvqa,vizwiz,vqav2"
    assert args[args.index("--mode") + 1] == "off,full"


def test_paper_defaults_and_overrides():
    fastv = method_spec("fastv")["args"]
    assert (fastv["fast_v_agg_layer"], fastv["fast_v_attention_rank"], fastv["fast_v_sys_length"]) == (2, 128, 35)
    pdrop = method_spec("pdrop")["args"]
    assert pdrop["layer_list"] == [2, 10, 20] and pdrop["image_token_ratio_list"] == [0.32, 0.16, 0.08]
    assert method_spec("sparsevlm")["args"]["retained_tokens"] == 128
    himap = method_spec("himap")["args"]
    assert [himap[k] for k in ("hmap_v_attn_txt_layer", "hmap_v_attn_txt_rank", "hmap_v_attn_img_layer",
                               "hmap_v_attn_img_rank", "sys_length")] == [2, 115, 8, 90, 35]
    assert method_spec("tokencarve")["args"]["token_carve_image_token_nums"] == 64
    assert parse_method_args(["a=1", "b=x", "c=[1, 2]", "d=true"]) == {"a": 1, "b": "x", "c": [1, 2], "d": True}
    with pytest.raises(EvalError, match="not key=value"):
        parse_method_args(["oops"])


def test_adapter_argument_types_and_budget_label():
    from eval.methods.base import Adapter

    class PDrop(Adapter):  # a throwaway adapter over the pdrop defaults, as a later wave will write
        name = "pdrop"

    a = PDrop({"image_token_ratio_list": "0.5,0.25,0.125"})
    assert a.args["image_token_ratio_list"] == [0.5, 0.25, 0.125]
    assert a.budget() == "2-10-20_0.5-0.25-0.125"
    assert a.preprocess_mode("science") == "pad" and a.trend_method == "pdrop"
    with pytest.raises(EvalError, match="layer_list='x' is not a comma-separated list"):
        PDrop({"layer_list": "x"})
    with pytest.raises(EvalError, match="layer_list=3 should be a list like its default"):
        PDrop({"layer_list": 3})
    assert get_adapter("llava").budget() == "all"
    from eval.methods.base import method_spec
    assert method_spec("himap")["preprocess"]["science"] == "crop"


def test_every_method_with_defaults_has_a_registered_adapter():
    from eval.methods import ADAPTERS, method_names
    assert sorted(ADAPTERS) == sorted(method_names())
    for name, target in ADAPTERS.items():
        module, _, cls = target.partition(":")
        assert module == f"eval.methods.{name}" and cls.endswith("Adapter"), (name, target)
