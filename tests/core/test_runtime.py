"""AlignRun.factors_at: the per-run S/I/P decision both hosts share (hyperalign.runtime)."""

import pytest
import torch

from hyperalign import AlignRun


class CountingPredictor:
    """Stands in for the hypernet: each call returns new, distinguishable factors."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        down = torch.full((1, 2, 3), float(self.calls))
        up = torch.full((1, 4, 2), float(self.calls))
        return {"t": (down, up)}


def run_evaluations(run, evaluations):
    """Feed (step, progress) model evaluations; return the steps at which the hypernet ran and the factors used."""
    predictor = CountingPredictor()
    used = [run.factors_at(step, progress, predictor)["t"][0][0, 0, 0].item() for step, progress in evaluations]
    return [c.step for c in run.calls], used, predictor.calls


def first_order(steps, start=0.0):
    return [(i, start + (1 - start) * i / steps) for i in range(steps)]


def second_order(steps):
    """Heun-style: two evaluations per step, the second at the step's end-point progress."""
    return [(i, p) for i in range(steps) for p in (i / steps, (i + 1) / steps)]


RUN_TABLE = [
    # mode, keysteps, evaluations, steps at which the hypernet ran
    ("S", (0.0,), first_order(1), [0]),
    ("I", (0.0,), first_order(1), [0]),
    ("P", (0.0, 0.5), first_order(1), [0]),
    ("S", (0.0,), first_order(2), [0, 1]),
    ("I", (0.0,), first_order(2), [0]),
    ("P", (0.0, 0.5), first_order(2), [0, 1]),
    ("S", (0.0,), first_order(20), list(range(20))),
    ("I", (0.0, 0.5), first_order(20), [0]),
    ("P", (0.0, 0.25, 0.5, 0.75), first_order(20), [0, 5, 10, 15]),
    ("S", (0.0,), second_order(4), [0, 1, 2, 3]),  # reuses within a step
    ("I", (0.0,), second_order(4), [0]),
    # P: an intermediate evaluation that crosses a keystep still reuses the step's LoRA
    ("P", (0.0, 0.3), second_order(4), [0, 2]),
    ("P", (0.0, 0.25), second_order(4), [0, 1]),
    # partial denoise from progress 0.4: P predicts at the first step, inside segment 1
    ("P", (0.0, 0.25, 0.55, 0.85), first_order(6, 0.4), [0, 2, 5]),
    ("I", (0.0, 0.25, 0.55), first_order(6, 0.4), [0]),
    # repeated progress values
    ("P", (0.0, 0.5), [(0, 0.0), (1, 0.5), (2, 0.5), (3, 0.75)], [0, 1]),
    ("S", (0.0, 0.5), [(0, 0.0), (1, 0.5), (2, 0.5), (3, 0.75)], [0, 1, 2, 3]),
]


@pytest.mark.parametrize("mode, keysteps, evaluations, expected", RUN_TABLE)
def test_factors_at(mode, keysteps, evaluations, expected):
    run = AlignRun(mode, keysteps)
    steps, used, calls = run_evaluations(run, evaluations)
    assert steps == expected
    assert calls == len(expected)
    # every evaluation uses the factors of the latest prediction at or before its step
    latest = {step: index + 1 for index, step in enumerate(expected)}
    current = 0
    for (step, _), value in zip(evaluations, used):
        current = latest.get(step, current)
        assert value == current


def test_summary_counts_calls():
    run = AlignRun("P", (0.0, 0.5))
    run_evaluations(run, first_order(4))
    assert run.summary().startswith("mode P: 2 hypernet call(s) at step(s) [0,2], ")


def test_collect_stats_compares_with_the_first_prediction():
    run = AlignRun("S", (0.0,), collect_stats=True)
    run_evaluations(run, first_order(3))
    first, later = run.calls[0].stats, run.calls[2].stats
    assert first["cosine"] == pytest.approx(1.0) and first["relative_change"] == pytest.approx(0.0)
    # call k's delta is up @ down = 2 k^2 everywhere (CountingPredictor): the third is 9x the first, same direction
    assert later["norm"] == pytest.approx(9 * first["norm"]) and later["cosine"] == pytest.approx(1.0)
    assert later["relative_change"] == pytest.approx(8.0)


def test_without_stats_no_stats_are_kept():
    run = AlignRun("S")
    run_evaluations(run, first_order(2))
    assert all(c.stats is None for c in run.calls)


@pytest.mark.parametrize(
    "mode, keysteps, message",
    [
        ("Q", (0.0,), "unknown mode 'Q'"),
        ("P", (0.2, 0.5), "first keystep must be 0"),
        ("P", (0.0, 0.5, 0.5), "strictly increasing"),
        ("P", (), "non-empty"),
    ],
)
def test_bad_run_settings(mode, keysteps, message):
    with pytest.raises(ValueError, match="HyperAlign: .*" + message):
        AlignRun(mode, keysteps)


def test_keysteps_string_is_accepted():
    assert AlignRun("P", "0, 0.5").keysteps == (0.0, 0.5)
