"""Performance contract of the ranking-site call : tables are cached per (geometry, image
size, dtype, device); the call does no file I/O and reads no device value (no host–device sync).

"No sync" is proven on torch's ``meta`` device: a meta tensor has no data, so any .item(), .cpu(),
.tolist(), bool(), nonzero() on it raises. A TorchFunctionMode spy also lists every tensor operation
the call makes, so a failure names the offending one."""
import builtins
import io

import numpy as np
import pytest
import torch

import debias_core as dc
from debias_core import site
from tests.spy import Spy

pytestmark = pytest.mark.usefixtures("clean_debias")

SYNCING = {"item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
           "argwhere", "masked_select", "unique", "any_", "equal", "allclose"}
BUILDING = {"from_numpy", "tensor", "as_tensor", "arange", "ones", "zeros", "full", "empty", "stack", "cat"}


def run_site(scores, positions=None, k=400):
    out = dc.debias(scores, positions)
    return out, dc.keep_cap(k)


# ------------------------------------------------------------------------------- cache

def test_cache_is_hit_on_repeated_calls():
    dc.configure(mode="full", trend="paper:himap/gqa")
    s = torch.rand(576)
    with dc.sample(image_size=(640, 427)):
        run_site(s)
        first = dc.cache_info()
        assert first["misses"] > 0
        for _ in range(5):
            run_site(torch.rand(576))
        again = dc.cache_info()
    assert again["misses"] == first["misses"] and again["size"] == first["size"]
    assert again["hits"] >= first["hits"] + 5 * 2        # the sample's plan (weight + padding) and the keep count
    # a new sample with the same image size reuses them too
    with dc.sample(image_size=(640, 427), span_start=40):
        run_site(s)
    assert dc.cache_info()["misses"] == first["misses"]


def test_switching_modes_rebuilds_nothing():
    """Alternating off/full with configure (as the benchmark and the eval driver do) reuses the trend object,
    its device tables and the sample's plan: no table is built after the first full call."""
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    s = torch.rand(1, 300)
    pos = torch.randperm(576)[:300].unsqueeze(0)
    with dc.sample(image_size=(640, 480)):
        run_site(s, pos)
    first = dc.cache_info()["misses"]
    for _ in range(3):
        dc.configure(mode="off")
        with dc.sample(image_size=(640, 480)):
            run_site(s, pos)
        dc.configure(mode="full")
        with dc.sample(image_size=(640, 480)):
            run_site(s, pos)
        dc.configure(mode="full", trend="paper:pdrop/gqa")  # naming the same preset again, too
        with dc.sample(image_size=(640, 480)):
            run_site(s, pos)
    assert dc.cache_info()["misses"] == first
    assert dc.settings().trend_spec == "paper:pdrop/gqa"
    assert len(site._plans) == 1                         # one plan, found again after every switch


@pytest.mark.parametrize("change", ["image size", "dtype", "threshold", "grid"])
def test_new_key_builds_new_tables_once(change):
    dc.configure(mode="full", trend="paper:himap/gqa")
    base = dict(size=(640, 427), dtype=torch.float32, grid=(24, 336))
    with dc.sample(image_size=base["size"]):
        run_site(torch.rand(576, dtype=base["dtype"]))
    before = dc.cache_info()["misses"]
    size, dtype, (grid, res) = base["size"], base["dtype"], base["grid"]
    if change == "image size":
        size = (500, 375)
    elif change == "dtype":
        dtype = torch.float64
    elif change == "threshold":
        dc.configure(method="pdrop")
    else:
        grid, res = 16, 224
    n = grid * grid
    trend = dc.ExponentialTrend(a=1.0, b=0.002, n=n) if grid != 24 else None
    if trend:
        dc.configure(trend=trend)
    for _ in range(3):
        with dc.sample(image_size=size, grid=grid, resolution=res):
            run_site(torch.rand(n, dtype=dtype))
        if _ == 0:
            after_first = dc.cache_info()["misses"]
    assert after_first > before                          # the new key was built ...
    assert dc.cache_info()["misses"] == after_first      # ... once


def test_clear_cache():
    dc.configure(mode="pad")
    with dc.sample(image_size=(640, 427)):
        run_site(torch.rand(576))
    assert dc.cache_info()["size"] > 0
    dc.clear_cache()
    assert dc.cache_info() == {"hits": 0, "misses": 0, "size": 0}


# ------------------------------------------------------------------------------- no sync

