// Which Apply nodes a prompt answered from ComfyUI's cache, from the socket events alone.
import assert from "node:assert/strict";
import { test } from "node:test";

import { PromptRuns } from "../js/lib/runs.js";
import { runProgress } from "../js/lib/timeline.js";

test("a cached Apply node whose sampler did not run is reported; ids compare as strings", () => {
  const runs = new PromptRuns();
  runs.start("p1");
  runs.cached("p1", [1, "2", "5"]);
  runs.ran(2); // a second Apply node whose sampler ran (its seed changed)
  assert.deepEqual(runs.finish("p1"), ["1", "5"]);
  assert.deepEqual(runs.finish("p1"), [], "the prompt is forgotten once finished");
});

test("a prompt that sampled everything reports nothing", () => {
  const runs = new PromptRuns();
  runs.start("p1");
  runs.cached("p1", []);
  runs.ran("5");
  assert.deepEqual(runs.finish("p1"), []);
});

test("errors and interruptions conclude nothing; another prompt's success is ignored", () => {
  const runs = new PromptRuns();
  runs.start("p1");
  runs.cached("p1", ["5"]);
  assert.deepEqual(runs.finish("p2"), []);
  runs.abandon();
  assert.deepEqual(runs.finish("p1"), []);
});

test("execution_cached without execution_start still counts", () => {
  const runs = new PromptRuns();
  runs.cached("p3", ["5"]);
  assert.deepEqual(runs.finish("p3"), ["5"]);
});

test("a run that predicted at every step gives each step's measured progress", () => {
  const calls = [0, 1, 2].map((step) => ({ step, progress: [0, 0.5, 0.9][step] }));
  assert.deepEqual(runProgress({ steps: 3, calls }), [0, 0.5, 0.9]);
  assert.equal(runProgress({ steps: 4, calls }), null, "a step without a call");
  assert.equal(runProgress({ steps: 2, calls: [calls[0], calls[2]] }), null, "calls not at steps 0..n-1");
  assert.equal(runProgress({ steps: 1, calls: [{ step: 0 }] }), null, "no progress");
  assert.equal(runProgress(null), null);
});
