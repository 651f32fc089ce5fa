"""The fuse cost model (hyperalign.fusecost): calls a prediction serves, when a merge pays, and the measurements."""

import pytest
import torch

from hyperalign.fusecost import PathCosts, measure_merge, measure_side, merge_pays, steps_served

# progress of each schedule sigma of a 10-step run (11 values: the last sigma has no step)
PROGRESS = [i / 10 for i in range(11)]


@pytest.mark.parametrize(
    ("mode", "keysteps", "step", "expected"),
    [
        ("S", (0.0,), 0, 1),
        ("S", (0.0,), 9, 1),
        ("I", (0.0,), 0, 10),
        ("I", (0.0,), 4, 6),
        ("P", (0.0, 0.3, 0.6), 0, 3),  # steps 0, 1, 2 (progress 0, 0.1, 0.2)
        ("P", (0.0, 0.3, 0.6), 3, 3),  # steps 3, 4, 5
        ("P", (0.0, 0.3, 0.6), 6, 4),  # steps 6 .. 9
        ("P", (0.0,), 0, 10),
    ],
)
def test_steps_served_by_mode_and_keysteps(mode, keysteps, step, expected):
    assert steps_served(mode, keysteps, PROGRESS, step) == expected


def test_steps_served_stop_at_the_end_of_the_active_window():
    assert steps_served("I", (0.0,), PROGRESS, 2, active=lambda p: p <= 0.5 + 1e-6) == 4  # steps 2 .. 5
    assert steps_served("I", (0.0,), PROGRESS, 10) == 0  # past the last step


@pytest.mark.parametrize(
    ("merge", "side", "calls", "pays"),
    [
        (1.0, 0.3, 4, True),  # 1.0 < 1.2
        (1.0, 0.3, 3, False),  # 1.0 > 0.9
        (1.0, 0.1, 9, False),
        (1.0, 0.1, 11, True),
        (0.0, 0.0, 0, False),  # no calls: nothing to pay back
    ],
)
def test_merge_pays_where_its_cost_is_below_the_side_paths_it_saves(merge, side, calls, pays):
    assert merge_pays(PathCosts(merge, side), calls) is pays


def test_the_decision_flips_at_the_break_even():
    costs = PathCosts(merge_seconds=0.25, side_seconds=0.012)  # a cold SD1.5 merge on CPU, latent 8
    assert costs.break_even() == pytest.approx(20.83, abs=0.01)
    assert not merge_pays(costs, 20) and merge_pays(costs, 21)
    # I mode: 10 steps do not pay back a merge, 30 do; S mode never at these costs
    assert not merge_pays(costs, steps_served("I", (0.0,), PROGRESS, 0))
    assert merge_pays(costs, steps_served("I", (0.0,), [i / 30 for i in range(31)], 0))
    assert PathCosts(1.0, 0.0).break_even() == float("inf")


def test_measurements_are_positive_and_leave_weights_alone():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32) for _ in range(3)]
    copies = [w.clone() for w in weights]
    groups = [(w, [(torch.randn(4, 32), torch.randn(64, 4), None)]) for w in weights]
    merge = measure_merge(groups, 0.5)
    assert merge > 0 and all(torch.equal(w, c) for w, c in zip(weights, copies))
    calls = [((2, 16, 32), torch.float32, 64, torch.randn(2, 4, 32), torch.randn(2, 64, 4), None, None)] * 3
    assert measure_side(calls, 0.5) > 0
    assert measure_side([], 0.5) == 0.0 and measure_merge([], 0.5) == 0.0


def test_measure_merge_times_a_budgeted_subset_and_scales_by_bytes(monkeypatch):
    """Never more than the budget in extra copies: with a budget of one weight, one merge is timed, scaled x3."""
    import hyperalign.fusecost as fusecost

    merged = []
    monkeypatch.setattr(fusecost, "merge_weights", lambda weight, parts, scale: merged.append(weight))
    monkeypatch.setattr(fusecost, "_seconds", lambda run, device, repeats, warm=True: (run(), 0.1)[1])
    weights = [torch.zeros(64, 32) for _ in range(3)]
    groups = [(w, [(torch.zeros(4, 32), torch.zeros(64, 4), None)]) for w in weights]
    assert measure_merge(groups, 1.0, budget_bytes=64 * 32 * 4) == pytest.approx(0.3)
    assert len(merged) == 1
