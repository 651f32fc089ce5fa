// Functions that run.mjs evaluates inside the ComfyUI page (each is sent as source text, so each
// one is self-contained: no imports, no module-level names).

/** Build the test graph with the page's LiteGraph API; returns what the widgets look like. */
export async function buildGraph({ steps, predictor, seed }) {
  const { app, LiteGraph } = window;
  const api = window.comfyAPI.api.api;
  const graph = app.graph;
  graph.clear();
  const state = { errors: [], done: false, liveSteps: 0, cached: [] };
  window.__hyperalign = state;
  api.addEventListener("execution_error", (e) => state.errors.push(e.detail));
  api.addEventListener("execution_success", () => (state.done = true));
  api.addEventListener("execution_cached", (e) => state.cached.push(...(e.detail?.nodes ?? []).map(String)));
  api.addEventListener("hyperalign.step", () => (state.liveSteps += 1));

  const add = (type, pos, values = {}, { width = 0, title, collapsed = false } = {}) => {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error(`node type ${type} is not registered`);
    graph.add(node);
    node.pos = pos;
    if (title) node.title = title;
    for (const [name, value] of Object.entries(values)) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`${type} has no widget ${name}`);
      widget.value = value;
    }
    node.setSize([Math.max(width, node.size[0]), node.computeSize()[1]]);
    if (collapsed) node.collapse(true);
    return node;
  };
  // Layout for the README screenshot: the test plumbing collapsed on the left, then the HyperAlign
  // nodes and the sampler, left to right.
  const fixed = { seed, control_after_generate: "fixed" };
  const sampling = { ...fixed, steps, cfg: 2, sampler_name: "euler", scheduler: "normal" };
  const model = add(
    "HyperAlignTestTinyModel",
    [0, 200],
    { ...fixed, family: "sd15" },
    { title: "Tiny SD1.5 (test)", collapsed: true },
  );
  const cond = add(
    "HyperAlignTestConditioning",
    [0, 260],
    { ...fixed, family: "sd15", batch: 1 },
    { title: "Test prompts", collapsed: true },
  );
  const latent = add("EmptyLatentImage", [0, 320], { width: 64, height: 64, batch_size: 1 }, { collapsed: true });
  const loader = add("HyperAlignLoader", [200, 0], { predictor_name: predictor }, { width: 300 });
  const keysteps = add("HyperAlignKeysteps", [200, 130], { ...sampling, count: 3 }, { width: 300 });
  const apply = add("HyperAlignApply", [540, 0], { mode: "S", strength: 1, keysteps: "" }, { width: 380 });
  const sampler = add("KSampler", [960, 0], { ...sampling, denoise: 1 }, { width: 260 });
  const save = add("SaveLatent", [960, 320], { filename_prefix: "hyperalign_browser_test" }, { collapsed: true });

  model.connect(0, apply, "model");
  loader.connect(0, apply, "predictor");
  apply.connect(0, sampler, "model");
  for (const target of [sampler, keysteps]) {
    if (target === keysteps) model.connect(0, keysteps, "model");
    cond.connect(0, target, "positive");
    cond.connect(1, target, "negative");
    latent.connect(0, target, "latent_image");
  }
  sampler.connect(0, save, "samples");
  Object.assign(state, { loader, model, cond, latent, keysteps, apply, sampler, save });
  state.linkKeysteps = () => {
    keysteps.connect(0, apply, "keysteps");
    app.canvas.draw(true, true);
  };

  // ids: a string in some frontends (1.58: "1"), a number in their serialised form
  const serialised = graph.serialize().nodes.find((n) => String(n.id) === String(apply.id));
  const prompt = await app.graphToPrompt();
  const inputs = prompt.output[String(apply.id)]?.inputs ?? {};
  return {
    widgets: { apply: apply.widgets.map((w) => w.name), keysteps: keysteps.widgets.map((w) => w.name) },
    widgetsSerialised:
      serialised.widgets_values.length !== apply.widgets.filter((w) => w.serialize !== false).length ||
      "timeline" in inputs ||
      "dynamics" in inputs,
  };
}

/**
 * Record LiteGraph's deprecation warnings with the stack that raised them, every time (not once per
 * message), so the runner can tell whether our extension uses a deprecated API.
 */
