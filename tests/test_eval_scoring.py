"""Scorers on hand-made answer files whose scores are worked out by hand (LLaVA's own scorers do the work)."""
import json

import pytest

from eval import scoring
from eval.common import EvalError
from tests.support import require_populated


def make_run(root, bench, answers, data_dir):
    """A run folder as eval.run leaves it: run.json + merge.jsonl."""
    run = root / "answers" / bench
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "benchmark": bench, "method": "fastv", "budget": "128", "mode": "off", "trend": None,
        "model_name": "m", "data_dir": str(data_dir), "limit": None}))
    with open(run / "merge.jsonl", "w") as f:
        for a in answers:
            f.write(json.dumps({"answer_id": "x", "model_id": "m", "metadata": {}, **a}) + "\n")
    return run


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pope_f1_and_accuracy_per_category(tmp_path):
    data = tmp_path / "data"
    qs = [{"question_id": i, "image": "x.jpg", "text": "q", "category": c}
          for i, c in enumerate(["adversarial"] * 4 + ["random"] * 2)]
    jsonl(data / "pope" / "llava_pope_test.jsonl", qs)
    labels = {"adversarial": ["yes", "yes", "no", "no"], "random": ["yes", "no"]}
    for cat, ls in labels.items():
        jsonl(data / "pope" / "coco" / f"coco_pope_{cat}.json", [{"label": lab} for lab in ls])
    # eval_pope: first sentence; "No"/"no"/"not" as a word -> no, else yes
    texts = ["Yes, there is.", "No.", "Yes", "There is not a cat.", "yes", "no"]
    run = make_run(tmp_path, "pope", [{"question_id": i, "prompt": "q", "text": t} for i, t in enumerate(texts)], data)
    res = scoring.score_run(run)
    adv, rnd = res["metrics"]["categories"]["adversarial"], res["metrics"]["categories"]["random"]
    assert (adv["accuracy"], adv["f1"], adv["samples"]) == (50.0, 50.0, 4)   # TP=FN=FP=TN=1
    assert (rnd["accuracy"], rnd["f1"]) == (100.0, 100.0)
    assert res["value"] == pytest.approx(75.0) and res["metric"] == "f1"
    assert json.loads((run / "score.json").read_text())["value"] == pytest.approx(75.0)


def test_scienceqa_img_accuracy(tmp_path):
    base = tmp_path / "data" / "scienceqa"
    base.mkdir(parents=True)
    problems = {"p1": {"choices": ["a", "b"], "answer": 0}, "p2": {"choices": ["a", "b"], "answer": 1},
                "p3": {"choices": ["a", "b"], "answer": 0}, "p4": {"choices": ["a", "b", "c"], "answer": 1}}
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["p1", "p2", "p3", "p4"]}))
    img = "<image>\nWhich one?\nAnswer with the option's letter from the given choices directly."
    answers = [{"question_id": "p1", "prompt": img, "text": "A"},     # right
               {"question_id": "p2", "prompt": img, "text": "A"},     # wrong
               {"question_id": "p4", "prompt": img, "text": "B"}]     # right; p3 (text-only) not run
    res = scoring.score_run(make_run(tmp_path, "scienceqa", answers, tmp_path / "data"))
    assert res["value"] == pytest.approx(200 / 3, abs=0.01)          # IMG-Accuracy 2/3
    assert res["metrics"]["accuracy_all"] == pytest.approx(50.0)     # p3 counted as failed


def test_textvqa_soft_accuracy(tmp_path):
    base = tmp_path / "data" / "textvqa"
    base.mkdir(parents=True)
    ann = {"data": [{"image_id": "i1", "question": "What is written?", "answers": ["stop"] * 10},
                    {"image_id": "i2", "question": "Is it open?", "answers": ["yes"] * 3 + ["no"] * 7}]}
    (base / "TextVQA_0.5.1_val.json").write_text(json.dumps(ann))
    sfx = "\nAnswer the question using a single word or phrase."
    answers = [{"question_id": "i1", "prompt": "What is written?" + sfx, "text": "Stop"},
               {"question_id": "i2", "prompt": "Is it open?" + sfx, "text": "yes"}]
    res = scoring.score_run(make_run(tmp_path, "textvqa", answers, tmp_path / "data"))
    # i1: 1.0; i2: leave-one-out min(1, matches/3) = (3·2/3 + 7·1)/10 = 0.9
    assert res["value"] == pytest.approx(95.0)


def test_mmbench_dev_plain_and_circular_accuracy(tmp_path):
    base = tmp_path / "data" / "mmbench"
    base.mkdir(parents=True)
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [[0, "q", "nan", "x", "y", "", "", "A"], [1000000, "q", "nan", "y", "x", "", "", "B"],
            [1, "q", "nan", "x", "y", "z", "", "C"], [1000001, "q", "nan", "z", "x", "y", "", "A"]]
    (base / "mmbench_dev_20230712.tsv").write_text(
        "\t".join(cols) + "\n" + "".join("\t".join(map(str, r + ["c", "img"])) + "\n" for r in rows))
    answers = [{"question_id": i, "round_id": 0, "prompt": "q", "text": t, "options": [], "option_char": ["A", "B", "C"]}
               for i, t in [(0, "A"), (1000000, "B"), (1, "C"), (1000001, "B")]]
    res = scoring.score_run(make_run(tmp_path, "mmbench", answers, tmp_path / "data"))
    assert res["metrics"]["accuracy"] == pytest.approx(75.0)
    assert res["value"] == pytest.approx(75.0)
    assert res["metrics"]["circular_accuracy"] == pytest.approx(50.0)   # question 1 fails one rotation
    if res["metrics"]["upload"] is None:
        assert "pandas" in res["metrics"]["upload_error"]


