"""``python -m study.offline_recall DIR [--method fastv] [--trend LABEL=MODE[:TREND]] ...``: which trend keeps the
evidence? Evidence recall of a single-stage ranking (FastV, the iLLaVA port), recomputed from a finished study's
calibration recording for any mode and trend, on a CPU in seconds.

The recording holds each calibration question's raw ranking scores at the pruning layer, before any pruning, so
the top-k that mode/trend would keep can be recomputed exactly (study.selection.kept_sets) and compared with the
question's evidence patches, by the evidence's row band. Two limits: a trend fitted on the same calibration
recording is measured in-sample; and this is selection quality, not accuracy (that needs real runs).

Example (the study's calibrated trend vs one fitted on the log scale):

    python -m debias_core.calibrate DIR/runs/calibration/fastv/record.npz --model llava-smollm2-study \\
        --method fastv --fit loglinear --out fastv-loglinear.json
    python -m study.offline_recall DIR --trend off=off --trend paper=full:paper:fastv \\
        --trend lsq=full:calibrated:DIR/trends/fastv.json --trend loglinear=full:calibrated:fastv-loglinear.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BANDS = ("top", "middle", "bottom")
SINGLE_STAGE = ("fastv", "illava")   # one ranking stage: the recording's stage 0 is all there is to recompute


def recall_by_band(recording, items: dict, *, mode: str, trend: str | None, method: str, k: int) -> dict:
    """Mean evidence recall of the top-``k`` over the recording's questions, overall and per row band
    {"all", "top", "middle", "bottom": float | None, "n": questions with evidence}. ``items``: question_id ->
    items.jsonl record (evidence boxes, image size)."""
    import numpy as np

    from . import selection
    from .data import row_band
    from .run import trend_method

    kept = selection.kept_sets(recording, mode=mode, trend=trend, method_key=method,
                               trend_method=trend_method(method), final_k=k)
    per_band = {b: [] for b in BANDS}
    for qid, measured in selection.per_question(kept, items).items():
        recall = measured["recall"][-1]
        if recall is not None:   # None: no evidence patch (e.g. an existence question answered "no")
            item = items[qid]
            per_band[row_band([tuple(b) for b in item["evidence"]], tuple(item["image_size"]))].append(recall)
    every = [r for rs in per_band.values() for r in rs]
    out = {b: (float(np.mean(rs)) if rs else None) for b, rs in per_band.items()}
    return {"all": float(np.mean(every)) if every else None, **out, "n": len(every)}


def _parse_trend(text: str) -> tuple[str, str, str | None]:
    label, sep, spec = text.partition("=")
    mode, _, trend = spec.partition(":")
    if not sep or not label or mode not in ("off", "pad", "pos", "full"):
        raise ValueError(f"--trend {text!r}: write LABEL=MODE or LABEL=MODE:TREND, MODE one of off, pad, pos, full "
                         f"(e.g. paper=full:paper:fastv)")
    if mode in ("pos", "full") and not trend:
        raise ValueError(f"--trend {text!r}: mode {mode} needs a trend after the colon (e.g. {label}={mode}:paper:fastv)")
    return label, mode, trend or None


def main(argv=None) -> int:
    from debias_core.calibrate import Recording

    p = argparse.ArgumentParser(prog="python -m study.offline_recall", description=__doc__.split("\n\n")[0])
    p.add_argument("study", type=Path, help="a study folder with runs/calibration/<method>/record.npz and data/calib")
    p.add_argument("--method", default="fastv", choices=SINGLE_STAGE)
    p.add_argument("--budgets", default="32,64,128")
    p.add_argument("--trend", action="append", default=None,
                   help="LABEL=MODE[:TREND], repeatable (default: off, pad, full with the paper preset)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON")
    a = p.parse_args(argv)
    try:
        trends = [_parse_trend(t) for t in (a.trend or ["off=off", "pad=pad", f"paper=full:paper:{a.method}"])]
        budgets = [int(x) for x in a.budgets.split(",") if x.strip()]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = a.study / "runs" / "calibration" / a.method / "record.npz"
    items_file = a.study / "data" / "calib" / "items.jsonl"
    for f, fix in ((record, "run the study's calibration (python -m study run --stop-after calibration)"),
                   (items_file, f"python -m study data --split calib --out {a.study / 'data' / 'calib'} --n 300")):
        if not f.is_file():
            print(f"error: {f} does not exist; {fix}", file=sys.stderr)
            return 2
    items = {str(r["question_id"]): r for r in map(json.loads, items_file.open())}
    recording = Recording.load(record)
    rows = []
    print(f"evidence recall of {a.method}'s top-k on {record} (top / middle / bottom evidence)")
    for k in budgets:
        for label, mode, trend in trends:
            r = recall_by_band(recording, items, mode=mode, trend=trend, method=a.method, k=k)
            rows.append({"budget": k, "label": label, "mode": mode, "trend": trend, **r})
            bands = " / ".join("–" if r[b] is None else f"{100 * r[b]:4.1f}" for b in BANDS)
            print(f"k={k:<4d} {label:<14s} {100 * r['all']:5.1f} %   {bands}   (n={r['n']})")
    if a.out:
        a.out.write_text(json.dumps({"recording": str(record), "method": a.method, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
