"""The S/I/P rule (AlignRun, over first-order runs), keystep strings, step location, progress and keystep
discovery (hyperalign.schedule), as tables."""

import math

import pytest
import torch

from hyperalign.runtime import AlignRun
from hyperalign.schedule import (
    discover_keysteps,
    format_keysteps,
    locate_step,
    parse_keysteps,
    progress_of_timestep,
    segment_of,
    validate_keysteps,
)


def uniform(steps, start=0.0, stop=1.0):
    """Progress at the start of each of `steps` steps between start and stop."""
    return [start + (stop - start) * i / steps for i in range(steps)]


def predicted_steps(mode, keysteps, progress):
    """The steps of a first-order run (one model evaluation per step, at `progress`) where the hypernet runs."""
    run = AlignRun(mode, keysteps)
    for step, p in enumerate(progress):
        run.factors_at(step, p, dict)
    return [call.step for call in run.calls]


RULE_TABLE = [
    # mode, keysteps, progress per step, steps where the hypernet runs
    ("S", (0.0,), [0.0], [0]),
    ("I", (0.0,), [0.0], [0]),
    ("P", (0.0, 0.5), [0.0], [0]),
    ("S", (0.0,), [0.0, 0.5], [0, 1]),
    ("I", (0.0, 0.5), [0.0, 0.5], [0]),
    ("P", (0.0, 0.5), [0.0, 0.5], [0, 1]),
    ("P", (0.0,), [0.0, 0.5], [0]),
    ("P", (0.0, 0.75), [0.0, 0.5], [0]),
    ("S", (0.0,), uniform(20), list(range(20))),
    ("I", (0.0,), uniform(20), [0]),
    ("P", (0.0, 0.25, 0.5, 0.75), uniform(20), [0, 5, 10, 15]),
    ("P", (0.0, 0.3, 0.62), uniform(50), [0, 15, 31]),
    ("S", (0.0,), uniform(50), list(range(50))),
    ("I", (0.0, 0.3), uniform(50), [0]),
    # keysteps at the edges: exactly on a step, just after the last step, just after the first
    ("P", (0.0, 0.05), uniform(20), [0, 1]),
    ("P", (0.0, 0.95), uniform(20), [0, 19]),
    ("P", (0.0, 0.951), uniform(20), [0]),
    ("P", (0.0, 0.999), uniform(20), [0]),
    ("P", (0.0, 0.001), uniform(20), [0, 1]),
    # float noise from sigma -> progress conversions: 0.25 - 1e-9 still counts as reaching 0.25
    ("P", (0.0, 0.25), [0.0, 0.25 - 1e-9, 0.5], [0, 1]),
    # repeated progress values (repeated sigmas in a schedule)
    ("P", (0.0, 0.5), [0.0, 0.5, 0.5, 0.75], [0, 1]),
    ("S", (0.0, 0.5), [0.0, 0.5, 0.5, 0.75], [0, 1, 2, 3]),
    ("I", (0.0, 0.5), [0.0, 0.0, 0.5], [0]),
    ("P", (0.0, 0.5), [0.0, 0.0, 0.0], [0]),
    # partial denoise / split run starting at progress 0.4: P predicts at its first step inside a segment
    ("P", (0.0, 0.25, 0.55, 0.85), [0.4, 0.5, 0.6, 0.7, 0.8, 0.9], [0, 2, 5]),
    ("P", (0.0, 0.25), uniform(6, 0.4), [0]),
    ("I", (0.0, 0.25, 0.55), uniform(6, 0.4), [0]),
    ("S", (0.0, 0.25, 0.55), uniform(6, 0.4), list(range(6))),
    # an empty run plans nothing
    ("S", (0.0,), [], []),
]


@pytest.mark.parametrize("mode, keysteps, progress, expected", RULE_TABLE)
def test_the_rule_predicts_at(mode, keysteps, progress, expected):
    assert predicted_steps(mode, keysteps, progress) == expected


def test_the_rule_rejects_unknown_mode():
    with pytest.raises(ValueError, match="HyperAlign: unknown mode 'X'"):
        AlignRun("X", (0.0,))


@pytest.mark.parametrize(
    "timestep, num_train_timesteps, progress",
    [
        (999, 1000, 0.0),
        (0, 1000, 1.0),
        (749, 1000, 250 / 999),
        (499.5, 1000, 0.5),
        (1.0, None, 0.0),
        (0.25, None, 0.75),
    ],
)
def test_progress_of_timestep(timestep, num_train_timesteps, progress):
    assert progress_of_timestep(timestep, num_train_timesteps) == pytest.approx(progress, abs=1e-12)
    as_tensor = progress_of_timestep(torch.tensor([float(timestep)], dtype=torch.float64), num_train_timesteps)
    assert as_tensor.tolist() == pytest.approx([progress], abs=1e-12)


