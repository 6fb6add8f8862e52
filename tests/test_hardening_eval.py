"""The eval driver, merge and score under bad input and interruption (tiny random LLaVA, CPU, in-process).

- Every bad input (option value, device, environment, preset, trend file, output folder, answers file) is one
  ``error:`` line, exit 2, before anything is loaded or written.
- A resume under any setting that changes answers is refused naming the setting, its old and new value;
  identical settings resume; settings that cannot change an answer (the pad threshold in mode off) do not block.
- Ctrl-C: exit 130, one line, every answer written so far kept, and the rerun finishes each question once.
"""
import json
import shutil

import pytest
import torch

from eval import merge as merge_cli
from eval import run as driver
from eval import score as score_cli
from tests.support import require_module

pytestmark = pytest.mark.usefixtures("clean_debias")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    require_module("accelerate", "the eval driver loads models through LLaVA's load_pretrained_model, which "
                                 "needs accelerate; the driver's hardening was not tested")
    from eval.synthetic import build_synthetic
    from eval.tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("hardening")
    model = build_tiny_llava(root / "tiny-llava")
    build_synthetic(root / "data", images=1)
    return {"root": root, "model": model, "data": root / "data"}


def _argv(tiny, answers, *extra, data=None):
    return ["--method", "llava", "--method-arg", "source=installed", "--benchmark", "synthetic_wide",
            "--model-path", str(tiny["model"]), "--data-dir", str(data or tiny["data"]), "--answers-dir", str(answers),
            "--max-new-tokens", "2", "--device", "cpu", "--limit", "2", *extra]


def _main(module, argv, capsys, monkeypatch, env=None):
    """``module.main(argv)`` with ``env`` set; (exit code, stderr lines that are not the run header/progress)."""
    import debias_core

    with monkeypatch.context() as m:
        for k, v in (env or {}).items():
            m.setenv(k, v)
        debias_core.reset()
        try:
            code = module.main(argv)
        except SystemExit as e:
            code = e.code
        finally:
            debias_core.reset()
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error") or "Traceback" in line]


def _refused(code, lines, *words):
    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], lines[0]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pad_run(tiny):
    """A finished two-question run in mode pad (whose pad threshold and geometry belong to its identity)."""
    import debias_core

    answers = tiny["root"] / "pad-run"
    debias_core.reset()
    assert driver.main(_argv(tiny, answers, "--mode", "pad")) == 0
    debias_core.reset()
    return answers / "tiny-llava" / "synthetic_wide" / "llava-all" / "pad"


def _copy_run(pad_run, tmp_path):
    answers = tmp_path / "answers"
    shutil.copytree(pad_run.parents[2], answers / "tiny-llava")
    return answers, answers / "tiny-llava" / "synthetic_wide" / "llava-all" / "pad"


# ------------------------------------------------------------------------------------- bad input

def _bad_trend(tmp_path):
    path = tmp_path / "steep.json"
    path.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": -1.0, "n": 576}))
    return str(path)


@pytest.mark.parametrize("extra, env, words", [
    (["--max-new-tokens", "0"], {}, ["--max-new-tokens 0 must be ≥ 1"]),
    (["--max-new-tokens", "-3"], {}, ["--max-new-tokens -3 must be ≥ 1"]),
    (["--num-chunks", "0"], {}, ["--num-chunks 0 must be ≥ 1"]),
    (["--num-chunks", "2", "--chunk-idx", "-1"], {}, ["--chunk-idx -1 is outside 0..1"]),
    (["--workers", "-1"], {}, ["--workers -1 must be ≥ 0"]),
    (["--num-chunks", "x"], {}, ["--num-chunks: invalid int value: 'x'", "--help"]),
    (["--device", "banana"], {}, ["--device 'banana' is not a device"]),
    (["--device", "cuda:7"], {}, ["--device cuda:7"]),
    (["--mode", "full", "--trend", "paper:nope/gqa"], {}, ["method 'nope' is unknown"]),
    (["--mode", "full", "--trend", "paper:himap/nope"], {}, ["benchmark 'nope' has no paper preset"]),
    (["--mode", "off", "--trend", "paper:nope/gqa"], {}, ["method 'nope' is unknown"]),   # unused, still wrong
    (["--mode", "full", "--trend", "BAD_TREND"], {}, ["steep.json", "b = -1.0", "0..575"]),
    ([], {"DEBIAS_CHECK": "maybe"}, ["DEBIAS_CHECK='maybe'", "yes/no"]),
    ([], {"DEBIAS_PAD_THRESHOLD": "nan"}, ["DEBIAS_PAD_THRESHOLD='nan'"]),
    ([], {"DEBIAS_PAD_THRESHOLD": "half"}, ["DEBIAS_PAD_THRESHOLD='half'"]),
    ([], {"DEBIAS_GEOMETRY": "rounded"}, ["geometry 'rounded'"]),
    (["--answers-dir", "A_FILE/answers"], {}, ["--answers-dir", "is a file, not a folder"]),
    (["--record", "A_FILE/calib.npz"], {}, ["--record", "is a file, not a folder"]),
])
def test_bad_input_is_one_line_and_nothing_is_written(tiny, tmp_path, capsys, monkeypatch, extra, env, words):
    if "cuda:7" in extra and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7, so a missing device could not be named")
    (tmp_path / "a_file").write_text("x")
    extra = [a.replace("BAD_TREND", _bad_trend(tmp_path)).replace("A_FILE", str(tmp_path / "a_file")) for a in extra]
    answers = tmp_path / "answers"
    code, lines = _main(driver, _argv(tiny, answers, *extra), capsys, monkeypatch, env)  # a real run, no --check-only
    _refused(code, lines, *words)
    assert not answers.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device cuda is valid here")
