"""Sampling with a hypernet in the loop, driven by :class:`hyperalign.runtime.AlignRun`.

``rollout`` denoises without gradients up to a step and reports which prediction's LoRA is in force
there: for S the one made at that step, for I the one made at the first step, for P the one made at
the step that opened that keystep segment, exactly as inference (ComfyUI) would. The trainer then
re-runs the hypernet *with* gradients on that prediction's saved inputs, so the objective trains
the very prediction the mode uses. ``generate`` runs the whole trajectory (sample grids, evaluation,
keystep discovery).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from hyperalign.runtime import AlignRun

from .models import Cond, FamilyAdapter, SamplingSteps


@dataclass
class HypernetInputs:
    """What the hypernet saw at `step`: perception tokens (b, n, c), progress (b,), context (b, L, d)."""

    step: int
    features: torch.Tensor
    progress: torch.Tensor
    context: torch.Tensor

    def run(self, hypernet):
        return hypernet(self.features, self.progress, self.context.float())


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, stream, step, sample number, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def per_sample_noise(shape: tuple[int, ...], seeds: list[int], device) -> torch.Tensor:
    """One Gaussian tensor of `shape` per seed, drawn on the CPU so any device and any batching agree."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


def per_sample_uniform(seeds: list[int], device) -> torch.Tensor:
    return torch.stack([torch.rand((), generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)


class Trajectory:
    """One sampling run of a batch: the family adapter, the hypernet (or None: the base model) and the mode.
    Each model call runs in its own `adapter.bound(...)` block, so nothing stays bound between calls."""

    def __init__(
        self,
        adapter: FamilyAdapter,
        hypernet,
        hcfg,
        cond: Cond,
        steps: SamplingSteps,
        guidance: float,
        mode: str = "S",
        keysteps=(0.0,),
    ):
        self.adapter, self.hypernet, self.hcfg, self.cond = adapter, hypernet, hcfg, cond
        self.steps, self.guidance = steps, guidance
        self.run = AlignRun(mode, tuple(keysteps))
        self.last: HypernetInputs | None = None

    def _predictor(self, i: int, x: torch.Tensor) -> Callable:
        def predict():
            b = x.shape[0]
            t = self.adapter.timesteps(self.steps.t[i], b)
            features = self.adapter.features(x, t, self.cond, self.hcfg, self.guidance)
            progress = torch.full((b,), self.steps.progress[i], device=x.device)
            self.last = HypernetInputs(i, features, progress, self.cond.context)
            return self.last.run(self.hypernet)

        return predict

    def factors_at(self, i: int, x: torch.Tensor):
        if self.hypernet is None:
            return None
        return self.run.factors_at(i, self.steps.progress[i], self._predictor(i, x))

    def model_step(self, i: int, x: torch.Tensor, factors) -> tuple[torch.Tensor, torch.Tensor]:
        """(next x, one-step x0 prediction) from step i."""
        b = x.shape[0]
        t = self.adapter.timesteps(self.steps.t[i], b)
        with self.adapter.bound(factors, self.adapter.rows(self.cond, self.guidance, b), b):
            pred = self.adapter.predict(x, t, self.cond, None, self.guidance)
        return self.adapter.step(x, pred, i, self.steps), self.adapter.x0(x, pred, t)

    @torch.no_grad()
    def rollout(self, x: torch.Tensor, stop: int) -> tuple[torch.Tensor, HypernetInputs | None]:
        """x at step `stop` (steps 0..stop-1 run) and the inputs of the prediction in force at `stop`."""
        for i in range(stop):
            x, _ = self.model_step(i, x, self.factors_at(i, x))
        if stop < len(self.steps):
            self.factors_at(stop, x)
        return x, self.last

    def final_with_grad(self, x: torch.Tensor, grad_steps: int, recompute: bool = True) -> torch.Tensor:
        """Final latents with gradient through the last `grad_steps` steps (the steps before roll without it).

        The hypernet predicts as the mode does (S every step, I once at x_T, P at keysteps); the prediction in force
        when the gradient starts is re-run with gradients. The perception features stay gradient-free (as at step k
        of the x0 objective), so the gradient reaches the LoRAs through the denoiser and sampler steps only.
        `recompute` checkpoints each model call (model.gradient_checkpointing): memory stays one call's activations
        at any K, for a quarter more compute."""
        n = len(self.steps)
        start = n - grad_steps
        x, inputs = self.rollout(x, start)
        factors = None if self.hypernet is None else inputs.run(self.hypernet)
        for i in range(start, n):
            if i > start and self.hypernet is not None:
                made = len(self.run.calls)
                current = self.factors_at(i, x)  # a new prediction (with gradients) when the mode makes one here
                factors = current if len(self.run.calls) > made else factors
            t = self.adapter.timesteps(self.steps.t[i], x.shape[0])
            pred = checkpointed_predict(self.adapter, x, t, self.cond, factors, self.guidance, recompute)
            x = self.adapter.step(x, pred, i, self.steps)
        return x

    @torch.no_grad()
    def generate(self, x: torch.Tensor, collect_x0: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final latents of the whole trajectory, and the x0 prediction of every step if asked."""
        x0s = []
        for i in range(len(self.steps)):
            x, x0 = self.model_step(i, x, self.factors_at(i, x))
            if collect_x0:
                x0s.append(x0.float().cpu())
        return x, x0s


@contextlib.contextmanager
def blocks_not_checkpointed(denoiser) -> Iterator[None]:
    """The denoiser's own block checkpointing off inside the block: under checkpointed_predict the whole call is
    checkpointed, and an inner block recomputed later in backward would run after the LoRA was unbound."""
    flagged = [m for m in denoiser.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in flagged:  # diffusers' per-block flag; set back exactly as it was
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in flagged:
            module.gradient_checkpointing = True


def checkpointed_predict(
    adapter: FamilyAdapter, x, t, cond: Cond, factors, guidance: float, recompute: bool = True
) -> torch.Tensor:
    """One model call under `factors`, checkpointed (only its inputs are kept for backward, so a chain of calls
    costs one call's activations). The LoRA is bound inside the checkpointed function, so the recomputation in
    backward binds it again: a block around the call would have ended by then. `recompute=False` keeps the
    activations instead (a quarter less compute for a chain of calls; for models whose activations fit, like
    the toy's; the factors are in the graph, so backward needs no binding)."""
    b = x.shape[0]
    rows = adapter.rows(cond, guidance, b)

    def call(x_in: torch.Tensor) -> torch.Tensor:
        with adapter.bound(factors, rows, b), blocks_not_checkpointed(adapter.denoiser):
            return adapter.predict(x_in, t, cond, None, guidance)

    if not torch.is_grad_enabled() or not recompute:
        return call(x)
    return checkpoint(call, x, use_reentrant=False)
