"""What every toy training loop shares: fixed seeds and threads, the learning-rate curve, EMA, logging."""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn


def deterministic(seed: int, threads: int, device: str = "cpu") -> torch.Generator:
    """Seed torch, pin the thread count (CPU reductions split work by thread) and return a (CPU) generator.

    On CUDA some backward kernels (nearest upsampling) have no deterministic version: a GPU build is
    reproducible only up to those, so they warn instead of failing there; a CPU build stays strict."""
    import os

    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=str(device) != "cpu")
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        lr = peak * (step + 1) / warmup
    else:
        progress = (step - warmup) / max(1, total - warmup)
        lr = peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class EMA:
    """Exponential moving average of a module's weights, with the usual warm-up of the decay."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for mine, theirs in zip(self.shadow.parameters(), module.parameters()):
            mine.lerp_(theirs.detach(), 1 - decay)


class Progress:
    """One log line every `every` steps: step, loss, seconds so far."""

    def __init__(self, name: str, total: int, every: int, log):
        self.name, self.total, self.every, self.log = name, total, max(1, every), log
        self.start, self.running = time.perf_counter(), None

    def __call__(self, step: int, loss: float) -> None:
        self.running = loss if self.running is None else 0.95 * self.running + 0.05 * loss
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.start
            self.log(f"{self.name} step {step + 1}/{self.total} | loss {self.running:.4f} | {elapsed:.0f} s")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