@pytest.mark.parametrize(
    "progress, keysteps, segment",
    [
        (0.0, (0.0,), 0),
        (0.99, (0.0,), 0),
        (0.29, (0.0, 0.3, 0.6), 0),
        (0.3, (0.0, 0.3, 0.6), 1),
        (0.3 - 1e-7, (0.0, 0.3, 0.6), 1),
        (0.6, (0.0, 0.3, 0.6), 2),
        (1.0, (0.0, 0.3, 0.6), 2),
    ],
)
def test_segment_of(progress, keysteps, segment):
    assert segment_of(progress, keysteps) == segment


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", (0.0,)),
        ("0, 0.25, 0.6", (0.0, 0.25, 0.6)),
        ("0;0.5", (0.0, 0.5)),
        (" 0 ,0.1, ", (0.0, 0.1)),
        ("0, 1e-3", (0.0, 0.001)),
    ],
)
def test_parse_keysteps(text, expected):
    assert parse_keysteps(text) == expected


@pytest.mark.parametrize("keysteps", [(0.0,), (0.0, 0.25, 0.6), (0.0, 0.1234, 0.5, 0.99)])
def test_format_parse_round_trip(keysteps):
    text = format_keysteps(keysteps)
    assert parse_keysteps(text) == keysteps
    assert validate_keysteps(text) == keysteps


def test_format_keysteps_text():
    assert format_keysteps((0.0, 0.25, 0.6)) == "0, 0.25, 0.6"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "non-empty"),
        ("   ,  ", "non-empty"),
        ("a, b", "not a comma-separated list of numbers"),
        ("0, 0.5x", "not a comma-separated list of numbers"),
        ("0, 0.5, 0.5", "strictly increasing"),
        ("0, 0.6, 0.3", "strictly increasing"),
        ("0.1, 0.5", "first keystep must be 0"),
        ("0, nan", r"fractions in \[0, 1\)"),
        ("0, inf", r"fractions in \[0, 1\)"),
        ("0, 1", r"fractions in \[0, 1\)"),
        ("0, 1.5", r"fractions in \[0, 1\)"),
        ("-0.1, 0", r"fractions in \[0, 1\)"),
    ],
)
def test_bad_keystep_strings(text, message):
    with pytest.raises(ValueError, match="HyperAlign: .*" + message):
        parse_keysteps(text)


@pytest.mark.parametrize(
    "keysteps, message",
    [
        ([], "non-empty"),
        (None, "non-empty"),
        (0.5, "non-empty"),
        ([0.0, math.nan], "fractions"),
        ([0.0, -math.inf], "fractions"),
        ([0.0, True], "fractions"),
        ([0.0, "0.5"], "fractions"),
        ([0.0, None], "fractions"),
        ([0.0, 0.5, 0.4], "strictly increasing"),
        ([0.0, 0.0], "strictly increasing"),
        ([0.2], "first keystep must be 0"),
        ([0.0, 1.0], "fractions"),
    ],
)
def test_bad_keystep_values(keysteps, message):
    with pytest.raises(ValueError, match="HyperAlign: .*" + message):
        validate_keysteps(keysteps)


def test_validate_keysteps_accepts_ints_and_returns_floats():
    assert validate_keysteps([0, 0.5]) == (0.0, 0.5)
    assert all(isinstance(k, float) for k in validate_keysteps([0, 0.5]))


SIGMAS = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "sigmas, sigma, previous, step",
    [
        (SIGMAS, 14.6, None, 0),
        (SIGMAS, 7.0, 0, 1),
        (SIGMAS, 7.0 * (1 + 5e-5), 0, 1),  # within rtol 1e-4: the start of step 1
        (SIGMAS, 5.0, 1, 1),  # a second-order sampler's intermediate evaluation belongs to the step in progress
        (SIGMAS, 2.0, 2, 2),
        (SIGMAS, 1.0, 2, 3),
        (SIGMAS, 0.5, 3, 3),
        (SIGMAS, 0.5, None, 3),
        (SIGMAS, 20.0, None, 0),  # above the schedule: the first step
        (SIGMAS, 7.0, 2, 2),  # steps never go back
        (torch.tensor([1.0, 1.0, 0.5, 0.0]), 1.0, None, 0),  # repeated sigmas: the first occurrence first ...
        (torch.tensor([1.0, 1.0, 0.5, 0.0]), 1.0, 0, 1),  # ... then the repeat is the next step
        (torch.tensor([1.0, 1.0, 0.5, 0.0]), 0.5, 1, 2),
        (torch.tensor([1.0, 0.0]), 1.0, None, 0),  # a 1-step run
    ],
)
def test_locate_step(sigmas, sigma, previous, step):
    assert locate_step(sigmas, sigma, previous) == step


def test_locate_step_walks_a_heun_run():
    """Euler-style starts and Heun-style midpoints of a 4-step schedule, in call order."""
    calls = [14.6, 9.0, 7.0, 4.0, 3.0, 2.0, 1.0]
    expected = [0, 0, 1, 1, 2, 2, 3]
    previous, found = None, []
    for sigma in calls:
        previous = locate_step(SIGMAS, sigma, previous)
        found.append(previous)
    assert found == expected


