// Canvas 2D drawing of the HyperAlign widgets: the step timeline, the LoRA dynamics chart and the
// keysteps strip. Each draws inside `box` {x, y, width} (node coordinates; where the box sits is
// widget.js's business), so it stays sharp at any zoom. Only a 2D context is used here (no DOM, no
// ComfyUI imports).

import { chartGeometry, formatTick } from "./chart.js";
import { timelineX } from "./timeline.js";

// Colours that read on ComfyUI's dark node body (#353535) and widget background (#222).
export const COLORS = {
  call: "#5b9cf5", // a step where the hypernet runs: a new LoRA
  reuse: "#2f4466", // a step that reuses the last LoRA
  idle: "#2a2a2a", // HyperAlign inactive there (start/end percent)
  skipped: "#1c1c1c", // the sampler does not run that step (KSamplerAdvanced window)
  keystep: "#e6b450",
  error: "#f07178",
  norm: "#8fd16a",
  cosine: "#5b9cf5",
  relative_change: "#f5a25b",
};

/** Theme colours from LiteGraph when it is loaded, else ComfyUI's dark defaults. */
export function themePalette(liteGraph) {
  return {
    background: liteGraph?.WIDGET_BGCOLOR ?? "#222",
    outline: liteGraph?.WIDGET_OUTLINE_COLOR ?? "#666",
    text: liteGraph?.WIDGET_TEXT_COLOR ?? "#ddd",
    muted: liteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? "#999",
    font: "Inter, Arial, sans-serif",
  };
}

function roundedBox(ctx, x, y, w, h, r, fill, stroke) {
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, h, r);
  else ctx.rect(x, y, w, h);
  ctx.fillStyle = fill;
  ctx.fill();
  if (stroke) {
    ctx.strokeStyle = stroke;
    ctx.lineWidth = 1;
    ctx.stroke();
  }
}

function text(ctx, value, x, y, { color, size = 11, align = "left", font, maxWidth }) {
  ctx.fillStyle = color;
  ctx.font = `${size}px ${font}`;
  ctx.textAlign = align;
  ctx.textBaseline = "middle";
  let shown = String(value);
  if (maxWidth && ctx.measureText(shown).width > maxWidth) {
    while (shown.length > 1 && ctx.measureText(`${shown}…`).width > maxWidth) shown = shown.slice(0, -1);
    shown = `${shown}…`;
  }
  ctx.fillText(shown, x, y);
}

export const TIMELINE_HEIGHT = 50;

/** The step timeline: one cell per sampler step, bright where the LoRA is regenerated. */
export function drawTimeline(ctx, timeline, { x: x0, y, width: w }, palette, lowQuality = false) {
  ctx.save();
  roundedBox(ctx, x0, y, w, TIMELINE_HEIGHT - 4, 6, palette.background, palette.outline);
  const inner = { x: x0 + 8, w: w - 16 };
  if (!lowQuality) {
    const color = timeline.schedule.error ? COLORS.error : palette.muted;
    text(ctx, timeline.label, inner.x, y + 11, { color, font: palette.font, maxWidth: inner.w });
  }
  const rowY = y + 24;
  const rowH = 12;
  const cellW = inner.w / timeline.steps;
  const gap = cellW >= 5 ? 1 : 0;
  for (const [i, cell] of timeline.cells.entries()) {
    let fill = COLORS.skipped;
    if (cell.sampled) fill = !cell.active ? COLORS.idle : cell.call ? COLORS.call : COLORS.reuse;
    ctx.fillStyle = fill;
    ctx.fillRect(inner.x + i * cellW, rowY, Math.max(0.5, cellW - gap), rowH);
  }
  for (const k of timeline.keystepMarks) {
    const x = timelineX(timeline, k, inner.x, inner.w);
    if (x === null) continue;
    ctx.fillStyle = COLORS.keystep;
    ctx.beginPath();
    ctx.moveTo(x - 3.5, rowY - 5);
    ctx.lineTo(x + 3.5, rowY - 5);
    ctx.lineTo(x, rowY - 0.5);
    ctx.closePath();
    ctx.fill();
  }
  if (!lowQuality) {
    const labelY = rowY + rowH + 7;
    text(ctx, "noise", inner.x, labelY, { color: palette.muted, size: 9, font: palette.font });
    text(ctx, "clean", inner.x + inner.w, labelY, {
      color: palette.muted,
      size: 9,
      font: palette.font,
      align: "right",
    });
    legend(ctx, inner.x + inner.w / 2, labelY, palette, [
      [COLORS.call, "new LoRA"],
      [COLORS.reuse, "reused"],
      ...(timeline.keystepMarks.length ? [[COLORS.keystep, "keystep"]] : []),
    ]);
  }
  ctx.restore();
}

