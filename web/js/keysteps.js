// hyperalign.keysteps: on HyperAlignKeysteps, the keysteps string it found and where the keysteps
// fall between noise and image. The node's plot is its ui "images", which ComfyUI shows itself.

import { app } from "../../scripts/app.js";
import { KEYSTEPS_HEIGHT, drawKeysteps } from "./lib/draw.js";
import { parseKeysteps } from "./lib/schedule.js";
import { addCanvasWidget, repaint } from "./lib/widget.js";

const NODE = "HyperAlignKeysteps";

function keystepsOf(message) {
  const text = message?.hyperalign_keysteps?.[0];
  if (typeof text !== "string") return null;
  try {
    return { text, keysteps: parseKeysteps(text) };
  } catch {
    return { text, keysteps: null };
  }
}

app.registerExtension({
  name: "hyperalign.keysteps",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      const node = this;
      node.hyperalignKeystepsWidget = addCanvasWidget(node, "keysteps_view", {
        height: () => KEYSTEPS_HEIGHT,
        paint(ctx, box, palette, lowQuality) {
          drawKeysteps(ctx, node.hyperalignKeysteps, box, palette, lowQuality);
        },
      });
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message, ...rest) {
      const result = onExecuted?.call(this, message, ...rest);
      const found = keystepsOf(message);
      if (found) {
        this.hyperalignKeysteps = found; // read by the Apply timeline when linked; test hook
        repaint(this, [this.hyperalignKeystepsWidget]);
        for (const node of this.graph?.nodes ?? []) if (node.hyperalignTimeline) repaint(node, node.widgets ?? []);
      }
      return result;
    };
  },
});
