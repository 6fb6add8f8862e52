"""The method registry (eval.registry over debias_core/data/methods.json): what derives from it, and its errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eval import registry
from eval.common import EvalError
from tests.support import ROOT

BUILT_IN = registry.methods(driver=None, plugins=False)

# files whose method lists and per-method settings derive from the registry: no method key may be typed in them
DERIVED = ["scripts/test.sh", "scripts/bench.sh", "eval/report.py", "bench/latency.py", "bench/carry.py",
           "bench/checkpoint.py", "bench/workload.py", "bench/insitu.py", "bench/report.py", "bench/video.py", "eval/methods/__init__.py", "eval/methods/base.py", "tests/test_repo.py",
           "debias_core/presets.py", "debias_core/config.py", "scripts/lib/common.sh", "scripts/lib/patches.sh",
           "scripts/slurm/eval_array.sbatch", "scripts/slurm/submit.sh", "scripts/slurm/merge_score.sbatch",
           "scripts/apply_patches.sh", "scripts/refresh_patches.sh", "scripts/check_envs.sh", "eval/video_qa.py"]
# words that are a method's key but name something else in a file (the exact text, removed before the search)
NOT_KEYS = {
    "bench/checkpoint.py": [r'"model_type": "llava"', r'must contain "llava"'],   # the checkpoint's model type
    # the video method's driver: its run folders are named after the pruning its patch series adds (and its
    # checkpoint folder name must contain "llava", upstream's loader rule); "video" is a folder of its tree
    "eval/video_qa.py": ['PRUNED_LABEL, UNPRUNED_LABEL = "fastv", "videollava"', '"llava" not in',
                         "must contain 'llava'", '/ "video" /'],
}


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "eval.registry", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env)


def _typed_keys(text: str, shell: bool) -> list[str]:
    """The method keys typed in ``text``: quoted, indexed or called; in shell scripts, any bare word."""
    # the package llava (imported by name) is not the method llava
    text = re.sub(r"(import_module|sys\.modules\.get|find_spec)\(\"llava\"\)", "", text)
    found = [q for key in BUILT_IN
             for q in re.findall(rf"[\"']{re.escape(key)}[\"']|\[{re.escape(key)}\]|\b{re.escape(key)}\)", text)]
    if shell:  # not even as a bare word (llava and video are also upstream and folder names there)
        found += [w for key in BUILT_IN if key not in ("llava", "video") for w in re.findall(rf"\b{key}\b", text)]
    return found


@pytest.mark.parametrize("path", DERIVED)
def test_no_method_key_is_typed_where_the_lists_derive(path):
    text = (ROOT / path).read_text()
    for allowed in NOT_KEYS.get(path, []):
        assert allowed in text, f"{path} no longer holds {allowed!r}: update NOT_KEYS"
        text = text.replace(allowed, "")
    typed = _typed_keys(text, shell=path.endswith((".sh", ".sbatch")))
    assert not typed, f"{path} types method key(s) {typed[:3]}; derive them from eval.registry"


@pytest.mark.parametrize("path, typed", [
    ("scripts/lib/common.sh", "case $1 in\n  fastv) echo --method-arg fast_v_sys_length=35 ;;\nesac"),
    ("eval/video_qa.py", 'env = dict(DEBIAS_METHOD="fastv")'),
    ("bench/latency.py", 'if name == "sparsevlm":'),
])
def test_the_key_search_finds_a_key_typed_back(path, typed):
    text = (ROOT / path).read_text() + "\n" + typed + "\n"
    for allowed in NOT_KEYS.get(path, []):
        text = text.replace(allowed, "")
    assert _typed_keys(text, shell=path.endswith(".sh"))


def test_shell_scripts_take_each_method_s_settings_from_the_registry():
    """method_fixed_args / method_env of scripts/lib/common.sh are the registry's explicit-args and env."""
    for key, entry in registry.methods(plugins=False).items():
        r = subprocess.run(["bash", "-c", f"source scripts/lib/common.sh; method_fixed_args {key}; method_env {key}"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        args = " ".join(f"--method-arg {k}={json.dumps(entry['args'][k])}" for k in entry["explicit_args"])
        assert r.stdout.splitlines() == [args, entry["env"]], key
    r = subprocess.run(["bash", "-c", "source scripts/lib/common.sh; eval_args nosuch"], cwd=ROOT,
                       capture_output=True, text=True, env={**__import__("os").environ, "CKPT": str(ROOT),
                                                            "DATA_DIR": str(ROOT)})
    assert r.returncode == 2 and r.stderr.startswith("error: method 'nosuch' is unknown"), r.stderr


def test_every_built_in_method_resolves_to_its_adapter():
    for key, entry in registry.methods().items():
        cls = registry.adapter_class(key)
        from eval.methods.base import Adapter
        assert issubclass(cls, Adapter) and cls.name == key, (key, entry["adapter"])
        assert (ROOT / "envs" / f"{entry['env']}.txt").is_file(), f"{key}: no envs/{entry['env']}.txt"
        assert entry["upstream"] in registry.upstreams()


def test_eval_run_methods_are_the_registry_s_and_others_are_refused():
    from eval.methods import ADAPTERS, method_names
    assert method_names() == [k for k, e in BUILT_IN.items() if e["driver"] == "eval.run"]
    assert set(ADAPTERS) == set(method_names())
    others = [k for k, e in BUILT_IN.items() if e["driver"] != "eval.run"]
    assert others, "the registry declares a method another module runs (Video-LLaVA's eval.video_qa)"
    for key in others:
        with pytest.raises(EvalError, match=f"runs with python -m {BUILT_IN[key]['driver']}"):
            registry.method(key)
        assert registry.method(key, driver=None)["driver"] == BUILT_IN[key]["driver"]
        assert registry.method(key, driver=BUILT_IN[key]["driver"]) == registry.method(key, driver=None)
    with pytest.raises(EvalError, match="'nosuch' is unknown; use one of"):
        registry.method("nosuch")
    with pytest.raises(EvalError, match="'nosuch' is unknown; use one of .*" + others[0]):
        registry.method("nosuch", driver=None)


def test_test_prefixes_name_existing_baseline_tests_and_every_baseline_test_belongs_to_one():
    out = _cli("tests")
    assert out.returncode == 0, out.stderr
    pairs = dict(line.split() for line in out.stdout.splitlines())
    assert pairs == {n: u["tests"] for n, u in registry.upstreams().items() if u["tests"]}
    for name, prefix in pairs.items():
        assert (ROOT / "tests" / "baselines" / f"test_{prefix}.py").is_file(), (name, prefix)
    owned = [f for f in (ROOT / "tests" / "baselines").glob("test_*.py")
             if any(f.stem == f"test_{p}" or f.stem.startswith(f"test_{p}_") for p in pairs.values())]
    main_suite = {f.name for f in (ROOT / "tests" / "baselines").glob("test_*.py")} - {f.name for f in owned}
    parity = {f.name for f in (ROOT / "tests" / "baselines").glob("test_parity_*.py")}  # launch baseline envs themselves
    # the port runs in .venv-test; the parity and study-model tests launch each baseline's environment themselves
    assert main_suite == {"test_llava_illava.py", "test_llava_illava_eval.py", "test_study_model_off.py"} | parity


def test_pad_thresholds_and_names_debias_core_reads_from_the_registry():
    from debias_core.presets import METHODS, method_name, pad_threshold

    data = json.loads((ROOT / "debias_core" / "data" / "paper_presets.json").read_text())["pad_threshold"]
    for key, entry in BUILT_IN.items():
        family = entry["trend_method"]
        assert family is None or family in METHODS, (key, family)
        assert method_name(key.upper()) == key
        assert pad_threshold(key) == data.get(family, 0.5), key
        for alias in entry["aliases"]:
            assert method_name(alias) == key and pad_threshold(alias) == pad_threshold(key)
    assert pad_threshold("pyramiddrop") == 0.01  # PyramidDrop's paper threshold, through its alias


def test_paper_trend_names():
    assert registry.paper_trend_name("fastv", "gqa") == registry.paper_trend_name("fastv", None) == "paper:fastv"
    assert registry.paper_trend_name("himap", "gqa") == "paper:himap/gqa"
    assert registry.paper_trend_name("himap", None) is None
    assert registry.paper_trend_name(registry.reference_method(), "gqa") is None
    from debias_core import resolve_trend
    for key in registry.methods():
        name = registry.paper_trend_name(key, "pope")
        if name:
            resolve_trend(name)  # every name it builds is a real preset


def test_report_labels_and_benchmark_stacks_derive_from_it():
    from bench import carry
    from bench.latency import METHODS, REFERENCE
    from eval.report import display_name

    assert display_name("pdrop") == "PyramidDrop" and display_name("not-registered") == "not-registered"
    assert REFERENCE == "llava" and REFERENCE in METHODS
    assert set(METHODS) == {k for k, e in BUILT_IN.items() if e["supports"].get("bench")}
    for key in (*METHODS, carry.CALL):
        assert carry.stack(key) in carry.WHEELS
    assert carry.stack("himap") == "431" and carry.stack("pdrop") == carry.stack(carry.CALL) == "437"
    assert set(carry.trees()) <= set(registry.upstreams())


def test_cli_queries_and_their_errors():
    assert _cli("methods").stdout.split() == list(registry.methods())
    assert "video" in _cli("methods", "--driver", "any").stdout.split()
    assert _cli("get", "himap", "upstream").stdout.strip() == "HiMAP"
    assert _cli("explicit-args", "fastv").stdout.strip() == "--method-arg fast_v_sys_length=35"
    assert _cli("explicit-args", "pdrop").stdout.strip() == ""
    for args, word in ((("get", "nosuch", "args"), "'nosuch' is unknown"), (("get", "fastv", "nofield"), "no field")):
        r = _cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and word in r.stderr and "Traceback" not in r.stderr


ENTRY = {"display": "P", "upstream": "LLaVA", "env": "LLaVA", "adapter": "p.py:P", "trend_method": None,
         "args": {}, "budget_keys": [], "preprocess": {"loader": "pad", "vqa": "pad", "science": "pad", "mmbench": "pad"}}


@pytest.mark.parametrize("plugin, word", [
    ({"methods": {"fastv": ENTRY}}, "'fastv', which is already registered"),
    ({"methods": {"p": {**ENTRY, "upstream": "Nope"}}}, "upstream 'Nope', which is not a submodule"),
    ({"methods": {"p": {k: v for k, v in ENTRY.items() if k != "args"}}}, "lacks args"),
    ({"methods": {"p": {**ENTRY, "colour": 1}}}, "unknown field(s) colour"),
    ({"methods": {"p": {**ENTRY, "budget_keys": ["keep"]}}}, "budget_keys keep are not among its args"),
    ({"methods": {"p": {**ENTRY, "preprocess": {"loader": "pad"}}}}, "preprocess must map each of"),
    ({"methods": {"p": {**ENTRY, "aliases": ["pyramiddrop"]}}}, "pyramiddrop are declared twice"),
    ({"upstreams": {}}, "must hold"),
])
def test_malformed_plugins_are_refused_with_one_line(tmp_path, monkeypatch, plugin, word):
    path = tmp_path / "methods.json"
    path.write_text(json.dumps(plugin))
    monkeypatch.setenv(registry.PLUGIN_ENV, str(path))
    with pytest.raises(registry.RegistryError) as e:
        registry.methods()
    assert word in str(e.value) and "\n" not in str(e.value)


def test_a_plugin_method_is_listed_and_its_adapter_loaded_from_beside_its_file(tmp_path, monkeypatch):
    (tmp_path / "p.py").write_text("from eval.methods.selection import TokenSelectionAdapter\n\n"
                                   "class P(TokenSelectionAdapter):\n    name = 'p'\n")
    (tmp_path / "methods.json").write_text(json.dumps({"methods": {"p": ENTRY}}))
    monkeypatch.setenv(registry.PLUGIN_ENV, str(tmp_path / "methods.json"))
    from eval.methods import get_adapter, method_names
    assert method_names()[-1] == "p" and "p" not in registry.methods(plugins=False)
    adapter = get_adapter("p")
    assert adapter.budget() == "all" and adapter.trend_method is None and adapter.upstream == "LLaVA"
    monkeypatch.setenv(registry.PLUGIN_ENV, str(tmp_path / "missing.json"))
    assert "p" not in method_names()  # a broken plugin leaves the built-ins usable; naming it fails clearly
    with pytest.raises(EvalError, match="missing.json, which does not exist"):
        get_adapter("p")


def test_the_driver_reports_a_broken_plugin_as_a_one_line_error(tmp_path):
    (tmp_path / "methods.json").write_text("{not json")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "EVAL_METHODS": str(tmp_path / "methods.json")}
    r = subprocess.run([sys.executable, "-m", "eval.run", "--method", "llava", "--benchmark", "pope", "--model-path",
                        str(tmp_path), "--check-only"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "error: " in r.stderr and "is not valid JSON" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_token_selection_keeps_the_selected_rows_in_raster_order():
    import torch

    from eval.methods.base import Loaded
    from eval.methods.selection import TokenSelectionAdapter

    class Model:
        def encode_images(self, images):
            return torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # [B=2, N=6, D=3]

    class Pick(TokenSelectionAdapter):
        name = "llava"  # any registered entry: the adapter reads its fields

        def select(self, features):
            return torch.tensor([[4, 1], [5, 0]])

    model = Model()
    Pick().configure(Loaded(None, model, None, 0, "m", "cpu", torch.float32))
    out = model.encode_images(None)
    full = torch.arange(36, dtype=torch.float32).reshape(2, 6, 3)
    assert torch.equal(out, torch.stack([full[0, [1, 4]], full[1, [0, 5]]]))
    with pytest.raises(EvalError, match="already configured"):
        Pick().configure(Loaded(None, model, None, 0, "m", "cpu", torch.float32))

    class Bad(Pick):
        def select(self, features):
            return torch.tensor([1, 2])

    other = Model()
    Bad().configure(Loaded(None, other, None, 0, "m", "cpu", torch.float32))
    with pytest.raises(EvalError, match=r"select returned indices of shape \(2,\)"):
        other.encode_images(None)