/** A centred row of colour swatches with labels. */
function legend(ctx, centerX, y, palette, entries) {
  ctx.font = `9px ${palette.font}`;
  const widths = entries.map(([, label]) => 9 + ctx.measureText(label).width + 8);
  let x = centerX - widths.reduce((a, b) => a + b, 0) / 2;
  for (const [i, [color, label]] of entries.entries()) {
    ctx.fillStyle = color;
    ctx.fillRect(x, y - 3, 6, 6);
    text(ctx, label, x + 9, y, { color: palette.muted, size: 9, font: palette.font });
    x += widths[i];
  }
}

export const CHART_EMPTY_HEIGHT = 24;
export const CHART_HEIGHT = 140;

export const CHART_HINT = "LoRA dynamics: run the graph to see them";

/** The LoRA dynamics of the last run, or a one-line `hint` when there is no run to show. */
export function drawChart(ctx, chart, { x: x0, y, width: w }, palette, lowQuality = false, hint = CHART_HINT) {
  ctx.save();
  if (!chart || !chart.calls) {
    roundedBox(ctx, x0, y, w, CHART_EMPTY_HEIGHT - 4, 6, palette.background, palette.outline);
    if (!lowQuality) {
      text(ctx, hint, x0 + 8, y + 10, { color: palette.muted, font: palette.font, maxWidth: w - 16 });
    }
    ctx.restore();
    return;
  }
  roundedBox(ctx, x0, y, w, CHART_HEIGHT - 4, 6, palette.background, palette.outline);
  const plot = { x: x0 + 32, y: y + 38, width: w - 66, height: CHART_HEIGHT - 64 };
  if (!lowQuality) {
    text(ctx, chart.summary, x0 + 8, y + 11, { color: palette.text, font: palette.font, maxWidth: w - 16 });
    legend(
      ctx,
      x0 + w / 2,
      y + 26,
      palette,
      chart.series.map((s) => [COLORS[s.key], s.label]),
    );
    axes(ctx, chart, plot, palette);
  }
  const geometry = chartGeometry(chart, plot);
  ctx.lineWidth = 1.5;
  for (const line of geometry.lines) {
    ctx.strokeStyle = COLORS[line.key];
    ctx.fillStyle = COLORS[line.key];
    ctx.beginPath();
    line.segments.forEach((s, i) => {
      if (i === 0) ctx.moveTo(s.x0, s.y);
      else ctx.lineTo(s.x0, s.y);
      ctx.lineTo(s.x1, s.y);
    });
    ctx.stroke();
    for (const s of line.segments) {
      ctx.beginPath();
      ctx.arc(s.x0, s.y, 2.2, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  ctx.restore();
}

function axes(ctx, chart, plot, palette) {
  const { yLeft, yRight, xOf } = chartGeometry(chart, plot);
  ctx.lineWidth = 1;
  for (const tick of chart.left.ticks) {
    const ty = Math.round(yLeft(tick)) + 0.5;
    ctx.strokeStyle = tick === 0 ? "#4a4a4a" : "#333";
    ctx.beginPath();
    ctx.moveTo(plot.x, ty);
    ctx.lineTo(plot.x + plot.width, ty);
    ctx.stroke();
    text(ctx, formatTick(tick, chart.left.step), plot.x - 4, ty, {
      color: palette.muted,
      size: 9,
      font: palette.font,
      align: "right",
    });
  }
  for (const tick of chart.right.ticks) {
    const label = formatTick(tick, chart.right.step);
    text(ctx, label, plot.x + plot.width + 4, yRight(tick), { color: COLORS.norm, size: 9, font: palette.font });
  }
  const bottom = plot.y + plot.height + 9;
  const last = chart.steps - 1;
  for (const step of new Set([0, Math.round(last / 2), last])) {
    const x = xOf(step); // where that step's LoRA starts: the call points sit there too
    text(ctx, String(step), x, bottom, { color: palette.muted, size: 9, font: palette.font, align: "center" });
  }
  text(ctx, "step", plot.x + plot.width + 4, bottom, { color: palette.muted, size: 9, font: palette.font });
}

export const KEYSTEPS_HEIGHT = 42;

/** The keysteps string the node output and where they fall on the 0..1 progress axis. */
export function drawKeysteps(ctx, info, { x: x0, y, width: w }, palette, lowQuality = false) {
  ctx.save();
  roundedBox(ctx, x0, y, w, KEYSTEPS_HEIGHT - 4, 6, palette.background, palette.outline);
  const inner = { x: x0 + 8, w: w - 16 };
  if (!lowQuality) {
    const label = info?.text ? `keysteps: ${info.text}` : "keysteps: run the graph to find them";
    const color = info?.text ? palette.text : palette.muted;
    text(ctx, label, inner.x, y + 11, { color, font: palette.font, maxWidth: inner.w });
  }
  const barY = y + 26;
  ctx.fillStyle = COLORS.reuse;
  ctx.fillRect(inner.x, barY, inner.w, 4);
  for (const k of info?.keysteps ?? []) {
    ctx.fillStyle = COLORS.keystep;
    ctx.fillRect(inner.x + k * inner.w - 1, barY - 4, 2, 12);
  }
  ctx.restore();
}
