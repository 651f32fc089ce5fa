"""Baselines HyperAlign is compared with on the toy world: a static LoRA and Best-of-N; and ‖ΔW‖/‖W‖.

The static LoRA is the fine-tuning baseline: one LoRA of the same rank on the same layers for every
prompt, sample and step. It stands in for the hypernet in the trainer, so it is trained by exactly
the same objective (reward term + lambda * preference term), data, steps, batch and learning rate;
only the input dependence is taken away. Best-of-N spends N times the sampling compute and keeps,
for each seed slot, the sample the training reward likes best.

Why the static LoRA's factors are peft's but its forward pass is not: peft injects its LoRA into the
denoiser's Linear layers, where it holds one set of factors per adapter and adds them to every row
of every call. The trainer instead binds factors per model call through hyperalign.lora's hooks:
per-sample rows, a sample's CFG rows sharing its LoRA, the perception encoder running the base
model (adapter.without_lora), the same scale. Routing the baseline through peft's layers would make
it a second LoRA path next to the hypernet's, and a comparison of two code paths rather than of
static vs predicted factors. So peft creates the LoRA (its LoraConfig and default initialisation:
Kaiming-uniform down, zero up) and the trainer's one LoRA path applies it.
"""

from __future__ import annotations

import torch
from torch import nn

from hyperalign.lora import Factors, fused_slice, resolve_modules
from hyperalign.targets import Target


def peft_factors(targets: list[Target], rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(down (r, in), up (out, r)) per target, created and initialised by peft's LoRA layers on a stand-in module
    tree of the targets' shapes (built on the meta device, so the base weights cost nothing)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    root = nn.Module()
    names = [f"t{i}" for i in range(len(targets))]  # target ids contain dots, which module names cannot
    with torch.device("meta"):
        for name, t in zip(names, targets):
            if t.kernel is None:
                root.add_module(name, nn.Linear(t.in_features, t.out_features, bias=False))
            else:  # peft's conv LoRA: a kernel down to r channels, a 1x1 up (LoCon), flattened below
                root.add_module(name, nn.Conv2d(t.in_channels, t.out_features, t.kernel, bias=False))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, init_lora_weights=True)
    root = inject_adapter_in_model(config, root, low_cpu_mem_usage=False)
    factors = []
    for name in names:
        layer = root.get_submodule(name)
        assert isinstance(layer, LoraLayer)
        layer.lora_A.to_empty(device="cpu")
        layer.lora_B.to_empty(device="cpu")
        layer.reset_lora_parameters("default", True)  # peft's own default initialisation
        down, up = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        factors.append((down.reshape(rank, -1).clone(), up.reshape(up.shape[0], rank).clone()))
    return factors


class StaticLoRA(nn.Module):
    """Learned factors, the same for every input: a hypernet-shaped LoRA that ignores x_t, t and c."""

    def __init__(self, targets: list[Target], rank: int):
        super().__init__()
        self.ids = [t.id for t in targets]
        factors = peft_factors(targets, rank)
        self.down = nn.ParameterList(nn.Parameter(down) for down, _ in factors)  # zero up: starts as the base model
        self.up = nn.ParameterList(nn.Parameter(up) for _, up in factors)

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


# ---------------------------------------------------------------------------------- ‖ΔW‖ / ‖W‖


def target_weights(denoiser: nn.Module, targets: list[Target]) -> dict[str, torch.Tensor]:
    """Each target's base weight (out, in) in the denoiser (a fused layer's slice), keyed by target id."""
    weights = {}
    for target, _path, module in resolve_modules(denoiser, targets, lambda t: t.id):
        part = fused_slice(target, module)
        weights[target.id] = module.weight.detach() if part is None else module.weight.detach()[part[0] : part[1]]
    return weights


@torch.no_grad()
def relative_delta_norm(factors: Factors, weights: dict[str, torch.Tensor], scale: float) -> float:
    """Mean over samples and targets of ‖ΔW‖_F / ‖W‖_F, ΔW = scale · up @ down (what the hooks add): how far a
    LoRA moves the model, comparable between a static LoRA and a predictor's per-sample factors."""
    ratios = []
    for key, (down, up) in factors.items():
        w = weights[key].float()
        delta = scale * torch.bmm(up.float(), down.float())  # (b, out, in)
        ratios.append(delta.flatten(1).norm(dim=1) / w.norm())
    return float(torch.cat(ratios).mean())


class DeltaNormRecorder(nn.Module):
    """Wraps a hypernet or a StaticLoRA and records ‖ΔW‖/‖W‖ of every prediction it makes, e.g. over the sampling
    runs of an evaluation (a predictor's factors differ per sample and step; a static LoRA's never do)."""

    def __init__(self, net: nn.Module, weights: dict[str, torch.Tensor], scale: float):
        super().__init__()
        self.net, self.weights, self.scale = net, weights, scale
        self.ratios: list[float] = []

    def forward(self, features, progress, context=None) -> Factors:
        factors = self.net(features, progress, context)
        self.ratios.append(relative_delta_norm(factors, self.weights, self.scale))
        return factors

    def mean(self) -> float:
        if not self.ratios:
            raise ValueError("HyperAlign: no prediction was recorded. HINT: sample with the recorder as the hypernet.")
        return sum(self.ratios) / len(self.ratios)
