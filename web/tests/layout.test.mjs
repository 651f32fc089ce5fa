// Nodes 2.0 layout on stand-in DOM elements shaped like the ones three frontends build around a
// canvas widget (rects as measured in Chromium at zoom 0.9; see web/js/lib/layout.js).
import assert from "node:assert/strict";
import { test } from "node:test";

import { nativeSpan, widgetBox } from "../js/lib/layout.js";

const ZOOM = 0.9;

/** A stand-in element: `left`/`right` in client px, padding in CSS px, children in order. */
function el(className, left, right, { padLeft = 0, padRight = 0, children = [], width } = {}) {
  const element = {
    className,
    children,
    parentElement: null,
    dataset: {},
    style: {},
    computed: { paddingLeft: `${padLeft}px`, paddingRight: `${padRight}px`, borderLeftWidth: "0px" },
    offsetTop: 0,
    offsetHeight: 100,
    getBoundingClientRect: () => ({ left, right, width: right - left }),
    get offsetWidth() {
      return width ?? (right - left) / ZOOM;
    },
    get clientWidth() {
      return this.offsetWidth;
    },
    get previousElementSibling() {
      const siblings = this.parentElement?.children ?? [];
      return siblings[siblings.indexOf(this) - 1] ?? null;
    },
    closest(selector) {
      const name = selector.slice(1);
      for (let e = this; e; e = e.parentElement) if (e.className.split(" ").includes(name)) return e;
      return null;
    },
    contains(other) {
      for (let e = other; e; e = e.parentElement) if (e === this) return true;
      return false;
    },
  };
  for (const child of children) child.parentElement = element;
  return element;
}

globalThis.getComputedStyle = (element) => element.computed;

/** The widget column of one frontend, with our canvas in its last row; returns [column, canvas]. */
function layout(frontend) {
  const slot = () => el("slot", 0, 10.8);
  if (frontend === "1.32") {
    // the column is padded; the canvas runs from node edge to node edge
    const canvas = el("canvas", 0.8, 379.2);
    const host = el("host", 0.8, 379.2, { children: [canvas] });
    const row = el("lg-node-widget", 0.8, 369.2, { children: [slot(), host] });
    return [el("lg-node-widgets", 0.8, 379.2, { padRight: 12, children: [row] }), canvas];
  }
  if (frontend === "1.49") {
    // each row is padded instead, and the canvas runs over that padding to the node's right edge
    const canvas = el("canvas", 0, 342);
    const host = el("host", 0, 342, { children: [canvas] });
    const row = el("lg-node-widget", 0, 342, { padRight: 12, children: [slot(), host] });
    return [el("lg-node-widgets", 0, 342, { children: [row] }), canvas];
  }
  // 1.58: the column is padded, the canvas starts 12 px left of its cell and is no wider than it
  const canvas = el("canvas", 0, 320.4);
  const host = el("host", 0, 320.4, { children: [canvas] });
  const cell = el("cell", 10.8, 331.2, { children: [host] });
  const row = el("lg-node-widget", 0, 331.2, { children: [slot(), cell] });
  const wrapper = el("wrapper", 0, 331.2, { children: [row] });
  return [el("lg-node-widgets", 0, 342, { padRight: 12, children: [wrapper] }), canvas];
}

test("the native widgets span from the input dot's cell to the row's inner right edge", () => {
  for (const [frontend, right] of [
    ["1.32", 369.2],
    ["1.49", 342 - 12 * ZOOM],
    ["1.58", 331.2],
  ]) {
    const [column, canvas] = layout(frontend);
    const span = nativeSpan(canvas, column, ZOOM);
    assert.ok(Math.abs(span.left - 10.8) < 1e-6, `${frontend}: left ${span.left}`);
    assert.ok(Math.abs(span.right - right) < 1e-6, `${frontend}: right ${span.right} (want ${right})`);
  }
});

test("a canvas that runs over the row's padding draws inside it (1.49)", () => {
  const [, canvas] = layout("1.49");
  const box = widgetBox(canvas, 380, 4, 50);
  assert.ok(Math.abs(box.x - 12) < 1e-6 && Math.abs(box.x + box.width - 368) < 1e-6, JSON.stringify(box));
  assert.equal(canvas.parentElement.style.width, undefined, "a container that reaches far enough is left alone");
});

test("a container that ends short of the native widgets is stretched to them (1.58)", () => {
  const [, canvas] = layout("1.58");
  widgetBox(canvas, 356, 4, 50);
  assert.equal(canvas.parentElement.style.width, "calc(100% + 12px)");
});

test("without a widget row the column's padded edges are used", () => {
  const canvas = el("canvas", 0, 342);
  const host = el("host", 0, 342, { children: [canvas] });
  const column = el("lg-node-widgets", 0, 342, { padRight: 12, children: [host] });
  const span = nativeSpan(canvas, column, ZOOM);
  assert.deepEqual([span.left, span.right].map((v) => Math.round(v * 10) / 10), [10.8, 331.2]);
});

test("canvas mode keeps LiteGraph's 15 px inset", () => {
  assert.deepEqual(widgetBox({}, 300, 7, 50), { x: 15, y: 7, width: 270 });
});