def spiky_trajectory(steps, spikes, base=1.0, norm=1e6, batch=()):
    """x0 predictions whose relative step distance is `base`, except `spikes` {transition j: height}.

    The norm is huge and the motion orthogonal, so the relative distance is the designed one; the
    curvature (|second difference| of the distance) then peaks exactly at each spiked transition j,
    whose new segment starts at step j + 1.
    """
    distance = torch.full((steps - 1,), base, dtype=torch.float64)
    for j, height in spikes.items():
        distance[j] += height
    position = torch.cat([torch.zeros(1, dtype=torch.float64), distance.cumsum(0)])
    x0 = torch.zeros(steps, 2, dtype=torch.float64)
    x0[:, 0] = norm  # |x0| stays ~norm, so relative distance ~ distance / norm
    x0[:, 1] = position  # the motion, along an orthogonal axis
    if batch:
        x0 = x0.reshape(steps, *(1 for _ in batch), 2).expand(steps, *batch, 2).contiguous()
    return x0


@pytest.mark.parametrize(
    "steps, spikes, k, expected_steps",
    [
        (20, {5: 10.0, 12: 8.0}, 3, [6, 13]),
        (20, {5: 10.0, 12: 8.0}, 2, [6]),
        (20, {12: 8.0, 5: 10.0}, 2, [6]),  # the larger curvature wins
        (30, {3: 5.0, 10: 7.0, 20: 9.0}, 4, [4, 11, 21]),
        (30, {3: 5.0, 10: 7.0, 20: 9.0}, 3, [11, 21]),
        (10, {0: 4.0}, 2, [1]),  # the first transition
        (10, {7: 4.0}, 2, [8]),  # the last full second difference (edge padding halves a spike at j = 8)
    ],
)
def test_discover_keysteps_finds_curvature_peaks(steps, spikes, k, expected_steps):
    keysteps, curves = discover_keysteps(spiky_trajectory(steps, spikes), k)
    assert keysteps == [0.0] + [round(s / steps, 6) for s in expected_steps]
    assert len(curves["distance"]) == steps - 1 and len(curves["curvature"]) == steps - 1
    peak = max(range(steps - 1), key=lambda j: curves["curvature"][j])
    assert peak == max(spikes, key=spikes.get)
    validate_keysteps(keysteps)


def test_discover_keysteps_averages_a_batch_axis():
    flat, _ = discover_keysteps(spiky_trajectory(20, {5: 10.0, 12: 8.0}), 3)
    batched, _ = discover_keysteps(spiky_trajectory(20, {5: 10.0, 12: 8.0}, batch=(2, 3)), 3)
    assert batched == flat


def test_discover_keysteps_k1_keeps_only_the_first():
    keysteps, _ = discover_keysteps(spiky_trajectory(20, {5: 10.0}), 1)
    assert keysteps == [0.0]


def test_discover_keysteps_single_step_trajectory():
    keysteps, curves = discover_keysteps(torch.randn(1, 4, 8, 8), 3)
    assert keysteps == [0.0]
    assert curves == {"distance": [], "curvature": []}


@pytest.mark.parametrize("k, expected", [(1, [0.0]), (2, [0.0, 0.5]), (5, [0.0, 0.5])])
def test_discover_keysteps_two_step_trajectory(k, expected):
    keysteps, curves = discover_keysteps(torch.randn(2, 4, 8, 8), k)
    assert keysteps == expected
    assert len(curves["distance"]) == 1


def test_discover_keysteps_maps_steps_to_given_progress():
    """With SD1.5-style progress (1 - t/999 of a trailing schedule), keysteps are the chosen steps' progress."""
    steps = 20
    timesteps = torch.linspace(999, 0, steps + 1)[:-1].round()
    progress = (1 - timesteps / 999).tolist()
    keysteps, _ = discover_keysteps(spiky_trajectory(steps, {5: 10.0, 12: 8.0}), 3, progress)
    assert keysteps == [0.0, round(progress[6], 6), round(progress[13], 6)]


def test_discover_keysteps_rejects_bad_arguments():
    with pytest.raises(ValueError, match="HyperAlign: the number of keysteps must be at least 1"):
        discover_keysteps(torch.randn(5, 3), 0)
    with pytest.raises(ValueError, match="HyperAlign: got 3 progress values for 5 steps"):
        discover_keysteps(torch.randn(5, 3), 2, [0.0, 0.5, 0.7])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("steps, k", [(4, 2), (12, 4), (50, 8)])
def test_discovered_keysteps_are_always_valid(seed, steps, k):
    torch.manual_seed(seed)
    trajectory = torch.randn(steps, 2, 3, 4).cumsum(0)
    keysteps, _ = discover_keysteps(trajectory, k)
    assert validate_keysteps(keysteps) == tuple(keysteps)
    assert len(keysteps) == min(k, steps)