export function watchDeprecations() {
  const { LiteGraph } = window;
  window.__deprecations = [];
  if (!Array.isArray(LiteGraph.onDeprecationWarning)) return false;
  LiteGraph.alwaysRepeatWarnings = true;
  LiteGraph.onDeprecationWarning.push((message) =>
    window.__deprecations.push({ message: String(message), stack: new Error().stack }),
  );
  return true;
}

/** Queue the graph as it stands; the runner then waits for `done` or an error. */
export async function queuePrompt() {
  const s = window.__hyperalign;
  Object.assign(s, { errors: [], done: false, liveSteps: 0, cached: [] });
  await window.app.queuePrompt(0, 1);
}

/** Set a widget value as the UI would (value, then its callback: the frontend's change hook). */
export function setWidgets({ node, values }) {
  const target = window.__hyperalign[node];
  for (const [name, value] of Object.entries(values)) {
    const widget = target.widgets.find((w) => w.name === name);
    widget.value = value;
    widget.callback?.(value, window.app.canvas, target);
  }
  window.app.canvas.setDirty(true, true);
}

/** Switch Nodes 2.0 (Vue nodes) on or off through the settings store, as the settings dialog does. */
export async function setVueNodes(on) {
  await window.app.extensionManager.setting.set("Comfy.VueNodes.Enabled", on);
}

/** What the HyperAlign widgets hold now (plain JSON). */
export function pageState() {
  const s = window.__hyperalign;
  const widget = (node, name) => node.widgets.find((w) => w.name === name);
  const timeline = s.apply.hyperalignTimeline;
  const chart = s.apply.hyperalignChart;
  const outputs = window.app.nodeOutputs?.[String(s.keysteps.id)];
  const graphCanvas = window.app.canvas.canvas;
  return JSON.parse(
    JSON.stringify({
      errors: s.errors,
      run: s.apply.hyperalignRun ?? null,
      liveSteps: s.liveSteps,
      cachedIds: s.cached,
      applyId: String(s.apply.id),
      applyCached: Boolean(s.apply.hyperalignCached),
      chart: chart && { calls: chart.calls, summary: chart.summary },
      timeline: timeline && {
        steps: timeline.steps,
        calls: timeline.calls,
        callSteps: timeline.cells.filter((c) => c.call).map((c) => c.index),
        label: timeline.label,
        basis: timeline.basis,
        keysteps: timeline.schedule.keysteps,
      },
      keysteps: s.keysteps.hyperalignKeysteps ?? null,
      keystepsImages: Math.max(s.keysteps.imgs?.length ?? 0, outputs?.images?.length ?? 0),
      draws: {
        timeline: widget(s.apply, "timeline").draws,
        dynamics: widget(s.apply, "dynamics").draws,
        keysteps: widget(s.keysteps, "keysteps_view").draws,
      },
      // where the chart was last painted: the graph canvas, or its own canvas in a Vue node
      chartOnGraphCanvas: widget(s.apply, "dynamics").drawnOn === graphCanvas,
      chartHeight: widget(s.apply, "dynamics").computeSize()[1],
    }),
  );
}

/**
 * Hide (opacity 0) every element that is not the graph canvas or one of its ancestors (menus, toolbars,
 * toasts), so a screenshot shows only the graph. showChrome() undoes it.
 */
export function hideChrome() {
  window.__hiddenChrome = window.__hiddenChrome ?? [];
  for (let el = window.app.canvas.canvas; el.parentElement; el = el.parentElement) {
    // opacity, not visibility: a child cannot override it
    for (const sibling of el.parentElement.children) {
      if (sibling === el || sibling.style.opacity === "0") continue;
      window.__hiddenChrome.push([sibling, sibling.style.opacity]);
      sibling.style.opacity = "0";
    }
  }
}

export function showChrome() {
  for (const [el, opacity] of window.__hiddenChrome ?? []) el.style.opacity = opacity;
  window.__hiddenChrome = [];
}

