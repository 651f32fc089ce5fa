// Unit tests of the pure widget logic: node --test web/tests/
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { appendLiveCall, buildChart, chartGeometry, formatSeconds, formatTick, niceScale } from "../js/lib/chart.js";
import { findSampler, resolveNodeById, samplerSettings } from "../js/lib/graph.js";
import { formatKeystep, formatKeysteps, parseKeysteps, plan, segmentOf } from "../js/lib/schedule.js";
import {
  DEFAULT_STEPS,
  buildTimeline,
  resolveSchedule,
  samplerSteps,
  timelineX,
  withMeasuredProgress,
} from "../js/lib/timeline.js";

const linear = (n) => Array.from({ length: n }, (_, i) => i / n);
const callSteps = (decisions) => decisions.flatMap((call, i) => (call ? [i] : []));

describe("plan (mirrors hyperalign.schedule.plan)", () => {
  test("S runs every step, I only the first", () => {
    assert.deepEqual(plan("S", [0], linear(4)), [true, true, true, true]);
    assert.deepEqual(plan("I", [0], linear(4)), [true, false, false, false]);
    assert.deepEqual(plan("I", [0], []), []);
  });

  test("P runs when a new keystep segment starts", () => {
    assert.deepEqual(callSteps(plan("P", [0, 0.3, 0.6], linear(20))), [0, 6, 12]);
    assert.deepEqual(callSteps(plan("P", [0, 0.25, 0.5, 0.75], linear(4))), [0, 1, 2, 3]);
    // two keysteps inside one step: a single call there
    assert.deepEqual(callSteps(plan("P", [0, 0.51, 0.52], linear(2))), [0]);
    assert.deepEqual(callSteps(plan("P", [0, 0.5], linear(1))), [0]);
  });

  test("a run that starts inside a segment predicts at its first step", () => {
    assert.deepEqual(callSteps(plan("P", [0, 0.5], [0.6, 0.7, 0.8])), [0]);
  });

  test("keysteps compare with the Python slack of 1e-6", () => {
    assert.equal(segmentOf(0.3 - 5e-7, [0, 0.3]), 1);
    assert.equal(segmentOf(0.3 - 2e-6, [0, 0.3]), 0);
  });

  test("an unknown mode is an error", () => {
    assert.throws(() => plan("X", [0], [0]), /unknown mode 'X'/);
  });
});

describe("keysteps strings (mirror parse/validate/format_keysteps)", () => {
  test("parse accepts commas, semicolons and Python float spellings", () => {
    assert.deepEqual(parseKeysteps("0, 0.3, 0.6"), [0, 0.3, 0.6]);
    assert.deepEqual(parseKeysteps(" 0;.25 ,5e-1, "), [0, 0.25, 0.5]);
    assert.deepEqual(parseKeysteps("+0, 0.000_5"), [0, 0.0005]);
  });

  const bad = [
    ["", /non-empty list/],
    ["a, b", /'a, b' is not a comma-separated list of numbers/],
    ["0x1", /not a comma-separated list/],
    ["0, 1", /fractions in \[0, 1\), got \[0\.0, 1\.0\]/],
    ["0, nan", /fractions in \[0, 1\)/],
    ["0, -inf", /fractions in \[0, 1\)/],
    ["0, 0.5, 0.5", /strictly increasing, got \(0\.0, 0\.5, 0\.5\)/],
    ["0.1, 0.5", /first keystep must be 0/],
  ];
  for (const [text, message] of bad) {
    test(`rejects ${JSON.stringify(text)}`, () => assert.throws(() => parseKeysteps(text), message));
  }

  test("format matches Python's format_keysteps (round down, 6 decimals)", () => {
    const cases = [
      [0, "0"],
      [0.3, "0.3"],
      [0.123456, "0.123456"],
      [0.5555556, "0.555555"],
      [1e-5, "0.00001"],
      [0.5, "0.5"],
    ];
    for (const [value, expected] of cases) assert.equal(formatKeystep(value), expected);
    assert.equal(formatKeysteps([0, 0.25, 0.6666667]), "0, 0.25, 0.666666");
  });
});

