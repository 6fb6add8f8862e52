"""Answer files: LLaVA-style chunking, resume after a torn write, merge checks (no model needed)."""
import json
import math

import pytest

from eval.answers import AnswerLog, chunk_file, get_chunk, merge, qid_key, read_answers, split_list
from eval.common import EvalError


def llava_split_list(lst, n):  # verbatim logic of LLaVA's llava/eval/model_vqa_loader.py split_list
    chunk_size = math.ceil(len(lst) / n)
    return [lst[i:i + chunk_size] for i in range(0, len(lst), chunk_size)]


@pytest.mark.parametrize("length,n", [(10, 1), (10, 3), (10, 4), (7, 7), (100, 8), (3, 5)])
def test_chunks_match_llava_and_cover_everything(length, n):
    items = list(range(length))
    assert split_list(items, n) == llava_split_list(items, n)
    chunks = [get_chunk(items, n, k) for k in range(n)]
    assert sum(chunks, []) == items  # contiguous, in order, nothing twice


def test_bad_chunk_arguments_are_named():
    with pytest.raises(EvalError, match="--chunk-idx 3"):
        get_chunk([1, 2], 3, 3)
    with pytest.raises(EvalError, match="--num-chunks 0"):
        split_list([1], 0)


def _answer(qid, text="t"):
    return {"question_id": qid, "prompt": "p", "text": text, "answer_id": "a", "model_id": "m", "metadata": {}}


def test_resume_skips_answered_and_repairs_a_torn_tail(tmp_path):
    path = tmp_path / "1_0.jsonl"
    with AnswerLog(path) as log:
        log.append(_answer(0))
        log.append(_answer("1"))
    with open(path, "ab") as f:  # a run killed in the middle of writing question 2
        f.write(b'{"question_id": 2, "prompt": "p", "te')
    log = AnswerLog(path)
    assert log.done == {qid_key(0), qid_key("1")}
    log.append(_answer(2))
    log.close()
    rows = read_answers(path)
    assert [r["question_id"] for r in rows] == [0, "1", 2]
    assert path.read_bytes().endswith(b"}\n")


def test_int_and_string_ids_stay_apart_and_duplicates_are_refused(tmp_path):
    with AnswerLog(tmp_path / "a.jsonl") as log:
        log.append(_answer(1))
        log.append(_answer("1"))
        with pytest.raises(EvalError, match="already answered"):
            log.append(_answer(1))


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(_answer(0)) + "\nnot json\n" + json.dumps(_answer(1)) + "\n")
    with pytest.raises(EvalError, match="line 2"):
        read_answers(path)


def test_merge_orders_by_question_file_and_checks_coverage(tmp_path):
    ids = [5, 3, 9, 1, 7]
    chunks = [get_chunk(ids, 2, k) for k in range(2)]
    for k, chunk in enumerate(chunks):
        with AnswerLog(chunk_file(tmp_path, 2, k)) as log:
            for q in reversed(chunk):  # written out of order
                log.append(_answer(q, text=f"a{q}"))
    out = merge(tmp_path, ids, 2)
    assert [r["question_id"] for r in read_answers(out)] == ids
    assert [r["text"] for r in read_answers(out)] == [f"a{q}" for q in ids]

    with pytest.raises(EvalError, match="1 of 6 questions have no answer"):
        merge(tmp_path, ids + [11], 2)
    with pytest.raises(EvalError, match="chunk file .*2_1.jsonl is missing"):
        chunk_file(tmp_path, 2, 1).unlink() or merge(tmp_path, ids, 2)


def test_merge_refuses_an_answer_in_two_chunks(tmp_path):
    for k in range(2):
        with AnswerLog(chunk_file(tmp_path, 2, k)) as log:
            log.append(_answer(1))
    with pytest.raises(EvalError, match="two chunk files"):
        merge(tmp_path, [1], 2)
