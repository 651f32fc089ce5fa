// Browser test of the HyperAlign frontend extension against a running ComfyUI server.
//
//   node web/tests/browser/run.mjs --url http://127.0.0.1:8188 [--out test-artifacts/browser]
//        [--chromium /usr/bin/chromium] [--screenshot docs/images/hyperalign-nodes.png] [--frontend 1.58.1]
//
// The server must have this pack and tests/nodes/testing_pack (tiny models) loaded and a predictor
// named by --predictor in models/hyperalign; tests/browser/test_browser.py sets all of that up, once
// per frontend (the one the host pins, and the newest, served with --front-end-root).
// Headless Debian Chromium is driven by playwright-core (no browser download). One page goes through
// both display modes:
//   canvas    build a small graph through the page's LiteGraph API, check the timeline before a run,
//             queue the prompt, wait for the "hyperalign.run" report to reach the chart, check the
//             pixels the widgets painted and that their right edge meets the native widgets', save a
//             screenshot; queue the same graph again: ComfyUI answers from its cache, and the chart
//             must keep the last run, marked as coming from the cache.
//   Nodes 2.0 switch Comfy.VueNodes.Enabled on: the widgets must paint into their own canvases in
//             the node's DOM, aligned with the native widgets on both sides, and update live after
//             a new run.
// Throughout: no errors in the console from our code, and no deprecated frontend API used by it.
// Exit code 0 = pass; failures are listed on stderr.

import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

import {
  buildGraph,
  canvasColourCounts,
  canvasRightEdges,
  fitView,
  hideChrome,
  pageState,
  queuePrompt,
  setVueNodes,
  setWidgets,
  showChrome,
  vueWidgets,
  watchDeprecations,
} from "./page.mjs";

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    out: { type: "string", default: "test-artifacts/browser" },
    chromium: { type: "string", default: process.env.CHROMIUM_PATH || "/usr/bin/chromium" },
    predictor: { type: "string", default: "tiny_sd15.safetensors" },
    screenshot: { type: "string" },
    timeout: { type: "string", default: "240" },
    frontend: { type: "string" }, // the frontend version the server must serve
  },
});
if (!opts.url) {
  console.error("usage: node web/tests/browser/run.mjs --url http://127.0.0.1:PORT");
  process.exit(2);
}

const STEPS = 10;
const ALIGN_TOLERANCE = 1; // node units (CSS px at zoom 1); our outline straddles the box edge by 0.5
const COLOURS = {
  call: [0x5b, 0x9c, 0xf5],
  norm: [0x8f, 0xd1, 0x6a],
  relative_change: [0xf5, 0xa2, 0x5b],
};
// our code, as the browser sees it: the URLs the server gives the extension (found in main), and
// the prefix of its console messages
let ourRoot = null;
const ours = (text) => (ourRoot !== null && String(text).includes(ourRoot)) || /\[HyperAlign\]/.test(text);
const OUT = resolve(opts.out);
const failures = [];
const log = (...args) => console.log("[browser]", ...args);
let phase = "setup";
function check(condition, message) {
  if (!condition) failures.push(`${phase}: ${message}`);
  log(condition ? "ok  " : "FAIL", `${phase}: ${message}`);
}

const deadline = setTimeout(
  () => {
    console.error(`[browser] timed out after ${opts.timeout} s`);
    process.exit(3);
  },
  Number(opts.timeout) * 1000,
);

// Settings that keep first-run dialogs and overlays out of the way (stored per server user).
const SETTINGS = {
  "Comfy.TutorialCompleted": true,
  "Comfy.VueNodes.Enabled": false,
  "Comfy.Minimap.Visible": false,
  "Comfy.Workflow.ShowMissingModelsWarning": false,
  "Comfy.Workflow.ShowMissingNodesWarning": false,
  "Comfy.NodeBadge.NodeSourceBadgeMode": "None",
  "Comfy.NodeBadge.NodeLifeCycleBadgeMode": "None",
  "Comfy.Graph.CanvasInfo": false,
};

let frontendVersion = null;
function frontendAtLeast(version) {
  const parts = (v) => String(v).split(".").map((p) => Number.parseInt(p, 10) || 0);
  const [have, want] = [parts(frontendVersion), parts(version)];
  for (let i = 0; i < 3; i++) if ((have[i] ?? 0) !== want[i]) return (have[i] ?? 0) > want[i];
  return true;
}

