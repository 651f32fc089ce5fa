"""Baselines HyperAlign is compared with on the toy world: a static LoRA and Best-of-N.

The static LoRA is the fine-tuning baseline: one LoRA of the same rank on the same layers for every
prompt, sample and step. It stands in for the hypernet in the trainer, so it is trained by exactly
the same objective (reward term + lambda * preference term), data, steps, batch and learning rate;
only the input dependence is taken away. Best-of-N spends N times the sampling compute and keeps,
for each seed slot, the sample the training reward likes best.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hyperalign.lora import Factors
from hyperalign.targets import Target


class StaticLoRA(nn.Module):
    """Learned factors, the same for every input: a hypernet-shaped LoRA that ignores x_t, t and c."""

    def __init__(self, targets: list[Target], rank: int):
        super().__init__()
        self.ids = [t.id for t in targets]
        # peft's default init: random down, zero up, so training starts from the base model exactly
        self.down = nn.ParameterList(
            nn.Parameter(torch.randn(rank, t.in_features) / math.sqrt(t.in_features)) for t in targets
        )
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(t.out_features, rank)) for t in targets)

    def forward(self, features: torch.Tensor, progress: torch.Tensor, context: torch.Tensor | None = None) -> Factors:
        b = features.shape[0]
        return {
            key: (down.expand(b, -1, -1), up.expand(b, -1, -1)) for key, down, up in zip(self.ids, self.down, self.up)
        }


def best_of_n(scores: torch.Tensor, slots: int) -> torch.Tensor:
    """Index of the best candidate of each slot; `scores` (n * slots,) is candidate-major (candidate j of
    slot s at j * slots + s), so candidate 0 of every slot is the base sample of that slot's seed."""
    per_slot = scores.reshape(-1, slots)  # (n, slots)
    return per_slot.argmax(dim=0) * slots + torch.arange(slots)
