"""Stage 5: how prompt-consistent and how tasteful the base model's samples are.

Samples (DDIM, `steps` steps, CFG `guidance`) of fixed train and held-out prompts are scored with the
shipped rewards and compared with two references on the same prompts: renders in random styles
(the training distribution) and ideal renders (the ceiling). `attribute_accuracy` is, per attribute,
the share of images that toy_clip scores higher with their own prompt than with that attribute
changed; `prompt_accuracy` is its mean over the six attributes.
"""

from __future__ import annotations

import numpy as np
import torch

from . import world


@torch.no_grad()
def score_images(images: torch.Tensor, prompts: list[str], clip, aesthetic, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    specs = [world.parse_prompt(p) for p in prompts]
    own = clip(images, prompts)
    result = {
        "toy_clip": round(own.mean().item(), 4),
        "toy_aesthetic": round(aesthetic(images, prompts).mean().item(), 4),
    }
    wins = []
    for attribute in world.ATTRIBUTES:
        wrong = [world.prompt_of(world.perturb(s, attribute, rng)) for s in specs]
        win = (own > clip(images, wrong)).float().mean().item()
        result[f"beats_wrong_{attribute}"] = round(win, 4)
        wins.append(win)
    result["prompt_accuracy"] = round(float(np.mean(wins)), 4)
    return result


def references(prompts: list[str], seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    specs = [world.parse_prompt(p) for p in prompts]
    styled = world.render_batch(specs, [world.random_style(rng) for _ in specs], list(range(len(specs))))
    ideal = world.render_batch(specs, [world.Style()] * len(specs), list(range(len(specs))))
    return {"renders_random_style": world.to_tensor_images(styled), "renders_ideal": world.to_tensor_images(ideal)}


def evaluate_base(
    pipe, clip, aesthetic, prompt_sets: dict[str, list[str]], seed: int, steps: int, guidance: float
) -> dict:
    from .diffusion import sample

    report = {"sampler": {"scheduler": "DDIM", "eta": 0.0, "steps": steps, "guidance": guidance, "seed": seed}}
    for name, prompts in prompt_sets.items():
        section = {"prompts": len(prompts)}
        images = sample(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
        section["base_samples"] = score_images(images, prompts, clip, aesthetic, seed)
        for ref_name, ref_images in references(prompts, seed).items():
            section[ref_name] = score_images(ref_images, prompts, clip, aesthetic, seed)
        report[name] = section
    return report