/** Zoom and pan so every node fits the free middle of the window; returns the screenshot clip. */
export function fitView() {
  const { app, LiteGraph } = window;

  const canvas = app.canvas;
  canvas.deselectAll?.();
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const rects = app.graph.nodes.map(
    (n) => n.boundingRect ?? [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title],
  );
  const box = [
    Math.min(...rects.map((r) => r[0])),
    Math.min(...rects.map((r) => r[1])),
    Math.max(...rects.map((r) => r[0] + r[2])),
    Math.max(...rects.map((r) => r[1] + r[3])),
  ];
  const rect = canvas.canvas.getBoundingClientRect();
  const free = { left: 24, top: 24, right: 24, bottom: 24 };
  const width = rect.width - free.left - free.right;
  const height = rect.height - free.top - free.bottom;
  const scale = Math.min(width / (box[2] - box[0]), height / (box[3] - box[1]), 1.25);
  canvas.ds.scale = scale;
  canvas.ds.offset[0] = (free.left + width / 2) / scale - (box[0] + box[2]) / 2;
  canvas.ds.offset[1] = (free.top + height / 2) / scale - (box[1] + box[3]) / 2;
  canvas.setDirty(true, true);
  canvas.draw(true, true);
  const pad = 14;
  const toScreen = (x, y) => [
    (x + canvas.ds.offset[0]) * scale + rect.left,
    (y + canvas.ds.offset[1]) * scale + rect.top,
  ];
  const [x0, y0] = toScreen(box[0], box[1]);
  const [x1, y1] = toScreen(box[2], box[3]);
  return { x: Math.max(0, x0 - pad), y: Math.max(0, y0 - pad), width: x1 - x0 + 2 * pad, height: y1 - y0 + 2 * pad };
}

/** Pixels near each HyperAlign colour inside each widget's area of the graph canvas. */
export function canvasColourCounts() {
  const { app } = window;
  const s = window.__hyperalign;
  const canvas = app.canvas;
  canvas.draw(true, true);
  const element = canvas.canvas;
  const ratio = element.width / element.getBoundingClientRect().width;
  const ctx = element.getContext("2d");
  const colours = {
    call: [0x5b, 0x9c, 0xf5],
    norm: [0x8f, 0xd1, 0x6a],
    relative_change: [0xf5, 0xa2, 0x5b],
    keystep: [0xe6, 0xb4, 0x50],
  };
  const count = (node, name) => {
    const widget = node.widgets.find((w) => w.name === name);
    const top = node.pos[1] + (widget.last_y ?? widget.y);
    const bottom = top + widget.computeSize()[1];
    const toPixels = (x, y) => [
      (x + canvas.ds.offset[0]) * canvas.ds.scale * ratio,
      (y + canvas.ds.offset[1]) * canvas.ds.scale * ratio,
    ];
    const [x0, y0] = toPixels(node.pos[0], top).map(Math.floor);
    const [x1, y1] = toPixels(node.pos[0] + node.size[0], bottom).map(Math.ceil);
    const data = ctx.getImageData(x0, y0, Math.max(1, x1 - x0), Math.max(1, y1 - y0)).data;
    const counts = Object.fromEntries(Object.keys(colours).map((k) => [k, 0]));
    for (let i = 0; i < data.length; i += 4) {
      for (const [key, [r, g, b]] of Object.entries(colours)) {
        if (Math.abs(data[i] - r) < 24 && Math.abs(data[i + 1] - g) < 24 && Math.abs(data[i + 2] - b) < 24)
          counts[key] += 1;
      }
    }
    return counts;
  };
  return {
    timeline: count(s.apply, "timeline"),
    dynamics: count(s.apply, "dynamics"),
    keysteps: count(s.keysteps, "keysteps_view"),
  };
}

/**
 * Canvas mode: where the native widgets and ours end on the right, in graph units, read from the
 * pixels of the graph canvas (scanning each widget's middle row leftwards from the node's border to
 * the first pixel that differs from the node body).
 */
