"""Helpers shared by the node tests (tests/nodes): predictors, sampling and node calls on tiny models."""

from __future__ import annotations

from pathlib import Path

import torch

import hyperalign
from hyperalign.config import HypernetConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_HYPERNET = {
    "sd15": {"feature_dim": 64, "context_dim": 64},
    "flux": {"feature_dim": 64, "context_dim": 32, "encoder_blocks": 1},
    "sdxl": {"feature_dim": 128, "context_dim": 64},
}
HYPERNET_SHAPE = {"dim": 32, "depth": 1, "heads": 2, "rank": 4, "alpha": 4.0, "basis": 8, "feature_grid": 2}
SCHEDULER = {"sd15": "normal", "flux": "simple", "sdxl": "normal"}
STEPS = 4
NEGATIVE_SEED = 99


def build_predictor(
    tiny,
    family: str,
    seed: int | None,
    mode: str = "S",
    keysteps=(0.0,),
    std: float = 0.1,
    arch: dict | None = None,
    targets: str = "attn",
):
    """A tiny predictor; seed None = untrained (exact identity), else every up-head randomised."""
    cfg = HypernetConfig(**TINY_HYPERNET[family], **HYPERNET_SHAPE)
    arch = arch or getattr(tiny, f"{family.upper()}_ARCH")
    predictor = hyperalign.new_predictor(family, cfg, arch, targets=targets, mode=mode, keysteps=keysteps)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in predictor.hypernet.named_parameters():
                if "up_coef" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * std / param.shape[-1] ** 0.5)
    return predictor


def sample(comfy, tiny, model, family, batch, *, sampler="euler", cfg=5.0, steps=STEPS, seed=0, prompt_seed=1):
    """comfy.sample.sample on an empty latent with `batch` different prompts; returns the latent."""
    latent = tiny.empty_latent(family, batch)["samples"]
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = tiny.conditioning(family, batch, prompt_seed)
    negative = tiny.conditioning(family, 1, NEGATIVE_SEED)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, SCHEDULER[family], positive, negative, latent, seed=seed, disable_pbar=True
    )


def apply(node, model, predictor_name, mode="S", strength=1.0, start=0.0, end=1.0, keysteps=""):
    """HyperAlignLoader + HyperAlignApply, as a graph would run them; returns the patched MODEL."""
    loaded = node("HyperAlignLoader", predictor_name=predictor_name).args[0]
    return node(
        "HyperAlignApply",
        model=model,
        predictor=loaded,
        mode=mode,
        strength=strength,
        start_percent=start,
        end_percent=end,
        keysteps=keysteps,
    ).args[0]


def runs(events) -> list[dict]:
    """The "hyperalign.run" payloads among recorded UI events."""
    return [data for event, data in events if event == "hyperalign.run"]
