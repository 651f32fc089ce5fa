// Reading the LiteGraph graph around a HyperAlign node, through duck-typed nodes (node.widgets,
// a downstream() callback, graph.getNodeById), so it runs on plain objects in tests.

import { DEFAULT_STEPS } from "./timeline.js";

export function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

/**
 * The sampler that decides the step count: breadth-first downstream from `start` along links
 * (`downstream(node)` lists the nodes fed by `node`), the first node with a numeric "steps" widget
 * (KSampler, KSamplerAdvanced, BasicScheduler, ...). Returns null if none is found within maxDepth.
 */
export function findSampler(start, downstream, maxDepth = 8) {
  const seen = new Set([start]);
  let frontier = [start];
  for (let depth = 0; depth < maxDepth && frontier.length; depth++) {
    const next = [];
    for (const node of frontier) {
      for (const child of downstream(node) ?? []) {
        if (!child || seen.has(child)) continue;
        seen.add(child);
        if (Number.isFinite(Number(widgetValue(child, "steps"))) && widgetValue(child, "steps") !== "") return child;
        next.push(child);
      }
    }
    frontier = next;
  }
  return null;
}

/** Sampler settings the timeline uses; DEFAULT_STEPS when no sampler is connected. */
export function samplerSettings(sampler) {
  if (!sampler) return { steps: DEFAULT_STEPS, source: "default" };
  const settings = { steps: Number(widgetValue(sampler, "steps")), source: sampler.type ?? "sampler" };
  const denoise = widgetValue(sampler, "denoise");
  if (denoise !== undefined) settings.denoise = Number(denoise);
  const startStep = widgetValue(sampler, "start_at_step");
  const endStep = widgetValue(sampler, "end_at_step");
  if (startStep !== undefined) settings.startStep = Number(startStep);
  if (endStep !== undefined) settings.endStep = Number(endStep);
  return settings;
}

/** A node by its execution id; "12:5" is node 5 inside the subgraph of node 12. */
export function resolveNodeById(graph, id) {
  let current = graph;
  const parts = String(id).split(":");
  for (const [index, part] of parts.entries()) {
    const node = current?.getNodeById?.(part) ?? current?.getNodeById?.(Number(part)) ?? null;
    if (index === parts.length - 1 || !node) return node;
    current = node.subgraph;
  }
  return null;
}
