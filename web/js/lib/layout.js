// Where a HyperAlign widget draws its box, so that its edges line up with the node's own widgets.
//
// Canvas mode paints every widget on the graph canvas with `width` = the node's width, and LiteGraph
// insets its widgets 15 px on each side: so do we. Nodes 2.0 (Vue nodes, setting
// Comfy.VueNodes.Enabled) gives a canvas-drawn widget a <canvas> of its own in the node's DOM, inside
// a row (`.lg-node-widget`) of the widget column (`.lg-node-widgets`), and each frontend release
// places and pads it differently: 1.32 pads the column, puts the canvas 13 px too high in a container
// of no height (so two such widgets overlap); 1.49 pads each row instead and lets the canvas run over
// that padding to the node's edge; 1.58 pads the column and puts the canvas 12 px left of the row,
// no wider than it, so it ends short. So the box is measured, not assumed: the native widgets of a
// row start after the cells before ours (the input dot's) and end at the row's inner right edge, and
// our container is stretched where it does not reach that edge.

export const MARGIN = 15;

/** The box {x, y, width} a widget `height` tall draws in, in the coordinates of `canvas`. */
export function widgetBox(canvas, width, y, height) {
  const column = canvas?.closest?.(".lg-node-widgets");
  if (!column) return { x: MARGIN, y, width: Math.max(10, width - 2 * MARGIN) };
  fitContainer(canvas, column, height);
  const { own, zoom, span } = measure(canvas, column, width);
  const left = Math.max(0, (span.left - own.left) / zoom);
  const right = Math.min(width, (span.right - own.left) / zoom);
  return { x: left, y, width: Math.max(10, right - left) };
}

/** Our canvas's rect, the graph's zoom (a CSS transform) and the native widgets' span, in client px. */
function measure(canvas, column, width) {
  const own = canvas.getBoundingClientRect();
  const zoom = own.width / (canvas.offsetWidth || width) || 1;
  return { own, zoom, span: nativeSpan(canvas, column, zoom) };
}

/**
 * Where the node's own widgets start and end on the screen (client px): in the row that holds our
 * canvas, from the right end of the cells before ours (the input dot) to the row's inner right edge.
 * Without such a row, the column's inner edges, inset on the left as much as on the right.
 */
export function nativeSpan(canvas, column, zoom) {
  const row = canvas.closest(".lg-node-widget");
  const box = row && column.contains(row) ? row : column;
  const rect = box.getBoundingClientRect();
  const style = getComputedStyle(box);
  const px = (value) => (Number.parseFloat(value) || 0) * zoom;
  const right = rect.right - px(style.paddingRight) - px(style.borderRightWidth);
  let left = rect.left + px(style.paddingLeft) + px(style.borderLeftWidth);
  if (box === column) return { left: left + px(style.paddingRight), right };
  const ours = [...row.children].find((child) => child.contains(canvas));
  for (let cell = ours?.previousElementSibling; cell; cell = cell.previousElementSibling)
    left = Math.max(left, cell.getBoundingClientRect().right);
  return { left, right };
}

/**
 * Make the container the frontend made for this widget hold the whole canvas, below the widget
 * above it, and reach the native widgets' right edge. Each change is made once per container; the
 * frontend redraws the widget when its size changes.
 */
function fitContainer(canvas, column, height) {
  const host = canvas.parentElement;
  if (!host) return;
  const { own, zoom, span } = measure(canvas, column, canvas.offsetWidth);
  const short = (span.right - own.right) / zoom; // px between our right end and theirs
  if (short > 0.5 && !host.dataset.hyperalignWidened) {
    const extra = host.offsetWidth - (host.parentElement?.clientWidth ?? host.offsetWidth) + short;
    host.style.width = `calc(100% + ${Math.ceil(extra - 0.01)}px)`; // not a px more for a rounding error
    host.dataset.hyperalignWidened = "1";
  }
  if (canvas.offsetTop < 0) canvas.style.marginTop = "0px";
  if (host.dataset.hyperalignHeight || host.offsetHeight < height) {
    host.style.minHeight = `${height + 2}px`;
    host.dataset.hyperalignHeight = "1";
  }
}
