"""Answer files: LLaVA's jsonl, written so that a run killed at any point resumes without loss or duplicates.

Each answer is one ``os.write`` of one complete line to a file opened O_APPEND, then flushed to the kernel
(fsync optional). A process killed mid-write can leave at most a partial last line; ``AnswerLog.open``
truncates such a tail before appending, and the restarted run skips every ``question_id`` already present.

Chunks follow LLaVA's ``split_list``/``get_chunk``: chunk size ceil(len / N), contiguous and in order
(``<N>_<k>.jsonl``); ``merge`` writes ``merge.jsonl`` in question-file order and checks that every question
is answered exactly once.

A line that is not a JSON object, or (eval.run's files) lacks ``question_id``, is an error naming the file and
line: such a file was not written by eval.run, and guessing which questions it answers could mix or lose
answers.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .common import EvalError


def split_list(items: list, n: int) -> list[list]:
    """LLaVA's split_list: ceil(len/n)-sized contiguous chunks (fewer than n when len < n)."""
    if n < 1:
        raise EvalError(f"--num-chunks {n} must be ≥ 1")
    size = max(1, math.ceil(len(items) / n))
    return [items[i:i + size] for i in range(0, len(items), size)]


def get_chunk(items: list, n: int, k: int) -> list:
    if not 0 <= k < n:
        raise EvalError(f"--chunk-idx {k} is outside 0..{n - 1} for --num-chunks {n}")
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else []


def qid_key(question_id) -> str:
    """Canonical key of a question id (keeps 1 and "1" apart, as json does)."""
    return json.dumps(question_id, sort_keys=True)


def chunk_file(run_dir: Path, n: int, k: int) -> Path:
    return Path(run_dir) / f"{n}_{k}.jsonl"


def read_answers(path: Path, *, repair: bool = False, id_field: str | None = None) -> list[dict]:
    """Complete answer lines of ``path`` (JSON objects). A torn last line (no newline, or not JSON) is dropped,
    and with ``repair`` truncated off the file. A bad line elsewhere, a complete line that is not a JSON
    object, or (with ``id_field``) one without that field is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, good_end, pos, lineno = [], 0, 0, 0
    while pos < len(data):
        lineno += 1
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        line = data[pos:end]
        try:
            row = json.loads(line) if nl >= 0 and line.strip() else None
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            row = None
        if row is None and line.strip():
            if end < len(data):
                raise EvalError(f"{path}: line {lineno} is not a complete JSON answer; the file was edited "
                                f"or corrupted (delete that line to resume)")
            break  # torn tail from a killed run
        if row is not None:
            if not isinstance(row, dict) or (id_field is not None and id_field not in row):
                what = "not a JSON object" if not isinstance(row, dict) else f"an answer without {id_field!r}"
                raise EvalError(f"{path}: line {lineno} is {what}; the file was not written by this tool "
                                f"or was edited (fix or delete that line, or delete the file to answer again)")
            rows.append(row)
        good_end, pos = end, end
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


class AnswerLog:
    """Append-only answer file with resume. ``done`` holds the question keys already answered."""

    def __init__(self, path: Path, *, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_answers(self.path, repair=True, id_field="question_id")
        self.done: set[str] = set()
        for r in rows:
            key = qid_key(r["question_id"])
            if key in self.done:
                raise EvalError(f"{self.path} answers question_id {r['question_id']!r} twice; it was not "
                                f"written by eval.run (remove the duplicate line)")
            self.done.add(key)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, answer: dict) -> None:
        key = qid_key(answer["question_id"])
        if key in self.done:
            raise EvalError(f"question_id {answer['question_id']!r} is already answered in {self.path}")
        line = (json.dumps(answer, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view):]
        if self.fsync:
            os.fsync(self.fd)
        self.done.add(key)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge(run_dir: Path, question_ids: list, num_chunks: int) -> Path:
    """Concatenate ``<N>_<k>.jsonl`` into ``merge.jsonl`` in question order; every question exactly once."""
    run_dir = Path(run_dir)
    by_key: dict[str, dict] = {}
    for k in range(num_chunks):
        path = chunk_file(run_dir, num_chunks, k)
        if not path.exists():
            raise EvalError(f"chunk file {path} is missing: run chunk {k} of {num_chunks} "
                            f"(python -m eval.run ... --num-chunks {num_chunks} --chunk-idx {k})")
        for row in read_answers(path, id_field="question_id"):
            key = qid_key(row["question_id"])
            if key in by_key:
                raise EvalError(f"question_id {row['question_id']!r} is answered in two chunk files of {run_dir}")
            by_key[key] = row
    wanted = [qid_key(q) for q in question_ids]
    missing = [q for q, key in zip(question_ids, wanted) if key not in by_key]
    if missing:
        raise EvalError(f"{len(missing)} of {len(wanted)} questions have no answer in {run_dir} "
                        f"(first: {missing[0]!r}); resume the unfinished chunks, then merge again")
    extra = set(by_key) - set(wanted)
    if extra:
        raise EvalError(f"{run_dir} answers {len(extra)} question(s) not in the question file "
                        f"(e.g. {sorted(extra)[0]}); it belongs to another question file")
    out = run_dir / "merge.jsonl"
    tmp = run_dir / "merge.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for key in wanted:
            f.write(json.dumps(by_key[key], ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out