describe("timeline", () => {
  const schedule = (inputs) => resolveSchedule({ mode: "P", keystepsText: "", ...inputs });

  test("marks the steps of each mode", () => {
    const calls = (mode, keystepsText = "") =>
      callSteps(
        buildTimeline({ schedule: schedule({ mode, keystepsText }), sampler: { steps: 10 } }).cells.map((c) => c.call),
      );
    assert.deepEqual(calls("S"), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert.deepEqual(calls("I"), [0]);
    assert.deepEqual(calls("P", "0, 0.3, 0.6"), [0, 3, 6]);
  });

  test("defaults to 20 steps and labels the plan", () => {
    const t = buildTimeline({ schedule: schedule({ keystepsText: "0, 0.5" }) });
    assert.equal(t.steps, DEFAULT_STEPS);
    assert.equal(t.calls, 2);
    assert.equal(t.label, "P · keysteps 0, 0.5 · 2/20 steps");
  });

  test("from_file is resolved from what the last run reported", () => {
    const unknown = buildTimeline({ schedule: resolveSchedule({ mode: "from_file" }), sampler: { steps: 8 } });
    assert.equal(unknown.known, false);
    assert.deepEqual(callSteps(unknown.cells.map((c) => c.call)), [0]);
    assert.match(unknown.label, /^mode from file · keysteps from file: run once to see them · 8 steps$/);

    const known = buildTimeline({
      schedule: resolveSchedule({ mode: "from_file", fileInfo: { mode: "P", keysteps: [0, 0.5] } }),
      sampler: { steps: 8 },
    });
    assert.deepEqual(callSteps(known.cells.map((c) => c.call)), [0, 4]);
    assert.equal(known.label, "P (file) · keysteps 0, 0.5 (file) · 2/8 steps");
  });

  test("the keysteps override wins over the file; a link waits for its value", () => {
    const s = resolveSchedule({ mode: "P", keystepsText: "0, 0.25", fileInfo: { mode: "P", keysteps: [0, 0.5] } });
    assert.deepEqual(s.keysteps, [0, 0.25]);
    assert.equal(s.keystepsSource, "widget");
    const linked = resolveSchedule({ mode: "P", linkedKeysteps: { keysteps: null } });
    assert.equal(linked.keysteps, null);
    assert.match(linked.note, /link/);
    const arrived = resolveSchedule({ mode: "P", linkedKeysteps: { keysteps: [0, 0.7] } });
    assert.deepEqual(arrived.keysteps, [0, 0.7]);
  });

  test("invalid keysteps are shown as an error and mark nothing", () => {
    const t = buildTimeline({ schedule: schedule({ keystepsText: "0, 2" }) });
    assert.equal(t.calls, 0);
    assert.match(t.label, /^keysteps: keysteps must be fractions in \[0, 1\)/);
  });

  test("start/end percent limit where the LoRA applies; the first active step predicts", () => {
    const t = buildTimeline({
      schedule: schedule({ mode: "I" }),
      sampler: { steps: 10 },
      startPercent: 0.3,
      endPercent: 0.7,
    });
    assert.deepEqual(
      t.cells.map((c) => c.active),
      [false, false, false, true, true, true, true, true, false, false],
    );
    assert.deepEqual(callSteps(t.cells.map((c) => c.call)), [3]);
    assert.match(t.label, /1\/10 steps \(5 active\)/);
  });

  test("denoise and KSamplerAdvanced windows shift and cut the steps", () => {
    assert.deepEqual(
      samplerSteps({ steps: 4, denoise: 0.5 }).map((s) => s.progress),
      [0.5, 0.625, 0.75, 0.875],
    );
    const window = samplerSteps({ steps: 6, startStep: 2, endStep: 4 });
    assert.deepEqual(
      window.map((s) => s.sampled),
      [false, false, true, true, false, false],
    );
    const t = buildTimeline({
      schedule: schedule({ keystepsText: "0, 0.5" }),
      sampler: { steps: 6, startStep: 2, endStep: 4 },
    });
    assert.deepEqual(callSteps(t.cells.map((c) => c.call)), [2, 3]);
  });

  test("keystep marks map onto the drawn strip, inside the step that holds them", () => {
    const t = buildTimeline({ schedule: schedule({ keystepsText: "0, 0.5" }), sampler: { steps: 4, denoise: 0.5 } });
    assert.equal(timelineX(t, 0.75, 10, 100), 60);
    assert.equal(timelineX(t, 0.8125, 10, 100), 72.5);
    assert.equal(timelineX(t, 0.25, 10, 100), null);
  });

  test("measured progress replaces the assumed one, so the marks follow the real schedule", () => {
    // SD1.5 "normal" with 10 steps spaces the steps i/9: keystep 1/9 is reached at step 1, not 2
    const measured = Array.from({ length: 10 }, (_, i) => 1 - Math.round(999 * (1 - i / 9)) / 999);
    const inputs = { schedule: schedule({ keystepsText: "0, 0.1111, 0.2222" }), sampler: { steps: 10 } };
    assert.deepEqual(callSteps(buildTimeline(inputs).cells.map((c) => c.call)), [0, 2, 3]);
    const t = buildTimeline({ ...inputs, measuredProgress: measured });
    assert.deepEqual(callSteps(t.cells.map((c) => c.call)), [0, 1, 2]);
    assert.equal(timelineX(t, 1 / 9, 0, 100), 10);
    // a run with another step count (or no report) leaves the assumption in place
    assert.deepEqual(
      callSteps(buildTimeline({ ...inputs, measuredProgress: measured.slice(1) }).cells.map((c) => c.call)),
      [0, 2, 3],
    );
    assert.equal(t.basis, "measured");
    const window = withMeasuredProgress(samplerSteps({ steps: 4, startStep: 1, endStep: 3 }), [0.4, 0.6]);
    assert.deepEqual(
      window.map((c) => c.progress),
      [0, 0.4, 0.6, 0.75],
    );
  });
});

describe("timeline after a run", () => {
  const schedule = resolveSchedule({ mode: "P", keystepsText: "0, 0.1111, 0.2222" });
  const run = { mode: "P", steps: 10, keysteps: [0, 0.1111, 0.2222], calls: [{ step: 0 }, { step: 1 }, { step: 2 }] };
  const marks = (t) => callSteps(t.cells.map((c) => c.call));

  test("without measured progress, the steps the run predicted at replace the assumed plan", () => {
    const t = buildTimeline({ schedule, sampler: { steps: 10 }, lastRun: run });
    assert.equal(t.basis, "run");
    assert.deepEqual(marks(t), [0, 1, 2]);
  });

  test("a run of another plan is ignored", () => {
    for (const other of [
      { ...run, steps: 12 },
      { ...run, mode: "S" },
      { ...run, keysteps: [0, 0.5] },
    ]) {
      const t = buildTimeline({ schedule, sampler: { steps: 10 }, lastRun: other });
      assert.equal(t.basis, "assumed");
      assert.deepEqual(marks(t), [0, 2, 3]);
    }
    const later = buildTimeline({ schedule, sampler: { steps: 10 }, lastRun: run, startPercent: 0.15 });
    assert.equal(later.basis, "assumed");
  });
});

describe("chart scaling", () => {
  test("niceScale covers the data with round ticks", () => {
    assert.deepEqual(niceScale(0, 1, 4), { min: 0, max: 1, step: 0.5, ticks: [0, 0.5, 1] });
    assert.deepEqual(niceScale(0, 12.5, 4).ticks, [0, 5, 10, 15]);
    assert.deepEqual(niceScale(0, 0.0034, 4).ticks, [0, 0.002, 0.004]);
    assert.deepEqual(niceScale(-0.2, 1, 4).ticks, [-0.5, 0, 0.5, 1]);
  });

  test("niceScale never exceeds maxTicks and survives flat or bad data", () => {
    for (const [lo, hi] of [
      [0, 1],
      [0, 7.3],
      [-3, 97],
      [1e-9, 3e-9],
      [0.1, 0.1000001],
      [-1, 1],
    ]) {
      for (const maxTicks of [3, 4, 6]) {
        const s = niceScale(lo, hi, maxTicks);
        assert.ok(s.ticks.length <= maxTicks, `${lo}..${hi} max ${maxTicks}: ${s.ticks}`);
        assert.ok(s.min <= lo && s.max >= hi, `${lo}..${hi} -> ${s.min}..${s.max}`);
      }
    }
    assert.equal(niceScale(-3, 97, 2).ticks.length, 3);
    assert.deepEqual(niceScale(0, 0, 4).ticks, [0, 0.5, 1]);
    assert.deepEqual(niceScale(NaN, Infinity, 4).ticks, [0, 0.5, 1]);
  });

  test("tick and time labels", () => {
    assert.equal(formatTick(0.5, 0.5), "0.5");
    assert.equal(formatTick(10, 5), "10");
    assert.equal(formatTick(0.004, 0.002), "0.004");
    assert.equal(formatTick(0.0004, 0.0002), "4e-4");
    assert.equal(formatSeconds(0.0042), "4.2 ms");
    assert.equal(formatSeconds(0.25), "250 ms");
    assert.equal(formatSeconds(1.234), "1.23 s");
    assert.equal(formatSeconds(125), "2 min 5 s");
  });

  const run = {
    node: "4",
    mode: "P",
    steps: 10,
    keysteps: [0, 0.5],
    seconds: 2.5,
    calls: [
      { step: 5, progress: 0.5, seconds: 0.02, norm: 3, cosine: 0.6, relative_change: 0.9 },
      { step: 0, progress: 0, seconds: 0.03, norm: 2, cosine: 1, relative_change: 0 },
    ],
  };

  test("each call's value holds until the next call", () => {
    const chart = buildChart(run);
    assert.equal(chart.steps, 10);
    assert.equal(chart.calls, 2);
    const norm = chart.series.find((s) => s.key === "norm");
    assert.deepEqual(norm.points, [
      { step: 0, until: 5, value: 2 },
      { step: 5, until: 10, value: 3 },
    ]);
    assert.deepEqual(chart.left.ticks, [0, 0.5, 1]);
    assert.deepEqual(chart.right.ticks, [2, 2.5, 3]); // the norm axis spans the norms, not 0
    assert.match(buildChart({ ...run, seconds: undefined }).summary, / · 50 ms$/);
    assert.equal(chart.summary, "P · 2 hypernet calls / 10 steps · 2.50 s");
  });

  test("geometry maps steps and values into the plot box", () => {
    const chart = buildChart(run);
    const g = chartGeometry(chart, { x: 10, y: 20, width: 100, height: 50 });
    assert.equal(g.xOf(5), 60);
    assert.equal(g.yLeft(1), 20);
    assert.equal(g.yLeft(0), 70);
    const cosine = g.lines.find((l) => l.key === "cosine").segments;
    assert.deepEqual(cosine[0], { x0: 10, x1: 60, y: 20 });
    assert.deepEqual(cosine[1], { x0: 60, x1: 110, y: 40 });
  });

  test("float noise above a cosine of 1 does not stretch the axis", () => {
    const chart = buildChart({ steps: 2, calls: [{ step: 0, norm: 1, cosine: 1.0000001, relative_change: 0 }] });
    assert.deepEqual(chart.left.ticks, [0, 0.5, 1]);
  });

  test("an empty or malformed run gives an empty chart, not an error", () => {
    assert.equal(buildChart(null).calls, 0);
    const chart = buildChart({ calls: [{ step: "x" }, { step: 2, norm: NaN }] });
    assert.equal(chart.calls, 1);
    assert.equal(chart.steps, 3);
    assert.deepEqual(chart.series.find((s) => s.key === "norm").points, []);
  });

  test("live steps accumulate and a step that goes back starts a new run", () => {
    let live = appendLiveCall(null, { step: 0, norm: 1 });
    live = appendLiveCall(live, { step: 1, norm: 2 });
    assert.deepEqual(
      live.calls.map((c) => c.step),
      [0, 1],
    );
    live = appendLiveCall(live, { step: 0, norm: 5 });
    assert.deepEqual(
      live.calls.map((c) => c.norm),
      [5],
    );
    assert.equal(live.live, true);
  });
});

describe("graph", () => {
  const node = (id, type, widgets = {}, children = []) => ({
    id,
    type,
    widgets: Object.entries(widgets).map(([name, value]) => ({ name, value })),
    children,
  });
  const downstream = (n) => n.children;

  test("finds the nearest downstream sampler breadth first", () => {
    const far = node(5, "KSampler", { steps: 50 });
    const near = node(4, "BasicScheduler", { steps: 12, denoise: 0.5 });
    const lora = node(3, "LoraLoader", { strength_model: 1 }, [far]);
    const apply = node(2, "HyperAlignApply", { steps: "" }, [lora, near]);
    assert.equal(findSampler(apply, downstream), near);
    assert.deepEqual(samplerSettings(near), { steps: 12, source: "BasicScheduler", denoise: 0.5 });
    assert.deepEqual(samplerSettings(null), { steps: 20, source: "default" });
  });

  test("stops at maxDepth and survives cycles", () => {
    const a = node(1, "A");
    const b = node(2, "B", {}, [a]);
    a.children = [b];
    assert.equal(findSampler(a, downstream), null);
    const chain = [node(9, "KSampler", { steps: 7 })];
    for (let i = 0; i < 10; i++) chain.unshift(node(i + 10, "Pass", {}, [chain[0]]));
    assert.equal(findSampler(chain[0], downstream, 8), null);
    assert.equal(findSampler(chain[0], downstream, 12).type, "KSampler");
  });

  test("resolves plain and subgraph execution ids", () => {
    const inner = { id: 5 };
    const sub = { getNodeById: (id) => (id === "5" ? inner : null) };
    const outer = { id: 12, subgraph: sub };
    const graph = { getNodeById: (id) => (id === 12 ? outer : null) };
    assert.equal(resolveNodeById(graph, 12), outer);
    assert.equal(resolveNodeById(graph, "12"), outer);
    assert.equal(resolveNodeById(graph, "12:5"), inner);
    assert.equal(resolveNodeById(graph, "7:5"), null);
  });
});
