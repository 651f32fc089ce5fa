"""When the hypernetwork runs: the S, I and P modes (paper §4.2) and keystep discovery (Fig. 4).

Time is measured as *progress* p in [0, 1]: 0 at pure noise, 1 at the clean image, in the model's
own (unshifted) time, the same notion as ComfyUI's ``start_percent``. The host converts a sigma to
progress with its model's sampling object, so keysteps mean the same thing at any step count, with
any sampler, and in split (KSamplerAdvanced) or partial-denoise runs.

- S: a new LoRA at every denoising step (a second-order sampler's extra evaluations in one step
  reuse that step's LoRA);
- I: one LoRA, predicted at the first step of the run and reused for all steps;
- P: a new LoRA when the run enters a new keystep segment; keysteps are increasing fractions in
  [0, 1), the first one 0. A run that starts inside a segment (split run, denoise < 1) predicts at
  its first step.

The rule itself is coded once, in :meth:`hyperalign.runtime.AlignRun.needs_prediction`, which both
hosts run; this module holds what it reads (keysteps, segments, steps, progress).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MODES = ("S", "I", "P")
_EPS = 1e-6  # progress values are floats derived from sigmas; compare with a little slack


def validate_keysteps(keysteps) -> tuple[float, ...]:
    if isinstance(keysteps, str):
        keysteps = parse_keysteps(keysteps)
    if not isinstance(keysteps, (list, tuple)) or not keysteps:
        raise ValueError(f"HyperAlign: keysteps must be a non-empty list of fractions in [0, 1), got {keysteps!r}.")
    values = []
    for k in keysteps:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or not 0 <= k < 1:
            raise ValueError(f"HyperAlign: keysteps must be fractions in [0, 1), got {keysteps!r}.")
        values.append(float(k))
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"HyperAlign: keysteps must be strictly increasing, got {tuple(values)}.")
    if values[0] != 0.0:
        raise ValueError(
            f"HyperAlign: the first keystep must be 0 (a LoRA is needed from the first step), got {tuple(values)}."
        )
    return tuple(values)


def parse_keysteps(text: str) -> tuple[float, ...]:
    """Parse '0, 0.25, 0.6' (the string the Keysteps node outputs and Apply accepts)."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"HyperAlign: keysteps {text!r} is not a comma-separated list of numbers, e.g. '0, 0.3, 0.6'."
        ) from None
    return validate_keysteps(values)


def format_keysteps(keysteps: Sequence[float]) -> str:
    """Keysteps as text, rounded *down* to 6 decimals: rounding up could move a keystep past the progress of
    the step it was discovered at, and the segment would then start one step late."""
    return ", ".join(f"{math.floor(k * 1e6) / 1e6:.6f}".rstrip("0").rstrip(".") or "0" for k in keysteps)


def segment_of(progress: float, keysteps: Sequence[float]) -> int:
    """Index of the keystep segment that `progress` lies in."""
    segment = 0
    for index, k in enumerate(keysteps):
        if progress + _EPS >= k:
            segment = index
    return segment


def progress_of_timestep(timestep, num_train_timesteps: int | None):
    """Progress (0 = pure noise, 1 = clean) of a model's own time: ``1 - t / (T - 1)`` for discrete DDPM
    timesteps t in [0, T - 1] (SD1.5: T = 1000), ``1 - t`` for a continuous time in [0, 1] (FLUX: t = sigma,
    `num_train_timesteps` None). Floats and tensors alike; both hosts call this one formula."""
    if num_train_timesteps is None:
        return 1.0 - timestep
    return 1.0 - timestep / (num_train_timesteps - 1)


def locate_step(sample_sigmas: torch.Tensor, sigma: float, previous: int | None) -> int:
    """The step of `sample_sigmas` (length steps + 1) a model evaluation at `sigma` belongs to.

    An exact match (rtol 1e-4) is the start of that step; a sigma between two schedule entries is a
    second-order sampler's intermediate evaluation and belongs to the step in progress. Steps never
    go back within a run, which disambiguates repeated sigmas.
    """
    sigmas = [float(s) for s in sample_sigmas]
    steps = max(len(sigmas) - 1, 1)
    start = previous or 0
    for index in range(start, steps):
        if math.isclose(sigmas[index], sigma, rel_tol=1e-4, abs_tol=1e-8):
            if previous is not None and index == previous and _repeats_next(sigmas, index):
                return index + 1
            return index
    for index in range(steps - 1, -1, -1):
        if sigmas[index] >= sigma:
            return max(index, start)
    return start


def _repeats_next(sigmas: list[float], index: int) -> bool:
    return index + 1 < len(sigmas) - 1 and math.isclose(sigmas[index], sigmas[index + 1], rel_tol=1e-4)


def discover_keysteps(
    x0_predictions: torch.Tensor, k: int, progress: Sequence[float] | None = None
) -> tuple[list[float], dict]:
    """Pick the `k` most influential steps of a base trajectory (paper §4.2, Fig. 4).

    `x0_predictions` (N, ...) holds the one-step clean predictions at each of N steps (a batch axis
    may follow the step axis; it is averaged). The relative distance between consecutive
    predictions says how fast the trajectory still moves; its curvature (second difference) marks
    where that behaviour changes. Keystep 0 is always kept; the other k-1 are the steps just after
    the largest curvatures. Returns keysteps as the progress of the chosen steps (`progress[i]`,
    default i/N; the first is reported as 0) and the curves for plotting.
    """
    steps = x0_predictions.shape[0]
    if k < 1:
        raise ValueError(f"HyperAlign: the number of keysteps must be at least 1, got {k}.")
    if steps < 2:
        return [0.0], {"distance": [], "curvature": []}
    flat = x0_predictions.reshape(steps, -1).double()
    diffs = (flat[1:] - flat[:-1]).norm(dim=1)
    distance = diffs / flat[:-1].norm(dim=1).clamp_min(1e-12)  # (N-1,)
    padded = torch.cat([distance[:1], distance, distance[-1:]])
    curvature = (padded[2:] - 2 * padded[1:-1] + padded[:-2]).abs()  # (N-1,)
    # curvature[j] belongs to the transition j -> j+1: a new segment starts at step j+1
    candidates = sorted(range(len(curvature)), key=lambda j: (-float(curvature[j]), j))
    progress = list(progress) if progress is not None else [i / steps for i in range(steps)]
    if len(progress) != steps:
        raise ValueError(f"HyperAlign: got {len(progress)} progress values for {steps} steps.")
    chosen = {0}
    for j in candidates:
        if len(chosen) >= min(k, steps):
            break
        if float(progress[j + 1]) < 1.0:  # a step already at the clean end cannot start a segment
            chosen.add(j + 1)
    keysteps = [0.0] + sorted({round(float(progress[i]), 6) for i in chosen if i > 0} - {0.0})
    return keysteps, {"distance": distance.tolist(), "curvature": curvature.tolist()}
