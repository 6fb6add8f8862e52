"""eval.video_qa: keyless score on hand-made answers, merge of chunk outputs, resume after a kill, the judge's
no-key error and watchdog, clear errors for missing paths.

The inference script is Video-LLaVA's own in real runs; here a stand-in (FAKE_SCRIPT) with the patched
script's CLI and file I/O (chunking of questions and answers, positional pairing, "w" output, silent skip of
missing videos, {id, question, answer, pred} lines) replaces the model, so that resume and merge are tested
without a GPU. The answer normaliser and the patched tree the checks read are the real ones (exported from
third_party/Video-LLaVA at its pin, with patches/Video-LLaVA applied). One test (slow) runs the real patched
script through infer with the tiny model of tests/baselines/video_probe.py, in .venv-Video-LLaVA.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eval import upstream, video_qa
from eval.common import EvalError
from tests.support import require_populated

FAKE_SCRIPT = r'''
import argparse, json, math, os, signal, sys
p = argparse.ArgumentParser()
for a in ("--model_path", "--cache_dir", "--video_dir", "--gt_file_question", "--gt_file_answers", "--output_dir",
          "--output_name"):
    p.add_argument(a, required=True)
p.add_argument("--num_chunks", type=int, default=1)
p.add_argument("--chunk_idx", type=int, default=0)
p.add_argument("--device", default="cuda:0")
p.add_argument("--model_base", default=None)
p.add_argument("--fastv_k", type=int, default=None)
p.add_argument("--fastv_rank", type=int, default=None)
args = p.parse_args()

def get_chunk(lst, n, k):
    size = math.ceil(len(lst) / n)
    return [lst[i:i + size] for i in range(0, len(lst), size)][k]

qs = get_chunk(json.load(open(args.gt_file_question)), args.num_chunks, args.chunk_idx)
ans = get_chunk(json.load(open(args.gt_file_answers)), args.num_chunks, args.chunk_idx)   # patch 0001
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "DEBIAS": os.environ.get("DEBIAS"),
                          "DEBIAS_TREND": os.environ.get("DEBIAS_TREND"),
                          "ids": [q["question_id"] for q in qs]}) + "\n")
out = open(os.path.join(args.output_dir, args.output_name + ".json"), "w")
kill_after = int(os.environ.get("FAKE_KILL_AFTER", "-1"))
written = 0
for q, a in zip(qs, ans):
    for fmt in (".mp4", ".avi", ".mov", ".mkv"):
        if os.path.exists(os.path.join(args.video_dir, q["video_name"] + fmt)):
            if written == kill_after:          # die mid-line, as a SIGKILL can
                out.write('{"id": "q'); out.flush(); os.kill(os.getpid(), signal.SIGKILL)
            n = int(q["question_id"][1:])
            pred = f"It is {a['answer']}." if n % 2 == 0 else "I do not know."
            out.write(json.dumps({"id": q["question_id"], "question": q["question"], "answer": a["answer"],
                                  "pred": pred}) + "\n")
            written += 1
            break
out.close()
'''

WORDS = ["man", "guitar", "dog", "slicing", "cat", "two", "car", "ball", "red"]
NO_VIDEO = "q5"   # its video file is absent: Video-LLaVA skips such a question without an output line


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Patched Video-LLaVA eval and model code (exported; third_party is never touched)."""
    require_populated("Video-LLaVA")
    dest = tmp_path_factory.mktemp("tp") / "Video-LLaVA"
    return upstream.export_tree("Video-LLaVA", dest, paths=["videollava/eval", "videollava/model"])


def make_data(root: Path, n: int = 9) -> Path:
    """GPT_Zero_Shot_QA/MSVD_Zero_Shot_QA with n questions q0..q{n-1} over empty stand-in video files."""
    folder = root / "GPT_Zero_Shot_QA" / "MSVD_Zero_Shot_QA"
    (folder / "videos").mkdir(parents=True)
    qs = [{"video_name": f"vid{i}", "question": f"what is in clip {i}?", "question_id": f"q{i}"} for i in range(n)]
    for q in qs:
        if q["question_id"] != NO_VIDEO:
            (folder / "videos" / f"{q['video_name']}.{'avi' if q['question_id'] == 'q3' else 'mp4'}").write_bytes(b"")
    (folder / "test_q.json").write_text(json.dumps(qs))
    (folder / "test_a.json").write_text(json.dumps([{"answer": WORDS[i % len(WORDS)], "type": 0,
                                                     "question_id": f"q{i}"} for i in range(n)]))
    return root / "GPT_Zero_Shot_QA"


