"""How one prediction's LoRA gets into the model's calls: merged into swapped weights, or forward hooks.

Prepared once per prediction (:class:`Applied`) and reused by every model call until the next one:
- Fused: when every row of a call shares one LoRA (one sample, modes in ``FUSE_MODES``), the ``FUSE`` policy
  allows it (by default on GPUs, not on CPU) and the copies fit in free memory, the LoRA is merged into new
  weight tensors that replace the target modules' weights during each call; the original tensors are never
  written and are back in place after the call (``lora.swapped_weights``).
- Hooked: otherwise, and for modules whose weights ComfyUI casts or patches per call (low-VRAM,
  manual cast, fp8, weight functions), forward hooks add each sample's LoRA to that sample's rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import comfy.model_management
import torch

from ..hyperalign.lora import (
    Factors,
    LoRAState,
    fused_weights,
    fusible_weight,
    hooked,
    rows_to_samples,
    swapped_weights,
)

logger = logging.getLogger(__name__)

# Merge the LoRA into the weights when every row shares one: "auto" on GPUs and other accelerators (where each
# hooked call pays launch and Python overhead per target, and a merge is a fast copy), not on CPU (where the side
# paths cost 0.5 % of a step and a merge's 0.3 GB copy pays back only after 2 to 20 model calls); "always"/"never"
# force it. docs/performance.md has the numbers. HYPERALIGN_FUSE sets it for a ComfyUI session.
FUSE_CHOICES = ("auto", "always", "never")
FUSE = os.environ.get("HYPERALIGN_FUSE", "auto")
# S predicts at every step, so a merge would serve one model evaluation: the side paths cost less there
FUSE_MODES = ("I", "P")


def _fusible_on(device: torch.device):
    """Modules whose weight can be swapped for a merged copy: a plain float Parameter already on the compute
    device, used as is by the forward (ComfyUI's manual-cast and low-VRAM layers cast it, or patch it
    through weight functions, on every call: those keep the hooks)."""

    def fusible(module) -> bool:
        return (
            fusible_weight(module)
            and module.weight.device == device
            and not getattr(module, "comfy_cast_weights", False)
            and not getattr(module, "weight_function", None)
            and not getattr(module, "bias_function", None)
        )

    return fusible


def fuse_on(device: torch.device) -> bool:
    """The FUSE policy for a model running on `device` (True/False are accepted as always/never)."""
    policy = {True: "always", False: "never"}.get(FUSE, FUSE)
    if policy not in FUSE_CHOICES:
        raise ValueError(
            f"HyperAlign: HYPERALIGN_FUSE={FUSE!r} is not one of {FUSE_CHOICES}. HINT: unset it for 'auto'."
        )
    return policy == "always" or (policy == "auto" and device.type != "cpu")


def _room_to_merge(resolved: list, fusible, device: torch.device) -> bool:
    """Whether merged copies of the fusible target weights fit in free memory next to ComfyUI's inference reserve
    (FLUX's attention targets are about 5 GB in bf16). If not, the hooks serve: they need no copies."""
    weights = {id(module): module.weight for _, _, module in resolved if fusible(module)}
    needed = sum(w.numel() * w.element_size() for w in weights.values())
    needed += max((w.numel() * 4 for w in weights.values()), default=0)  # one fp32 working copy (half dtypes)
    free = comfy.model_management.get_free_memory(device)
    if needed + comfy.model_management.minimum_inference_memory() <= free:
        return True
    logger.info(
        "HyperAlign: not merging the LoRA into the weights (needs %.0f MB, %.0f MB free); using forward hooks",
        needed / 2**20,
        free / 2**20,
    )
    return False


@dataclass(eq=False)
class Applied:
    """One prediction's factors made ready for model calls, on first use: merged weights for the fusible
    target modules (only when every row shares one LoRA), and per-row-layout bound states for the rest."""

    factors: Factors
    resolved: list  # (target, path, module) of every target
    samples: int
    scale: float
    fuse: bool
    merged: dict | None = None  # module -> merged weight Parameter
    hooked: list | None = None  # resolved rows left to the hook path
    states: dict = field(default_factory=dict)  # (rows, device) -> LoRAState

    def prepare(self, device: torch.device) -> None:
        if self.merged is not None:
            return
        fusible = _fusible_on(device)
        if self.fuse and _room_to_merge(self.resolved, fusible, device):
            self.merged, self.hooked = fused_weights(self.resolved, self.factors, 0, self.scale, fusible)
        else:
            self.merged, self.hooked = {}, self.resolved

    def state_for(self, rows: int, device: torch.device) -> LoRAState:
        key = (rows, device)
        state = self.states.get(key)
        if state is None:
            state = LoRAState(scale=self.scale)
            index = None if rows == self.samples else rows_to_samples(rows, self.samples).to(device)
            state.bind(self.factors, index, device=device)
            self.states[key] = state
        return state

    @contextmanager
    def in_force(self, x: torch.Tensor) -> Iterator[None]:
        """The LoRA in force for one model call on input `x` (rows, ...): merged weights swapped in and hooks
        on the rest, all gone on exit, also when the call raises."""
        self.prepare(x.device)
        if not self.hooked:
            with swapped_weights(self.merged):
                yield
            return
        state = self.state_for(x.shape[0], x.device)
        with swapped_weights(self.merged), hooked(self.hooked, state):
            yield


def for_prediction(
    model,
    factors: Factors,
    resolved: list,
    x_in: torch.Tensor,
    scale: float,
    *,
    mode: str,
    keysteps: Sequence[float],
    step: int,
    progress: Sequence[float],
    active: Callable[[float], bool],
) -> Applied:
    """One new prediction's LoRA for the model calls it serves (from step `step` of a run whose schedule
    progress values are `progress`, in `mode` with `keysteps`, while `active(progress)`), fused or hooked.

    Merge only when every row shares one LoRA and the mode is in ``FUSE_MODES``; never when ComfyUI hook
    patches may rewrite weights in place between calls."""
    samples = x_in.shape[0]
    patcher = getattr(model, "current_patcher", None)
    fuse = fuse_on(x_in.device) and samples == 1 and mode in FUSE_MODES and not getattr(patcher, "hook_patches", None)
    return Applied(factors, resolved, samples, scale, fuse)
