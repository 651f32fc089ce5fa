"""The HyperAlign hypernetwork (paper §4.2, Fig. 3): features of (x_t, t, c) -> LoRA factors.

Shape legend: b samples, n feature tokens, l target layers, d decoder width, r rank, k basis width,
i in_features, o out_features.

Pipeline:
1. Perception encoder: the frozen base model's own downsampling path (SD1.5: time embedding, input
   blocks and middle block; FLUX: embedders and the first K double blocks). It belongs to the host,
   which passes its output tokens (b, n, feature_dim) in; this module never imports a host.
2. A linear projection of those tokens to width d, plus two extra memory tokens: the timestep
   (sinusoidal of the progress, through an MLP) and the mean prompt embedding.
3. A transformer decoder: one query token per target layer, zero-initialised and learnable (the
   paper's design), plus a fixed sinusoidal index code so the tokens start distinct; queries
   self-attend and cross-attend to the memory.
4. Heads: each decoded token becomes that target's factors through a learned LoRA basis.

Head design and its trade-off. A direct linear head onto every factor of every target would need
d * r * (i + o) weights per target, about 0.8 B for SD1.5's 128 attention layers at d=512, r=8.
Instead each target t owns a learned input basis P_t (k, i) and output basis Q_t (o, k), and the
head predicts small coefficient matrices A_b (r, k) and B_b (k, r), so
    down_b = A_b @ P_t  (r, i),   up_b = Q_t @ B_b  (o, r).
Heads are shared by all targets of one (i, o) shape (the decoded token already says which target
it is), so there are only a handful of them. Cost: ~k * (i + o) parameters per target plus a few
heads; for SD1.5 rank 8, k 32, all 128 targets: 10 M at d=256, 18 M at d=512 (scripts/model_sizes.py). Trade-off:
per-sample LoRAs live in a learned k-dimensional input and output subspace per layer rather than
the full space; k is a config knob (k = min(i, o) recovers full expressivity).

Identity at init: the up-head is zero, so up_b = 0 and every delta is exactly zero until trained.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import HypernetConfig
from .lora import Factors
from .targets import Target


def sinusoidal(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (…,) -> (…, dim), as diffusion models embed timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def shape_groups(targets: list[Target]) -> dict[str, list[int]]:
    """Target indices grouped by (in_features, out_features), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for index, t in enumerate(targets):
        groups.setdefault(f"{t.in_features}x{t.out_features}", []).append(index)
    return groups


class _GroupHead(nn.Module):
    """Factors for all targets of one shape: shared coefficient heads, per-target bases."""

    def __init__(self, count: int, in_features: int, out_features: int, cfg: HypernetConfig):
        super().__init__()
        r, k = cfg.rank, cfg.basis
        self.rank, self.basis = r, k
        self.down_coef = nn.Linear(cfg.dim, r * k)
        self.up_coef = nn.Linear(cfg.dim, k * r)
        self.down_basis = nn.Parameter(torch.randn(count, k, in_features) / math.sqrt(in_features))
        self.up_basis = nn.Parameter(torch.randn(count, out_features, k) / math.sqrt(k))
        nn.init.normal_(self.down_coef.weight, std=1.0 / math.sqrt(cfg.dim))
        nn.init.zeros_(self.down_coef.bias)
        nn.init.zeros_(self.up_coef.weight)  # exact identity at init
        nn.init.zeros_(self.up_coef.bias)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = tokens.shape  # (b, n, d) for the n targets of this group
        a = self.down_coef(tokens).view(b, n, self.rank, self.basis)  # (b, n, r, k)
        c = self.up_coef(tokens).view(b, n, self.basis, self.rank)  # (b, n, k, r)
        down = torch.einsum("bnrk,nki->bnri", a, self.down_basis)  # (b, n, r, i)
        up = torch.einsum("nok,bnkr->bnor", self.up_basis, c)  # (b, n, o, r)
        return down, up


class HyperNet(nn.Module):
    def __init__(self, cfg: HypernetConfig, targets: list[Target]):
        super().__init__()
        if not targets:
            raise ValueError("HyperAlign: the hypernetwork needs at least one target layer.")
        self.cfg, self.targets = cfg, list(targets)
        d = cfg.dim
        self.feature_proj = nn.Linear(cfg.feature_dim, d)
        self.feature_norm = nn.LayerNorm(d)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.context_proj = nn.Linear(cfg.context_dim, d) if cfg.context_dim else None
        self.queries = nn.Parameter(torch.zeros(len(targets), d))  # zero-initialised (paper)
        self.register_buffer("query_code", sinusoidal(torch.arange(len(targets)), d), persistent=False)
        layer = nn.TransformerDecoderLayer(d, cfg.heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, cfg.depth, norm=nn.LayerNorm(d))
        groups = shape_groups(self.targets)
        self.group_index = {name: idx for name, idx in groups.items()}
        self.heads = nn.ModuleDict(
            {
                name: _GroupHead(len(idx), self.targets[idx[0]].in_features, self.targets[idx[0]].out_features, cfg)
                for name, idx in groups.items()
            }
        )

    def memory(self, features: torch.Tensor, progress: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        tokens = self.feature_norm(self.feature_proj(features))  # (b, n, d)
        time = self.time_mlp(sinusoidal(progress * 1000.0, self.cfg.dim).to(tokens.dtype))[:, None]  # (b, 1, d)
        parts = [tokens, time]
        if self.context_proj is not None:
            if context is None:
                raise ValueError("HyperAlign: this predictor needs the prompt embedding (context), got None.")
            parts.append(self.context_proj(context.mean(dim=1, keepdim=True).to(tokens.dtype)))  # (b, 1, d)
        return torch.cat(parts, dim=1)

    def forward(self, features: torch.Tensor, progress: torch.Tensor, context: torch.Tensor | None = None) -> Factors:
        """features (b, n, feature_dim), progress (b,) in [0, 1], context (b, L, context_dim) -> factors."""
        b = features.shape[0]
        mem = self.memory(features, progress.reshape(-1).expand(b), context)
        queries = (self.queries + self.query_code.to(self.queries.dtype)).expand(b, -1, -1)
        decoded = self.decoder(queries, mem)  # (b, l, d)
        factors: Factors = {}
        for name, head in self.heads.items():
            idx = self.group_index[name]
            down, up = head(decoded[:, idx])
            for j, target_index in enumerate(idx):
                factors[self.targets[target_index].id] = (down[:, j], up[:, j])
        return factors


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def feature_tokens(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """Perception-encoder output (b, c, h, w) -> at most grid*grid tokens (b, n, c), by average pooling.

    Both hosts call this on their encoder's output, so ComfyUI and the trainer see the same tokens.
    """
    h, w = feature_map.shape[-2:]
    pooled = torch.nn.functional.adaptive_avg_pool2d(feature_map, (min(h, grid), min(w, grid)))
    return pooled.flatten(2).transpose(1, 2)  # (b, n, c)