def test_cuda_on_a_cpu_only_machine(tiny, tmp_path, capsys, monkeypatch):
    code, lines = _main(driver, _argv(tiny, tmp_path / "a", "--device", "cuda"), capsys, monkeypatch)
    _refused(code, lines, "--device cuda: no usable CUDA device", "--device cpu")


@pytest.mark.parametrize("word", ["off", "0", "no", "FALSE", "on", "Yes", "1"])
def test_debias_check_words_are_accepted(tiny, tmp_path, capsys, monkeypatch, word):
    code, lines = _main(driver, _argv(tiny, tmp_path / "a", "--check-only"), capsys, monkeypatch,
                        {"DEBIAS_CHECK": word})
    assert code == 0 and lines == []


@pytest.mark.parametrize("corrupt, words", [
    (lambda lines: [lines[0][:20]] + lines[1:], ["line 1 is not a complete JSON answer"]),
    (lambda lines: [json.dumps({k: v for k, v in json.loads(lines[0]).items() if k != "question_id"})] + lines[1:],
     ["line 1 is an answer without 'question_id'"]),
    (lambda lines: ["[1, 2]"] + lines[1:], ["line 1 is not a JSON object"]),
])
def test_malformed_answers_file_stops_run_merge_and_score(tiny, pad_run, tmp_path, capsys, monkeypatch, corrupt, words):
    answers, run = _copy_run(pad_run, tmp_path)
    (run / "1_0.jsonl").write_text("\n".join(corrupt((run / "1_0.jsonl").read_text().splitlines())) + "\n")
    before = (run / "1_0.jsonl").read_bytes()
    code, lines = _main(driver, _argv(tiny, answers, "--mode", "pad"), capsys, monkeypatch)
    _refused(code, lines, "1_0.jsonl", *words)
    code, lines = _main(merge_cli, ["--run-dir", str(run)], capsys, monkeypatch)
    _refused(code, lines, "1_0.jsonl", *words)
    assert (run / "1_0.jsonl").read_bytes() == before   # untouched: the user decides what to do with it


def test_score_and_merge_of_a_non_run_are_one_line(tmp_path, capsys, monkeypatch):
    code, lines = _main(score_cli, ["--run-dir", str(tmp_path / "nope")], capsys, monkeypatch)
    _refused(code, lines, "nope/run.json does not exist")
    code, lines = _main(score_cli, ["--run-dir", str(tmp_path)], capsys, monkeypatch, {"DEBIAS_CHECK": "maybe"})
    _refused(code, lines, "DEBIAS_CHECK='maybe'")
    (tmp_path / "run.json").write_text("{not json")
    code, lines = _main(merge_cli, ["--run-dir", str(tmp_path)], capsys, monkeypatch)
    _refused(code, lines, "run.json is not a readable run file")


def test_score_that_cannot_write_its_result_is_one_line(tmp_path, capsys, monkeypatch):
    def unwritable(run_dir, data_dir=None):   # what writing score.json into a read-only run folder raises
        raise PermissionError(13, "Permission denied", str(run_dir / "score.json"))

    monkeypatch.setattr(score_cli, "score_run", unwritable)
    code, lines = _main(score_cli, ["--run-dir", str(tmp_path)], capsys, monkeypatch)
    _refused(code, lines, f"{tmp_path}/score.json: Permission denied; score.json was not written")


def test_exit_codes_and_resume_rules_are_in_help(capsys):
    for main in (driver.main, score_cli.main, merge_cli.main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split()).replace("``", "`")
        assert "Exit status" in text and "130" in text and "one `error: ...` line" in text, text
    assert "trend_sha256" in driver.runinfo.__doc__ and "question_sha256" in driver.runinfo.__doc__


