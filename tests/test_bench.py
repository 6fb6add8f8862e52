"""The GPU latency benchmark's script, checked on CPU with a tiny checkpoint (no timing is asserted: the
numbers of a CPU smoke run mean nothing; the benchmark itself runs on a GPU, see README "Performance")."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bench.latency import paired_overhead
from tests import support


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