@pytest.fixture()
def setup(tmp_path, tree, monkeypatch):
    data = make_data(tmp_path / "data")
    ckpt = tmp_path / "Video-LLaVA-7B"
    ckpt.mkdir()
    fake = tmp_path / "fake_run_inference_video_qa.py"
    fake.write_text(FAKE_SCRIPT)
    log = tmp_path / "fake_calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.delenv("FAKE_KILL_AFTER", raising=False)
    return {"tmp": tmp_path, "data": data, "ckpt": ckpt, "fake": fake, "log": log, "tree": tree}


def plan(s, answers="answers", **kw):
    kw.setdefault("fastv_k", 2)
    kw.setdefault("fastv_rank", 1028)
    return video_qa.plan(s["tmp"] / answers, str(s["ckpt"]), ["msvd"], kw.pop("modes", ["off"]),
                         data_dir=s["data"], root=s["tree"], **kw)


def calls(s):
    return [json.loads(line) for line in s["log"].read_text().splitlines()] if s["log"].exists() else []


# ------------------------------------------------------------------ keyless score
HAND = [  # (answer, prediction, exact match, contains)
    ("man", "The man is playing a guitar.", False, True),
    ("guitar", "guitar", True, True),
    ("slicing", "The woman slices an onion.", False, False),      # no lemmatisation
    ("two", "There are 2 dogs.", False, True),                     # number words -> digits
    ("man", "A woman is dancing.", False, False),                  # whole words, not substrings
    ("Playing", "playing.", True, True),                           # case and final period
    ("ice cream", "He eats ice cream quickly", False, True),       # a contiguous multi-word run
    ("ice cream", "cream and ice", False, False),
]


def test_keyless_scores_hand_made_answers():
    require_populated("Video-LLaVA")
    rows = [{"id": i, "question": "?", "answer": a, "pred": p} for i, (a, p, _, _) in enumerate(HAND)]
    res = video_qa.keyless(rows, video_qa.answer_processor())
    assert res["n"] == len(HAND)
    assert res["exact_match_count"] == sum(em for *_, em, _ in HAND) == 2
    assert res["contains_count"] == sum(c for *_, c in HAND) == 5
    assert res["contains"] == pytest.approx(100 * 5 / 8) and res["exact_match"] == pytest.approx(100 * 2 / 8)


def test_keyless_row_by_row_matches_the_table():
    require_populated("Video-LLaVA")
    proc = video_qa.answer_processor()
    for a, p, em, cont in HAND:
        r = video_qa.keyless([{"answer": a, "pred": p}], proc)
        assert (r["exact_match_count"], r["contains_count"]) == (em, cont), (a, p)


def test_normaliser_is_video_llavas_own_file(tmp_path):
    """A copy of the tree whose processor is edited changes the score: the file really is what is loaded."""
    require_populated("Video-LLaVA")
    src = video_qa.video_llava_dir() / "videollava" / "eval" / "m4c_evaluator.py"
    dst = tmp_path / "videollava" / "eval" / "m4c_evaluator.py"
    dst.parent.mkdir(parents=True)
    dst.write_text(src.read_text().replace('"two": "2"', '"two": "zwei"'))
    rows = [{"answer": "two", "pred": "There are 2 dogs."}]
    assert video_qa.keyless(rows, video_qa.answer_processor())["contains_count"] == 1
    assert video_qa.keyless(rows, video_qa.answer_processor(tmp_path))["contains_count"] == 0


def test_missing_normaliser_names_the_path(tmp_path):
    with pytest.raises(EvalError, match=re.escape(str(tmp_path / "nowhere" / "videollava" / "eval" /
                                                      "m4c_evaluator.py")) + r".*git submodule update --init "
                                        r"third_party/Video-LLaVA"):
        video_qa.answer_processor(tmp_path / "nowhere")


