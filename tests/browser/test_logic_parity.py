"""The frontend's schedule logic (web/js/lib/schedule.js) against hyperalign.schedule and AlignRun's S/I/P rule.

The timeline on HyperAlignApply must mark exactly the steps the Python run will predict at, and
accept or reject exactly the keysteps strings the node accepts. Both sides get the same cases; a
small Node script evaluates the JS side and prints JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hyperalign.runtime import AlignRun
from hyperalign.schedule import MODES, format_keysteps, parse_keysteps

REPO = Path(__file__).resolve().parents[2]
LOGIC = REPO / "web" / "js" / "lib" / "schedule.js"

KEYSTEPS = [[0.0], [0.0, 0.3, 0.6], [0.0, 0.25, 0.5, 0.75], [0.0, 0.5, 0.51], [0.0, 0.999], [0.0, 1 / 3, 2 / 3]]
STEP_COUNTS = [1, 2, 4, 7, 20, 50]
# keysteps strings, separated by "|": valid ones, Python float spellings, and every kind of error
STRINGS = (
    "0, 0.3, 0.6|0;0.25| 0 , .5 |0, 0.5, 0.5|0.1|| |a|0, 1|0, nan|0, inf|0, -0.1|0, 1e-5|0,1_0|0, 1e20|"
    "0, 0.00001, 0.5|0x1|+0|-0, 0.5|0, 0.3333333333|0 0.5|0, 0.12345678|0, 5e-1|0,,0.5|0, 0.2, 0.1"
).split("|")

SCRIPT = """
import { readFileSync } from "node:fs";
const logic = await import(process.argv[1]);
const cases = JSON.parse(readFileSync(0, "utf8"));
const plans = cases.plans.map(([mode, keysteps, progress]) => logic.plan(mode, keysteps, progress));
const strings = cases.strings.map((text) => {
  try {
    const values = logic.parseKeysteps(text);
    return { values, formatted: logic.formatKeysteps(values) };
  } catch (error) {
    return { error: error.message };
  }
});
process.stdout.write(JSON.stringify({ plans, strings }));
"""


def _progress_lists(steps: int) -> list[list[float]]:
    linear = [i / steps for i in range(steps)]
    denoised = [(steps + i) / (2 * steps) for i in range(steps)]  # KSampler denoise 0.5
    # as SD1.5 "normal" measures it: i / (steps - 1) through integer timesteps
    measured = [1 - round(999 * (1 - i / max(steps - 1, 1))) / 999 for i in range(steps)]
    return [linear, denoised, measured]


def _python_plan(mode: str, keysteps: list[float], progress: list[float]) -> list[bool]:
    """Per step of a first-order run, whether the Python rule (AlignRun) runs the hypernet there."""
    run = AlignRun(mode, keysteps)
    for step, p in enumerate(progress):
        run.factors_at(step, p, dict)
    predicted = {call.step for call in run.calls}
    return [step in predicted for step in range(len(progress))]


def _python_string(text: str) -> dict:
    try:
        values = list(parse_keysteps(text))
    except ValueError as error:
        return {"error": str(error)}
    return {"values": values, "formatted": format_keysteps(values)}


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("WITH_BROWSER") == "1" or os.environ.get("CI"):
            pytest.fail("node is not installed; CI must provide it (scripts/test.sh runs the JS tests with it)")
        pytest.skip("node is not installed")
    return node


def test_js_schedule_logic_matches_python():
    cases = [
        (mode, keysteps, progress)
        for mode in MODES
        for keysteps in KEYSTEPS
        for steps in STEP_COUNTS
        for progress in _progress_lists(steps)
    ]
    # progress a hair before or after each keystep: the 1e-6 slack decides
    for keysteps in KEYSTEPS:
        near = sorted({0.0, *(k + d for k in keysteps[1:] for d in (-2e-6, -5e-7, 5e-7))})
        cases += [("P", keysteps, near), ("P", keysteps, [p for p in near if p != 0.0])]
    payload = json.dumps({"plans": cases, "strings": STRINGS})
    result = subprocess.run(
        [_node(), "--input-type=module", "-e", SCRIPT, LOGIC.as_uri()],
        input=payload,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    js = json.loads(result.stdout)

    for (mode, keysteps, progress), js_plan in zip(cases, js["plans"], strict=True):
        assert js_plan == _python_plan(mode, keysteps, progress), (mode, keysteps, progress)
    for text, js_string in zip(STRINGS, js["strings"], strict=True):
        assert js_string == _python_string(text), text
