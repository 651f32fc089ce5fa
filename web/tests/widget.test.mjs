// The widget helper on a stand-in node: order, serialisation flags, failure containment.
import assert from "node:assert/strict";
import { test } from "node:test";

import { addCanvasWidget, onWidgetChange, upstreamNode } from "../js/lib/widget.js";

function fakeNode() {
  return {
    size: [300, 100],
    widgets: [{ name: "mode", value: "S" }],
    addCustomWidget(widget) {
      this.widgets.push(widget);
      return widget;
    },
  };
}

test("our widgets sit below the node's own, timeline before chart, whichever is added first", () => {
  const node = fakeNode();
  addCanvasWidget(node, "dynamics", { height: () => 24, paint() {} });
  addCanvasWidget(node, "timeline", { height: () => 50, paint() {} });
  assert.deepEqual(
    node.widgets.map((w) => w.name),
    ["mode", "timeline", "dynamics"],
  );
});

test("the widgets are neither saved nor sent, and report their size", () => {
  const node = fakeNode();
  const widget = addCanvasWidget(node, "timeline", { height: () => 50, paint() {} });
  assert.equal(widget.serialize, false);
  assert.equal(widget.options.serialize, false);
  assert.deepEqual(widget.computeSize(), [300, 50]);
});

test("a drawing error is contained and counted as no draw", (t) => {
  const errors = t.mock.method(console, "error", () => {});
  const node = fakeNode();
  const widget = addCanvasWidget(node, "broken", {
    height: () => 10,
    paint() {
      throw new Error("boom");
    },
  });
  widget.draw({}, node, 300, 0, 20, false);
  widget.draw({}, node, 300, 0, 20, false);
  assert.equal(widget.draws, 0);
  assert.equal(errors.mock.callCount(), 1);
});

test("widget callbacks are chained, not replaced", () => {
  const node = fakeNode();
  const calls = [];
  node.widgets[0].callback = (v) => calls.push(`own ${v}`);
  onWidgetChange(node, ["mode"], () => calls.push("ours"));
  node.widgets[0].callback("P");
  assert.deepEqual(calls, ["own P", "ours"]);
});

test("on the graph canvas the box is inset like LiteGraph's own widgets", () => {
  const node = fakeNode();
  const boxes = [];
  const widget = addCanvasWidget(node, "timeline", { height: () => 50, paint: (_ctx, box) => boxes.push(box) });
  widget.draw({ canvas: {} }, node, 300, 40, 20, false);
  assert.deepEqual(boxes, [{ x: 15, y: 40, width: 270 }]);
  assert.equal(widget.draws, 1);
});

test("linked inputs are found through isInputConnected, not the deprecated input.link", () => {
  const source = { id: 1 };
  const inputs = [{ name: "model" }, { name: "keysteps" }];
  // a getter that fails the test if read: frontend 1.58 warns on every read of input.link
  for (const input of inputs)
    Object.defineProperty(input, "link", {
      get() {
        throw new Error("input.link read");
      },
    });
  const node = {
    inputs,
    findInputSlot: (name) => inputs.findIndex((i) => i.name === name),
    isInputConnected: (slot) => slot === 1,
    getInputNode: (slot) => (slot === 1 ? source : null),
  };
  assert.equal(upstreamNode(node, "keysteps"), source);
  assert.equal(upstreamNode(node, "model"), null);
  assert.equal(upstreamNode(node, "missing"), null);
});

test("without isInputConnected (old LiteGraph) the link field decides", () => {
  const source = { id: 1 };
  const node = {
    inputs: [{ name: "keysteps", link: null }],
    findInputSlot: () => 0,
    getInputNode: () => source,
  };
  assert.equal(upstreamNode(node, "keysteps"), null);
  node.inputs[0].link = 7;
  assert.equal(upstreamNode(node, "keysteps"), source);
});
