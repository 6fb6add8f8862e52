"""Every path of the ranking-site call equals the plain reference (debias_core/reference.py), bit for bit.

Hypothesis draws the call: mode, score dtype, [N] or [B, N] scores (one sample context, or one per row),
the position form (none = raster 0..N−1, a long or int32 tensor [N] / [1, N] / [B, N] with merged tokens at
−1, a host list, sequence indices with ``start=``, tracked ``positions(L)[kept]``), ``mean_dim``, ``padding``,
stage, image sizes (with and without padding, text-only) and the pad threshold. Each drawn call is made
twice — cold (the full path builds and validates) and warm (the fast path) — and both results, ``mask_padding``
and ``keep_cap`` are compared with the reference. CUDA runs the same properties on a GPU machine.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import debias_core as dc
from debias_core import reference

pytestmark = pytest.mark.usefixtures("clean_debias")

LENGTH = 576
TREND = dc.StagedTrend({0: dc.ExponentialTrend(a=1.0, b=0.004, n=LENGTH),
                        1: dc.ExponentialTrend(a=1.0, b=-0.002, n=LENGTH)})
SIZES = [(640, 427), (427, 640), (500, 500), (1000, 101), (336, 200), None]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
FORMS = ["none", "long", "int32", "list", "start", "tracked"]
PROFILE = settings(max_examples=400, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: the CUDA fast paths were not compared with the reference (run on a GPU machine)"))


@st.composite
def calls(draw):
    """One ranking-site call: (configure kwargs, sample sizes, call description)."""
    mode = draw(st.sampled_from(["off", "pad", "pos", "full"]))
    method = draw(st.sampled_from(["himap", "pdrop"]))          # pad thresholds 0.5 and 0.01
    rows = draw(st.sampled_from([None, 1, 2, 3]))                # None: scores [N]
    form = draw(st.sampled_from(FORMS))
    per_row = rows is not None and form != "tracked" and draw(st.booleans())
    sizes = [draw(st.sampled_from(SIZES)) for _ in range(rows if per_row else 1)]
    n = draw(st.integers(1, LENGTH)) if form != "none" else draw(st.integers(1, LENGTH))
    call = dict(
        mode=mode, method=method, rows=rows, form=form, sizes=sizes, n=n,
        dtype=draw(st.sampled_from(DTYPES)), stage=draw(st.sampled_from([0, 1])),
        padding=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
        position_rows=draw(st.sampled_from(["1-D", "[1, N]", "[B, N]"])) if rows else "1-D",
        merged=form in ("long", "int32", "list") and draw(st.booleans()),
        mean_dim=draw(st.sampled_from([None, 0, -2, "last"])),
        queries=draw(st.sampled_from([1, 2])),
        start=draw(st.integers(0, 700)),
    )
    return call


def _content_positions(sizes, method):
    threshold = 0.01 if method == "pdrop" else 0.5
    masks = [reference.content(dc.SampleContext(image_size=tuple(s) if s else None), threshold) for s in sizes]
    return np.flatnonzero(np.logical_and.reduce(masks))


def _build(call, device):
    """(scores as passed, positions as passed, start, mean_dim) for ``call`` on ``device``."""
    g = torch.Generator().manual_seed(call["seed"])
    pool = _content_positions(call["sizes"], call["method"]) if not call["padding"] else np.arange(LENGTH)
    if call["form"] == "none":                                   # raster 0..n−1: as many as the pool's prefix holds
        prefix = np.flatnonzero(pool != np.arange(len(pool)))
        pool = pool[: prefix[0] if len(prefix) else len(pool)]
    n = min(call["n"], len(pool))
    shape = (n,) if call["rows"] is None else (call["rows"], n)
    scores = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    scores[..., ::7] = 0.0
    scores[..., 3::11] = -0.0
    form = call["form"]
    if form == "none":
        positions = None
    else:
        def pick():
            return torch.from_numpy(pool)[torch.randperm(len(pool), generator=g)[:n]]
        layout = call["position_rows"]
        positions = (torch.stack([pick() for _ in range(call["rows"])]) if layout == "[B, N]"
                     else pick().unsqueeze(0) if layout == "[1, N]" else pick())
        if call["merged"]:
            positions[..., ::13] = -1
    start = None
    if form == "start":
        start = call["start"]
        positions = positions + start
    elif form == "int32":
        positions = positions.int()
    elif form == "list":
        positions = positions.tolist()
    mean_dim = call["mean_dim"]
    raw = scores
    if mean_dim is not None:                                     # the site's torch.mean(x, dim=mean_dim)
        dim = scores.dim() if mean_dim == "last" else mean_dim % (scores.dim() + 1)
        raw = torch.stack([scores * (1 + q) / call["queries"] for q in range(call["queries"])], dim=dim)
        mean_dim = -1 if mean_dim == "last" else mean_dim
    raw = raw.to(call["dtype"]).to(device)
    if isinstance(positions, torch.Tensor):
        positions = positions.to(device)
    return raw, positions, start, mean_dim


def _tracked(positions, device):
    """positions(L)[kept] for long positions [N] (no −1: tracked tokens are never merged)."""
    return dc.positions(LENGTH, device=device)[positions.to(device)]


def _check_call(call, device):
    if call["form"] == "none" and not call["padding"] and len(_content_positions(call["sizes"], call["method"])) \
            and _content_positions(call["sizes"], call["method"])[0] != 0:
        call = dict(call, padding=True)                          # raster from 0 would start on padding
    dc.configure(mode=call["mode"], trend=TREND, method=call["method"])
    scores, positions, start, mean_dim = _build(call, device)
    sizes = [tuple(s) if s else None for s in call["sizes"]]
    with dc.sample(image_size=sizes if len(sizes) > 1 else sizes[0]):
        if call["form"] == "tracked":
            positions = _tracked(positions.reshape(-1, positions.shape[-1])[0], device)
            if call["mode"] == "off":
                positions = positions[: scores.shape[-1]]
        kwargs = dict(stage=call["stage"], mean_dim=mean_dim, start=start, padding=call["padding"])
        want = reference.debias(scores, positions, **kwargs)
        for path in ("cold", "warm"):
            got = dc.debias(scores, positions, **kwargs)
            assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device, path
            assert torch.equal(got, want), (path, call)
            if call["mode"] == "off" and mean_dim is None:
                assert got is scores                             # off: upstream's tensor itself
        if mean_dim is None:
            want_mask = reference.mask_padding(scores, positions, start=start)
            for path in ("cold", "warm"):
                assert torch.equal(dc.mask_padding(scores, positions, start=start), want_mask), (path, call)
        k = call["n"] - 1 or 1
        assert dc.keep_cap(k) == dc.keep_cap(k) == reference.keep_cap(k), call


@pytest.mark.parametrize("device", ["cpu", CUDA])
@PROFILE
@given(call=calls())
def test_debias_equals_the_reference(device, call):
    if call["form"] == "tracked":
        call = dict(call, merged=False, position_rows="1-D")    # positions() tracks one sample's raster
    _check_call(call, device)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["pad", "pos", "full"])
def test_every_form_and_mode_at_least_once(device, form, mode):
    """Hypothesis explores; this pins one padded-image call per position form and mode, batched, fp16."""
    call = dict(mode=mode, method="pdrop", rows=2 if form != "tracked" else None, form=form,
                sizes=[(640, 427), (300, 500)] if form != "tracked" else [(640, 427)], n=300,
                dtype=torch.float16, stage=1, padding=True, seed=3, position_rows="[B, N]" if form != "tracked" else "1-D",
                merged=form in ("long", "int32", "list"), mean_dim=None, queries=1, start=35)
    _check_call(call, device)


def test_the_reference_is_the_formula():
    """The reference itself, by hand on four tokens: s·w[p] + bias[p], merged token neutral, float32."""
    s = torch.tensor([2.0, 0.0, -1.0, 4.0], dtype=torch.float16)
    p = torch.tensor([0, 1, 2, -1])
    w = np.array([1.0, 0.5, 0.25])
    content = np.array([True, False, True])
    out = reference.debiased_scores(s, p, mode="full", weight=w, is_content=content)
    assert out.dtype == torch.float32
    assert out.tolist() == [2.0, float("-inf"), -0.25, 4.0]
    assert reference.debiased_scores(s, p, mode="pos", weight=w, is_content=content).tolist() == [2.0, 0.0, -0.25, 4.0]
    assert reference.debiased_scores(s, p, mode="pad", weight=w, is_content=content).tolist() == [
        2.0, float("-inf"), -1.0, 4.0]
    assert reference.debiased_scores(s, p, mode="off", weight=w, is_content=content) is s


def test_a_wrong_fast_path_would_be_caught(monkeypatch):
    """Guard against a vacuous comparison: a fast path that drops the positional weight fails the property."""
    from debias_core import site
    dc.configure(mode="full", trend=TREND, method="himap")
    call = dict(mode="full", method="himap", rows=None, form="long", sizes=[(640, 427)], n=200,
                dtype=torch.float32, stage=0, padding=True, seed=1, position_rows="1-D", merged=False,
                mean_dim=None, queries=1, start=0)
    real = site._Plan.operation

    def weight_only(self, scores, index, start=None):   # forgets the padding bias
        op = real(self, scores, index, start)
        return lambda s, i: op(s, i).nan_to_num(neginf=0.0)
    monkeypatch.setattr(site._Plan, "operation", weight_only)
    with pytest.raises(AssertionError):
        _check_call(call, "cpu")


# ------------------------------------------------------------------------------- the one cache and its bound

@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(call=calls())
def test_a_tiny_cache_bound_changes_no_result(monkeypatch, call):
    """With room for 3 entries per region the cache empties itself in the middle of building plans, shifted
    tables and warm entries: every call must still equal the reference, and no region may exceed the bound."""
    from debias_core.tables import Cache, cache
    monkeypatch.setattr(Cache, "LIMIT", 3)
    if call["form"] == "tracked":
        call = dict(call, merged=False, position_rows="1-D")
    _check_call(call, "cpu")
    assert max(len(region) for region in cache.regions()) <= 3


def test_every_region_is_bounded_and_clear_empties_all(monkeypatch):
    from debias_core.tables import Cache, cache
    monkeypatch.setattr(Cache, "LIMIT", 8)
    dc.configure(mode="full", trend=TREND, method="pdrop")
    s = torch.rand(300)
    sizes = [(640, 200 + 7 * i) for i in range(40)]                  # 40 distinct geometries
    for size in sizes:
        with dc.sample(image_size=size, span_start=35):
            dc.debias(s, torch.arange(300))
            dc.debias(s, torch.arange(300) + 35, start=35, stage=1)
            dc.mask_padding(s)
            dc.keep_cap(300)
            dc.debias(s, dc.positions(LENGTH)[torch.arange(300)], stage=1)
    assert all(len(region) <= 8 for region in cache.regions()) and cache.size() > 0, [len(r) for r in cache.regions()]
    dc.clear_cache()
    assert cache.size() == 0 and dc.cache_info() == {"hits": 0, "misses": 0, "size": 0}
