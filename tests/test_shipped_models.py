"""Every shipped student loads through ``hasten.load_pipeline`` and reproduces the check metrics its folder
records (``scripts/card_check.py``), within what float rounding on another CPU can move."""

from __future__ import annotations

import json

import pytest

import hasten
from hasten.distill.student import shipped_students
from hasten.eval.shapes_eval import CHECK_FILE, card_check
from hasten.pipeline import EMBEDDED


def test_both_students_are_shipped():
    assert {"shapes-ard4", "shapes-flash"} <= set(shipped_students())


@pytest.mark.parametrize("name", shipped_students())
def test_a_shipped_student_reproduces_its_cards_check_metrics(name):
    pipe = hasten.load_pipeline(name)
    recorded = json.loads((EMBEDDED[name] / CHECK_FILE).read_text())  # every shipped student records them
    assert [r["steps"] for r in recorded] == list(pipe.step_counts)
    for want in recorded:
        got = card_check(pipe, want["steps"], want["samples"], want["noise_seed"])
        # rounding differences can flip a borderline image or two; anything larger is a different model
        assert abs(got["adherence"] - want["adherence"]) <= 0.02, (want, got)
        assert got["fd_shapes"] == pytest.approx(want["fd_shapes"], rel=0.02), (want, got)
