// The model behind the LoRA dynamics chart on HyperAlignApply (paper Fig. 8): axes with round
// ticks, one held value per hypernet call, and the run summary. Pure: no DOM, no ComfyUI imports.

function niceNumber(range, round) {
  const exponent = Math.floor(Math.log10(range));
  const fraction = range / 10 ** exponent;
  let nice;
  if (round) nice = fraction < 1.5 ? 1 : fraction < 3 ? 2 : fraction < 7 ? 5 : 10;
  else nice = fraction <= 1 ? 1 : fraction <= 2 ? 2 : fraction <= 5 ? 5 : 10;
  return nice * 10 ** exponent;
}

/** The next round step after `step` in the 1, 2, 5, 10, 20, ... series. */
function nextNiceStep(step) {
  const exponent = Math.floor(Math.log10(step) + 1e-9);
  const fraction = Math.round(step / 10 ** exponent);
  return (fraction < 2 ? 2 : fraction < 5 ? 5 : 10) * 10 ** exponent;
}

const tidy = (v) => Number(v.toPrecision(12));

/** An axis covering [lo, hi] with round tick values (1, 2, 5 x 10^n steps), at most max(3, maxTicks) ticks. */
export function niceScale(lo, hi, maxTicks = 4) {
  let a = Number(lo);
  let b = Number(hi);
  if (!Number.isFinite(a) || !Number.isFinite(b)) [a, b] = [0, 1];
  if (a > b) [a, b] = [b, a];
  if (b - a <= 1e-12 * Math.max(1, Math.abs(a), Math.abs(b))) {
    const pad = a === 0 ? 1 : Math.abs(a) * 0.5;
    [a, b] = a >= 0 && a - pad < 0 ? [0, a + pad] : [a - pad, b + pad];
  }
  const wanted = Math.max(3, Math.floor(maxTicks) || 0); // 3 ticks always fit: -step, 0, step
  let step = niceNumber(niceNumber(b - a, false) / (wanted - 1), true);
  const span = () => [Math.floor(a / step + 1e-9) * step, Math.ceil(b / step - 1e-9) * step];
  let [min, max] = span();
  while (Math.round((max - min) / step) + 1 > wanted) {
    step = nextNiceStep(step);
    [min, max] = span();
  }
  const ticks = Array.from({ length: Math.round((max - min) / step) + 1 }, (_, i) => tidy(min + i * step));
  return { min: tidy(min), max: tidy(max), step: tidy(step), ticks };
}

/** Tick label with as many decimals as the tick step needs. */
export function formatTick(value, step) {
  if (value === 0) return "0";
  const magnitude = Math.max(Math.abs(value), Math.abs(step));
  if (magnitude >= 1e4 || Math.abs(step) < 1e-3) return value.toExponential(0).replace("e+", "e");
  const decimals = Math.max(0, -Math.floor(Math.log10(Math.abs(step)) + 1e-9));
  return value.toFixed(decimals);
}

export function formatSeconds(seconds) {
  const s = Number(seconds);
  if (!Number.isFinite(s) || s < 0) return "?";
  if (s < 0.01) return `${(s * 1000).toFixed(1)} ms`;
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

export const CHART_SERIES = [
  { key: "norm", label: "‖ΔW‖", axis: "right" },
  { key: "cosine", label: "cos vs step 0", axis: "left" },
  { key: "relative_change", label: "rel. change", axis: "left" },
];

/**
 * The LoRA dynamics chart of one run (paper Fig. 8): one point per hypernet call, held until the
 * next call (that LoRA is in use until then). Cosine and relative change share the left axis
 * (it always includes [0, 1]); the norm has its own right axis over its own range.
 */
export function buildChart(run) {
  const calls = (run?.calls ?? [])
    .filter((c) => c && Number.isFinite(Number(c.step)))
    .map((c) => ({ ...c, step: Number(c.step) }))
    .sort((a, b) => a.step - b.step);
  const lastStep = calls.length ? calls[calls.length - 1].step : 0;
  const steps = Math.max(Number(run?.steps) || 0, lastStep + 1, 1);
  const values = (key) => calls.map((c) => Number(c[key])).filter(Number.isFinite);
  // cosine and relative change are read against 0 and 1; the norm axis spans its own range, so
  // its change over the run stays visible even when it is small next to its size
  // rounded: a cosine of 1.0000001 (float error) must not stretch the axis to 1.5
  const leftValues = [...values("cosine"), ...values("relative_change"), 0, 1].map((v) => Number(v.toFixed(6)));
  const rightValues = values("norm").length ? values("norm") : [0];
  const series = CHART_SERIES.map((s) => ({
    ...s,
    points: calls
      .map((c, i) => ({
        step: c.step,
        until: i + 1 < calls.length ? calls[i + 1].step : steps,
        value: Number(c[s.key]),
      }))
      .filter((p) => Number.isFinite(p.value)),
  }));
  const callSeconds = calls.reduce((sum, c) => sum + (Number(c.seconds) || 0), 0);
  return {
    steps,
    series,
    left: niceScale(Math.min(...leftValues), Math.max(...leftValues), 4),
    right: niceScale(Math.min(...rightValues), Math.max(...rightValues), 4),
    calls: calls.length,
    summary: chartSummary(run, calls.length, steps, callSeconds),
  };
}

export const CACHED_NOTE = "from ComfyUI's cache, last run: ";

/**
 * "P · 3 hypernet calls / 20 steps · 45 ms": the run's `seconds` is the time spent in the hypernet.
 * A run shown again because ComfyUI answered from its cache says so first (the end may be cut off).
 */
function chartSummary(run, calls, steps, callSeconds) {
  const cached = run?.cached ? CACHED_NOTE : "";
  const mode = run?.mode ? `${run.mode} · ` : "";
  const seconds = Number.isFinite(Number(run?.seconds)) ? Number(run.seconds) : callSeconds;
  const live = run?.live ? " (sampling…)" : "";
  const counts = `${calls} hypernet call${calls === 1 ? "" : "s"} / ${steps} steps`;
  return `${cached}${mode}${counts} · ${formatSeconds(seconds)}${live}`;
}

/** Pixel mapping of a chart inside `box` {x, y, width, height}: step -> x, value -> y per axis. */
export function chartGeometry(chart, box) {
  const xOf = (step) => box.x + (step / chart.steps) * box.width;
  const yOf = (scale) => (value) =>
    box.y + box.height - ((value - scale.min) / (scale.max - scale.min || 1)) * box.height;
  const axes = { left: yOf(chart.left), right: yOf(chart.right) };
  const lines = chart.series.map((s) => ({
    key: s.key,
    segments: s.points.map((p) => ({ x0: xOf(p.step), x1: xOf(p.until), y: axes[s.axis](p.value) })),
  }));
  return { xOf, yLeft: axes.left, yRight: axes.right, lines };
}

/** Live per-step events accumulate into a run; a step that does not advance starts a new run. */
export function appendLiveCall(live, call) {
  const step = Number(call?.step);
  const calls = live?.calls ?? [];
  const last = calls.length ? Number(calls[calls.length - 1].step) : -1;
  const fresh = !live || !Number.isFinite(step) || step <= last;
  return {
    live: true,
    mode: fresh ? undefined : live.mode,
    steps: fresh ? undefined : live.steps,
    calls: fresh ? [call] : [...calls, call],
  };
}
