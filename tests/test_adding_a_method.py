"""docs/adding_a_method.md, followed to the letter: its files and its registration step, then the driver.

The toy method's files and the ``EVAL_METHODS`` line are read from the guide itself (nothing of the toy is written
here), so the guide cannot drift from what works. ``python -m eval.run`` then runs the toy on the tiny random
LLaVA and the synthetic benchmarks (CPU, offline) with a spy around ``debias_core.debias`` / ``keep_cap``
(a ``sitecustomize`` module on the subprocess's path), and without the registration step the driver must refuse.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import ROOT, padding_positions, require_module

GUIDE = ROOT / "docs" / "adding_a_method.md"
BENCHES = ("synthetic_wide", "synthetic_square")
KEEP = 64  # the toy's default "keep" in the guide's registry entry

SPY = textwrap.dedent('''
    """Logs every debias_core.debias / keep_cap call of this process (one JSON line each) to $SPY_LOG."""
    import json, os

    import debias_core
    import torch
    from debias_core.context import current_samples

    _debias, _keep_cap, _log = debias_core.debias, debias_core.keep_cap, os.environ["SPY_LOG"]

    def _write(rec):
        with open(_log, "a") as f:
            f.write(json.dumps(rec) + "\\n")

    def debias(scores, *args, **kwargs):
        out = _debias(scores, *args, **kwargs)
        ctx = current_samples()
        _write({"fn": "debias", "mode": debias_core.settings().mode, "shape": list(scores.shape),
                "returned_input": out is scores, "changed": not torch.equal(out, scores),
                "neg_inf": sorted({int(i) for i in torch.isneginf(out).nonzero()[:, -1]}),
                "image_size": list(ctx[0].image_size) if ctx and ctx[0].image_size else None})
        return out

    def keep_cap(k, *args, **kwargs):
        out = _keep_cap(k, *args, **kwargs)
        _write({"fn": "keep_cap", "mode": debias_core.settings().mode, "k": k, "capped": out})
        return out

    debias_core.debias, debias_core.keep_cap = debias, keep_cap
''')


def guide_files() -> dict[str, str]:
    """{relative path: content} of every ``<!-- file: PATH -->`` block of the guide."""
    text = GUIDE.read_text()
    found = dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", text, flags=re.S))
    assert found, f"{GUIDE} has no <!-- file: ... --> blocks: the worked example is gone"
    return found


def guide_registration(folder: Path) -> dict[str, str]:
    """The environment the guide's registration step sets, with $PWD = ``folder``."""
    text = GUIDE.read_text()
    step = re.search(r"<!-- step: register -->\n```bash\n(.*?)```", text, flags=re.S)
    assert step, f"{GUIDE} has no registration step (<!-- step: register -->)"
    env = dict(re.findall(r"^export (\w+)=(\S+)$", step.group(1), flags=re.M))
    assert env, f"the guide's registration step sets no variable: {step.group(1)!r}"
    return {k: v.replace("$PWD", str(folder)) for k, v in env.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_module("accelerate", "the eval driver loads models through LLaVA's load_pretrained_model, which "
                                 "needs accelerate; the guide's toy method was not run")
    from eval.synthetic import build_synthetic
    from eval.tiny_llava import build_tiny_llava

    root = tmp_path_factory.mktemp("guide")
    for rel, content in guide_files().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    (root / "spy").mkdir()
    (root / "spy" / "sitecustomize.py").write_text(SPY)
    model = build_tiny_llava(root / "tiny-llava")
    build_synthetic(root / "data", images=3)  # 6 questions per benchmark
    return {"root": root, "model": model, "data": root / "data"}


def _run(setup, answers: Path, registration: dict, spy_log: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("EVAL_METHODS",) and not k.startswith("DEBIAS")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(setup["root"] / "spy"), str(ROOT)]), SPY_LOG=str(spy_log),
               **registration)
    cmd = [sys.executable, "-m", "eval.run", "--method", "toy", "--benchmark", ",".join(BENCHES), "--mode",
           "off,full", "--model-path", str(setup["model"]), "--data-dir", str(setup["data"]), "--answers-dir",
           str(answers), "--max-new-tokens", "4", "--device", "cpu"]
    return subprocess.run(cmd, cwd=setup["root"], env=env, capture_output=True, text=True, timeout=900)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def registered_run(setup):
    answers, log = setup["root"] / "answers", setup["root"] / "spy.jsonl"
    r = _run(setup, answers, guide_registration(setup["root"]), log)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"answers": answers / "tiny-llava", "calls": _rows(log)}


def test_the_guide_registers_a_plugin_file_it_also_provides(setup):
    registration = guide_registration(setup["root"])
    assert set(registration) == {"EVAL_METHODS"}
    assert Path(registration["EVAL_METHODS"]).is_file(), "the registration step names a file the guide never writes"


def test_the_toy_answers_every_question_through_the_driver(setup, registered_run):
    for bench in BENCHES:
        aspect = bench.split("_")[1]
        questions = _rows(setup["data"] / "synthetic" / aspect / "llava_synthetic.jsonl")
        for mode, folder in (("off", "off"), ("full", "full-paper-fastv")):
            rows = _rows(registered_run["answers"] / bench / f"toy-{KEEP}" / folder / "merge.jsonl")
            assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
            assert all(r["metadata"]["method"] == "toy" and r["metadata"]["mode"] == mode for r in rows)
            assert all(r["metadata"]["budget"] == str(KEEP) for r in rows)
            run = json.loads((registered_run["answers"] / bench / f"toy-{KEEP}" / folder / "run.json").read_text())
            # the fastv family's, from the registry entry's trend_method (recorded where it can change answers)
            assert run["pad_threshold"] == (0.5 if mode == "full" else None)


def test_the_toy_ranks_through_debias_core_once_per_sample(setup, registered_run):
    calls = registered_run["calls"]
    debias = [c for c in calls if c["fn"] == "debias"]
    caps = [c for c in calls if c["fn"] == "keep_cap"]
    n_samples = 6 * len(BENCHES)  # every synthetic question has an image
    assert len(debias) == len(caps) == 2 * n_samples, [c["fn"] for c in calls]  # modes off and full
    assert all(c["shape"] == [1, 576] for c in debias)
    assert all(c["k"] == KEEP for c in caps)
    off = [c for c in debias if c["mode"] == "off"]
    full = [c for c in debias if c["mode"] == "full"]
    assert len(off) == len(full) == n_samples
    assert all(c["returned_input"] and not c["neg_inf"] for c in off)  # off: the scores themselves
    assert all(c["changed"] for c in full)                             # the trend reweights every sample
    padded = 0
    for c in full:  # exactly the padding tokens are suppressed (LLaVA-1.5 geometry, written out in tests)
        expected = sorted(padding_positions(tuple(c["image_size"]), 0.5))
        assert c["neg_inf"] == expected, c["image_size"]
        padded += bool(expected)
    assert padded >= 3  # the wide images have padding, so suppression was exercised
    for c in caps:
        assert 1 <= c["capped"] <= KEEP


def test_without_the_registration_step_the_driver_refuses_the_toy(setup):
    answers = setup["root"] / "unregistered"
    r = _run(setup, answers, {}, setup["root"] / "spy-unregistered.jsonl")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: method 'toy' is unknown" in r.stderr and "Traceback" not in r.stderr
    assert not answers.exists()  # nothing written that a rerun would trust
