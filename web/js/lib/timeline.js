// The model behind the step timeline on HyperAlignApply: which sampler steps run, where HyperAlign
// is active and where the hypernet predicts a new LoRA. Pure: no DOM, no ComfyUI imports.

import { EPS, MODES, formatKeysteps, parseKeysteps, plan } from "./schedule.js";

export const FROM_FILE = "from_file";
export const DEFAULT_STEPS = 20;

/**
 * The steps a sampler node will run and each one's progress, as a linear-in-time schedule sees them
 * (progress i/total, the assumption the timeline states). `denoise` < 1 runs the last `steps` of
 * int(steps / denoise) (KSampler); `startStep`/`endStep` cut a window (KSamplerAdvanced).
 */
export function samplerSteps({ steps = DEFAULT_STEPS, denoise = 1, startStep = 0, endStep = Infinity } = {}) {
  const count = Math.max(1, Math.floor(Number(steps)) || DEFAULT_STEPS);
  const d = Number.isFinite(Number(denoise)) ? Math.min(Math.max(Number(denoise), 0), 1) : 1;
  const total = d > 0 && d < 1 ? Math.max(count, Math.floor(count / d)) : count;
  const offset = total - count;
  const first = Math.max(0, Math.floor(Number(startStep) || 0));
  const last = Math.min(count, Number.isFinite(Number(endStep)) ? Math.floor(Number(endStep)) : count);
  return Array.from({ length: count }, (_, i) => ({
    index: i,
    progress: (offset + i) / total,
    sampled: i >= first && i < last,
  }));
}

/**
 * Replace the assumed progress of the sampled steps by what a run measured (one value per step it
 * ran, from its sigmas), when the counts agree; the schedule's real spacing (e.g. SD1.5 "normal" is
 * i/(steps-1), karras is far from linear) then decides the marks exactly as it did in that run.
 */
export function withMeasuredProgress(steps, measured) {
  const sampled = steps.filter((s) => s.sampled);
  if (!Array.isArray(measured) || measured.length !== sampled.length || !measured.every(Number.isFinite)) return steps;
  let next = 0;
  return steps.map((s) => (s.sampled ? { ...s, progress: Number(measured[next++]), measured: true } : s));
}

/**
 * The per-step progress a finished run measured, from its hypernet calls: a run that predicted at
 * every step it sampled (mode S over the whole window) reports each step's real progress (the
 * Python side sends no separate list). Null when the calls do not cover every step.
 */
export function runProgress(run) {
  const calls = run?.calls;
  if (!Array.isArray(calls) || !calls.length || calls.length !== Number(run.steps)) return null;
  if (!calls.every((c, i) => Number(c?.step) === i && Number.isFinite(Number(c?.progress)))) return null;
  return calls.map((c) => Number(c.progress));
}

function overrideKeysteps(text, linked) {
  if (linked) {
    if (linked.keysteps) return { keysteps: linked.keysteps, source: "input" };
    return { keysteps: null, source: "input", note: "keysteps come from a link: run once to see them" };
  }
  const trimmed = String(text ?? "").trim();
  if (!trimmed) return null;
  try {
    return { keysteps: parseKeysteps(trimmed), source: "widget" };
  } catch (error) {
    return { keysteps: null, source: "widget", error: error.message.replace(/^HyperAlign: /, "") };
  }
}

/** Mode and keysteps the run will use: widgets first, then what is known about the predictor file. */
export function resolveSchedule({ mode, keystepsText = "", linkedKeysteps = null, fileInfo = null }) {
  const override = overrideKeysteps(keystepsText, linkedKeysteps);
  const fromFile = mode === FROM_FILE || !MODES.includes(mode);
  const effectiveMode = fromFile ? (fileInfo?.mode ?? null) : mode;
  const result = {
    mode: effectiveMode,
    modeSource: fromFile ? (effectiveMode ? "file" : "unknown") : "widget",
    keysteps: null,
    keystepsSource: null,
    error: override?.error ?? null,
    note: override?.note ?? null,
  };
  if (effectiveMode !== "P" && effectiveMode !== null) return result;
  if (override) {
    result.keysteps = override.keysteps;
    result.keystepsSource = override.source;
  } else if (fileInfo?.keysteps?.length) {
    result.keysteps = fileInfo.keysteps.slice();
    result.keystepsSource = "file";
  } else {
    result.keystepsSource = "unknown";
  }
  return result;
}

const sameNumbers = (a, b) =>
  Array.isArray(a) && Array.isArray(b) && a.length === b.length && a.every((v, i) => Math.abs(v - b[i]) < 1e-9);

