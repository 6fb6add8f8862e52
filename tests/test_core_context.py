"""Per-sample context (debias_core.sample) and mode/trend configuration (env and configure)."""
import threading

import pytest
import torch

import debias_core as dc
from debias_core import DebiasError, SampleContext

pytestmark = pytest.mark.usefixtures("clean_debias")


# ------------------------------------------------------------------------------- sample()

def test_sample_scopes_one_context():
    assert dc.current_samples() is None
    with dc.sample(image_size=(640, 480), span_start=35) as ctx:
        assert isinstance(ctx, SampleContext)
        assert ctx == SampleContext((640, 480), "pad", 24, 336, 35, 576)
        assert dc.current_samples() == (ctx,)
    assert dc.current_samples() is None


def test_context_is_gone_after_an_exception():
    with pytest.raises(RuntimeError):
        with dc.sample(image_size=(640, 480)):
            raise RuntimeError("generate failed")
    assert dc.current_samples() is None


def test_nested_contexts_restore_the_outer_one():
    with dc.sample(image_size=(640, 480)) as outer:
        with dc.sample(image_size=(500, 500)) as inner:
            assert dc.current_samples() == (inner,)
        assert dc.current_samples() == (outer,)


def test_batch_contexts_with_scalar_and_list_fields():
    with dc.sample(image_size=[(640, 480), (500, 500), None], span_start=[35, 36, 37], grid=24) as ctxs:
        assert len(ctxs) == 3
        assert [c.image_size for c in ctxs] == [(640, 480), (500, 500), None]
        assert [c.span_start for c in ctxs] == [35, 36, 37]
        assert all(c.grid == 24 and c.span_length == 576 for c in ctxs)
    with dc.sample(image_size=[(640, 480)]):          # a batch of one is one context
        assert len(dc.current_samples()) == 1


def test_video_llava_and_anyres_layouts():
    with dc.sample(image_size=None, preprocess="none", span_length=2056) as c:
        assert c.span_length == 2056
    with dc.sample(image_size=(400, 200), grid=16, resolution=224) as c:   # Video-LLaVA image
        assert c.span_length == 256
    with dc.sample(image_size=(640, 480), preprocess="anyres", span_length=2340) as c:
        assert c.span_length == 2340


def test_contexts_do_not_leak_between_threads():
    seen = {}

    def other():
        seen["other"] = dc.current_samples()

    with dc.sample(image_size=(640, 480)):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["other"] is None


@pytest.mark.parametrize("kwargs, word", [
    (dict(image_size=(0, 480)), "width 0"),
    (dict(image_size=(640, 480.5)), "480.5"),
    (dict(image_size=(640, 480), grid=25), "grid 25 does not divide resolution 336"),
    (dict(image_size=(640, 480), preprocess="crop"), "'crop'"),
    (dict(image_size=(640, 480), span_start=-1), "span_start -1"),
    (dict(image_size=(640, 480), span_start=3.5), "span_start 3.5"),
    (dict(image_size=(640, 480), span_length=0), "span_length 0"),
    (dict(image_size=(640, 480), span_length=600), "span_length 600 does not match a 24×24 pad grid"),
    (dict(image_size=[(640, 480), (500, 500)], span_start=[35]), "span_start has 1 entries for a batch of 2"),
    (dict(image_size=[(640, 480), (0, 5)]), "width 0"),
])
def test_bad_context_fields_name_the_value(kwargs, word):
    with pytest.raises(DebiasError, match=word):
        with dc.sample(**kwargs):
            pass
    assert dc.current_samples() is None


# ------------------------------------------------------------------------------- configuration

def test_default_settings():
    st = dc.settings()
    assert st.mode == "off" and st.trend is None and st.pad_threshold == 0.5
    assert st.exact_geometry and not st.checks


