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
    """The README's from-scratch training claims (the default 5-minute run and the 9-minute one: validation where
    quoted, the warm-up's length and steps, and the unpruned comparison on the first 500 evaluation questions) are
    recomputed from the committed records."""
    section = _section()
    folder = ROOT / re.search(r"\]\((docs/study/train-h100-[^)/]+)/train-5min\.json\)", section).group(1)
    records = {name: json.loads((folder / f"train-{name}.json").read_text()) for name in ("5min", "9min")}
    for record in records.values():
        assert record["settings"]["init"] is None and record["seconds"] < 600   # from scratch, under 10 minutes
    val = {name: {round(h["seconds"]): h["val_exact"] for h in r["history"] if "val_exact" in h}
           for name, r in records.items()}
    default = records["5min"]
    assert f"alone for {default['settings']['vision_minutes']} min" in section
    assert f"{default['vision_warmup']['steps']} steps of {default['vision_warmup']['batch']} images" in section
    assert f"reached {100 * default['final_val_exact']:.1f} % validation at {round(default['seconds'])} s" in section
    quoted = re.search(r"reached (\S+) % validation at (\d+) s, (\S+) % at (\d+) s and (\S+) % at (\d+) s", section)
    assert quoted, "the README quotes the 9-minute run's validation at three points"
    for value, seconds in zip(quoted.groups()[0::2], quoted.groups()[1::2]):
        assert float(value) == round(100 * val["9min"][int(seconds)], 1), (value, seconds)
    assert f"--minutes {records['9min']['settings']['minutes']:g}" in section
    compared = json.loads((folder / "unpruned-first500-cpu.json").read_text())["runs"]
    for name in ("5min", "9min", "published"):
        low, high = compared[name]["ci95"]
        assert compared[name]["n"] == 500
        assert f"{compared[name]['accuracy']:.1f} % [{low:.1f}, {high:.1f}]" in section, name
    comparison = json.loads((folder / "unpruned-first500-cpu.json").read_text())

    def signed(x):
        return f"{x:+.1f}".replace("-", "−")

    for name in ("5min", "9min"):   # the paired differences to the published weights
        d = comparison[f"{name}_minus_published"]
        assert f"{signed(d['diff'])} [{signed(d['ci95'][0])}, {signed(d['ci95'][1])}]" in section, name
