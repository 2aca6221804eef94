"""bench/method_study_report.py: the pieces of the study report that need no runs."""

from __future__ import annotations

import pytest

from tests.helpers import load_script


@pytest.fixture(scope="module")
def report():
    return load_script("bench/method_study_report.py")


def test_a_rate_chosen_at_an_end_of_the_sweep_is_marked(report):
    lrs = (1e-3, 3e-3, 1e-2)
    assert report._sweep_end(3e-3, lrs) == ""  # bracketed on both sides
    assert report._sweep_end(1e-2, lrs) == " (top of the sweep)"
    assert report._sweep_end(1e-3, lrs) == " (bottom of the sweep)"
    assert report._sweep_end(1e-3, (1e-3,)) == " (the only rate tried)"


def _run_with_ess(router: list[float], weight: list[float]) -> dict:
    """A run whose trace at layer "29" has these per-step router and applied-weight ESS values."""
    steps = [{"router_ess": {"29": r}, "weight_ess": {"29": w}} for r, w in zip(router, weight, strict=True)]
    return {"trace": {"steps": steps}}


def _collapse_cell(report, softmax_router: list[float], remix_router: list[float]) -> str:
    """The last cell of the collapse row for one softmax run and one ReMix run (10 steps at each end)."""
    methods = [type("M", (), {"name": n})() for n in ("softmax-k2", "remix-k2-M4")]
    final = {"softmax-k2": ["s"], "remix-k2-M4": ["r"]}
    evals = {"s": {"served": {"accuracy_mean": 0.3}}, "r": {"served": {"accuracy_mean": 0.4}}}
    runs = {
        "s": _run_with_ess(softmax_router, [1.9] * 10 + [1.2] * 10),
        "r": _run_with_ess(remix_router, [2.0] * 20),
    }
    row = report._claims(methods, final, evals, runs, "29")[-1]  # after the accuracy row of these two methods
    assert "the softmax router's ESS collapses" in row
    return row.rstrip(" |").rsplit(" | ", 1)[1]


@pytest.mark.parametrize(
    ("softmax", "remix", "verdict"),
    [
        ([7.0] * 10 + [1.5] * 10, [7.0] * 10 + [5.0] * 10, "yes"),  # softmax halves, ReMix does not
        (
            [7.0] * 10 + [1.5] * 10,
            [7.0] * 10 + [1.7] * 10,
            "no: both routers concentrate; only the weights applied differ",
        ),  # both halve
        ([7.0] * 10 + [5.0] * 10, [7.0] * 10 + [6.0] * 10, "it falls, no collapse"),  # falls, less than half
        ([7.0] * 10 + [7.5] * 10, [7.0] * 10 + [6.0] * 10, "no"),  # softmax does not fall at all
    ],
)
def test_collapse_row_says_yes_only_when_softmax_halves_and_remix_does_not(report, softmax, remix, verdict):
    assert _collapse_cell(report, softmax, remix) == verdict
