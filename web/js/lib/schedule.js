// The keystep schedule rules of hyperalign/schedule.py, in JavaScript: parse_keysteps,
// validate_keysteps, format_keysteps, segment_of, and plan (AlignRun.needs_prediction in
// hyperalign/runtime.py, step by step over a first-order run). The timeline on HyperAlignApply must mark
// exactly the steps the Python run predicts at; tests/browser/test_logic_parity.py checks both
// sides on the same cases. No DOM and no ComfyUI imports (node --test imports it).

export const MODES = ["S", "I", "P"];
export const EPS = 1e-6; // same slack as schedule.py: progress values come from sigmas

const PY_FLOAT = /^[+-]?(?:(?:\d(?:_?\d)*)(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)(?:[eE][+-]?\d(?:_?\d)*)?$/;
const PY_SPECIAL = /^[+-]?(?:inf|infinity|nan)$/i;

/** Python's float(text) for an already stripped string; undefined where Python raises ValueError. */
export function parsePythonFloat(text) {
  if (PY_FLOAT.test(text)) return Number(text.replaceAll("_", ""));
  if (PY_SPECIAL.test(text)) return /nan/i.test(text) ? NaN : text.startsWith("-") ? -Infinity : Infinity;
  return undefined;
}

/** Python repr() of a float (shortest round-trip digits, exponent outside 1e-4 <= |x| < 1e16). */
export function pyFloatRepr(value) {
  if (Number.isNaN(value)) return "nan";
  if (!Number.isFinite(value)) return value > 0 ? "inf" : "-inf";
  if (value === 0) return Object.is(value, -0) ? "-0.0" : "0.0";
  const [mantissa, exponentText] = value.toExponential().split("e");
  const exponent = Number(exponentText);
  const sign = value < 0 ? "-" : "";
  const digits = mantissa.replace("-", "").replace(".", "");
  if (exponent >= 16 || exponent < -4) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    return `${sign}${m}e${exponent < 0 ? "-" : "+"}${String(Math.abs(exponent)).padStart(2, "0")}`;
  }
  if (exponent < 0) return `${sign}0.${"0".repeat(-exponent - 1)}${digits}`;
  const whole = digits.slice(0, exponent + 1).padEnd(exponent + 1, "0");
  return `${sign}${whole}.${digits.slice(exponent + 1) || "0"}`;
}

function pyStrRepr(text) {
  return text.includes("'") && !text.includes('"') ? `"${text}"` : `'${text.replaceAll("'", "\\'")}'`;
}

function pyTupleRepr(values) {
  return values.length === 1 ? `(${pyFloatRepr(values[0])},)` : `(${values.map(pyFloatRepr).join(", ")})`;
}

/** schedule.validate_keysteps: strictly increasing fractions in [0, 1) starting at 0. */
export function validateKeysteps(values) {
  if (!Array.isArray(values) || values.length === 0) {
    throw new Error(
      `HyperAlign: keysteps must be a non-empty list of fractions in [0, 1), got ${JSON.stringify(values)}.`,
    );
  }
  for (const k of values) {
    if (typeof k !== "number" || !Number.isFinite(k) || k < 0 || k >= 1) {
      throw new Error(`HyperAlign: keysteps must be fractions in [0, 1), got [${values.map(pyFloatRepr).join(", ")}].`);
    }
  }
  for (let i = 1; i < values.length; i++) {
    if (values[i] <= values[i - 1]) {
      throw new Error(`HyperAlign: keysteps must be strictly increasing, got ${pyTupleRepr(values)}.`);
    }
  }
  if (values[0] !== 0) {
    throw new Error(
      `HyperAlign: the first keystep must be 0 (a LoRA is needed from the first step), got ${pyTupleRepr(values)}.`,
    );
  }
  return values.slice();
}

/** schedule.parse_keysteps: "0, 0.25, 0.6" (commas or semicolons) -> validated numbers. */
export function parseKeysteps(text) {
  const parts = String(text)
    .replaceAll(";", ",")
    .split(",")
    .map((p) => p.trim())
    .filter((p) => p);
  const values = parts.map(parsePythonFloat);
  if (values.some((v) => v === undefined)) {
    throw new Error(
      `HyperAlign: keysteps ${pyStrRepr(String(text))} is not a comma-separated list of numbers, e.g. '0, 0.3, 0.6'.`,
    );
  }
  return validateKeysteps(values);
}

/** One keystep as schedule.format_keysteps writes it: rounded down to 6 decimals, trailing zeros stripped. */
export function formatKeystep(value) {
  const text = (Math.floor(value * 1e6) / 1e6).toFixed(6).replace(/0+$/, "").replace(/\.$/, "");
  return text === "" || text === "-0" ? "0" : text;
}

/** schedule.format_keysteps. */
export function formatKeysteps(values) {
  return values.map(formatKeystep).join(", ");
}

/** schedule.segment_of: index of the keystep segment that `progress` lies in. */
export function segmentOf(progress, keysteps) {
  let segment = 0;
  keysteps.forEach((k, index) => {
    if (progress + EPS >= k) segment = index;
  });
  return segment;
}

/** AlignRun's S/I/P rule: for each step (its progress at the step's start), whether the hypernet runs there. */
export function plan(mode, keysteps, progress) {
  if (!MODES.includes(mode)) throw new Error(`HyperAlign: unknown mode '${mode}'; expected one of S, I, P.`);
  let lastSegment = null;
  return progress.map((p, index) => {
    if (mode === "S") return true;
    if (mode === "I") return index === 0;
    const segment = segmentOf(p, keysteps);
    const call = segment !== lastSegment;
    lastSegment = segment;
    return call;
  });
}
