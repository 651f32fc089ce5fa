// hyperalign.timeline: on HyperAlignApply, a strip of the denoising steps that marks where the
// LoRA is regenerated (S every step, I once, P at the keysteps), redrawn as the inputs change.
//
// Step count: the first node downstream of Apply (following links breadth-first) with a numeric
// "steps" widget, e.g. KSampler, KSamplerAdvanced or BasicScheduler; its denoise and
// start/end_at_step are honoured. Without one the strip shows 20 steps. Step i is assumed to have
// progress i/steps (a schedule linear in model time). After a run the marks are exact: with the
// progress the run measured per step (a run that predicted at every step reports it, same step
// count), or else, while the plan is unchanged, the steps it predicted at. Mode "from_file" and
// empty keysteps come from the last run's report.

import { app } from "../../scripts/app.js";
import { TIMELINE_HEIGHT, drawTimeline } from "./lib/draw.js";
import { findSampler, samplerSettings, widgetValue } from "./lib/graph.js";
import { buildTimeline, resolveSchedule, runProgress } from "./lib/timeline.js";
import { addCanvasWidget, downstreamNodes, onWidgetChange, repaint, upstreamNode } from "./lib/widget.js";

const NODE = "HyperAlignApply";
const INPUTS = ["mode", "strength", "keysteps", "start_percent", "end_percent"];

/** The timeline model for an Apply node as its widgets and graph stand now. */
export function timelineOf(node) {
  const linked = upstreamNode(node, "keysteps");
  const schedule = resolveSchedule({
    mode: widgetValue(node, "mode"),
    keystepsText: widgetValue(node, "keysteps") ?? "",
    linkedKeysteps: linked ? { keysteps: linked.hyperalignKeysteps?.keysteps ?? null } : null,
    fileInfo: node.hyperalignFile ?? null,
  });
  return buildTimeline({
    schedule,
    sampler: samplerSettings(findSampler(node, downstreamNodes)),
    startPercent: widgetValue(node, "start_percent") ?? 0,
    endPercent: widgetValue(node, "end_percent") ?? 1,
    measuredProgress: runProgress(node.hyperalignRun),
    lastRun: node.hyperalignRun ?? null,
  });
}

app.registerExtension({
  name: "hyperalign.timeline",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      const node = this;
      const widget = addCanvasWidget(node, "timeline", {
        height: () => TIMELINE_HEIGHT,
        paint(ctx, box, palette, lowQuality) {
          node.hyperalignTimeline = timelineOf(node); // also the browser test's hook
          drawTimeline(ctx, node.hyperalignTimeline, box, palette, lowQuality);
        },
      });
      onWidgetChange(node, INPUTS, () => repaint(node, [widget]));
      return result;
    };
  },
});
