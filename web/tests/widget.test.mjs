// The widget helper on a stand-in node: order, serialisation flags, failure containment.
import assert from "node:assert/strict";
import { test } from "node:test";

import { addCanvasWidget, onWidgetChange } from "../js/lib/widget.js";

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
