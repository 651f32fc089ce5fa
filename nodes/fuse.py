"""How one prediction's LoRA gets into the model's calls: merged into swapped weights, or forward hooks.

Decided per prediction and per layer, on the prediction's first model call (:class:`Applied`):
- Per layer: a target can be merged when its weight is a plain float Parameter resident on the compute device
  that the forward uses as it is (:func:`mergeable`). ComfyUI's cast-weights layers qualify when their weight
  is resident and no weight function rewrites it per call (0.33's dynamic VRAM marks every layer
  ``comfy_cast_weights``; its big layers live in a VRAM pool that streams them per call, off the compute
  device's tensors: those, low-VRAM offloaded layers, fp8/quantised weights and layers with weight functions
  (a LoRA loader in low-VRAM mode) keep the hooks.
- Per prediction: merge when every row of a call shares one LoRA (one sample), no ComfyUI hook patches may
  rewrite weights between calls, the ``FUSE`` policy says so, and the copies fit in free memory. The policy
  "auto" asks the cost model (:mod:`hyperalign.fusecost`): one merge against the side paths of the model calls
  the prediction serves (from the mode, keysteps and step count), with both costs measured on this model's
  mergeable layers, device and call shape, once per process (the first call of that shape runs hooked while
  the shapes are recorded). ``HYPERALIGN_FUSE=always|never`` forces it.
- Merged: new weight tensors replace the target modules' weights during each call; the original tensors are
  never written and are back in place after the call (``lora.swapped_weights``). The rest: forward hooks add
  each sample's LoRA to that sample's rows.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import comfy.model_management
import torch

from ..hyperalign.fusecost import PathCosts, measure_merge, measure_side, merge_pays, steps_served
from ..hyperalign.lora import (
    Factors,
    LoRAState,
    conv_geometry,
    fused_slice,
    fused_weights,
    fusible_weight,
    hooked,
    swapped_weights,
)
from ..hyperalign.rows import bind_rows

logger = logging.getLogger(__name__)

# "auto": the cost model decides; "always"/"never" force it (HYPERALIGN_FUSE sets it for a ComfyUI session).
FUSE_CHOICES = ("auto", "always", "never")
FUSE = os.environ.get("HYPERALIGN_FUSE", "auto")
# modes in which a merge is considered at all (the cost model rules S out unless a call is expensive enough)
FUSE_MODES = ("S", "I", "P")
# measured costs: diffusion model -> {(device, call shape, dtype): PathCosts}; dropped with the model
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mergeable(module, device: torch.device) -> bool:
    """Whether `module`'s weight can be swapped for a merged copy for calls on `device`: a plain float Parameter
    already on that device, which the forward uses as it is (up to a dtype cast). ComfyUI's cast-weights
    layers read ``module.weight`` through ``cast_bias_weight``, which returns it unchanged when it is on the
    device and no weight function applies; weights elsewhere (low-VRAM offload, 0.33's dynamic-VRAM pool)
    would need a resident copy outside ComfyUI's memory management, and weight functions (a LoRA loader's
    low-VRAM patches) would be applied on top of the merged copy: both keep the hooks."""
    return (
        fusible_weight(module)
        and module.weight.device == device
        and not getattr(module, "weight_function", None)
        and not getattr(module, "bias_function", None)
        and getattr(module, "weight_lowvram_function", None) is None
    )


def policy() -> str:
    """The FUSE policy (True/False are accepted as always/never)."""
    chosen = {True: "always", False: "never"}.get(FUSE, FUSE)
    if chosen not in FUSE_CHOICES:
        raise ValueError(
            f"HyperAlign: HYPERALIGN_FUSE={FUSE!r} is not one of {FUSE_CHOICES}. HINT: unset it for 'auto'."
        )
    return chosen


def _room_to_merge(rows: list, device: torch.device) -> bool:
    """Whether merged copies of these target rows' weights fit in free memory next to ComfyUI's inference reserve
    (FLUX's attention targets are about 5 GB in bf16). If not, the hooks serve: they need no copies."""
    weights = {id(module): module.weight for _, _, module in rows}
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


def _merge_groups(resolved: list, factors: Factors) -> list:
    """(weight, [(down, up, out_slice)]) per module, for timing a merge with the real factors of sample 0."""
    groups: dict = {}
    for target, _path, module in resolved:
        down, up = factors[target.id]
        groups.setdefault(module, (module.weight, []))[1].append((down[0], up[0], fused_slice(target, module)))
    return list(groups.values())


@contextmanager
def _recording_inputs(resolved: list) -> Iterator[dict]:
    """Record each target module's input shape and dtype during one model call (pre-hooks, removed on exit)."""
    seen: dict = {}
    handles = []

    def record(module, args):
        seen.setdefault(module, (tuple(args[0].shape), args[0].dtype))

    try:
        for module in {id(m): m for _, _, m in resolved}.values():
            handles.append(module.register_forward_pre_hook(record))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def measure_costs(resolved: list, factors: Factors, state: LoRAState, inputs: dict, scale: float) -> PathCosts:
    """One merge of the `resolved` targets and their side paths in one call whose inputs were `inputs`
    (module -> (shape, dtype)), with `state` bound to that call's rows."""
    side = []
    for target, _path, module in resolved:
        if module in inputs and (pair := state.for_target(target.id)) is not None:
            shape, dtype = inputs[module]
            geometry = conv_geometry(target, module)
            side.append((shape, dtype, module.weight.shape[0], *pair, fused_slice(target, module), geometry))
    merge = measure_merge(_merge_groups(resolved, factors), scale)
    return PathCosts(merge, measure_side(side, scale))


@dataclass(eq=False)
class Applied:
    """One prediction's factors made ready for model calls: on the first call, merged weights for the mergeable
    target modules when the policy says so, and per-row-layout bound states for the hooks on the rest."""

    factors: Factors
    resolved: list  # (target, path, module) of every target
    samples: int
    scale: float
    fuse: str  # "never", "always", or "auto" (the cost model decides)
    calls: int = 1  # model calls this prediction is expected to serve (a lower bound: one per step)
    costs: dict | None = None  # the model's measured PathCosts by call shape (fuse == "auto")
    merged: dict | None = None  # module -> merged weight Parameter
    hooked: list | None = None  # resolved rows left to the hook path
    states: dict = field(default_factory=dict)  # (rows, device) -> LoRAState

    def state_for(self, rows: int, device: torch.device) -> LoRAState:
        key = (rows, device)
        state = self.states.get(key)
        if state is None:
            state = LoRAState(scale=self.scale)
            bind_rows(state, self.factors, rows, self.samples, device)
            self.states[key] = state
        return state

    def _choose(self, device: torch.device, candidates: list, merge: bool) -> None:
        """Merge `candidates` (rows of mergeable modules) if `merge` and their copies fit; the rest stay hooked."""
        self.merged, self.hooked = {}, self.resolved
        if merge and candidates and _room_to_merge(candidates, device):
            modules = {id(module) for _, _, module in candidates}
            self.merged, self.hooked = fused_weights(
                self.resolved, self.factors, 0, self.scale, lambda module: id(module) in modules
            )

    @contextmanager
    def in_force(self, x: torch.Tensor) -> Iterator[None]:
        """The LoRA in force for one model call on input `x` (rows, ...): merged weights swapped in and hooks
        on the rest, all gone on exit, also when the call raises."""
        if self.merged is None:
            candidates = [] if self.fuse == "never" else [row for row in self.resolved if mergeable(row[2], x.device)]
            key = (x.device, tuple(x.shape), x.dtype)
            if self.fuse == "auto" and candidates and key not in self.costs:
                with self._calibrating(x, key, candidates):
                    yield
                return
            auto = self.fuse == "auto" and bool(candidates) and merge_pays(self.costs[key], self.calls)
            self._choose(x.device, candidates, self.fuse == "always" or auto)
        if not self.hooked:
            with swapped_weights(self.merged):
                yield
            return
        state = self.state_for(x.shape[0], x.device)
        with swapped_weights(self.merged), hooked(self.hooked, state):
            yield

    @contextmanager
    def _calibrating(self, x: torch.Tensor, key: tuple, candidates: list) -> Iterator[None]:
        """This call runs hooked while the targets' inputs are recorded; then both paths' costs are measured
        once for this model and call shape, and the prediction's other calls follow the cost model."""
        state = self.state_for(x.shape[0], x.device)
        with _recording_inputs(candidates) as inputs, hooked(self.resolved, state):
            yield
        costs = measure_costs(candidates, self.factors, state, inputs, self.scale)
        self.costs[key] = costs
        logger.info(
            "HyperAlign: a merge costs %.1f ms, the side paths %.2f ms per model call (%s): merging pays "
            "after %.1f calls",
            costs.merge_seconds * 1e3,
            costs.side_seconds * 1e3,
            ", ".join(str(v) for v in key),
            costs.break_even(),
        )
        self._choose(x.device, candidates, merge_pays(costs, self.calls - 1))


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

    A merge is considered only when every row shares one LoRA and the mode is in ``FUSE_MODES``, and never
    when ComfyUI hook patches may rewrite weights in place between calls."""
    samples = x_in.shape[0]
    patcher = getattr(model, "current_patcher", None)
    chosen = policy()
    if samples != 1 or mode not in FUSE_MODES or getattr(patcher, "hook_patches", None):
        chosen = "never"
    root = getattr(model, "diffusion_model", model)
    costs = _COSTS.setdefault(root, {}) if chosen == "auto" else None
    calls = steps_served(mode, keysteps, progress, step, active)
    return Applied(factors, resolved, samples, scale, chosen, calls, costs)
