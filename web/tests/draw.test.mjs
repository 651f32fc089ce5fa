// The drawing code against a recording 2D context: what gets painted where, without a browser.
import assert from "node:assert/strict";
import { test } from "node:test";

import { buildChart } from "../js/lib/chart.js";
import { CHART_HEIGHT, COLORS, drawChart, drawKeysteps, drawTimeline, themePalette } from "../js/lib/draw.js";
import { buildTimeline, resolveSchedule } from "../js/lib/timeline.js";

/** A CanvasRenderingContext2D stand-in that records fills and texts. */
function recorder() {
  const log = { rects: [], texts: [], strokes: 0 };
  const ctx = {
    fillStyle: "",
    strokeStyle: "",
    font: "",
    save() {},
    restore() {},
    beginPath() {},
    closePath() {},
    moveTo() {},
    lineTo() {},
    arc() {},
    rect() {},
    roundRect() {},
    fill() {},
    stroke() {
      log.strokes += 1;
    },
    fillRect(x, y, w, h) {
      log.rects.push({ x, y, w, h, color: ctx.fillStyle });
    },
    fillText(text, x, y) {
      log.texts.push({ text, x, y, color: ctx.fillStyle });
    },
    measureText: (text) => ({ width: String(text).length * 5 }),
  };
  return { ctx, log };
}

const palette = themePalette(undefined);

test("the timeline paints one bright cell per hypernet call, inside the node", () => {
  const timeline = buildTimeline({
    schedule: resolveSchedule({ mode: "P", keystepsText: "0, 0.3, 0.6" }),
    sampler: { steps: 20 },
  });
  const { ctx, log } = recorder();
  drawTimeline(ctx, timeline, { x: 15, y: 100, width: 270 }, palette);
  const calls = log.rects.filter((r) => r.color === COLORS.call && r.h === 12);
  const reuse = log.rects.filter((r) => r.color === COLORS.reuse && r.h === 12);
  assert.equal(calls.length, 3);
  assert.equal(reuse.length, 17);
  for (const r of log.rects) assert.ok(r.x >= 15 && r.x + r.w <= 285 && r.y >= 100, JSON.stringify(r));
  assert.ok(log.texts.some((t) => t.text.startsWith("P · keysteps 0, 0.3, 0.6")));
});

test("zoomed out (low quality) the timeline skips its text", () => {
  const timeline = buildTimeline({ schedule: resolveSchedule({ mode: "S" }) });
  const { ctx, log } = recorder();
  drawTimeline(ctx, timeline, { x: 15, y: 0, width: 270 }, palette, true);
  assert.equal(log.texts.length, 0);
  assert.equal(log.rects.filter((r) => r.color === COLORS.call).length, 20);
});

test("the chart draws its three series, axes and summary", () => {
  const calls = [0, 1, 2, 3].map((step) => ({
    step,
    progress: step / 4,
    seconds: 0.01,
    norm: 1 + step,
    cosine: 1 - step / 4,
    relative_change: step / 3,
  }));
  const { ctx, log } = recorder();
  drawChart(ctx, buildChart({ mode: "S", steps: 4, seconds: 1, calls }), { x: 15, y: 50, width: 290 }, palette);
  assert.ok(log.strokes >= 3);
  assert.ok(log.texts.some((t) => t.text.startsWith("S · 4 hypernet calls / 4 steps")));
  assert.ok(log.texts.some((t) => t.text === "rel. change"));
  for (const t of log.texts) assert.ok(t.y >= 50 && t.y <= 50 + CHART_HEIGHT, JSON.stringify(t));
});

test("before a run the chart is a one-line hint", () => {
  const { ctx, log } = recorder();
  drawChart(ctx, null, { x: 15, y: 0, width: 290 }, palette);
  assert.equal(log.texts.length, 1);
  assert.match(log.texts[0].text, /run the graph/);
});

test("a chart with nothing to show says why", () => {
  const { ctx, log } = recorder();
  drawChart(ctx, null, { x: 15, y: 0, width: 290 }, palette, false, "from the cache");
  assert.deepEqual(
    log.texts.map((t) => t.text),
    ["from the cache"],
  );
});

test("a run shown again from the cache says so before anything else", () => {
  const run = { mode: "P", steps: 4, seconds: 0.1, calls: [{ step: 0, norm: 1, cosine: 1, relative_change: 0 }] };
  assert.match(buildChart(run).summary, /^P · 1 hypernet call \/ 4 steps/);
  assert.match(buildChart({ ...run, cached: true }).summary, /^from ComfyUI's cache, last run: P · 1 hypernet call/);
});

test("each widget draws inside the box it is given", () => {
  const timeline = buildTimeline({ schedule: resolveSchedule({ mode: "S" }) });
  const { ctx, log } = recorder();
  drawTimeline(ctx, timeline, { x: 40, y: 10, width: 200 }, palette);
  drawKeysteps(ctx, { text: "0, 0.5", keysteps: [0, 0.5] }, { x: 40, y: 10, width: 200 }, palette);
  for (const r of log.rects) assert.ok(r.x >= 40 && r.x + r.w <= 240.5 && r.y >= 10, JSON.stringify(r));
});

test("the keysteps strip marks each keystep", () => {
  const { ctx, log } = recorder();
  drawKeysteps(ctx, { text: "0, 0.2, 0.5", keysteps: [0, 0.2, 0.5] }, { x: 15, y: 0, width: 270 }, palette);
  assert.equal(log.rects.filter((r) => r.color === COLORS.keystep).length, 3);
  assert.equal(log.texts[0].text, "keysteps: 0, 0.2, 0.5");
});
