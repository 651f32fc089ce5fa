// A canvas-drawn, non-serialised widget for HyperAlign nodes, plus the small graph helpers the
// extensions share. No ComfyUI imports: the node and LiteGraph come in as arguments.

import { themePalette } from "./draw.js";
import { widgetBox } from "./layout.js";

const reported = new Set();

/**
 * Add a widget that draws itself on the node with `paint(ctx, box, palette, lowQuality)` inside
 * `box` {x, y, width} (lined up with the node's own widgets) and is `height()` tall. It stores no
 * value: it is not saved in workflows nor sent in prompts.
 */
export function addCanvasWidget(node, name, { height, paint }) {
  const widget = {
    name,
    type: `hyperalign.${name}`,
    value: "",
    serialize: false,
    options: { serialize: false },
    draws: 0, // test hooks: how often it was painted, on which canvas, where
    drawnOn: null,
    box: null,
    draw(ctx, _node, width, y, _h, lowQuality) {
      try {
        widget.box = widgetBox(ctx.canvas, width, y, height());
        paint(ctx, widget.box, themePalette(globalThis.LiteGraph), Boolean(lowQuality));
        widget.drawnOn = ctx.canvas;
        widget.draws += 1;
      } catch (error) {
        // A drawing bug must never break the canvas; say it once per widget kind.
        if (!reported.has(name)) console.error(`[HyperAlign] ${name} widget failed to draw`, error);
        reported.add(name);
      }
    },
    computeSize(width) {
      return [width ?? node.size?.[0] ?? 0, height()];
    },
  };
  node.addCustomWidget(widget);
  placeLast(node);
  return widget;
}

// Our widgets go below the node's own, in this order whichever extension loaded first.
const ORDER = ["timeline", "dynamics", "keysteps_view"];

function placeLast(node) {
  const ours = (w) => ORDER.includes(w.name) && String(w.type).startsWith("hyperalign.");
  const sorted = node.widgets.filter(ours).sort((a, b) => ORDER.indexOf(a.name) - ORDER.indexOf(b.name));
  node.widgets.splice(0, node.widgets.length, ...node.widgets.filter((w) => !ours(w)), ...sorted);
}

/** Repaint a node now, on the graph canvas and in Vue node mode (which re-runs `triggerDraw`). */
export function repaint(node, widgets) {
  for (const widget of widgets) widget?.triggerDraw?.();
  node.setDirtyCanvas?.(true, true);
  node.graph?.setDirtyCanvas?.(true, true);
}

/** Nodes fed by `node`'s outputs. */
export function downstreamNodes(node) {
  const nodes = [];
  for (const [slot] of (node.outputs ?? []).entries()) nodes.push(...(node.getOutputNodes?.(slot) ?? []));
  return nodes;
}

/** The node linked into input `name`, or null when that input is not linked. */
export function upstreamNode(node, name) {
  const slot = node.findInputSlot?.(name) ?? -1;
  if (slot < 0 || !inputConnected(node, slot)) return null;
  return node.getInputNode?.(slot) ?? null;
}

// `input.link` is deprecated from frontend 1.58 on; isInputConnected is there from 1.27 (the
// floor), the fallback only serves LiteGraph builds without it.
function inputConnected(node, slot) {
  if (typeof node.isInputConnected === "function") return node.isInputConnected(slot);
  return node.inputs?.[slot]?.link != null;
}

/** Run `after` whenever one of the named widgets changes, keeping any existing callback. */
export function onWidgetChange(node, names, after) {
  for (const widget of node.widgets ?? []) {
    if (!names.includes(widget.name)) continue;
    const previous = widget.callback;
    widget.callback = function (...args) {
      const result = previous?.apply(this, args);
      after();
      return result;
    };
  }
}
