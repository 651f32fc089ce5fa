// Browser test of the HyperAlign frontend extension against a running ComfyUI server.
//
//   node web/tests/browser/run.mjs --url http://127.0.0.1:8188 [--out test-artifacts/browser]
//        [--chromium /usr/bin/chromium] [--screenshot docs/images/hyperalign-nodes.png]
//
// The server must have this pack and tests/nodes/testing_pack (tiny models) loaded and a predictor
// named by --predictor in models/hyperalign; tests/browser/test_browser.py sets all of that up.
// Headless Debian Chromium is driven by playwright-core (no browser download). The test builds a
// small graph through the page's LiteGraph API, checks the timeline before running, queues the
// prompt, waits for the "hyperalign.run" report to reach the chart, checks the pixels the widgets
// painted, and saves a screenshot. Exit code 0 = pass; failures are listed on stderr.

import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";

import { chromium } from "playwright-core";

import { buildGraph, canvasColourCounts, fitView, hideChrome, pageState } from "./page.mjs";

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    out: { type: "string", default: "test-artifacts/browser" },
    chromium: { type: "string", default: process.env.CHROMIUM_PATH || "/usr/bin/chromium" },
    predictor: { type: "string", default: "tiny_sd15.safetensors" },
    screenshot: { type: "string" },
    timeout: { type: "string", default: "240" },
  },
});
if (!opts.url) {
  console.error("usage: node web/tests/browser/run.mjs --url http://127.0.0.1:PORT");
  process.exit(2);
}

const STEPS = 10;
const OUT = resolve(opts.out);
const failures = [];
const log = (...args) => console.log("[browser]", ...args);
function check(condition, message) {
  if (!condition) failures.push(message);
  log(condition ? "ok  " : "FAIL", message);
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

async function main() {
  mkdirSync(OUT, { recursive: true });
  const settings = await fetch(new URL("/api/settings", opts.url), { method: "POST", body: JSON.stringify(SETTINGS) });
  check(settings.ok, `server accepts settings (HTTP ${settings.status})`);

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
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(60_000);
    page.on("console", (m) => consoleLines.push(`[${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => consoleLines.push(`[pageerror] ${e.message}`));
    log(`chromium ${context.browser()?.version() ?? ""} -> ${opts.url}`);

    await page.goto(opts.url, { waitUntil: "domcontentloaded" });
    await page.waitForFunction(
      () => window.app?.graph && window.LiteGraph?.registered_node_types?.HyperAlignApply && window.app.canvas,
      null,
      { timeout: 90_000 },
    );
    const frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
    log(`frontend ${frontend}`);

    const built = await page.evaluate(buildGraph, { steps: STEPS, predictor: opts.predictor });
    check(
      built.widgets.apply.slice(-2).join() === "timeline,dynamics",
      `Apply ends with the timeline, then the chart (${built.widgets.apply})`,
    );
    check(built.widgets.keysteps.includes("keysteps_view"), `Keysteps has its widget (${built.widgets.keysteps})`);
    check(!built.widgetsSerialised, "the widgets are not saved in the workflow");

    // Before any run: the plan from the widgets (mode S), then P with typed keysteps, then the link.
    await page.evaluate(() => window.app.canvas.draw(true, true));
    let state = await page.evaluate(pageState);
    check(
      state.timeline?.steps === STEPS,
      `the timeline reads ${STEPS} steps from the KSampler (${state.timeline?.steps})`,
    );
    check(state.timeline?.calls === STEPS, `mode S marks every step (${state.timeline?.calls})`);
    check(state.draws.timeline > 0, "the timeline was painted");

    await page.evaluate(() => {
      const apply = window.__hyperalign.apply;
      apply.widgets.find((w) => w.name === "mode").value = "P";
      apply.widgets.find((w) => w.name === "keysteps").value = "0, 0.45";
      window.app.canvas.draw(true, true);
    });
    state = await page.evaluate(pageState);
    check(
      JSON.stringify(state.timeline?.callSteps) === "[0,5]",
      `P with keysteps 0, 0.45 marks steps 0 and 5 (${state.timeline?.callSteps})`,
    );

    await page.evaluate(() => window.__hyperalign.linkKeysteps());
    state = await page.evaluate(pageState);
    check(/link/.test(state.timeline?.label ?? ""), `linked keysteps wait for a run (${state.timeline?.label})`);

    // Run the graph and wait for the report.
    const started = Date.now();
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    // execution_success comes after every hyperalign.run of the prompt (same ordered socket).
    await page.waitForFunction(() => window.__hyperalign.errors.length || window.__hyperalign.done, null, {
      timeout: 180_000,
    });
    state = await page.evaluate(pageState);
    log(`run finished in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    check(state.errors.length === 0, `no execution errors ${JSON.stringify(state.errors).slice(0, 500)}`);
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
    // After a run the timeline is exact: from the per-step progress the run reported (optional
    // "step_progress" in hyperalign.run), else from the steps the run predicted at.
    const runSteps = (run?.calls ?? []).map((c) => c.step);
    check(
      JSON.stringify(state.timeline?.callSteps) === JSON.stringify(runSteps),
      `the timeline marks the steps the run predicted at (${state.timeline?.callSteps} vs ${runSteps}, ` +
        `basis ${state.timeline?.basis})`,
    );
    if (run?.step_progress)
      check(
        state.timeline?.basis === "measured",
        `the timeline uses the progress the run measured (${state.timeline?.basis})`,
      );
    else log(`note: hyperalign.run has no "step_progress"; the timeline is exact only while the plan is unchanged`);
    check(
      state.draws.dynamics > 0 && state.chartHeight >= 140,
      `the chart was painted at full height (${state.chartHeight})`,
    );

    // Layout for the screenshot, then check what the canvas shows inside each widget.
    await page.evaluate(hideChrome);
    const clip = await page.evaluate(fitView);
    await page.waitForTimeout(300);
    const colours = await page.evaluate(canvasColourCounts);
    log(`pixels: ${JSON.stringify(colours)}`);
    check(colours.timeline.call > 20, "the timeline shows its new-LoRA cells");
    check(
      colours.dynamics.norm > 20 && colours.dynamics.relative_change > 20,
      "the chart shows the norm and relative-change lines",
    );
    check(colours.keysteps.keystep > 5, "the keysteps strip shows its marks");

    await page.evaluate(hideChrome); // again: toasts may have appeared since
    const shot = join(OUT, "hyperalign-nodes.png");
    await page.screenshot({ path: shot, clip });
    log(`screenshot ${shot}`);
    if (opts.screenshot) {
      mkdirSync(dirname(resolve(opts.screenshot)), { recursive: true });
      copyFileSync(shot, resolve(opts.screenshot));
      log(`copied to ${opts.screenshot}`);
    }
    writeFileSync(join(OUT, "state.json"), JSON.stringify({ frontend, state, colours }, null, 2));

    const ours = consoleLines.filter((l) => /hyperalign/i.test(l) && /^\[(error|pageerror)\]/.test(l));
    check(ours.length === 0, `no errors from the extension in the console ${ours.slice(0, 3).join(" | ")}`);
  } finally {
    writeFileSync(join(OUT, "console.log"), consoleLines.join("\n"));
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

main()
  .catch((error) => failures.push(`crashed: ${error?.stack ?? error}`))
  .finally(() => {
    clearTimeout(deadline);
    if (failures.length) {
      console.error(`[browser] ${failures.length} failure(s):\n  - ${failures.join("\n  - ")}`);
      process.exit(1);
    }
    log("all checks passed");
  });
