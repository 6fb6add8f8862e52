"""DEBIAS=off against upstream through the eval driver: the same driver command on an upstream tree and on the
patched tree, each observed by study_probe.py, compared bit for bit (test_study_model_off.py, and SparseVLMs'
32-layer builder in test_sparsevlm_eval.py).

- ``reference_tree``: the pin, plus only the patches without which upstream cannot run here at all;
- ``run_observed_driver``: ``python study_probe.py OUT -- eval.run args`` in a baseline's interpreter with
  EVAL_THIRD_PARTY = a folder of exported trees, DEBIAS=off; returns the observations and the answers;
- ``assert_off_matches_upstream``: per question, every ranking's indices, the logits and their shapes, then the
  answers.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests import support

PROBE = Path(__file__).with_name("study_probe.py")


def reference_tree(name: str, dest: Path, numbers: tuple = ()) -> Path:
    """third_party/<name> at its pin in ``dest``, plus the patches numbered ``numbers`` (e.g. ("0003",)), in order."""
    tree = support.pristine_tree(name, dest)
    chosen = [p for p in support.patch_files(name) if p.name[:4] in numbers]
    assert [p.name[:4] for p in chosen] == list(numbers), f"patches/{name} has no {numbers}: {chosen}"
    for p in chosen:
        r = subprocess.run(["git", "apply", "--whitespace=nowarn", str(p)], cwd=tree, capture_output=True, text=True,
                           env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent)))
        assert r.returncode == 0, f"{p.name} does not apply to the {name} pin:\n{r.stderr}"
    return tree


def run_observed_driver(python: Path, trees: Path, driver_args: list[str], out: Path, *, path: list = ()) -> dict:
    """eval.run ``driver_args`` (which must include --answers-dir) under study_probe.py, in ``python``, from the
    repository root, with EVAL_THIRD_PARTY=``trees``, DEBIAS=off, offline, one thread; ``path``: folders first on
    PYTHONPATH. Returns the probe's JSON plus "answers": [{question_id, text}] of the run's merge.jsonl."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEBIAS")}
    env.update(DEBIAS="off", EVAL_THIRD_PARTY=str(trees), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(p) for p in path] + [str(support.ROOT)]
                                          + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out.mkdir(parents=True, exist_ok=True)
    observed = out / "observed.json"
    r = subprocess.run([str(python), str(PROBE), str(observed), "--", *driver_args], cwd=support.ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"eval.run on {trees} exited {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    result = json.loads(observed.read_text())
    run_dirs = [Path(line) for line in r.stdout.strip().splitlines() if (Path(line) / "merge.jsonl").is_file()]
    assert len(run_dirs) == 1, f"expected one run folder in the driver's output:\n{r.stdout[-2000:]}"
    result["answers"] = [{k: a[k] for k in ("question_id", "text")}
                         for a in map(json.loads, (run_dirs[0] / "merge.jsonl").read_text().splitlines())]
    return result


def assert_off_matches_upstream(upstream: dict, ours: dict, what: str, labels: list | None = None) -> None:
    """Both runs exited 0 and saw the same questions; per question (``labels`` name them in messages) every ranking
    selected the same indices, the logits are bit-identical with the same shapes; the answers are equal. At least
    one question must have ranked something (else nothing was compared)."""
    for side, run in (("upstream", upstream), ("ours", ours)):
        assert run["exit"] == 0, f"{what} {side}: eval.run exited {run['exit']}"
    assert len(ours["questions"]) == len(upstream["questions"]) > 0, f"{what}: questions differ in number"
    assert any(len(s) > 1 for q in upstream["questions"] for s in q["selections"]), (
        f"{what}: upstream ranked nothing, so no kept index was compared")
    for i, (up, us) in enumerate(zip(upstream["questions"], ours["questions"])):
        where = f"{what}, question {labels[i] if labels else i}"
        assert us["span_start"] == up["span_start"], f"{where}: image start {us['span_start']} != {up['span_start']}"
        assert len(us["selections"]) == len(up["selections"]), (
            f"{where}: {len(us['selections'])} rankings, upstream {len(up['selections'])}")
        for n, (a, b) in enumerate(zip(up["selections"], us["selections"])):
            assert b == a, f"{where}: ranking {n} selected other indices than upstream"
        assert us["logit_shapes"] == up["logit_shapes"], f"{where}: sequence lengths differ from upstream"
        assert us["logits_sha256"] == up["logits_sha256"], f"{where}: logits differ from upstream"
    assert ours["answers"] == upstream["answers"], f"{what}: answers differ from upstream"
