// Where a HyperAlign widget draws its box, so that its edges line up with the node's own widgets.
//
// Canvas mode paints every widget on the graph canvas with `width` = the node's width, and LiteGraph
// insets its widgets 15 px on each side: so do we. Nodes 2.0 (Vue nodes, setting
// Comfy.VueNodes.Enabled) gives a canvas-drawn widget a <canvas> of its own in the node's DOM, placed
// differently by each frontend release: 1.32 puts it flush with the widget column but 13 px too
// high, in a container of no height (so two such widgets overlap); 1.58 puts it 12 px left of the
// column and no wider than it, so its right end falls short of the native widgets. There the box is
// measured against the widget column (`.lg-node-widgets`), whose padded inner edges are where the
// native widgets start and end, and our widget's own container is stretched to reach them.

export const MARGIN = 15;

/** The box {x, y, width} a widget `height` tall draws in, in the coordinates of `canvas`. */
export function widgetBox(canvas, width, y, height) {
  const column = canvas?.closest?.(".lg-node-widgets");
  if (!column) return { x: MARGIN, y, width: Math.max(10, width - 2 * MARGIN) };
  fitContainer(canvas, column, height);
  const { zoom, inset, own, col } = measure(canvas, column, width);
  const left = Math.max(0, (col.left - own.left) / zoom + inset);
  const right = Math.min(width, (col.right - own.left) / zoom - inset);
  return { x: left, y, width: Math.max(10, right - left) };
}

function measure(canvas, column, width) {
  const own = canvas.getBoundingClientRect();
  return {
    own,
    col: column.getBoundingClientRect(),
    zoom: own.width / (canvas.offsetWidth || width) || 1, // the graph's zoom (a CSS transform)
    inset: Number.parseFloat(getComputedStyle(column).paddingRight) || 0,
  };
}

/**
 * Make the container the frontend made for this widget hold the whole canvas, below the widget
 * above it, and reach the native widgets' right edge. Each change is made once per container; the
 * frontend redraws the widget when its size changes.
 */
function fitContainer(canvas, column, height) {
  const host = canvas.parentElement;
  if (!host) return;
  const { zoom, inset, own, col } = measure(canvas, column, canvas.offsetWidth);
  const short = (col.right - own.right) / zoom - inset; // px between our right end and theirs
  if (short > 0.5 && !host.dataset.hyperalignWidened) {
    const extra = host.offsetWidth - (host.parentElement?.clientWidth ?? host.offsetWidth) + short;
    host.style.width = `calc(100% + ${Math.ceil(extra)}px)`;
    host.dataset.hyperalignWidened = "1";
  }
  if (canvas.offsetTop < 0) canvas.style.marginTop = "0px";
  if (host.dataset.hyperalignHeight || host.offsetHeight < height) {
    host.style.minHeight = `${height + 2}px`;
    host.dataset.hyperalignHeight = "1";
  }
}