def test_environment_selects_mode_trend_method(monkeypatch):
    monkeypatch.setenv("DEBIAS", "FULL")
    monkeypatch.setenv("DEBIAS_TREND", "paper:pdrop/gqa")
    monkeypatch.setenv("DEBIAS_METHOD", "pdrop")
    dc.reset()
    st = dc.settings()
    assert st.mode == "full" and st.trend_spec == "paper:pdrop/gqa" and st.pad_threshold == 0.01
    assert st.trend.b == dc.paper_trend("pdrop", "gqa").b
    monkeypatch.setenv("DEBIAS_PAD_THRESHOLD", "0.3")
    monkeypatch.setenv("DEBIAS_GEOMETRY", "official")
    monkeypatch.setenv("DEBIAS_CHECK", "1")
    dc.reset()
    st = dc.settings()
    assert st.pad_threshold == 0.3 and not st.exact_geometry and st.checks


def test_trend_file_from_environment(monkeypatch, tmp_path):
    path = tmp_path / "t.json"
    dc.save_trend(dc.ExponentialTrend(a=1.0, b=0.003, n=576), path)
    monkeypatch.setenv("DEBIAS", "pos")
    monkeypatch.setenv("DEBIAS_TREND", str(path))
    dc.reset()
    assert dc.settings().trend.b == 0.003


def test_configure_overrides_and_reset_rereads_env(monkeypatch):
    monkeypatch.setenv("DEBIAS", "pad")
    dc.reset()
    assert dc.settings().mode == "pad"
    dc.configure(mode="full", trend="paper:himap/gqa")
    assert dc.settings().mode == "full"
    dc.configure(method="pdrop")                      # keeps mode and trend, takes pdrop's threshold
    st = dc.settings()
    assert (st.mode, st.trend_spec, st.pad_threshold) == ("full", "paper:himap/gqa", 0.01)
    dc.configure(pad_threshold=0.2)
    assert dc.settings().pad_threshold == 0.2
    dc.reset()
    assert dc.settings().mode == "pad"


def test_configure_with_a_trend_object():
    t = dc.ExponentialTrend(a=1.0, b=0.002, n=576)
    dc.configure(mode="pos", trend=t)
    assert dc.settings().trend is t
    dc.configure(mode="full")                         # the in-code trend is kept
    assert dc.settings().trend is t


@pytest.mark.parametrize("env, word", [
    ({"DEBIAS": "on"}, "debias mode 'on' is unknown"),
    ({"DEBIAS": "full"}, "mode 'full' needs a positional trend"),
    ({"DEBIAS": "pos", "DEBIAS_TREND": "paper:himap/imagenet"}, "'imagenet'"),
    ({"DEBIAS": "pad", "DEBIAS_TREND": "nonsense"}, "'nonsense' is neither a preset"),
    ({"DEBIAS": "pad", "DEBIAS_METHOD": "fastvv"}, "method 'fastvv' is unknown"),
    ({"DEBIAS": "pad", "DEBIAS_METHOD": "fastvv", "DEBIAS_PAD_THRESHOLD": "0.5"}, "'fastvv'"),
    ({"DEBIAS_PAD_THRESHOLD": "half"}, "DEBIAS_PAD_THRESHOLD='half'"),
    ({"DEBIAS_PAD_THRESHOLD": "2"}, "threshold 2.0"),
    ({"DEBIAS_GEOMETRY": "rounded"}, "geometry 'rounded'"),
])
def test_bad_environment_is_a_clear_error(monkeypatch, env, word):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dc.reset()
    with pytest.raises(DebiasError, match=word):
        dc.settings()
    with pytest.raises(DebiasError, match=word):      # at the call site too, not a silent fallback
        dc.debias(torch.ones(3))


@pytest.mark.parametrize("kwargs, word", [
    (dict(mode="loud"), "'loud'"), (dict(mode="pos"), "needs a positional trend"),
    (dict(trend="paper:nosuch/gqa"), "'nosuch'"), (dict(geometry="approx"), "'approx'"),
    (dict(pad_threshold=-1), "threshold -1"), (dict(method=3), "method 3"),
])
def test_bad_configure(kwargs, word):
    with pytest.raises(DebiasError, match=word):
        dc.configure(**kwargs)
    assert dc.settings().mode == "off"                 # a failed configure changes nothing


def test_malformed_trend_file_from_environment(monkeypatch, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"form": "exponential", "a": 1.0}')
    monkeypatch.setenv("DEBIAS", "pos")
    monkeypatch.setenv("DEBIAS_TREND", str(path))
    dc.reset()
    with pytest.raises(DebiasError, match=r"bad.json.*'b'"):
        dc.settings()