@pytest.mark.parametrize("mode", ["pad", "pos", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_meta_tensors_single_sample(mode, dtype):
    dc.configure(mode=mode, trend="paper:himap/gqa")
    s = torch.empty(576, dtype=dtype, device="meta")
    with dc.sample(image_size=(640, 427), span_start=35):
        with Spy() as spy:
            out, k = run_site(s)
            out2 = dc.debias(s[:200], torch.empty(200, dtype=torch.long, device="meta"), stage=1)
            masked = dc.mask_padding(s)
    assert out.device.type == "meta" and out.shape == (576,) and out2.shape == (200,) and masked.shape == (576,)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert k == (384 if mode != "pos" else 400)
    assert not SYNCING & set(spy.ops), f"syncing ops on the hot path: {SYNCING & set(spy.ops)}"


def test_meta_tensors_batch_with_per_sample_contexts():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    s = torch.empty(3, 576, dtype=torch.float16, device="meta")
    pos = torch.empty(3, 576, dtype=torch.long, device="meta")
    with dc.sample(image_size=[(640, 427), (500, 500), None]):
        with Spy() as spy:
            out = dc.debias(s, pos)
            k = dc.keep_cap(500)
            out_shared = dc.debias(s, pos[0])
    assert out.shape == (3, 576) and out_shared.shape == (3, 576) and out.device.type == "meta"
    assert k == 360
    assert not SYNCING & set(spy.ops), SYNCING & set(spy.ops)


def test_warm_call_builds_nothing_and_reads_nothing():
    """After the first call, a call only gathers, multiplies and masks: no table is rebuilt from host data."""
    dc.configure(mode="full", trend="paper:himap/gqa")
    s = torch.empty(2, 576, dtype=torch.float16, device="meta")
    pos = torch.empty(2, 576, dtype=torch.long, device="meta")
    with dc.sample(image_size=[(640, 427), (400, 200)]):
        run_site(s, pos)
        with Spy() as spy:
            run_site(s, pos)
    assert not (SYNCING | BUILDING) & set(spy.ops), (SYNCING | BUILDING) & set(spy.ops)


def test_debias_check_is_ignored_for_meta(monkeypatch):
    """DEBIAS_CHECK=1 asks for value checks on accelerator tensors; a meta tensor has no values to check."""
    monkeypatch.setenv("DEBIAS", "pad")
    monkeypatch.setenv("DEBIAS_CHECK", "1")
    dc.reset()
    with dc.sample(image_size=(640, 427)):
        assert dc.debias(torch.empty(576, device="meta")).shape == (576,)


def test_the_spy_would_catch_a_sync():
    """Guard against a vacuous spy: the CPU path does read values (its checks), and the spy sees that."""
    dc.configure(mode="pad")
    with dc.sample(image_size=(640, 427)):
        with Spy() as spy:
            dc.debias(torch.rand(576), torch.arange(576))
    assert SYNCING & set(spy.ops)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.empty(3, device="meta").max().item()


def test_keep_cap_never_touches_a_tensor():
    dc.configure(mode="full", trend="paper:himap/gqa")
    with dc.sample(image_size=(1000, 101)):
        with Spy() as spy:
            assert dc.keep_cap(100) == 48
    assert spy.ops == []


# ------------------------------------------------------------------------------- no file I/O

def test_no_file_io_during_the_call(monkeypatch):
    trend = dc.ExponentialTrend(a=1.0, b=0.002, n=576)
    dc.configure(mode="full", trend=trend)         # settings resolved before the hot path

    def refuse(*a, **k):
        raise AssertionError(f"file I/O on the hot path: {a!r}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    with dc.sample(image_size=(640, 427)):         # first call: tables built from geometry and parameters
        out, k = run_site(torch.rand(576))
        out, k = run_site(torch.rand(2, 576))
    assert k == 384 and torch.isneginf(out).sum() == 2 * (576 - 384)


# ------------------------------------------------------------------------------- CUDA (GPU machines only)

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device: the sync-free contract was checked on meta tensors only")


@cuda
@pytest.mark.parametrize("mode", ["pad", "pos", "full"])
def test_cuda_calls_never_synchronise(mode):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising CUDA call — cold calls
    (tables built and uploaded) and warm calls alike."""
    dc.configure(mode=mode, trend="paper:himap/gqa")
    dev = torch.device("cuda")
    s1 = torch.rand(576, device=dev, dtype=torch.float16)
    sb = torch.rand(2, 576, device=dev, dtype=torch.bfloat16)
    pos = torch.randperm(576, device=dev)[:300].repeat(2, 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            with dc.sample(image_size=(640, 427)):
                a, k1 = run_site(s1)
                dc.debias(s1[:300], list(range(300)))       # host positions: uploaded without a sync
            with dc.sample(image_size=[(333, 500), (500, 500)]):
                b, k2 = run_site(sb[:, :300], pos)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert a.device.type == "cuda" and b.shape == (2, 300)
    assert (k1, k2) == ((384, 384) if mode != "pos" else (400, 400))


@cuda
def test_cuda_results_equal_cpu_results():
    dc.configure(mode="full", trend="paper:fastv")
    s = torch.rand(2, 576, dtype=torch.float32)
    pos = torch.stack([torch.randperm(576)[:200], torch.randperm(576)[:200]])
    pos[0, :5] = -1
    with dc.sample(image_size=[(640, 427), (200, 400)]):
        cpu = dc.debias(s[:, :200], pos)
        gpu = dc.debias(s[:, :200].cuda(), pos.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


@cuda
def test_cuda_checks_only_with_debias_check(monkeypatch):
    s = torch.ones(576, device="cuda")
    s[9] = float("nan")
    monkeypatch.setenv("DEBIAS", "pad")
    dc.reset()
    with dc.sample(image_size=(640, 427)):
        dc.debias(s)                                  # no check: no sync, the NaN passes through
        monkeypatch.setenv("DEBIAS_CHECK", "1")
        dc.reset()
        with pytest.raises(dc.DebiasError, match="nan at index 9"):
            dc.debias(s)


# ------------------------------------------------------------------------------- the fast path

def _no_full_path(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the call took the full path")
    monkeypatch.setattr(site, "_apply", refuse)
    monkeypatch.setattr(site, "required_samples", refuse)


@pytest.mark.parametrize("mode", ["pad", "pos", "full"])
@pytest.mark.parametrize("case", ["raster", "positions", "positions 2-D", "batch", "batch, two images"])
def test_fast_path_equals_full_path(monkeypatch, mode, case):
    """The second call with the same key takes the fast path (the full path is made to fail) and returns
    exactly what the full path returned, for every layout of scores and positions."""
    dc.configure(mode=mode, trend="paper:pdrop/gqa", method="pdrop")
    g = torch.Generator().manual_seed(0)
    sizes = [(640, 427), (300, 500)] if case == "batch, two images" else (640, 427)
    rows = 2 if case.startswith("batch") else 1 if case == "positions 2-D" else None
    shape = (rows, 300) if rows else (300,)
    pos = None if case == "raster" else torch.randperm(576, generator=g)[:300]
    if pos is not None and case != "positions":
        pos = pos.unsqueeze(0).expand(rows or 1, -1).contiguous()
    pos_b = None if pos is None else pos.clone()
    if pos_b is not None:
        pos_b[..., :5] = -1                               # merged tokens take the neutral slot
    results = []
    for call in range(2):
        if call == 1:
            _no_full_path(monkeypatch)
        with dc.sample(image_size=sizes):
            s = torch.rand(shape, generator=torch.Generator().manual_seed(call))
            results.append((s, dc.debias(s, pos_b), dc.mask_padding(s, pos_b), dc.keep_cap(500)))
    monkeypatch.undo()
    s, fast, fast_mask, fast_k = results[1]
    dc.clear_cache()                                       # the reference: a cold, full-path call
    with dc.sample(image_size=sizes):
        ref, ref_mask, ref_k = dc.debias(s, pos_b), dc.mask_padding(s, pos_b), dc.keep_cap(500)
    assert torch.equal(fast, ref) and torch.equal(fast_mask, ref_mask) and fast_k == ref_k


def test_fast_path_still_checks_values_on_cpu():
    dc.configure(mode="full", trend="paper:pdrop/gqa")
    pos = torch.arange(300)
    with dc.sample(image_size=(640, 427)):
        dc.debias(torch.rand(300), pos)
        with pytest.raises(dc.DebiasError, match="nan"):
            dc.debias(torch.full((300,), float("nan")), pos)
        with pytest.raises(dc.DebiasError, match="outside the visual span"):
            dc.debias(torch.rand(300), torch.arange(300) + 400)


@pytest.mark.parametrize("change", ["settings", "sample", "stage", "shape", "dtype", "positions dtype"])
def test_fast_path_is_left_when_anything_in_its_key_changes(change):
    dc.configure(mode="full", trend="paper:pdrop/gqa")
    s, pos, stage = torch.rand(300), torch.randperm(576)[:300], 0
    size = (640, 427)
    with dc.sample(image_size=size):
        first = dc.debias(s, pos, stage=stage)
    if change == "settings":
        dc.configure(mode="pad")
    elif change == "sample":
        size = (427, 640)
    elif change == "stage":
        dc.configure(trend=dc.StagedTrend({0: dc.ExponentialTrend(1.0, 0.001, 576),
                                          1: dc.ExponentialTrend(1.0, 0.01, 576)}))
        with dc.sample(image_size=size):
            first = dc.debias(s, pos, stage=0)
        stage = 1
    elif change == "shape":
        s, pos = s[:200], pos[:200]
        first = first[:200]
    elif change == "dtype":
        s = s.double()
    else:
        pos = pos.int()
    with dc.sample(image_size=size):
        again = dc.debias(s, pos, stage=stage)
    dc.clear_cache()
    with dc.sample(image_size=size):
        ref = dc.debias(s, pos, stage=stage)
    assert torch.equal(again, ref)
    if change != "positions dtype" and change != "shape":
        assert not torch.equal(again.float(), first.float())   # the change mattered: a stale entry would show


def test_keep_cap_fast_path_follows_settings_and_samples():
    dc.configure(mode="full", trend="paper:pdrop/gqa", method="pdrop")
    with dc.sample(image_size=(640, 427)):
        a = dc.keep_cap(576), dc.keep_cap(576)
    with dc.sample(image_size=(640, 240)):
        b = dc.keep_cap(576)
    dc.configure(method="himap")                          # another threshold
    with dc.sample(image_size=(640, 427)):
        c = dc.keep_cap(576)
    dc.configure(mode="pos")
    with dc.sample(image_size=(640, 427)):
        d = dc.keep_cap(576)
    assert a[0] == a[1] < 576 and b < a[0] and c != a[0] and d == 576
    with dc.sample(image_size=(640, 427)):
        with pytest.raises(dc.DebiasError):
            dc.keep_cap(0)