/** The steps a finished run predicted at, when it ran this very plan (mode, keysteps, step count). */
function observedCalls(run, schedule, cells) {
  if (!run || !Array.isArray(run.calls) || Number(run.steps) !== cells.length || run.mode !== schedule.mode)
    return null;
  if (schedule.mode === "P" && !sameNumbers(run.keysteps, schedule.keysteps)) return null;
  const steps = run.calls.map((c) => Number(c.step));
  return steps.every((step) => cells[step]?.active) ? new Set(steps) : null;
}

/**
 * Where the LoRA is regenerated. Each cell is a sampler step: `active` when HyperAlign applies there
 * (sampled and start_percent <= progress <= end_percent), `call` when the hypernet runs. The plan
 * covers the active steps only, as the Python run sees them: its first active step always predicts.
 * An unknown mode or keysteps (from_file before any run) marks only that first step.
 *
 * `basis` says where the marks come from: "measured" (the plan on the per-step progress a run
 * reported), "run" (the steps the last run predicted at, when it ran the same plan), or "assumed"
 * (the plan on progress i/steps).
 */
export function buildTimeline({
  schedule,
  sampler = {},
  startPercent = 0,
  endPercent = 1,
  measuredProgress = null,
  lastRun = null,
}) {
  const steps = withMeasuredProgress(samplerSteps(sampler), measuredProgress);
  const lo = Number.isFinite(Number(startPercent)) ? Number(startPercent) : 0;
  const hi = Number.isFinite(Number(endPercent)) ? Number(endPercent) : 1;
  const cells = steps.map((s) => ({
    ...s,
    active: s.sampled && s.progress + EPS >= lo && s.progress <= hi + EPS,
    call: false,
  }));
  const active = cells.filter((c) => c.active);
  const known = !schedule.error && schedule.mode && (schedule.mode !== "P" || schedule.keysteps);
  let basis = cells.some((c) => c.measured) ? "measured" : "assumed";
  const observed = known && basis === "assumed" ? observedCalls(lastRun, schedule, cells) : null;
  if (observed) {
    basis = "run";
    for (const c of cells) c.call = observed.has(c.index);
  } else if (known) {
    const decisions = plan(
      schedule.mode,
      schedule.keysteps ?? [0],
      active.map((c) => c.progress),
    );
    active.forEach((c, i) => (c.call = decisions[i]));
  } else if (active.length && !schedule.error) {
    active[0].call = true;
  }
  const keystepMarks = schedule.mode === "P" && schedule.keysteps ? schedule.keysteps.slice() : [];
  return {
    steps: cells.length,
    cells,
    calls: cells.filter((c) => c.call).length,
    activeSteps: active.length,
    known: Boolean(known),
    basis,
    keystepMarks,
    schedule,
    label: timelineLabel(schedule, cells, active.length),
  };
}

function timelineLabel(schedule, cells, activeCount) {
  if (schedule.error) return `keysteps: ${schedule.error}`;
  const calls = cells.filter((c) => c.call).length;
  const modeText = schedule.mode
    ? `${schedule.mode}${schedule.modeSource === "file" ? " (file)" : ""}`
    : "mode from file";
  const parts = [modeText];
  if (schedule.mode === "P" || schedule.mode === null) {
    if (schedule.keysteps) {
      const from =
        schedule.keystepsSource === "file" ? " (file)" : schedule.keystepsSource === "input" ? " (input)" : "";
      parts.push(`keysteps ${formatKeysteps(schedule.keysteps)}${from}`);
    } else if (schedule.note) {
      parts.push(schedule.note);
    } else {
      parts.push("keysteps from file: run once to see them");
    }
  }
  const known = schedule.mode && (schedule.mode !== "P" || schedule.keysteps);
  const active = activeCount < cells.length ? ` (${activeCount} active)` : "";
  parts.push(known ? `${calls}/${cells.length} steps${active}` : `${cells.length} steps${active}`);
  return parts.join(" · ");
}

/**
 * x of a progress value on a timeline drawn from x0 over `width`: inside the cell of the step whose
 * interval holds it (so non-linear schedules place it right), null when outside the steps shown.
 */
export function timelineX(timeline, progress, x0, width) {
  const starts = timeline.cells.map((c) => c.progress);
  const n = starts.length;
  const end = n > 1 ? starts[n - 1] + Math.max(0, starts[n - 1] - starts[n - 2]) : starts[0] + 1;
  if (progress < starts[0] - EPS || progress > end + EPS) return null;
  for (let i = n - 1; i >= 0; i--) {
    if (progress + EPS < starts[i]) continue;
    const next = i + 1 < n ? starts[i + 1] : end;
    const fraction = next > starts[i] ? Math.min(1, Math.max(0, (progress - starts[i]) / (next - starts[i]))) : 0;
    return x0 + ((i + fraction) * width) / n;
  }
  return x0;
}