def test_score_writes_json_next_to_the_answers(tmp_path):
    require_populated("Video-LLaVA")
    lines = [{"id": f"q{i}", "question": "?", "answer": a, "pred": p} for i, (a, p, _, _) in enumerate(HAND)]
    (tmp_path / "merge.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    res = video_qa.score(tmp_path)
    saved = json.loads((tmp_path / "score_keyless.json").read_text())
    assert saved["contains"] == res["contains"] == pytest.approx(62.5)
    assert saved["exact_match"] == pytest.approx(25.0) and saved["n"] == 8
    assert any("lemmatisation" in c for c in saved["caveats"])


def test_score_without_merge_names_the_file(tmp_path):
    with pytest.raises(EvalError, match=re.escape(str(tmp_path / "merge.jsonl")) + " does not exist: merge first"):
        video_qa.score(tmp_path)


# ------------------------------------------------------------------ merge
def write_lines(path: Path, rows, torn: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def row(i):
    return {"id": f"q{i}", "question": f"what is in clip {i}?", "answer": WORDS[i % len(WORDS)], "pred": f"p{i}"}


def test_merge_chunk_files_in_question_order(setup):
    (run,) = plan(setup)
    write_lines(run / "2_1.json", [row(6), row(4)], torn='{"id": "q7", "pre')   # killed mid-line
    write_lines(run / "2_0.json", [row(0), row(2), row(1)])
    write_lines(run / "2_1.resume1.json", [row(7), row(8)])
    write_lines(run / "2_0.resume1.json", [row(3), {**row(0), "pred": "later duplicate"}])
    stats = video_qa.merge(run)
    merged = [json.loads(line) for line in (run / "merge.jsonl").read_text().splitlines()]
    assert [r["id"] for r in merged] == ["q0", "q1", "q2", "q3", "q4", "q6", "q7", "q8"]
    assert merged[0]["pred"] == "p0"                                  # the first answer of a question is kept
    assert stats == {"questions": 9, "answers": 8, "no_video": 1, "no_video_ids": [NO_VIDEO],
                     "unanswered_unchecked": 0}
    assert json.loads((run / "merge_stats.json").read_text()) == stats


def test_merge_refuses_a_question_with_video_but_no_answer(setup):
    (run,) = plan(setup)
    write_lines(run / "1_0.json", [row(i) for i in (0, 1, 2, 3, 4, 6, 7)])   # q8 has a video, no answer
    with pytest.raises(EvalError, match=r"1 of 9 questions .* have a video but no answer \(first: 'q8'\); resume"):
        video_qa.merge(run)
    assert not (run / "merge.jsonl").exists()


def test_merge_refuses_answers_of_another_question_file(setup):
    (run,) = plan(setup)
    write_lines(run / "1_0.json", [row(i) for i in (0, 1, 2, 3, 4, 6, 7, 8)] + [{**row(0), "id": "zz"}])
    with pytest.raises(EvalError, match=r"answers 1 question\(s\) not in .*test_q.json"):
        video_qa.merge(run)


def test_merge_plain_upstream_outputs_with_a_question_file(tmp_path):
    """Chunk files written by Video-LLaVA's own scripts (no video_run.json): --questions is enough."""
    qs = [{"video_name": "v", "question": "?", "question_id": i} for i in range(4)]
    (tmp_path / "test_q.json").write_text(json.dumps(qs))
    out = tmp_path / "out"
    out.mkdir()
    write_lines(out / "2_1.json", [{"id": 2, "question": "?", "answer": "a", "pred": "b"},
                                   {"id": 3, "question": "?", "answer": "a", "pred": "b"}])
    write_lines(out / "2_0.json", [{"id": 0, "question": "?", "answer": "a", "pred": "b"},
                                   {"id": 1, "question": "?", "answer": "a", "pred": "b"}])
    assert video_qa.main(["merge", "--run-dir", str(out), "--questions", str(tmp_path / "test_q.json")]) == 0
    assert [json.loads(x)["id"] for x in (out / "merge.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


# ------------------------------------------------------------------ infer: resume, chunks
def run_all(s, run, n, kills=None):
    """Run every chunk of n; kills = {chunk: answers after which the first attempt is SIGKILLed}."""
    for k in range(n):
        if kills and k in kills:
            os.environ["FAKE_KILL_AFTER"] = str(kills[k])
            try:
                assert video_qa.infer(run, n, k, script=str(s["fake"])) != 0
            finally:
                del os.environ["FAKE_KILL_AFTER"]
        assert video_qa.infer(run, n, k, script=str(s["fake"])) == 0


def test_killed_chunks_resume_to_the_one_shot_result(setup):
    one, = plan(setup, answers="one")
    run_all(setup, one, 1)
    video_qa.merge(one)
    n_calls = len(calls(setup))
    two, = plan(setup, answers="two")
    run_all(setup, two, 2, kills={0: 2, 1: 0})
    video_qa.merge(two)
    assert (two / "merge.jsonl").read_bytes() == (one / "merge.jsonl").read_bytes()
    merged = [json.loads(line) for line in (one / "merge.jsonl").read_text().splitlines()]
    assert [r["id"] for r in merged] == [f"q{i}" for i in range(9) if f"q{i}" != NO_VIDEO]
    assert all(r["answer"] == WORDS[int(r["id"][1:])] for r in merged)   # answers paired with their question
    c = calls(setup)[n_calls:]
    # chunk 0 = q0..q4 (ceil(9/2) = 5): killed after 2 answers, resumed with the 2 left (q5 has no video);
    # chunk 1 = q5..q8 minus q5: killed before its first answer, resumed with all 3.
    assert [x["ids"] for x in c] == [["q0", "q1", "q2", "q3", "q4"], ["q2", "q3", "q4"], ["q6", "q7", "q8"],
                                     ["q6", "q7", "q8"]]
    assert sorted(p.name for p in two.glob("*.json") if p.name[0].isdigit()) == [
        "2_0.json", "2_0.resume1.json", "2_1.json", "2_1.resume1.json"]


def test_a_finished_chunk_does_not_start_the_script(setup, capsys):
    run, = plan(setup)
    run_all(setup, run, 1)
    before = len(calls(setup))
    assert video_qa.infer(run, 1, 0, script=str(setup["fake"])) == 0
    assert len(calls(setup)) == before
    assert "0 to do" in capsys.readouterr().err


def test_infer_passes_settings_and_runs_from_the_tree(setup, tmp_path):
    trend = tmp_path / "video_trend.json"
    trend.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 1e-4, "n": 2056}))
    run, = plan(setup, modes=["full"], trend=str(trend), fastv_k=3, fastv_rank=500)
    assert run.name == "full-video_trend.json" and run.parent.name == "fastv-k3r500"
    assert video_qa.infer(run, 1, 0, script=str(setup["fake"])) == 0
    (c,) = calls(setup)
    argv = c["argv"]
    opt = {argv[i]: argv[i + 1] for i in range(0, len(argv) - 1, 2)}
    assert opt["--num_chunks"] == "1" and opt["--chunk_idx"] == "0" and opt["--output_name"] == "1_0"
    assert opt["--fastv_k"] == "3" and opt["--fastv_rank"] == "500"
    assert opt["--model_path"] == str(setup["ckpt"].resolve())
    assert c["DEBIAS"] == "full" and c["DEBIAS_TREND"] == f"calibrated:{trend.resolve()}"
    assert Path(c["cwd"]).resolve() == setup["tree"].resolve()


def test_real_script_accepts_the_arguments_infer_passes(tree):
    """Every option infer gives the inference script is one the patched Video-LLaVA script defines."""
    text = (tree / "videollava" / "eval" / "video" / "run_inference_video_qa.py").read_text()
    defined = set(re.findall(r"add_argument\(\s*['\"](--[a-z_]+)", text))
    src = Path(video_qa.__file__).read_text()
    passed = set(re.findall(r'"(--[a-z_]+)"', src.split("def infer(")[1].split("\ndef ")[0]))
    assert passed and passed <= defined, passed - defined


def test_misaligned_answer_file_is_refused(setup):
    folder = setup["data"] / "MSVD_Zero_Shot_QA"
    a = json.loads((folder / "test_a.json").read_text())
    a[1], a[2] = a[2], a[1]
    (folder / "test_a.json").write_text(json.dumps(a))
    with pytest.raises(EvalError, match=r"test_a.json item 1 answers question_id 'q2' .* same order"):
        plan(setup)


def test_a_different_run_in_the_same_folder_is_refused(setup):
    plan(setup)
    with pytest.raises(EvalError, match=r"holds answers of a different run \(limit: None there vs 3 now\)"):
        plan(setup, limit=3)


# ------------------------------------------------------------------ plan: missing paths and trends
def test_plan_errors_name_the_path(setup, tmp_path):
    with pytest.raises(EvalError, match=r"MSVD-QA data /nonexistent/MSVD_Zero_Shot_QA does not exist; download"):
        video_qa.plan(tmp_path / "a", str(setup["ckpt"]), ["msvd"], ["off"], data_dir="/nonexistent",
                      root=setup["tree"])
    with pytest.raises(EvalError, match=r"checkpoint /nonexistent/Video-LLaVA-7B does not exist"):
        video_qa.plan(tmp_path / "a", "/nonexistent/Video-LLaVA-7B", ["msvd"], ["off"], data_dir=setup["data"],
                      root=setup["tree"])
    with pytest.raises(EvalError, match=r"nowhere is not populated .*git submodule update --init"):
        video_qa.plan(tmp_path / "a", str(setup["ckpt"]), ["msvd"], ["off"], data_dir=setup["data"],
                      root=tmp_path / "nowhere")
    (setup["data"] / "MSVD_Zero_Shot_QA" / "test_a.json").unlink()
    with pytest.raises(EvalError, match=r"incomplete: .*MSVD_Zero_Shot_QA/test_a.json does not exist"):
        plan(setup)


def test_pristine_tree_is_refused(tmp_path, setup):
    pristine = upstream.export_tree("Video-LLaVA", tmp_path / "pristine", patched=False,
                                    paths=["videollava/eval", "videollava/model"])
    with pytest.raises(EvalError, match=r"run_inference_video_qa.py lacks our patch series .*apply_patches.sh "
                                        r"Video-LLaVA"):
        video_qa.plan(tmp_path / "a", str(setup["ckpt"]), ["msvd"], ["off"], data_dir=setup["data"],
                      root=pristine)


@pytest.mark.parametrize("trend,message", [
    (None, r"mode full needs DEBIAS_TREND: no positional trend is published for video; calibrate"),
    ("paper:fastv", r"paper:fastv is a LLaVA-1.5 preset over 576 positions"),
    ("TREND576", r"covers 576 positions but a video prompt has 2056 visual tokens"),
    ("/nonexistent/t.json", r"trend file /nonexistent/t.json does not exist"),
])
def test_trend_errors(setup, tmp_path, trend, message):
    if trend == "TREND576":
        trend = str(tmp_path / "t576.json")
        Path(trend).write_text(json.dumps({"form": "exponential", "a": 1.0, "b": 1e-3, "n": 576}))
    with pytest.raises(EvalError, match=message):
        plan(setup, modes=["off", "full"], trend=trend)


# ------------------------------------------------------------------ GPT judge
FAKE_JUDGE = r'''
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
for a in ("--pred_path", "--output_dir", "--output_json", "--api_key", "--api_base"):
    p.add_argument(a, default="")
p.add_argument("--num_tasks", type=int, default=1)
args = p.parse_args()
if os.environ.get("FAKE_JUDGE_HANG"):
    while True:                      # eval_video_qa.py's retry loop when every request fails
        time.sleep(0.05)
rows = [eval(line) for line in open(args.pred_path)]
yes = 0
for r in rows:
    ok = r["answer"].lower() in r["pred"].lower()
    yes += ok
    json.dump([{"pred": "yes" if ok else "no", "score": 4 if ok else 1}, r], open(f"{args.output_dir}/{r['id']}.json", "w"))
print("Yes count:", yes)
print("No count:", len(rows) - yes)
print("Accuracy:", yes / len(rows))
print("Average score:", (4 * yes + (len(rows) - yes)) / len(rows))
'''


@pytest.fixture()
def judged(tmp_path, monkeypatch):
    """A run folder with merge.jsonl, a tree whose eval_video_qa.py is a stand-in, and openai 0.28 metadata."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"id": f"q{i}", "question": "?", "answer": a, "pred": p} for i, (a, p, _, _) in enumerate(HAND)]
    write_lines(run / "merge.jsonl", rows)
    fake_tree = tmp_path / "tree"
    (fake_tree / "videollava" / "eval" / "video").mkdir(parents=True)
    (fake_tree / "videollava" / "eval" / "video" / "eval_video_qa.py").write_text(FAKE_JUDGE)
    site = tmp_path / "site"   # importlib.metadata finds this as an installed openai 0.28.1
    (site / "openai-0.28.1.dist-info").mkdir(parents=True)
    (site / "openai-0.28.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: openai\nVersion: 0.28.1\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    return run, fake_tree


def test_judge_without_key_keeps_the_answers(judged, monkeypatch, capsys):
    run, fake_tree = judged
    monkeypatch.delenv("OPENAI_API_KEY")
    before = (run / "merge.jsonl").read_bytes()
    assert video_qa.main(["judge", "--run-dir", str(run), "--video-llava", str(fake_tree)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "needs OPENAI_API_KEY" in err and f"answers kept in {run / 'merge.jsonl'}" in err
    assert "keyless score is python -m eval.video_qa score" in err
    assert (run / "merge.jsonl").read_bytes() == before
    assert not (run / "gpt3.5").exists() and not (run / "score_gpt.json").exists()


def test_judge_needs_pre_1_openai(judged, monkeypatch, tmp_path):
    run, fake_tree = judged
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "empty"))
    if video_qa._openai_version(sys.executable) is not None:
        pytest.skip("this interpreter has a real openai package, so the missing-openai error was not tested")
    with pytest.raises(EvalError, match=r"needs the pre-1.0 openai package .* has none; pip install 'openai<1.0'; "
                                        r"answers kept in"):
        video_qa.judge(run, root=fake_tree)


def test_judge_result_is_parsed_into_json(judged):
    run, fake_tree = judged
    res = video_qa.judge(run, root=fake_tree, poll=0.05)
    saved = json.loads((run / "score_gpt.json").read_text())
    # the stand-in judge says yes when the answer is a substring of the prediction: 5 of the 8 rows
    assert saved["yes"] == 5 and saved["no"] == 3
    assert saved["accuracy"] == res["accuracy"] == pytest.approx(100 * 5 / 8)
    assert saved["score"] == pytest.approx((4 * 5 + 3) / 8)
    assert saved["api_base"] == "https://api.openai.com/v1" and "sk-test" not in json.dumps(saved)
    assert len(list((run / "gpt3.5").glob("*.json"))) == 8


def test_judge_watchdog_stops_an_endless_retry(judged, monkeypatch):
    run, fake_tree = judged
    monkeypatch.setenv("FAKE_JUDGE_HANG", "1")
    with pytest.raises(EvalError, match=r"no progress for 1 s \(0 of 8 judged\) and was stopped.*answers kept"):
        video_qa.judge(run, root=fake_tree, stall=1, poll=0.1)


def test_judge_arguments_exist_in_video_llavas_judge():
    require_populated("Video-LLaVA")
    text = (video_qa.video_llava_dir() / "videollava" / "eval" / "video" / "eval_video_qa.py").read_text()
    defined = set(re.findall(r'add_argument\("(--[a-z_]+)"', text))
    src = Path(video_qa.__file__).read_text()
    passed = set(re.findall(r'"(--[a-z_]+)"', src.split("def judge(")[1].split("\ndef ")[0]))
    assert passed and passed <= defined, passed - defined


def test_report_table(setup):
    run, = plan(setup)
    run_all(setup, run, 1)
    video_qa.merge(run)
    video_qa.score(run, setup["tree"])
    md = video_qa.report(setup["tmp"] / "answers")
    # fake predictions name the answer for even ids: q0 q2 q4 q6 q8 of the 8 answered
    assert "| Video-LLaVA-7B | MSVD-QA | fastv-k2r1028 | off |  | 62.50 | 0.00 | 8 |" in md
    assert (setup["tmp"] / "answers" / "video_results.csv").exists()


# ------------------------------------------------------------------ the real script (Video-LLaVA CPU environment)
LAUNCHER = r'''
"""Runs the patched run_inference_video_qa.py as infer starts it, on CPU with the tiny model of
tests/baselines/video_probe.py: torchvision/pytorchvideo stand-ins, the loader on cpu, 4 new tokens."""
import runpy, sys
import transformers  # noqa: F401  (before the stand-ins, as video_probe.py does)
sys.path.insert(0, {baselines!r})
import video_stubs
video_stubs.install()
import torch
torch.set_num_threads(1)
import videollava.model.builder as builder
load = builder.load_pretrained_model

def load_on_cpu(*args, **kwargs):
    tok, model, processor, ctx = load(*args, device="cpu", **kwargs)   # the script passes no device
    generate = model.generate
    def short(*a, **kw):
        kw["max_new_tokens"] = 4
        return generate(*a, **kw)
    model.generate = short
    return tok, model, processor, ctx

builder.load_pretrained_model = load_on_cpu
script = {script!r}
sys.argv = [script, *sys.argv[1:], "--device", "cpu"]
runpy.run_path(script, run_name="__main__")
'''


@pytest.mark.slow
@pytest.mark.baseline
def test_real_script_resumes_to_the_one_shot_answers(tmp_path):
    """Video-LLaVA's own patched inference script (tiny random model, real decord videos, FastV K=2 R=300,
    DEBIAS=off; about a minute on 2 CPU cores): a run folder holding the first 3 answers of a one-shot run is resumed by infer, which hands
    the script only the 4 others; the merged result equals the one-shot run's, byte for byte."""
    require_populated("Video-LLaVA")
    vpy = Path(video_qa.ROOT) / ".venv-Video-LLaVA" / "bin" / "python"
    if not vpy.exists():
        pytest.skip("the Video-LLaVA CPU environment (.venv-Video-LLaVA) is not built, so the real inference script "
                    "was not run through infer; build it with bash setup.sh --test-env Video-LLaVA")
    baselines = Path(video_qa.ROOT) / "tests" / "baselines"
    tree = upstream.export_tree("Video-LLaVA", tmp_path / "tp" / "Video-LLaVA")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(video_qa.ROOT)]))
    r = subprocess.run([str(vpy), str(baselines / "video_probe.py"), "init", str(tmp_path / "w")], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "GPT_Zero_Shot_QA" / "MSVD_Zero_Shot_QA"
    folder.mkdir(parents=True)
    for f in ("test_q.json", "test_a.json"):
        (folder / f).write_bytes((tmp_path / "w" / f).read_bytes())
    (folder / "videos").symlink_to(tmp_path / "w" / "videos")
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER.format(baselines=str(baselines),
                                        script=str(tree / "videollava/eval/video/run_inference_video_qa.py")))
    runs = {}
    for name in ("one", "resumed"):
        (run,) = video_qa.plan(tmp_path / name, str(tmp_path / "w" / "Video-LLaVA-tiny"), ["msvd"], ["off"],
                               data_dir=tmp_path / "GPT_Zero_Shot_QA", fastv_k=2, fastv_rank=300, root=tree)
        runs[name] = run
    infer = [str(vpy), "-m", "eval.video_qa", "infer", "--num-chunks", "1", "--script", str(launcher), "--run-dir"]
    r = subprocess.run(infer + [str(runs["one"])], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    one = (runs["one"] / "1_0.json").read_text().splitlines()
    assert len(one) == 7
    (runs["resumed"] / "1_0.json").write_text("\n".join(one[:3]) + "\n" + one[3][:20])   # killed mid-line
    r = subprocess.run(infer + [str(runs["resumed"])], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 answered, 0 without a video (skipped, as Video-LLaVA does), 4 to do" in r.stderr
    assert len((runs["resumed"] / "1_0.resume1.json").read_text().splitlines()) == 4
    for run in runs.values():
        video_qa.merge(run)
    assert (runs["resumed"] / "merge.jsonl").read_bytes() == (runs["one"] / "merge.jsonl").read_bytes()
    merged = [json.loads(x) for x in (runs["one"] / "merge.jsonl").read_text().splitlines()]
    assert [m["answer"] for m in merged] == [f"answer-to-q{i}" for i in range(7)]


def test_activitynet_uses_its_own_script_and_video_prefix(setup):
    """ActivityNet-QA: run_inference_video_qa_act.py, which reads all_test/v_<video_name>.<ext>."""
    folder = setup["data"] / "Activitynet_Zero_Shot_QA"
    (folder / "all_test").mkdir(parents=True)
    qs = [{"video_name": f"clip{i}", "question": "is it?", "question_id": f"v_clip{i}_0"} for i in range(3)]
    (folder / "test_q.json").write_text(json.dumps(qs))
    (folder / "test_a.json").write_text(json.dumps([{"answer": "yes", "type": 3, "question_id": q["question_id"]}
                                                    for q in qs]))
    (folder / "all_test" / "v_clip0.mp4").write_bytes(b"")
    (folder / "all_test" / "clip1.mp4").write_bytes(b"")            # no v_ prefix: the script does not find it
    (run,) = video_qa.plan(setup["tmp"] / "a", str(setup["ckpt"]), ["activitynet"], ["off"], data_dir=setup["data"],
                           root=setup["tree"])
    info = video_qa.read_run(run)
    assert info["script"].endswith("videollava/eval/video/run_inference_video_qa_act.py")
    t = video_qa.todo(info, run, 1, 0)
    assert t["todo"] == [0] and t["no_video"] == [1, 2]
