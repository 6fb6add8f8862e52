"""A study folder never mixes runs: a finished run is reused only with the checkpoint and split size it was made
with, and the check happens before any work (study.run.check_finished_runs)."""
import json

import pytest

from study import run as R


def _model(tmp_path, sha):
    m = tmp_path / f"model-{sha}"
    m.mkdir()
    (m / "study.json").write_text(json.dumps({"trained_sha256": sha * 8, "gguf_sha256": "g" * 8, "dtype": "float16",
                                              "image_start": 32}))
    return m


def _split(data, name, n):
    (data / name).mkdir(parents=True)
    (data / name / "questions.jsonl").write_text("".join(json.dumps({"question_id": i}) + "\n" for i in range(n)))


def _done(out, name, made_with, split="eval"):
    folder = out / "runs" / name
    folder.mkdir(parents=True)
    record = {"job": {"name": name, "split": split}, "n": 4, "correct": {}}
    if made_with is not None:
        record["made_with"] = made_with
    (folder / "done.json").write_text(json.dumps(record))
    return folder / "done.json"


@pytest.fixture
def study(tmp_path):
    data = tmp_path / "out" / "data"
    _split(data, "eval", 4)
    _split(data, "calib", 2)
    return tmp_path / "out", data


def test_runs_of_this_checkpoint_and_split_size_are_reused(tmp_path, study):
    out, data = study
    model = _model(tmp_path, "a")
    _done(out, "fastv/64/off--", {"model": R.model_identity(model), "questions": 4})
    _done(out, "calibration/fastv", {"model": R.model_identity(model), "questions": 2}, split="calib")
    R.check_finished_runs(out, model, data)   # no error


@pytest.mark.parametrize("case, message", [
    ("weights", "was made with other weights"),
    ("questions", "was made on 3 questions; this study's split has 4"),
    ("unrecorded", "records neither the checkpoint nor the split size"),
])
def test_runs_of_other_weights_or_split_sizes_are_refused_with_the_fix(tmp_path, study, case, message):
    out, data = study
    model, other = _model(tmp_path, "a"), _model(tmp_path, "b")
    made_with = {"weights": {"model": R.model_identity(other), "questions": 4},
                 "questions": {"model": R.model_identity(model), "questions": 3},
                 "unrecorded": None}[case]
    done = _done(out, "fastv/64/off--", made_with)
    with pytest.raises(R.StudyError) as e:
        R.check_finished_runs(out, model, data)
    assert message in str(e.value) and str(done) in str(e.value) and "another --out" in str(e.value)


def test_the_report_refuses_runs_of_another_checkpoint(tmp_path, study, capsys):
    out, _ = study
    model, other = _model(tmp_path, "a"), _model(tmp_path, "b")
    _done(out, "fastv/64/off--", {"model": R.model_identity(other), "questions": 4})
    assert R.report_main(["--out", str(out), "--model", str(model)]) == 2
    assert "other than or beside" in capsys.readouterr().err


def test_a_quick_slice_and_a_full_study_default_to_separate_folders(tmp_path):
    assert R.parse_args(["--quick"]).out.name == "study-quick"
    assert R.parse_args([]).out.name == "study"
    assert R.parse_args(["--quick", "--out", str(tmp_path)]).out == tmp_path


def test_a_second_calibration_fit_gets_its_own_trend_files_and_run_names(tmp_path):
    jobs = R.plan(["fastv"], [64], ["full"], [], 32, tmp_path / "trends", fit="loglinear")
    calibrated = [j for j in jobs if j.trend_label == "calibrated"]
    assert [j.name for j in calibrated] == ["fastv/64/full-calibrated-loglinear"]
    assert calibrated[0].trend == f"calibrated:{tmp_path / 'trends' / 'fastv.loglinear.json'}"
    default = [j for j in R.plan(["fastv"], [64], ["full"], [], 32, tmp_path / "trends") if j.trend_label == "calibrated"]
    assert [j.name for j in default] == ["fastv/64/full-calibrated"]
    assert default[0].trend == f"calibrated:{tmp_path / 'trends' / 'fastv.json'}"


def test_a_folder_never_mixes_calibrated_runs_of_two_fits(tmp_path):
    (tmp_path / "runs" / "fastv" / "64" / "full-calibrated").mkdir(parents=True)
    R.check_one_calibration_fit(tmp_path, "lsq")
    with pytest.raises(R.StudyError, match="another fit .*full-calibrated.*--calibration-fit loglinear"):
        R.check_one_calibration_fit(tmp_path, "loglinear")


def test_calibration_fits_with_the_chosen_fit_into_its_own_file(tmp_path, monkeypatch):
    calls = []

    class Done:
        returncode, stderr = 0, ""

    monkeypatch.setattr(R.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    R.calibrate_trends([{"job": {"method": "fastv", "name": "calibration/fastv"}}], tmp_path, "loglinear")
    (cmd,) = calls
    assert cmd[cmd.index("--fit") + 1] == "loglinear"
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "trends" / "fastv.loglinear.json")