# ------------------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("extra, env, words", [
    ([], {"DEBIAS_PAD_THRESHOLD": "0.2"}, ["pad_threshold: 0.5 there vs 0.2 now"]),
    ([], {"DEBIAS_GEOMETRY": "official"}, ["geometry: 'exact' there vs 'official' now"]),
    (["--max-new-tokens", "3"], {}, ["max_new_tokens: 2 there vs 3 now"]),
    (["--conv-mode", "llava_v1"], {}, ["conv_mode: 'vicuna_v1' there vs 'llava_v1' now"]),
    (["--limit", "1"], {}, ["limit: 2 there vs 1 now"]),
])
def test_resume_under_other_settings_is_refused(tiny, pad_run, tmp_path, capsys, monkeypatch, extra, env, words):
    answers, run = _copy_run(pad_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    argv = _argv(tiny, answers, "--mode", "pad")
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, lines = _main(driver, argv, capsys, monkeypatch, env)
    _refused(code, lines, "holds answers of a different run", *words, "use another --answers-dir", "delete")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_under_identical_settings_appends_nothing(tiny, pad_run, tmp_path, capsys, monkeypatch):
    answers, run = _copy_run(pad_run, tmp_path)
    before = (run / "1_0.jsonl").read_bytes()
    code, lines = _main(driver, _argv(tiny, answers, "--mode", "pad"), capsys, monkeypatch,
                        {"DEBIAS_CHECK": "off", "DEBIAS_GEOMETRY": "EXACT"})   # same values, other spellings
    assert code == 0 and lines == []
    assert (run / "1_0.jsonl").read_bytes() == before
    info = json.loads((run / "run.json").read_text())
    assert (info["pad_threshold"], info["geometry"]) == (0.5, "exact") and len(info["question_sha256"]) == 64


def test_run_file_without_the_new_fields_is_refused(tiny, pad_run, tmp_path, capsys, monkeypatch):
    answers, run = _copy_run(pad_run, tmp_path)
    info = json.loads((run / "run.json").read_text())
    for k in ("question_sha256", "geometry"):
        del info[k]
    (run / "run.json").write_text(json.dumps(info))
    code, lines = _main(driver, _argv(tiny, answers, "--mode", "pad"), capsys, monkeypatch)
    _refused(code, lines, "geometry: not recorded there", "question_sha256: not recorded there")


def test_pad_threshold_does_not_block_a_mode_off_resume(tiny, tmp_path, capsys, monkeypatch):
    """Mode off suppresses no padding: the threshold cannot change an answer, so it is not part of the run."""
    answers = tmp_path / "answers"
    assert _main(driver, _argv(tiny, answers, "--mode", "off"), capsys, monkeypatch)[0] == 0
    code, lines = _main(driver, _argv(tiny, answers, "--mode", "off"), capsys, monkeypatch,
                        {"DEBIAS_PAD_THRESHOLD": "0.2", "DEBIAS_GEOMETRY": "official"})
    assert code == 0 and lines == []


def test_changed_trend_file_or_question_file_is_refused(tiny, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    trend = tmp_path / "trend.json"
    trend.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 0.002, "n": 576}))
    answers = tmp_path / "answers"
    argv = _argv(tiny, answers, "--mode", "full", "--trend", f"calibrated:{trend}", data=data)
    assert _main(driver, argv, capsys, monkeypatch)[0] == 0
    run = next(answers.rglob("run.json")).parent
    answered = (run / "1_0.jsonl").read_bytes()
    old_trend = json.loads((run / "run.json").read_text())["trend_sha256"]

    trend.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 0.004, "n": 576}))  # same path, new content
    code, lines = _main(driver, argv, capsys, monkeypatch)
    _refused(code, lines, f"trend_sha256: '{old_trend}' there vs '")

    trend.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 0.002, "n": 576}))  # back: resumes again
    assert _main(driver, argv, capsys, monkeypatch)[0] == 0
    questions = data / "synthetic" / "wide" / "llava_synthetic.jsonl"
    rows = _rows(questions)
    rows[0]["text"] += " Answer briefly."
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, lines = _main(driver, argv, capsys, monkeypatch)
    _refused(code, lines, "question_sha256: '")
    assert (run / "1_0.jsonl").read_bytes() == answered


# -------------------------------------------------------------------------------------- interruption

def test_ctrl_c_keeps_the_answers_and_the_rerun_finishes(tiny, tmp_path, capsys, monkeypatch):
    from eval.methods.llava import LlavaAdapter

    calls, original = [], LlavaAdapter.generate

    def interrupted_on_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    answers = tmp_path / "answers"
    with monkeypatch.context() as m:
        m.setattr(LlavaAdapter, "generate", interrupted_on_the_second)
        code, lines = _main(driver, _argv(tiny, answers), capsys, monkeypatch)
    assert code == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted"), lines
    assert "rerun the same command to resume" in lines[0]
    run = answers / "tiny-llava" / "synthetic_wide" / "llava-all" / "off"
    assert len(_rows(run / "1_0.jsonl")) == 1 and not (run / "merge.jsonl").exists()
    assert _main(driver, _argv(tiny, answers), capsys, monkeypatch)[0] == 0
    ids = [r["question_id"] for r in _rows(run / "1_0.jsonl")]
    questions = [q["question_id"] for q in _rows(tiny["data"] / "synthetic" / "wide" / "llava_synthetic.jsonl")][:2]
    assert sorted(ids) == sorted(questions) and len(ids) == 2   # each question answered once
    assert [r["question_id"] for r in _rows(run / "merge.jsonl")] == questions
