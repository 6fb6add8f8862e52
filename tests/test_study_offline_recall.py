"""study.offline_recall recomputes a single-stage ranking's top-k from a calibration recording for any trend and
measures evidence recall by row band: on scores with a pure recency trend, `off` misses top evidence and dividing
out that trend finds it."""
import json

import numpy as np
import pytest

from study import offline_recall as O

B = 0.02   # recency per visual position of the synthetic scores


def _recording(n_questions):
    from debias_core.calibrate import Recording
    from debias_core.recorder import Recorder

    rng = np.random.default_rng(0)
    rec, samples = Recorder(), []
    for q in range(n_questions):
        raw = np.exp(B * np.arange(576)) * rng.uniform(0.5, 1.5, 576)
        rec.rows.setdefault(0, []).append((np.arange(576, dtype=np.int64), raw))
        samples.append({"question_id": f"q{q}", "image_size": [336, 336], "preprocess": "pad", "grid": 24,
                        "resolution": 336, "span_start": 32, "span_length": 576})
    return Recording(rec, samples, {0: list(range(n_questions))})


def _items(n_questions):   # evidence: the top-left 2 x 2 patches of a square image (top band)
    return {f"q{q}": {"question_id": f"q{q}", "image_size": [336, 336], "evidence": [[0, 0, 28, 28]]}
            for q in range(n_questions)}


def test_recency_hides_top_evidence_and_dividing_out_the_trend_finds_it(tmp_path):
    trend = tmp_path / "trend.json"
    trend.write_text(json.dumps({"form": "exponential", "a": 1.0, "b": B, "n": 576}))
    rec, items = _recording(8), _items(8)
    off = O.recall_by_band(rec, items, mode="off", trend=None, method="fastv", k=64)
    fixed = O.recall_by_band(rec, items, mode="full", trend=f"calibrated:{trend}", method="fastv", k=64)
    assert off["n"] == fixed["n"] == 8 and off["middle"] is None and off["bottom"] is None
    assert off["top"] == off["all"] == 0.0          # the top-64 of a recency trend are the last positions
    assert fixed["top"] > 0.0                        # about 64/576 of the evidence once the trend is divided out


@pytest.mark.parametrize("bad", ["paper", "x=sideways", "x=full", "=off"])
def test_bad_trend_arguments_are_named(bad, tmp_path, capsys):
    assert O.main([str(tmp_path), "--trend", bad]) == 2
    assert f"--trend {bad!r}" in capsys.readouterr().err


def test_a_study_folder_without_calibration_names_the_fix(tmp_path, capsys):
    assert O.main([str(tmp_path)]) == 2
    assert "runs/calibration/fastv/record.npz does not exist" in capsys.readouterr().err
