"""bench/method_study_report.py: the pieces of the study report that need no runs."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("method_study_report", ROOT / "bench" / "method_study_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rate_chosen_at_an_end_of_the_sweep_is_marked(report):
    lrs = (1e-3, 3e-3, 1e-2)
    assert report._sweep_end(3e-3, lrs) == ""  # bracketed on both sides
    assert report._sweep_end(1e-2, lrs) == " (top of the sweep)"
    assert report._sweep_end(1e-3, lrs) == " (bottom of the sweep)"
    assert report._sweep_end(1e-3, (1e-3,)) == " (the only rate tried)"