async function runPrompt(page) {
  const started = Date.now();
  await page.evaluate(queuePrompt);
  // execution_success comes after every hyperalign.run of the prompt (same ordered socket).
  await page.waitForFunction(() => window.__hyperalign.errors.length || window.__hyperalign.done, null, {
    timeout: 180_000,
  });
  await page.waitForTimeout(200); // let the repaint that follows the last event happen
  const state = await page.evaluate(pageState);
  log(`${phase}: prompt finished in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  check(state.errors.length === 0, `no execution errors ${JSON.stringify(state.errors).slice(0, 500)}`);
  return state;
}

/** Canvas mode: the plan before a run, a run, pixels, alignment, screenshot, then a cached run. */
async function canvasMode(page) {
  phase = "canvas";
  // a seed of its own: a server that ran this graph before would answer the first run from its cache
  const seed = Math.floor(Math.random() * 2 ** 31);
  const built = await page.evaluate(buildGraph, { steps: STEPS, predictor: opts.predictor, seed });
  check(
    built.widgets.apply.slice(-2).join() === "timeline,dynamics",
    `Apply ends with the timeline, then the chart (${built.widgets.apply})`,
  );
  check(built.widgets.keysteps.includes("keysteps_view"), `Keysteps has its widget (${built.widgets.keysteps})`);
  check(!built.widgetsSerialised, "the widgets are not saved in the workflow");
  if (frontendAtLeast("1.58.0")) {
    // the watch must see a deprecated call when one happens (this one is ours, not the extension's)
    const seen = await page.evaluate(() => {
      void window.__hyperalign.apply.inputs[0].link;
      return window.__deprecations.some((d) => /input\.link/.test(d.message));
    });
    check(seen, "the deprecation watch reports a read of input.link");
  }

  // Before any run: the plan from the widgets (mode S), then P with typed keysteps, then the link.
  await page.evaluate(() => window.app.canvas.draw(true, true));
  let state = await page.evaluate(pageState);
  check(
    state.timeline?.steps === STEPS,
    `the timeline reads ${STEPS} steps from the KSampler (${state.timeline?.steps})`,
  );
  check(state.timeline?.calls === STEPS, `mode S marks every step (${state.timeline?.calls})`);
  check(state.draws.timeline > 0 && state.chartOnGraphCanvas, "the widgets were painted on the graph canvas");

  await page.evaluate(setWidgets, { node: "apply", values: { mode: "P", keysteps: "0, 0.45" } });
  await page.evaluate(() => window.app.canvas.draw(true, true));
  state = await page.evaluate(pageState);
  check(
    JSON.stringify(state.timeline?.callSteps) === "[0,5]",
    `P with keysteps 0, 0.45 marks steps 0 and 5 (${state.timeline?.callSteps})`,
  );

  await page.evaluate(() => window.__hyperalign.linkKeysteps());
  state = await page.evaluate(pageState);
  check(/link/.test(state.timeline?.label ?? ""), `linked keysteps wait for a run (${state.timeline?.label})`);

  state = await runPrompt(page);
  const run = state.run;
  check(
    run?.steps === STEPS && run?.mode === "P",
    `hyperalign.run reached the Apply node (steps ${run?.steps}, mode ${run?.mode})`,
  );
  check(
    run?.calls?.length > 0 && run.calls.every((c) => Number.isFinite(c.norm)),
    `the run reported ${run?.calls?.length} hypernet calls with stats`,
  );
  check(state.liveSteps > 0, `hyperalign.step events arrived while sampling (${state.liveSteps})`);
  check(state.keysteps?.text?.length > 0, `Keysteps shows its string (${state.keysteps?.text})`);
  check(state.keystepsImages > 0, `Keysteps shows its plot (${state.keystepsImages} image)`);
  check(
    JSON.stringify(state.timeline?.keysteps) === JSON.stringify(run?.keysteps),
    `the timeline took the linked keysteps (${state.timeline?.keysteps} vs ${run?.keysteps})`,
  );
  const runSteps = (run?.calls ?? []).map((c) => c.step);
  check(
    JSON.stringify(state.timeline?.callSteps) === JSON.stringify(runSteps) && state.timeline?.basis === "run",
    `the timeline marks the steps the run predicted at (${state.timeline?.callSteps} vs ${runSteps}, ` +
      `basis ${state.timeline?.basis})`,
  );
  check(
    state.draws.dynamics > 0 && state.chartHeight >= 140,
    `the chart was painted at full height (${state.chartHeight})`,
  );

  // Layout for the screenshot, then check what the canvas shows inside each widget.
  await page.evaluate(hideChrome);
  const clip = await page.evaluate(fitView);
  await page.waitForTimeout(300);
  const colours = await page.evaluate(canvasColourCounts);
  log(`${phase}: pixels ${JSON.stringify(colours)}`);
  check(colours.timeline.call > 20, "the timeline shows its new-LoRA cells");
  check(
    colours.dynamics.norm > 20 && colours.dynamics.relative_change > 20,
    "the chart shows the norm and relative-change lines",
  );
  check(colours.keysteps.keystep > 5, "the keysteps strip shows its marks");
  const edges = await page.evaluate(canvasRightEdges);
  log(`${phase}: right edges (node units) ${JSON.stringify(edges)}`);
  for (const name of ["timeline", "dynamics"])
    check(
      edges.native !== null && Math.abs(edges[name] - edges.native) <= ALIGN_TOLERANCE,
      `the ${name} ends where the native widgets end (${edges[name]?.toFixed(1)} vs ${edges.native?.toFixed(1)})`,
    );

  await page.evaluate(hideChrome); // again: toasts may have appeared since
  const shot = join(OUT, "hyperalign-nodes.png");
  await page.screenshot({ path: shot, clip });
  log(`screenshot ${shot}`);
  if (opts.screenshot) {
    mkdirSync(dirname(resolve(opts.screenshot)), { recursive: true });
    copyFileSync(shot, resolve(opts.screenshot));
    log(`copied to ${opts.screenshot}`);
  }
  await page.evaluate(showChrome);

  // The same graph again: ComfyUI serves every node from its cache and nothing samples.
  const before = state;
  state = await runPrompt(page);
  check(state.cachedIds.includes(state.applyId), `ComfyUI answered Apply from its cache (${state.cachedIds})`);
  check(state.liveSteps === 0, `nothing was sampled (${state.liveSteps} step events)`);
  check(state.applyCached, "the Apply node knows its result came from the cache");
  check(
    state.chart?.calls === before.run?.calls?.length && /cache/.test(state.chart?.summary ?? ""),
    `the chart keeps the last run and says it came from the cache (${state.chart?.calls} calls: ` +
      `"${state.chart?.summary}")`,
  );
  const cachedColours = await page.evaluate(canvasColourCounts);
  check(cachedColours.dynamics.norm > 20, "after the cached run the chart still shows the lines");
  return { seed, colours, edges, cachedSummary: state.chart?.summary };
}

/** Nodes 2.0: the widgets in their own canvases, aligned, updated live by a new run. */
async function vueMode(page, seed) {
  phase = "nodes2";
  await page.evaluate(setVueNodes, true);
  await page.waitForFunction(
    () => {
      const s = window.__hyperalign;
      const element = document.querySelector(`[data-node-id="${s.apply.id}"]`);
      const painted = (name) => element?.contains(s.apply.widgets.find((w) => w.name === name).drawnOn);
      return window.LiteGraph.vueNodesMode !== false && painted("timeline") && painted("dynamics");
    },
    null,
    { timeout: 30_000 },
  );
  await page.waitForTimeout(500); // the containers settle (one resize, one redraw)
  let widgets = await page.evaluate(vueWidgets, { colours: COLOURS });
  log(`${phase}: widgets ${JSON.stringify(widgets)}`);
  check(widgets.timeline?.inNode && widgets.dynamics?.inNode, "the widgets paint into canvases inside the Vue node");
  check(widgets.timeline?.counts?.call > 20, "the timeline shows its new-LoRA cells");
  check(widgets.dynamics?.counts?.norm > 20, "the chart shows the last run");
  for (const name of ["timeline", "dynamics"]) {
    check(
      Math.abs(widgets[name]?.leftOffset ?? Infinity) <= ALIGN_TOLERANCE,
      `the ${name} starts where the native widgets start (off by ${widgets[name]?.leftOffset?.toFixed(1)} px)`,
    );
    check(
      Math.abs(widgets[name]?.rightOffset ?? Infinity) <= ALIGN_TOLERANCE,
      `the ${name} ends where the native widgets end (off by ${widgets[name]?.rightOffset?.toFixed(1)} px)`,
    );
  }

  // A new run (mode S, a new seed so the cache cannot answer) must reach the Vue canvases live.
  const before = await page.evaluate(pageState);
  await page.evaluate(setWidgets, { node: "apply", values: { mode: "S" } });
  const edited = await page.evaluate(pageState);
  check(
    edited.draws.timeline > before.draws.timeline && edited.timeline?.calls === STEPS,
    `editing the mode redraws the timeline in its Vue canvas (${edited.timeline?.label})`,
  );
  await page.evaluate(setWidgets, { node: "sampler", values: { seed: seed + 1 } });
  const state = await runPrompt(page);
  check(
    state.run?.mode === "S" && state.run?.calls?.length === STEPS && !state.applyCached,
    `the new run reached the chart (mode ${state.run?.mode}, ${state.run?.calls?.length} calls)`,
  );
  check(state.liveSteps === STEPS, `hyperalign.step events arrived while sampling (${state.liveSteps})`);
  check(
    state.draws.dynamics > before.draws.dynamics && !state.chartOnGraphCanvas,
    `the chart was repainted in its Vue canvas (${before.draws.dynamics} -> ${state.draws.dynamics} draws)`,
  );
  check(
    state.chart?.calls === STEPS && !/cache/.test(state.chart.summary),
    `the chart shows the new run (${state.chart?.summary})`,
  );
  check(
    state.timeline?.basis === "measured",
    `a run at every step gives the measured progress (${state.timeline?.basis})`,
  );
  widgets = await page.evaluate(vueWidgets, { colours: COLOURS });
  check(
    widgets.dynamics?.counts?.norm > 20 && widgets.timeline?.counts?.call > 20,
    `the new run is painted (${JSON.stringify(widgets.dynamics?.counts)})`,
  );
  return { widgets };
}

async function main() {
  mkdirSync(OUT, { recursive: true });
  const settings = await fetch(new URL("/api/settings", opts.url), { method: "POST", body: JSON.stringify(SETTINGS) });
  check(settings.ok, `server accepts settings (HTTP ${settings.status})`);
  const extensions = await (await fetch(new URL("/api/extensions", opts.url))).json();
  ourRoot = new URL(extensions.find((u) => u.endsWith("/dynamics.js")).replace(/dynamics\.js$/, ""), opts.url).href;
  log(`extension at ${ourRoot}`);

  const profile = mkdtempSync(join(tmpdir(), "hyperalign-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: opts.chromium,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    viewport: { width: 1500, height: 900 },
    deviceScaleFactor: 2,
    timeout: 60_000,
  });
  const consoleLines = [];
  const ourErrors = [];
  const results = {};
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(60_000);
    page.on("console", (m) => {
      const line = `[${m.type()}] ${m.text()} (${m.location()?.url ?? ""})`;
      consoleLines.push(line);
      if (m.type() === "error" && ours(line)) ourErrors.push(line);
    });
    page.on("pageerror", (e) => {
      consoleLines.push(`[pageerror] ${e.stack ?? e.message}`);
      if (ours(e.stack ?? e.message)) ourErrors.push(e.stack ?? e.message);
    });
    log(`chromium ${context.browser()?.version() ?? ""} -> ${opts.url}`);

    await page.goto(opts.url, { waitUntil: "domcontentloaded" });
    await page.waitForFunction(
      () => window.app?.graph && window.LiteGraph?.registered_node_types?.HyperAlignApply && window.app.canvas,
      null,
      { timeout: 90_000 },
    );
    results.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
    frontendVersion = results.frontend;
    log(`frontend ${results.frontend}`);
    if (opts.frontend)
      check(results.frontend === opts.frontend, `the server serves frontend ${opts.frontend} (${results.frontend})`);
    const watching = await page.evaluate(watchDeprecations);
    if (!watching) log("note: this frontend reports no deprecations (no LiteGraph.onDeprecationWarning)");

    results.canvas = await canvasMode(page);
    results.nodes2 = await vueMode(page, results.canvas.seed);

    phase = "both modes";
    const deprecations = await page.evaluate(() => window.__deprecations);
    const ourDeprecations = deprecations.filter((d) => ours(d.stack));
    log(`deprecation warnings: ${deprecations.length} in all, ${ourDeprecations.length} from our code`);
    check(
      ourDeprecations.length === 0,
      `our code uses no deprecated frontend API ${ourDeprecations
        .slice(0, 2)
        .map((d) => `${d.message} ${d.stack}`)
        .join(" | ")}`,
    );
    check(ourErrors.length === 0, `no errors from the extension in the console ${ourErrors.slice(0, 3).join(" | ")}`);
    await page.screenshot({ path: join(OUT, "nodes2.png") });
  } finally {
    writeFileSync(join(OUT, "console.log"), consoleLines.join("\n"));
    writeFileSync(join(OUT, "results.json"), JSON.stringify(results, null, 2));
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

main()
  .catch((error) => failures.push(`crashed (${phase}): ${error?.stack ?? error}`))
  .finally(() => {
    clearTimeout(deadline);
    if (failures.length) {
      console.error(`[browser] ${failures.length} failure(s):\n  - ${failures.join("\n  - ")}`);
      process.exit(1);
    }
    log("all checks passed");
  });
