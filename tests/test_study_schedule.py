"""The study's scheduler (study.run.run_all): costliest runs first, never more than ``parallel`` drivers at once,
and a calibration run unlocks its method's calibrated runs as soon as it is done (no phase waits for another)."""
import threading
import time
from dataclasses import asdict

from study import run as R


def _job(name, method, kind="baseline", label="-"):
    return R.Job(name, method, "eval", "off", None, label, 64, kind=kind)


def _fake_runs(monkeypatch, fail=()):
    started, lock = [], threading.Lock()
    state = {"now": 0, "peak": 0}

    def run_job(job, out, model, data, envs, *, limit):
        with lock:
            started.append(job.name)
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        if job.name in fail:
            raise R.StudyError(f"{job.name}: python -m eval.run exited 1")
        return {"job": asdict(job)}

    monkeypatch.setattr(R, "run_job", run_job)
    return started, state


def test_costliest_first_and_at_most_parallel_at_once(monkeypatch, tmp_path):
    started, state = _fake_runs(monkeypatch)
    jobs = [_job("illava/64", "illava"), _job("fastv/64", "fastv"), _job("tokencarve/64", "tokencarve"),
            _job("unknown/64", "someplugin"), _job("himap/64", "himap"), _job("cal/pdrop", "pdrop", "calibration")]
    results, failures = R.run_all(jobs, tmp_path, tmp_path, tmp_path, None, limit=None, parallel=1)
    assert failures == [] and len(results) == 6
    assert started == ["cal/pdrop", "tokencarve/64", "himap/64", "fastv/64", "illava/64", "unknown/64"]
    assert state["peak"] == 1
    started.clear()
    R.run_all(jobs * 3, tmp_path, tmp_path, tmp_path, None, limit=None, parallel=4)
    assert 1 < state["peak"] <= 4


def test_a_calibration_unlocks_its_calibrated_runs_and_a_failed_unlock_is_a_failure(monkeypatch, tmp_path):
    started, _ = _fake_runs(monkeypatch, fail={"fastv/64/off"})
    waiting = {"tokencarve": [_job("tokencarve/64/full-calibrated", "tokencarve", label="calibrated")],
               "himap": [_job("himap/64/full-calibrated", "himap", label="calibrated")]}

    def unlocks(record):
        job = record["job"]
        if job["kind"] != "calibration":
            return []
        if job["method"] == "himap":
            raise R.StudyError("calibrating himap failed: no attention recorded")
        return waiting.pop(job["method"])

    jobs = [_job("fastv/64/off", "fastv"), _job("calibration/tokencarve", "tokencarve", "calibration"),
            _job("calibration/himap", "himap", "calibration")]
    results, failures = R.run_all(jobs, tmp_path, tmp_path, tmp_path, None, limit=None, parallel=1,
                                  unlocks=unlocks)
    # the unlocked tokencarve run is costlier than fastv's, so it overtakes it in the queue
    assert started == ["calibration/tokencarve", "calibration/himap", "tokencarve/64/full-calibrated",
                       "fastv/64/off"]
    assert sorted(r["job"]["name"] for r in results) == ["calibration/himap", "calibration/tokencarve",
                                                          "tokencarve/64/full-calibrated"]
    assert failures == ["calibrating himap failed: no attention recorded", "fastv/64/off: python -m eval.run exited 1"]
    assert list(waiting) == ["himap"]   # never unlocked: the study reports these as not run
