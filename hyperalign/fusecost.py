"""When merging one sample's LoRA into the weights pays: the cost model behind the nodes' fuse policy.

A merge costs once per prediction (``merge_seconds``: a fresh copy of every mergeable target weight plus
``s * up @ down``); the hooked side path costs on every model call (``side_seconds``: two small matmuls per
target, plus the per-target Python and launch overhead of a hook). So merging pays when the prediction
serves more model calls than ``merge_seconds / side_seconds``. Both costs are measured on the model's own
target layers, device and call shape (:func:`measure_merge`, :func:`measure_side`); the host caches them.
Pure torch: no host imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .lora import ConvGeometry, add_lora_delta, merge_weights
from .schedule import segment_of


@dataclass(frozen=True)
class PathCosts:
    """Seconds of one merge of every mergeable target, and of their side paths in one model call."""

    merge_seconds: float
    side_seconds: float

    def break_even(self) -> float:
        """Model calls a merge must serve to pay back."""
        return self.merge_seconds / self.side_seconds if self.side_seconds > 0 else float("inf")


def merge_pays(costs: PathCosts, calls: int) -> bool:
    """Whether one merge costs less than the side paths of `calls` model calls."""
    return calls > 0 and costs.merge_seconds < calls * costs.side_seconds


def steps_served(
    mode: str,
    keysteps: Sequence[float],
    progress: Sequence[float],
    step: int,
    active: Callable[[float], bool] = lambda _: True,
) -> int:
    """Sampling steps a prediction made at `step` stays in force for, before the next prediction or the end
    of the run (or of the active window): S one step, I every step left, P the steps left in its keystep
    segment. `progress` holds each schedule sigma's progress (steps + 1 values: the last sigma has no step)."""
    last = len(progress) - 1  # steps 0 .. last - 1
    if mode == "S":
        return 1 if step < last else 0
    segment = segment_of(progress[step], keysteps)
    served = 0
    for index in range(step, last):
        if not active(progress[index]) or (mode == "P" and segment_of(progress[index], keysteps) != segment):
            break
        served += 1
    return served


# ------------------------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)


def _seconds(run: Callable[[], None], device: torch.device, repeats: int, warm: bool = True) -> float:
    """Median seconds of `run` (after one warm-up when `warm`), the device drained around each."""
    if warm:
        run()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


MergeGroup = tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]]]


def measure_merge(groups: Sequence[MergeGroup], scale: float, budget_bytes: int = 64 * 2**20) -> float:
    """Seconds to merge every group (weight, [(down, up, out_slice)]), from one timed merge of the largest groups
    that fit in `budget_bytes` of weights, scaled by bytes (a merge streams the weights once): the measurement
    itself never holds more than that in extra copies. No warm-up: a merge in a run writes fresh memory too
    (on CPU that is about 3x a merge into recycled memory, docs/performance.md)."""
    if not groups:
        return 0.0
    total = sum(w.numel() * w.element_size() for w, _ in groups)
    chosen, size = [], 0
    for weight, parts in sorted(groups, key=lambda g: -g[0].numel()):
        nbytes = weight.numel() * weight.element_size()
        if chosen and size + nbytes > budget_bytes:
            continue
        chosen.append((weight, parts))
        size += nbytes
    device = chosen[0][0].device

    def run():
        for weight, parts in chosen:
            merge_weights(weight, parts, scale)

    return _seconds(run, device, repeats=1, warm=False) * total / size


SideCall = tuple[
    tuple[int, ...], torch.dtype, int, torch.Tensor, torch.Tensor, tuple[int, int] | None, ConvGeometry | None
]


def _output_shape(shape: tuple[int, ...], width: int, geometry: ConvGeometry | None) -> tuple[int, ...]:
    if geometry is None:
        return (*shape[:-1], width)
    return (shape[0], width, *geometry.output_size(shape[2:]))


def measure_side(calls: Iterable[SideCall], scale: float) -> float:
    """Seconds of one model call's side paths. Each target gives its input's shape and dtype, its output width,
    its row-bound factors (down (rows, r, i), up (rows, o, r), on the call's device, as the hooks get them), its
    out_slice and, for a convolution, its geometry; the side paths run on zero activations of those shapes."""
    calls = list(calls)
    if not calls:
        return 0.0
    device = calls[0][3].device
    buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    work = []
    for shape, dtype, width, down, up, out_slice, geometry in calls:
        key = (tuple(shape), dtype, width, geometry)
        if key not in buffers:  # targets of one shape share buffers: the measurement stays small
            x = torch.zeros(shape, device=device, dtype=dtype)
            buffers[key] = (x, torch.zeros(_output_shape(shape, width, geometry), device=device, dtype=dtype))
        x, out = buffers[key]
        work.append((out, x, down, up, out_slice, geometry))

    def run():
        with torch.no_grad():
            for out, x, down, up, out_slice, geometry in work:
                add_lora_delta(out, x, down, up, scale, out_slice, geometry)

    return _seconds(run, device, repeats=3)
