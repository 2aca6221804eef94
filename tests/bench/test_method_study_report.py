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
