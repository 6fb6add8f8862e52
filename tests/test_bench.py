"""The GPU latency benchmark's script, checked on CPU with a tiny checkpoint (no timing is asserted: the
numbers of a CPU smoke run mean nothing; the benchmark itself runs on a GPU, see README "Performance")."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from bench import carry, video
from bench.latency import METHODS, paired_overhead
from bench.report import markdown, summarise
from eval import registry
from tests import support

PUBLISHED = support.ROOT / "docs" / "bench" / "2026-12-06-h100"


def test_paired_overhead_recovers_a_constant_offset():
    rng = np.random.default_rng(1)
    off = 50 + rng.normal(0, 5, 40)         # noisy runs...
    full = off + 0.5                         # ...each paired full run exactly 0.5 ms slower
    q = paired_overhead(list(off), list(full))
    assert q["median_pct"] == pytest.approx(100 * 0.5 / np.median(off))
    assert q["ci95_pct"][0] == pytest.approx(q["ci95_pct"][1])      # no spread in the differences


def test_paired_overhead_interval_covers_zero_for_identical_arms():
    rng = np.random.default_rng(2)
    off, again = 50 + rng.normal(0, 5, 60), 50 + rng.normal(0, 5, 60)
    lo, hi = paired_overhead(list(off), list(again))["ci95_pct"]
    assert lo < 0 < hi


def test_summary_and_report_reproduce_a_published_run():
    """The published H100 run's bench.json, summarised and written again, gives its published summary and table."""
    data = json.loads(PUBLISHED.with_suffix(".json").read_text())
    assert json.loads(json.dumps(summarise(data["results"]))) == data["summary"]
    assert markdown(data["results"], data["summary"], data["meta"]) == PUBLISHED.with_suffix(".md").read_text()


def test_report_rows_for_failures_and_other_inputs():
    data = json.loads(PUBLISHED.with_suffix(".json").read_text())
    results = {**data["results"], "pdrop": {"error": "exit 1", "log_tail": "Traceback\nValueError: boom"}}
    method = next(m for m in METHODS if m in data["results"] and m != registry.reference_method())
    results[method] = {**results[method], "input": "a random clip"}
    md = markdown(results, summarise(results), data["meta"])
    assert "| pdrop | not run: exit 1 — ValueError: boom |" in md
    assert f"Input of {method}: a random clip." in md


def test_every_benchmarked_method_has_a_wheel_stack_and_the_fork_files_derive_from_the_registry():
    for key in (*METHODS, carry.CALL):
        assert carry.stack(key) in carry.WHEELS
    for key, entry in registry.methods(driver=None, plugins=False).items():  # other drivers' methods too
        assert carry.stack(key) == carry._wheel_tag(registry.upstreams()[entry["upstream"]]["transformers"])
    with pytest.raises(registry.RegistryError, match="'nosuch' is unknown"):
        carry.stack("nosuch")
    fork = [p for paths in carry.trees().values() for p in paths if p.startswith(carry.FORK + "/")]
    assert fork and list(carry.FORK_FILES) == [p[len(carry.FORK) + 1:] for p in fork]  # study.carry reads them


def test_carried_environment_adds_a_common_site_only_where_the_bundle_has_one(tmp_path):
    method = METHODS[0]
    path = carry.environment(tmp_path / "carry", method, tmp_path / "site")["env"]["PYTHONPATH"].split(":")
    assert path == [str(tmp_path / "site" / carry.stack(method)), str(support.ROOT)]
    (tmp_path / "site" / "common").mkdir(parents=True)
    path = carry.environment(tmp_path / "carry", method, tmp_path / "site")["env"]["PYTHONPATH"].split(":")
    assert path[1] == str(tmp_path / "site" / "common")


