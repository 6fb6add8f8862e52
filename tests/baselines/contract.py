"""The contract every patched baseline satisfies, written once; each baseline supplies its probe and specifics.

A baseline's test module (tests/baselines/test_<prefix>.py) runs its probe (tests/baselines/<prefix>_probe.py)
on the pristine and the patched tree in subprocesses, and declares one class over the results:

    from tests.baselines.contract import BaselineContract, Run, pytest_generate_tests  # noqa: F401 (the hook)

    @pytest.fixture(scope="module")
    def results(runs):                      # what the hooks receive: the module's probe results
        return runs

    class TestContract(BaselineContract):
        off_cases = ["640x200", ...]        # DEBIAS=off, upstream vs ours
        padded_cases = ["full-640x200", ...]  # pad / full on images with padding
        pos_cases = ["flat", ...]           # off vs pos where the positional weight must move the kept set

        def off_pair(self, results, case) -> tuple[Run, Run]: ...       # (upstream, ours)
        def padded(self, results, case) -> tuple[Run, set, list]: ...    # (ours, valid positions, expected counts)
        def pos_pair(self, results, case) -> tuple[Run, Run]: ...       # (off, pos) on the same input
        def entry(self, results) -> Run: ...                             # the patched module's real entry

and, optionally, ``check_off`` / ``check_padded`` / ``check_pos`` / ``check_entry`` for what only that baseline
has (its own bookkeeping: decode positions, merge counts, budgets). The contract, per case:

- ``off`` is bit-identical to upstream: the same kept positions at every ranking, the same generated tokens,
  the same bookkeeping (``Run.extra``) and the same fp32 logits;
- ``pad`` / ``full`` keep no padding token at any ranking, each ranking keeps exactly its expected (capped)
  count, no ranking exceeds the real tokens, and no token is kept twice;
- ``pos`` moves the kept set to earlier positions: at every ranking the mean kept position decreases;
- the real entry (generate through the baseline's own code) runs: tokens generated, finite logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass
class Run:
    """One probe run, in the contract's terms.

    kept:   the kept original (raster) positions of each ranking, in the order they ran (stages × decode steps);
            0..575 for LLaVA-1.5's 24×24 grid (``BaselineContract.span``)
    tokens: generated token ids
    logits: name -> fp32 tensor (or nested list), compared bit for bit in ``off``
    extra:  anything else that must equal upstream in ``off`` (per-layer lengths, decode positions, counts)
    """
    kept: list[list[int]]
    tokens: list = field(default_factory=list)
    logits: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


CASE_LISTS = {"off_case": "off_cases", "padded_case": "padded_cases", "pos_case": "pos_cases"}


def pytest_generate_tests(metafunc):
    """Parametrise the contract's tests with the cases the baseline's class lists (import this hook into the
    test module)."""
    for arg, attr in CASE_LISTS.items():
        if arg in metafunc.fixturenames and metafunc.cls is not None:
            cases = list(getattr(metafunc.cls, attr))
            assert cases, f"{metafunc.cls.__name__}.{attr} is empty: the contract needs at least one case"
            metafunc.parametrize(arg, cases)


def _as_tensor(value):
    import torch
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float32)


def _mean(positions):
    return sum(positions) / len(positions)


class BaselineContract:
    """Base of a baseline's ``TestContract``; see the module docstring."""

    off_cases: list = []
    padded_cases: list = []
    pos_cases: list = []
    span = 576  # visual tokens ranked (LLaVA-1.5's 24×24 grid)
    has_padding = True  # False: the inputs have no padding (video: centre crop); pad/full must then change nothing

    # --------------------------------------------------------------------------- supplied by the baseline
    def off_pair(self, results, case) -> tuple[Run, Run]:
        raise NotImplementedError

    def padded(self, results, case) -> tuple[Run, set, list]:
        raise NotImplementedError

    def pos_pair(self, results, case) -> tuple[Run, Run]:
        raise NotImplementedError

    def entry(self, results) -> Run:
        raise NotImplementedError

    def check_off(self, results, case, upstream: Run, ours: Run) -> None:
        """Specifics of ``off`` (e.g. upstream's own counts)."""

    def check_padded(self, results, case, run: Run, valid: set) -> None:
        """Specifics of pad/full (e.g. the capped counts drive later stages and decode positions)."""

    def check_pos(self, results, case, off: Run, pos: Run) -> None:
        """Specifics of pos (e.g. exactly the earliest k positions on tied scores)."""

    def check_entry(self, results, run: Run) -> None:
        """Specifics of the real entry."""

    # --------------------------------------------------------------------------- the contract
    def test_off_is_bit_identical_to_upstream(self, results, off_case):
        import torch

        upstream, ours = self.off_pair(results, off_case)
        assert upstream.kept, f"{off_case}: the probe recorded no ranking, so there is nothing to compare"
        assert ours.kept == upstream.kept, f"{off_case}: kept positions differ from upstream"
        assert ours.tokens == upstream.tokens, f"{off_case}: generated tokens differ from upstream"
        assert ours.extra == upstream.extra, f"{off_case}: bookkeeping differs from upstream"
        assert sorted(ours.logits) == sorted(upstream.logits), f"{off_case}: different logits recorded"
        for name in upstream.logits:
            assert torch.equal(_as_tensor(ours.logits[name]), _as_tensor(upstream.logits[name])), (
                f"{off_case}: logits {name} differ from upstream")
        self.check_off(results, off_case, upstream, ours)

    def test_no_padding_survives_and_counts_are_capped(self, results, padded_case):
        run, valid, counts = self.padded(results, padded_case)
        if self.has_padding:
            assert len(valid) < self.span, f"{padded_case}: the image has no padding, so this case cannot test suppression"
        assert len(run.kept) == len(counts), f"{padded_case}: {len(run.kept)} rankings, {len(counts)} expected counts"
        for i, (kept, k) in enumerate(zip(run.kept, counts)):
            padding = sorted(set(kept) - valid)
            assert not padding, f"{padded_case}: padding tokens {padding[:10]} survived ranking {i}"
            assert len(kept) == len(set(kept)) == k, f"{padded_case}: ranking {i} kept {len(kept)}, expected {k}"
            assert k <= len(valid), f"{padded_case}: ranking {i} expects {k} > {len(valid)} real tokens"
        self.check_padded(results, padded_case, run, valid)

    def test_pos_moves_the_kept_set_earlier(self, results, pos_case):
        off, pos = self.pos_pair(results, pos_case)
        assert off.kept and len(off.kept) == len(pos.kept), f"{pos_case}: rankings differ in number"
        for i, (a, b) in enumerate(zip(off.kept, pos.kept)):
            assert _mean(b) < _mean(a), (f"{pos_case}: ranking {i}: pos kept mean position {_mean(b):.1f}, "
                                         f"off {_mean(a):.1f}")
        self.check_pos(results, pos_case, off, pos)

    def test_real_entry_runs(self, results):
        import torch

        run = self.entry(results)
        assert run.tokens, "the real entry generated no token"
        assert any(run.kept), "the real entry ranked nothing"  # one ranking may keep none (an empty recycle)
        for name, value in run.logits.items():
            assert torch.isfinite(_as_tensor(value)).all(), f"real entry: logits {name} are not finite"
        self.check_entry(results, run)


def skip_unless(condition: bool, why: str) -> None:
    """Skip a contract case that does not apply to this baseline, saying why (e.g. no logits recorded)."""
    if not condition:
        pytest.skip(why)