def test_seed_image_accuracy_through_llavas_converter(tmp_path):
    require_populated("LLaVA")
    base = tmp_path / "data" / "seed_bench"
    base.mkdir(parents=True)
    ann = {"question_type": {"Scene": 1, "Identity": 2},
           "questions": [{"question_id": "q1", "question_type_id": 1, "data_type": "image", "answer": "A"},
                         {"question_id": "q2", "question_type_id": 1, "data_type": "image", "answer": "B"},
                         {"question_id": "q3", "question_type_id": 2, "data_type": "image", "answer": "C"}]}
    (base / "SEED-Bench.json").write_text(json.dumps(ann))
    answers = [{"question_id": q, "prompt": "p", "text": t} for q, t in [("q1", "A"), ("q2", "A"), ("q3", "C")]]
    res = scoring.score_run(make_run(tmp_path, "seed", answers, tmp_path / "data"))
    assert res["value"] == pytest.approx(200 / 3, abs=0.01)
    # LLaVA's converter divides by zero on a set without video questions, after printing the image score
    assert "warning" in res["metrics"]


def test_seed_upstream_keyerror_is_explained(tmp_path):
    require_populated("LLaVA")
    base = tmp_path / "data" / "seed_bench"
    base.mkdir(parents=True)
    ann = {"question_type": {"Scene": 1, "Identity": 2},
           "questions": [{"question_id": "q1", "question_type_id": 1, "data_type": "image", "answer": "A"},
                         {"question_id": "q2", "question_type_id": 2, "data_type": "image", "answer": "B"}]}
    (base / "SEED-Bench.json").write_text(json.dumps(ann))
    answers = [{"question_id": "q1", "prompt": "p", "text": "A"}, {"question_id": "q2", "prompt": "p", "text": "A"}]
    with pytest.raises(EvalError, match="every answer of a question type is wrong"):
        scoring.score_run(make_run(tmp_path, "seed", answers, tmp_path / "data"))


def test_server_converters_write_upload_files(tmp_path):
    require_populated("LLaVA")
    data = tmp_path / "data"
    jsonl(data / "vizwiz" / "llava_test.jsonl", [{"question_id": 1, "image": "v1.jpg", "text": "q"},
                                                 {"question_id": 2, "image": "v2.jpg", "text": "q"}])
    run = make_run(tmp_path / "vz", "vizwiz", [{"question_id": 1, "prompt": "q", "text": "Yes."},
                                               {"question_id": 2, "prompt": "q", "text": "Two dogs"}], data)
    res = scoring.score_run(run)
    assert res["value"] is None and res["scoring"] == "server"
    assert json.loads(open(res["metrics"]["upload"]).read()) == [{"image": "v1.jpg", "answer": "yes"},
                                                                 {"image": "v2.jpg", "answer": "2 dogs"}]
    jsonl(data / "vqav2" / "llava_vqav2_mscoco_test2015.jsonl", [{"question_id": 7, "text": "q"},
                                                                  {"question_id": 8, "text": "q"}])
    run = make_run(tmp_path / "vq", "vqav2", [{"question_id": 7, "prompt": "q", "text": "No"}], data)
    res = scoring.score_run(run)
    assert json.loads(open(res["metrics"]["upload"]).read()) == [{"question_id": 7, "answer": "no"},
                                                                 {"question_id": 8, "answer": ""}]


def test_mmvet_without_key_is_a_clear_error_and_keeps_answers(tmp_path, monkeypatch):
    require_populated("LLaVA")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    (tmp_path / "data" / "mm-vet").mkdir(parents=True)
    run = make_run(tmp_path, "mmvet", [{"question_id": 0, "prompt": "q", "text": "a cat"}], tmp_path / "data")
    before = (run / "merge.jsonl").read_bytes()
    with pytest.raises(EvalError, match="OPENAI_API_KEY is not set; answers kept"):
        scoring.score_run(run)
    assert (run / "merge.jsonl").read_bytes() == before
    assert json.loads((run / "mmvet_results" / "merge.json").read_text()) == {"v1_0": "a cat"}
    assert not (run / "score.json").exists()


def test_missing_llava_scripts_and_external_evaluators_are_named(tmp_path, monkeypatch):
    (tmp_path / "data" / "gqa" / "data").mkdir(parents=True)
    run = make_run(tmp_path, "gqa", [{"question_id": "g1", "prompt": "q", "text": "yes"}], tmp_path / "data")
    with pytest.raises(EvalError, match="eval/eval.py does not exist"):
        scoring.score_run(run)
    monkeypatch.setattr(scoring, "populated", lambda name: False)  # as on a clone without submodules
    with pytest.raises(EvalError, match="scripts/convert_gqa_for_eval.py is needed but third_party/LLaVA is not "
                                        "populated"):
        scoring.llava_script("convert_gqa_for_eval.py")
    with pytest.raises(EvalError, match="merge.jsonl does not exist"):
        (run / "merge.jsonl").unlink() or scoring.score_run(run)
