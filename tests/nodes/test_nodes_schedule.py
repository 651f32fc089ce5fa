"""S, I and P call the hypernetwork exactly at the expected steps, in every kind of sampler run.

Tiny SD1.5, "normal" scheduler, 8 steps: the steps start at progress
0, .143, .285, .428, .572, .715, .857, 1.0 (1 - t/999). With keysteps (0, 0.3, 0.65), P predicts
when a step enters a new segment: steps 0, 3 and 5 of a full run. Split runs (KSamplerAdvanced
0-4 and 4-8) and denoise 0.5 (progress .534, .6, .667, ...) count steps within each sampler call.
"""

from __future__ import annotations

import inspect

import pytest
from comfy_testlib import apply

KEYSTEPS = "0, 0.3, 0.65"
STEPS = 8


def _ksampler(comfy, tiny, model, sampler="euler", denoise=1.0):
    positive, negative = tiny.conditioning("sd15", 2, 1), tiny.conditioning("sd15", 1, 99)
    comfy.nodes.KSampler().sample(
        model, 0, STEPS, 5.0, sampler, "normal", positive, negative, tiny.empty_latent("sd15", 2), denoise=denoise
    )


def _split(comfy, tiny, model):
    positive, negative = tiny.conditioning("sd15", 2, 1), tiny.conditioning("sd15", 1, 99)
    advanced = comfy.nodes.KSamplerAdvanced()
    (half,) = advanced.sample(
        model,
        "enable",
        0,
        STEPS,
        5.0,
        "euler",
        "normal",
        positive,
        negative,
        tiny.empty_latent("sd15", 2),
        0,
        4,
        "enable",
    )
    advanced.sample(model, "disable", 0, STEPS, 5.0, "euler", "normal", positive, negative, half, 4, 10000, "disable")


RUNS = {
    "full": lambda comfy, tiny, model: _ksampler(comfy, tiny, model),
    "heun": lambda comfy, tiny, model: _ksampler(comfy, tiny, model, sampler="heun"),
    "denoise": lambda comfy, tiny, model: _ksampler(comfy, tiny, model, denoise=0.5),
    "split": _split,
}

CASES = [  # (mode, run, start_percent, end_percent, hypernet steps per sampler call)
    ("S", "full", 0.0, 1.0, [list(range(8))]),
    ("I", "full", 0.0, 1.0, [[0]]),
    ("P", "full", 0.0, 1.0, [[0, 3, 5]]),
    ("S", "heun", 0.0, 1.0, [list(range(8))]),
    ("P", "heun", 0.0, 1.0, [[0, 3, 5]]),
    ("S", "denoise", 0.0, 1.0, [list(range(8))]),
    ("I", "denoise", 0.0, 1.0, [[0]]),
    ("P", "denoise", 0.0, 1.0, [[0, 2]]),
    ("S", "split", 0.0, 1.0, [[0, 1, 2, 3], [0, 1, 2, 3]]),
    ("I", "split", 0.0, 1.0, [[0], [0]]),
    ("P", "split", 0.0, 1.0, [[0, 3], [0, 1]]),
    ("S", "full", 0.5, 1.0, [[4, 5, 6, 7]]),
    ("I", "full", 0.5, 1.0, [[4]]),
    ("S", "full", 0.0, 0.3, [[0, 1, 2]]),
]


@pytest.mark.comfy
@pytest.mark.parametrize(("mode", "run", "start", "end", "expected"), CASES)
def test_hypernet_runs_exactly_at_the_expected_steps(
    comfy, tiny, base_models, predictors, node, hyperalign_pack, ui_events, mode, run, start, end, expected
):
    patched = apply(node, base_models["sd15"], predictors["sd15_a"], mode=mode, start=start, end=end, keysteps=KEYSTEPS)
    hypernet = node("HyperAlignLoader", predictor_name=predictors["sd15_a"]).args[0].predictor.hypernet
    forwards = []
    handle = hypernet.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    try:
        RUNS[run](comfy, tiny, patched)
    finally:
        handle.remove()
    reports = [data for event, data in ui_events if event == "hyperalign.run"]
    assert [[call["step"] for call in report["calls"]] for report in reports] == expected
    assert forwards == [2] * sum(len(steps) for steps in expected)  # one forward per call, on the 2 samples
    live = [data["call"]["step"] for event, data in ui_events if event == "hyperalign.step"]
    assert live == [step for steps in expected for step in steps]


@pytest.mark.comfy
def test_run_report_follows_the_ui_contract(comfy, tiny, base_models, predictors, node, ui_events):
    patched = apply(node, base_models["sd15"], predictors["sd15_a"], mode="P", keysteps=KEYSTEPS)
    _ksampler(comfy, tiny, patched)
    (report,) = [data for event, data in ui_events if event == "hyperalign.run"]
    assert set(report) == {"node", "mode", "steps", "keysteps", "seconds", "summary", "calls"}
    assert report["mode"] == "P" and report["steps"] == STEPS and report["keysteps"] == [0.0, 0.3, 0.65]
    assert report["summary"].startswith("mode P: 3 hypernet call(s) at step(s) [0,3,5]")
    first, *rest = report["calls"]
    assert set(first) == {"step", "progress", "seconds", "norm", "cosine", "relative_change"}
    assert first["cosine"] == pytest.approx(1.0) and first["relative_change"] == pytest.approx(0.0, abs=1e-6)
    assert all(call["norm"] > 0 and call["seconds"] >= 0 for call in report["calls"])
    assert [round(call["progress"], 3) for call in report["calls"]] == [0.0, 0.428, 0.715]
    assert report["seconds"] == pytest.approx(sum(call["seconds"] for call in report["calls"]))
    assert any(call["relative_change"] > 0 for call in rest)


@pytest.mark.comfy
def test_summary_line_is_logged_once_per_run(comfy, tiny, base_models, predictors, node, caplog):
    patched = apply(node, base_models["sd15"], predictors["sd15_a"], mode="I")
    with caplog.at_level("INFO"):
        _ksampler(comfy, tiny, patched)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HyperAlign: mode")]
    assert len(lines) == 1
    assert lines[0].startswith("HyperAlign: mode I: 1 hypernet call(s) at step(s) [0], ")


def _with_unique_id(node_class, unique_id: str):
    """The node class as the host's executor prepares it, with the hidden UNIQUE_ID set: ComfyUI 0.3.x passes
    the hidden inputs to PREPARE_CLASS_CLONE, 0.33 a dict that holds them under "hidden_inputs"."""
    hidden = {"UNIQUE_ID": unique_id}
    if "v3_data" in inspect.signature(node_class.PREPARE_CLASS_CLONE).parameters:
        return node_class.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    return node_class.PREPARE_CLASS_CLONE(hidden)


@pytest.mark.comfy
def test_node_id_reaches_the_ui(comfy, tiny, base_models, predictors, hyperalign_pack, ui_events):
    """The hidden UNIQUE_ID of the Apply node addresses the UI messages."""
    loader = hyperalign_pack.nodes["HyperAlignLoader"]
    apply_node = _with_unique_id(hyperalign_pack.nodes["HyperAlignApply"], "17")
    predictor = loader.execute(predictor_name=predictors["sd15_a"]).args[0]
    patched = apply_node.execute(
        model=base_models["sd15"], predictor=predictor, mode="I", strength=1.0, start_percent=0.0, end_percent=1.0
    ).args[0]
    _ksampler(comfy, tiny, patched)
    assert [event for event, _ in ui_events] == ["hyperalign.step", "hyperalign.run"]
    assert {data["node"] for _, data in ui_events} == {"17"}
