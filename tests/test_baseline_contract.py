"""The baseline contract (tests/baselines/contract.py) fails on each violation it exists to catch (no probe run:
hand-made results stand in for a baseline's)."""
from __future__ import annotations

import pytest

from tests.baselines.contract import BaselineContract, Run

VALID = set(range(100))  # a padded image: tokens 100..575 are padding


class Fake(BaselineContract):
    """Hooks that return whatever the test put into ``results``."""

    def off_pair(self, results, case):
        return results["upstream"], results["ours"]

    def padded(self, results, case):
        return results["ours"], VALID, results["counts"]

    def pos_pair(self, results, case):
        return results["off"], results["pos"]

    def entry(self, results):
        return results["ours"]


GOOD = Run(kept=[[1, 2, 3], [1, 2]], tokens=[5, 6], logits={"l": [0.5, 1.0]}, extra={"k": [3, 2]})


def _with(**changes) -> Run:
    return Run(**{**GOOD.__dict__, **changes})


def test_a_conforming_baseline_passes():
    c = Fake()
    c.test_off_is_bit_identical_to_upstream({"upstream": GOOD, "ours": _with()}, "case")
    c.test_no_padding_survives_and_counts_are_capped({"ours": GOOD, "counts": [3, 2]}, "case")
    c.test_pos_moves_the_kept_set_earlier({"off": _with(kept=[[7, 8, 9], [8, 9]]), "pos": GOOD}, "case")
    c.test_real_entry_runs({"ours": GOOD})


@pytest.mark.parametrize("ours, word", [
    (_with(kept=[[1, 2, 4], [1, 2]]), "kept positions"),
    (_with(tokens=[5, 7]), "generated tokens"),
    (_with(extra={"k": [3, 3]}), "bookkeeping"),
    (_with(logits={"l": [0.5, 1.0000001]}), "logits l"),
    (_with(logits={}), "different logits"),
])
def test_off_catches_any_difference_from_upstream(ours, word):
    with pytest.raises(AssertionError, match=word):
        Fake().test_off_is_bit_identical_to_upstream({"upstream": GOOD, "ours": ours}, "case")


@pytest.mark.parametrize("run, counts, word", [
    (_with(kept=[[1, 2, 300], [1, 2]]), [3, 2], "padding tokens \\[300\\]"),
    (_with(kept=[[1, 2, 3], [1, 2]]), [3, 3], "kept 2, expected 3"),
    (_with(kept=[[1, 1, 3], [1, 2]]), [3, 2], "kept 3, expected 3"),  # a token kept twice
    (_with(), [3], "2 rankings, 1 expected counts"),
])
def test_padded_catches_padding_and_wrong_counts(run, counts, word):
    with pytest.raises(AssertionError, match=word):
        Fake().test_no_padding_survives_and_counts_are_capped({"ours": run, "counts": counts}, "case")


def test_padded_refuses_an_image_without_padding():
    class NoPad(Fake):
        def padded(self, results, case):
            return GOOD, set(range(576)), [3, 2]

    with pytest.raises(AssertionError, match="has no padding"):
        NoPad().test_no_padding_survives_and_counts_are_capped({}, "case")


def test_pos_catches_a_ranking_that_did_not_move_earlier():
    with pytest.raises(AssertionError, match="ranking 1"):
        Fake().test_pos_moves_the_kept_set_earlier({"off": _with(kept=[[7, 8, 9], [1, 2]]), "pos": GOOD}, "case")


@pytest.mark.parametrize("run, word", [
    (_with(tokens=[]), "generated no token"),
    (_with(kept=[[], []]), "ranked nothing"),
    (_with(logits={"l": [float("nan")]}), "not finite"),
])
def test_entry_catches_a_run_that_did_not_happen(run, word):
    with pytest.raises(AssertionError, match=word):
        Fake().test_real_entry_runs({"ours": run})