export function canvasRightEdges() {
  const { app } = window;
  const s = window.__hyperalign;
  const canvas = app.canvas;
  canvas.draw(true, true);
  const element = canvas.canvas;
  const ratio = element.width / element.getBoundingClientRect().width;
  const ctx = element.getContext("2d");
  const unit = canvas.ds.scale * ratio; // pixels per graph unit
  const px = (x, y) => [(x + canvas.ds.offset[0]) * unit, (y + canvas.ds.offset[1]) * unit];
  const rightEdge = (node, name, dy) => {
    const widget = node.widgets.find((w) => w.name === name);
    const y = node.pos[1] + (widget.last_y ?? widget.y) + dy;
    const [x0] = px(node.pos[0], y);
    const [x1, row] = px(node.pos[0] + node.size[0], y);
    const start = Math.floor(x1) - Math.ceil(3 * unit);
    const data = ctx.getImageData(Math.floor(x0), Math.round(row), start - Math.floor(x0) + 1, 1).data;
    const at = (i) => [data[4 * i], data[4 * i + 1], data[4 * i + 2]];
    const body = at(start - Math.floor(x0));
    for (let i = start - Math.floor(x0); i >= 0; i--) {
      const [r, g, b] = at(i);
      if (Math.abs(r - body[0]) + Math.abs(g - body[1]) + Math.abs(b - body[2]) > 30)
        return (Math.floor(x0) + i + 1) / unit - canvas.ds.offset[0] - node.pos[0];
    }
    return null;
  };
  return {
    native: rightEdge(s.apply, "strength", 10), // a number widget, 20 tall
    timeline: rightEdge(s.apply, "timeline", 23),
    dynamics: rightEdge(s.apply, "dynamics", 10),
  };
}

/**
 * Nodes 2.0: our widgets' own canvases inside the Apply node. For each: whether it sits in the
 * node, the HyperAlign colours it shows, and where its painted box starts and ends compared with
 * the native widgets: their labels' left edge and their controls' right edge (in node units; 0 =
 * aligned).
 */
export function vueWidgets({ colours }) {
  const s = window.__hyperalign;
  const nodeElement = document.querySelector(`[data-node-id="${s.apply.id}"]`);
  if (!nodeElement) return { error: `no DOM element for node ${s.apply.id}` };
  const controls = [...nodeElement.querySelectorAll("input, button, [role=combobox]")].filter(
    (el) => !el.closest("[data-testid^=node-header]") && el.getBoundingClientRect().width > 0,
  );
  const nativeRight = Math.max(...controls.map((el) => el.getBoundingClientRect().right));
  // the native widgets start where their labels' text starts
  const names = new Set(s.apply.widgets.filter((w) => !String(w.type).startsWith("hyperalign.")).map((w) => w.name));
  const labels = [...nodeElement.querySelectorAll("*")].filter(
    (el) => el.children.length === 0 && names.has(el.textContent.trim()) && el.getBoundingClientRect().width > 0,
  );
  const nativeLeft = Math.min(...labels.map((el) => el.getBoundingClientRect().left));
  const result = { controls: controls.length, labels: labels.length };
  for (const name of ["timeline", "dynamics"]) {
    const widget = s.apply.widgets.find((w) => w.name === name);
    const canvas = widget.drawnOn;
    if (!canvas || !nodeElement.contains(canvas)) {
      result[name] = { inNode: false };
      continue;
    }
    const rect = canvas.getBoundingClientRect();
    const zoom = rect.width / canvas.offsetWidth;
    const ratio = canvas.width / canvas.offsetWidth; // device pixels per CSS pixel of the canvas
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const counts = Object.fromEntries(Object.keys(colours).map((k) => [k, 0]));
    for (let i = 0; i < data.length; i += 4) {
      for (const [key, [r, g, b]] of Object.entries(colours)) {
        if (Math.abs(data[i] - r) < 24 && Math.abs(data[i + 1] - g) < 24 && Math.abs(data[i + 2] - b) < 24)
          counts[key] += 1;
      }
    }
    // leftmost and rightmost painted pixels in the box's middle row (at least half covered: the
    // outline's antialiased fringe is not where the box ends)
    const row = Math.round((widget.box.y + 10) * ratio);
    const painted = (x) => data[4 * (row * canvas.width + x) + 3] >= 128;
    let right = canvas.width - 1;
    while (right >= 0 && !painted(right)) right -= 1;
    let left = 0;
    while (left < canvas.width && !painted(left)) left += 1;
    const paintedRight = rect.left + ((right + 1) / ratio) * zoom;
    const paintedLeft = rect.left + (left / ratio) * zoom;
    result[name] = {
      inNode: true,
      counts,
      leftOffset: (paintedLeft - nativeLeft) / zoom,
      rightOffset: (paintedRight - nativeRight) / zoom,
    };
  }
  return result;
}
