"""Studies run on disjoint parts of the evaluation split (study.data first_image, python -m study merge): a later
part holds the images a larger split holds there; the merge joins the parts' per-question records, recomputes
accuracy, and refuses what would mix unlike runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from study import data
from study import merge as G

MODEL = {"trained_sha256": "a" * 64, "gguf_sha256": "b" * 64, "dtype": "float16"}


def _part(root: Path, first_image: int, n: int, *, trend=b'{"b": 0.01}', model=MODEL, runs=("fastv/64/off--",),
          correct_every=2) -> Path:
    """A study folder as python -m study run leaves it: data/eval of the part, trends, finished runs whose
    per-question records cover the part's questions."""
    data.generate_split("eval", root / "data" / "eval", n_questions=n, seed=data.SPLIT_SEEDS["eval"],
                        first_image=first_image, progress=False)
    (root / "trends").mkdir(parents=True)
    (root / "trends" / "fastv.json").write_bytes(trend)
    ids = [json.loads(line)["question_id"] for line in open(root / "data" / "eval" / "questions.jsonl")]
    for name in runs:
        method, budget, mode = name.split("/")
        correct = {q: i % correct_every == 0 for i, q in enumerate(ids)}
        record = {"job": {"name": name, "method": method, "split": "eval", "mode": mode.split("-")[0],
                          "trend": f"calibrated:{root / 'trends' / 'fastv.json'}" if "calibrated" in mode else None,
                          "budget": int(budget), "kind": "baseline"},
                  "run_dir": str(root / "answers"), "seconds": 10.0,
                  "made_with": {"model": model, "questions": len(ids)},
                  "accuracy": 100.0 * sum(correct.values()) / len(ids), "n": len(ids), "correct": correct,
                  "selection": {q: {"recall": [0.5], "padding_share": 0.1, "kept": [64]} for q in ids}}
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "done.json").write_text(json.dumps(record))
    cal = root / "runs" / "calibration" / "fastv"
    cal.mkdir(parents=True)
    (cal / "done.json").write_text(json.dumps({"job": {"name": "calibration/fastv", "split": "calib"}}))
    return root


def test_a_later_part_holds_the_images_a_larger_split_holds_there(tmp_path):
    whole = data.generate_split("eval", tmp_path / "whole", n_questions=12, progress=False)
    part = data.generate_split("eval", tmp_path / "part", n_questions=6, first_image=2, progress=False)
    assert sorted(p.name for p in (part / "images").glob("*.png")) == ["eval_000002.png", "eval_000003.png"]
    for name in ("eval_000002.png", "eval_000003.png"):
        assert (part / "images" / name).read_bytes() == (whole / "images" / name).read_bytes()
    whole_items = [json.loads(x) for x in open(whole / "items.jsonl")]
    part_items = [json.loads(x) for x in open(part / "items.jsonl")]
    assert part_items == whole_items[6:12]   # same questions, same ids (eval_000006 ...)
    assert json.loads((part / "manifest.json").read_text())["first_image"] == 2
    # a part is not the first part: asking for the first part in its folder is refused
    with pytest.raises(data.SplitError, match="first_image=2"):
        data.generate_split("eval", part, n_questions=6, progress=False)


def test_merge_joins_per_question_records_and_recomputes_accuracy(tmp_path):
    a = _part(tmp_path / "a", 0, 6, runs=("fastv/64/off--", "fastv/64/full-calibrated"))
    b = _part(tmp_path / "b", 2, 6, runs=("fastv/64/off--", "fastv/64/full-calibrated"), correct_every=3)
    summary = G.merge([b, a], tmp_path / "m")   # any order: parts are put in image order
    assert summary == {"runs": 2, "questions": 12, "parts": [str(a), str(b)]}
    m = tmp_path / "m"
    rec = json.loads((m / "runs" / "fastv/64/off--" / "done.json").read_text())
    assert rec["n"] == 12 and rec["made_with"]["questions"] == 12
    assert list(rec["correct"]) == [f"eval_{i:06d}" for i in range(12)]
    assert rec["accuracy"] == pytest.approx(100.0 * (3 + 2) / 12)
    assert len(rec["selection"]) == 12 and [p["n"] for p in rec["parts"]] == [6, 6]
    cal = json.loads((m / "runs" / "fastv/64/full-calibrated" / "done.json").read_text())
    assert cal["job"]["trend"] == f"calibrated:{m / 'trends' / 'fastv.json'}"
    manifest = json.loads((m / "data" / "eval" / "manifest.json").read_text())
    assert manifest["n_questions"] == 12 and manifest["n_images"] == 4
    assert [p["first_image"] for p in manifest["parts"]] == [0, 2]
    assert len(list((m / "data" / "eval" / "images").glob("*.png"))) == 4
    assert (m / "runs" / "calibration" / "fastv" / "done.json").is_file()
    # a merged folder is for reporting: a study run there (generate_split) is refused
    with pytest.raises(data.SplitError, match="study merge"):
        data.generate_split("eval", m / "data" / "eval", n_questions=12, progress=False)


@pytest.mark.parametrize("change, match", [
    (dict(first_image=1), "inside"),
    (dict(trend=b'{"b": 0.02}'), "calibrated trends differ"),
    (dict(runs=("fastv/64/off--", "fastv/64/pad--")), "finished runs differ"),
    (dict(model=dict(MODEL, trained_sha256="c" * 64)), "other weights"),
])
def test_merge_refuses_unlike_parts(tmp_path, change, match):
    a = _part(tmp_path / "a", 0, 6)
    b = _part(tmp_path / "b", change.pop("first_image", 2), 6, **change)
    with pytest.raises(G.MergeError, match=match):
        G.merge([a, b], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_refuses_repeated_questions_and_a_used_folder(tmp_path, capsys):
    a = _part(tmp_path / "a", 0, 6)
    b = _part(tmp_path / "b", 2, 6)
    rec_path = b / "runs" / "fastv/64/off--" / "done.json"
    rec = json.loads(rec_path.read_text())
    rec["correct"]["eval_000001"] = True      # a question of part a
    rec_path.write_text(json.dumps(rec))
    with pytest.raises(G.MergeError, match="repeats questions"):
        G.merge([a, b], tmp_path / "m")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    assert G.main([str(a), str(b), "--out", str(tmp_path / "used")]) == 2
    assert "not empty" in capsys.readouterr().err
