// hyperalign.dynamics: on HyperAlignApply, a chart of the generated LoRA across the steps of the
// last run (norm, and cosine and relative change against the first call: paper Fig. 8) with the
// run summary. The Python side sends "hyperalign.step" ({node, call}) while sampling and
// "hyperalign.run" ({node, mode, steps, keysteps, seconds, summary, calls}) after each run. When
// ComfyUI answers a prompt from its cache nothing is sampled: the chart then shows the last run
// it saw, marked as such, or says that the result came from the cache.

import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { appendLiveCall, buildChart } from "./lib/chart.js";
import { CHART_EMPTY_HEIGHT, CHART_HEIGHT, drawChart } from "./lib/draw.js";
import { resolveNodeById, widgetValue } from "./lib/graph.js";
import { PromptRuns } from "./lib/runs.js";
import { FROM_FILE } from "./lib/timeline.js";
import { addCanvasWidget, repaint, upstreamNode } from "./lib/widget.js";

const NODE = "HyperAlignApply";
const CACHED_HINT = "LoRA dynamics: result from ComfyUI's cache, nothing was sampled (change the seed to sample)";
const prompts = new PromptRuns();

function applyNode(id) {
  const node = resolveNodeById(app.graph, id);
  return node && (node.comfyClass ?? node.type) === NODE ? node : null;
}

/** Remember what the predictor file said, for the timeline, when the widgets deferred to it. */
function rememberFile(node, detail) {
  const file = { ...(node.hyperalignFile ?? {}) };
  if (widgetValue(node, "mode") === FROM_FILE) file.mode = detail.mode;
  const keystepsFromFile = !String(widgetValue(node, "keysteps") ?? "").trim() && !upstreamNode(node, "keysteps");
  if (keystepsFromFile && detail.mode === "P" && Array.isArray(detail.keysteps)) file.keysteps = detail.keysteps;
  node.hyperalignFile = file;
}

function onRun(event) {
  const detail = event?.detail;
  prompts.ran(detail?.node);
  const node = applyNode(detail?.node);
  if (!node || !Array.isArray(detail.calls)) return;
  node.hyperalignRun = detail; // the browser test's hook
  node.hyperalignLive = null;
  node.hyperalignCached = false;
  rememberFile(node, detail);
  repaint(node, node.widgets ?? []);
}

function onStep(event) {
  const detail = event?.detail;
  prompts.ran(detail?.node);
  const node = applyNode(detail?.node);
  if (!node || !detail.call) return;
  node.hyperalignLive = appendLiveCall(node.hyperalignLive, detail.call);
  node.hyperalignCached = false;
  repaint(node, node.widgets ?? []);
}

function onPromptDone(event) {
  for (const id of prompts.finish(event?.detail?.prompt_id)) {
    const node = applyNode(id);
    if (!node) continue;
    node.hyperalignCached = true;
    repaint(node, node.widgets ?? []);
  }
}

/** What the chart shows: the run in progress, else the last finished run, else nothing. */
function chartOf(node) {
  const live = node.hyperalignLive;
  if (live) return buildChart({ ...live, steps: live.steps ?? node.hyperalignTimeline?.steps });
  if (!node.hyperalignRun) return null;
  return buildChart({ ...node.hyperalignRun, cached: Boolean(node.hyperalignCached) });
}

app.registerExtension({
  name: "hyperalign.dynamics",
  setup() {
    api.addEventListener("hyperalign.run", onRun);
    api.addEventListener("hyperalign.step", onStep);
    api.addEventListener("execution_start", (event) => prompts.start(event?.detail?.prompt_id));
    api.addEventListener("execution_cached", (event) => prompts.cached(event?.detail?.prompt_id, event?.detail?.nodes));
    api.addEventListener("execution_success", onPromptDone);
    api.addEventListener("execution_error", () => prompts.abandon());
    api.addEventListener("execution_interrupted", () => prompts.abandon());
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      const node = this;
      addCanvasWidget(node, "dynamics", {
        height: () => (node.hyperalignRun || node.hyperalignLive ? CHART_HEIGHT : CHART_EMPTY_HEIGHT),
        paint(ctx, box, palette, lowQuality) {
          node.hyperalignChart = chartOf(node); // also the browser test's hook
          const hint = node.hyperalignCached ? CACHED_HINT : undefined;
          drawChart(ctx, node.hyperalignChart, box, palette, lowQuality, hint);
        },
      });
      return result;
    };
  },
});
