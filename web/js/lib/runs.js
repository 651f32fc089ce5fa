// Which HyperAlign Apply nodes a prompt answered from ComfyUI's cache. For nodes whose inputs did
// not change ComfyUI sends "execution_cached" with their ids and runs nothing, so a sampler after
// them sends no "hyperalign.run" and the chart would have nothing new to show. Pure: fed the
// socket events, no ComfyUI imports.

export class PromptRuns {
  #prompt = null;

  /** "execution_start": a prompt begins. */
  start(promptId) {
    this.#prompt = { id: promptId ?? null, cached: new Set(), ran: new Set() };
  }

  /** "execution_cached": the execution ids of the nodes served from the cache. */
  cached(promptId, ids) {
    if (!this.#prompt || (promptId != null && this.#prompt.id !== promptId)) this.start(promptId);
    for (const id of ids ?? []) this.#prompt.cached.add(String(id));
  }

  /** "hyperalign.step" / "hyperalign.run": the Apply node `id` sampled in this prompt. */
  ran(id) {
    this.#prompt?.ran.add(String(id));
  }

  /**
   * "execution_success": the ids of the nodes that were served from the cache and did not sample
   * (for those the last run's data is what the prompt produced). Forgets the prompt.
   */
  finish(promptId) {
    const prompt = this.#prompt;
    if (!prompt || (promptId != null && prompt.id != null && prompt.id !== promptId)) return [];
    this.#prompt = null;
    return [...prompt.cached].filter((id) => !prompt.ran.has(id));
  }

  /** "execution_error" / "execution_interrupted": nothing is concluded about the cache. */
  abandon() {
    this.#prompt = null;
  }
}
