"""The README's study table is the committed study's numbers: every row of "Results on a real LLM" is recomputed
from the study.json it links to, so a new study run cannot leave the README showing the old one."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"FastV": "fastv", "iLLaVA port": "illava", "HiMAP": "himap", "PyramidDrop": "pdrop", "SparseVLMs": "sparsevlm",
        "TokenCarve": "tokencarve"}


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Results on a real LLM")
    return text[start:text.index("\n## ", start + 1)]


def _study() -> dict:
    folder = re.search(r"\]\((docs/study/h100-[^)/]+)/report\.md\)", _section()).group(1)
    return json.loads((ROOT / folder / "study.json").read_text())


def _num(cell: str) -> float:
    return float(cell.replace("−", "-").replace("+", "").strip())


def test_every_table_row_is_the_linked_study_json():
    records = {r["name"]: r for r in _study()["records"]}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in _section().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in KEYS]
    assert len(rows) == 17, "six baselines x three budgets, SparseVLMs two"
    for name, budget, off, pad, pos, full, delta, calibrated, _recall in rows:
        run = f"{KEYS[name]}/{budget}"
        for cell, mode in ((off, "off--"), (pad, "pad--"), (pos, "pos-paper"), (full, "full-paper"),
                           (calibrated, "full-calibrated")):
            assert _num(cell) == round(records[f"{run}/{mode}"]["accuracy"], 1), (run, mode, cell)
        diff, low, high = (_num(x) for x in re.match(r"(\S+) \[(\S+), (\S+)\]", delta).groups())
        vs_off = records[f"{run}/full-paper"]["vs_off"]
        assert (diff, low, high) == (round(vs_off["diff"], 1), *(round(x, 1) for x in vs_off["ci95"])), run


def test_the_unpruned_accuracy_quoted_is_the_study_s():
    study = _study()
    low, high = study["unpruned_ci95"]
    quoted = f"{study['unpruned_accuracy']:.1f} % [{low:.1f}, {high:.1f}] unpruned"
    assert quoted in _section()


def test_the_interval_widths_quoted_are_the_study_s():
    """The README's half-width ranges of the paired off -> full intervals (paper and calibrated trends) are the
    linked study's, so the claim about the ±3-point aim follows the data."""
    records = _study()["records"]
    for trend in ("paper", "calibrated"):
        half = [(r["vs_off"]["ci95"][1] - r["vs_off"]["ci95"][0]) / 2 for r in records
                if r["kind"] == "baseline" and r["mode"] == "full" and r["trend"] == trend]
        assert len(half) == 17
        quoted = f"±{min(half):.1f} to ±{max(half):.1f}"
        assert quoted in _section(), (trend, quoted)


def test_the_from_scratch_training_quoted_is_its_record():
    """The README's from-scratch training claims (validation at three points, the warm-up's length, and the
    unpruned comparison on the first 500 evaluation questions) are recomputed from the committed records."""
    section = _section()
    folder = re.search(r"\]\((docs/study/train-h100-[^)/]+)/train\.json\)", section).group(1)
    record = json.loads((ROOT / folder / "train.json").read_text())
    checks = {round(h["seconds"]): h["val_exact"] for h in record["history"] if "val_exact" in h}
    quoted = re.search(r"reached (\S+) % validation at (\d+) s, (\S+) % at (\d+) s and (\S+) % at (\d+) s", section)
    assert quoted, "the README quotes the from-scratch run's validation at three points"
    for value, seconds in zip(quoted.groups()[0::2], quoted.groups()[1::2]):
        assert float(value) == round(100 * checks[int(seconds)], 1), (value, seconds)
    assert record["seconds"] < 600 and record["settings"]["init"] is None   # from scratch, in under 10 minutes
    assert f"alone for {record['settings']['vision_minutes']} min" in section
    assert f"{record['vision_warmup']['steps']} steps of {record['vision_warmup']['batch']} images" in section
    compared = json.loads((ROOT / folder / "unpruned-first500-cpu.json").read_text())
    runs = compared["runs"]
    assert runs["9min"]["n"] == runs["published"]["n"] == 500
    for name in ("9min", "published"):
        low, high = runs[name]["ci95"]
        assert f"{runs[name]['accuracy']:.1f} % [{low:.1f}, {high:.1f}]" in section, name
    assert record["history"] and compared["runs"]["9min"]["accuracy"] >= 85.0   # the target, as measured