def test_video_stand_ins_take_only_the_imports_that_fail(tmp_path, monkeypatch):
    """Video-LLaVA's processor modules call their imports at import time (decord.bridge.set_bridge): a stand-in
    answers any attribute, call or find_spec; a module that imports is left alone."""
    (tmp_path / "videollava" / "model").mkdir(parents=True)
    (tmp_path / "standin_probe_real.py").write_text("REAL = True\n")
    monkeypatch.setattr(video, "PROCESSOR_IMPORTS", ("standin_probe_absent", "standin_probe_absent.sub",
                                                     "standin_probe_real"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("standin_probe_absent", "standin_probe_absent.sub", "standin_probe_real"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        assert video.video_imports(tmp_path) == ["standin_probe_absent", "standin_probe_absent.sub"]
        assert sys.path[0] == str(tmp_path) and sys.modules["standin_probe_real"].REAL
        import standin_probe_absent
        from standin_probe_absent.sub import VideoReader, cpu  # noqa: F401
        standin_probe_absent.bridge.set_bridge("torch")
        assert importlib.util.find_spec("standin_probe_absent.sub") is not None

        class Derived(VideoReader):  # a stand-in can be a base class
            pass
        assert isinstance(Derived(), video.StandIn)
    finally:
        for name in ("standin_probe_absent", "standin_probe_absent.sub", "standin_probe_real"):
            sys.modules.pop(name, None)
    with pytest.raises(Exception, match="has no videollava/model"):
        video.video_imports(tmp_path / "empty")


@pytest.mark.slow
def test_cpu_smoke_run_writes_results(tmp_path):
    support.require_populated("LLaVA")
    support.require_module("accelerate", "LLaVA's loader needs accelerate")
    from eval.upstream import export_tree

    export_tree("LLaVA", tmp_path / "trees" / "LLaVA", paths=["llava"])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "bench.latency", "--device", "cpu", "--tiny", "--trees",
                        str(tmp_path / "trees"), "--ckpt", str(tmp_path / "ckpt" / "llava-random"), "--out", str(out),
                        "--methods", "llava,illava", "--reps", "2", "--warmup", "1", "--decode", "2"],
                       cwd=support.ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    res = data["results"]
    assert {"_call", "llava", "illava"} <= set(res)
    port = res["illava"]
    assert "error" not in port, port
    assert set(port["modes"]) == {"off", "full", "off_control"}
    assert len(port["modes"]["off"]["prefill_ms"]["runs"]) == 4            # prefill: twice the reps
    calls = port["host_syncs_in_debias_core"]["warm"]["calls"]
    assert calls.get("debias") == 1 and calls.get("keep_cap") == 1          # one ranking per prefill
    assert "paired" in data["summary"]["illava"]["prefill_ms"]
    assert {c["n"] for c in res["_call"]["call"]} == {576, 2056}
    assert "| illava |" in (out / "bench.md").read_text()

    # the in-situ job adds, per method, the calls measured inside real prefills and the mode-off control
    r = subprocess.run([sys.executable, "-m", "bench.latency", "--device", "cpu", "--tiny", "--trees",
                        str(tmp_path / "trees"), "--ckpt", str(tmp_path / "ckpt" / "llava-random"), "--out", str(out),
                        "--methods", "llava,illava", "--reps", "2", "--insitu"],
                       cwd=support.ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    q = json.loads((out / "bench.json").read_text())["results"]["illava"]["in_situ"]
    assert "error" not in q, q
    assert q["calls_per_prefill"] == 1 and q["n"] == 2
    assert {"net_pct_median", "control_us_per_prefill_median", "host_us_per_prefill_median"} <= set(q)
    assert q["timed_per_prefill"] == {"full": 2, "off": 2}                  # debias + keep_cap, in both modes
    assert set(q["by_call_us_median"]["full"]) == {"debias", "keep_cap"}
    md = (out / "bench.md").read_text()
    assert "## In situ" in md and "| illava | " in md.split("Where the net goes")[1]


def _require_environment(key: str) -> None:
    from eval.common import environment_python

    env = registry.method(key, driver=None)["env"]
    if environment_python(env) is None:   # the interpreter the benchmark itself would pick
        pytest.skip(f"no .venv-{env}, so the benchmark's {key} workload was not run; build it with "
                    f"bash setup.sh --test-env {env}")


def _smoke_run(tmp_path, key: str, *trees: str) -> tuple[dict, str]:
    """bench.latency on CPU with the tiny checkpoint for ``key`` (and the reference) over exported trees:
    (the method's bench.json entry, bench.md)."""
    from eval.upstream import export_tree

    for name in ("LLaVA", *trees):
        export_tree(name, tmp_path / "trees" / name, paths=carry.trees()[name])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "bench.latency", "--device", "cpu", "--tiny", "--trees",
                        str(tmp_path / "trees"), "--ckpt", str(tmp_path / "ckpt" / "llava-random"), "--out", str(out),
                        "--methods", key, "--reps", "1", "--warmup", "0", "--decode", "1"],
                       cwd=support.ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "bench.json").read_text())["results"][key]
    assert "error" not in res, res.get("log_tail", "")[-3000:]
    assert set(res["modes"]) == {"off", "full", "off_control"}
    return res, (out / "bench.md").read_text()


@pytest.mark.slow
def test_cpu_smoke_run_of_sparsevlms_without_flash_attn(tmp_path):
    """SparseVLMs' pruning layers on its SDPA fallback (no flash-attn here), ranking at its three layers."""
    support.require_populated("LLaVA")
    support.require_populated("SparseVLMs")
    key = next(k for k, e in registry.methods().items() if e["upstream"] == "SparseVLMs")
    _require_environment(key)
    res, md = _smoke_run(tmp_path, key, "SparseVLMs")
    assert res["host_syncs_in_debias_core"]["warm"]["calls"]["debias"] == 3
    assert f"| {key} | " in md


@pytest.mark.slow
def test_cpu_smoke_run_of_the_video_method(tmp_path):
    """Video-LLaVA (a method eval.video_qa drives): its own model class over the benchmark's checkpoint, 8 frames
    x 257 tokens, FastV at layer K, off vs full; in its environment (.venv-Video-LLaVA: transformers 4.31)."""
    key = registry.driven_by("eval.video_qa")["key"]
    if key not in METHODS:
        pytest.skip(f"the registry does not mark method {key!r} supports.bench, so the benchmark does not run it")
    support.require_populated("LLaVA")
    support.require_populated("Video-LLaVA")
    _require_environment(key)
    res, md = _smoke_run(tmp_path, key, "Video-LLaVA")
    assert res["host_syncs_in_debias_core"]["warm"]["calls"] == {"debias": 1, "keep_cap": 1}  # one FastV ranking
    assert "prompt 35 + 2056 + 40 tokens" in res["input"]
    assert f"Input of {key}: " in md
