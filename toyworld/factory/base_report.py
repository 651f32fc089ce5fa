"""The build's report on the base model: what its samples show, judged by ground truth and by the rewards.

Per prompt set (training and held-out scenes), samples (DDIM, `steps` steps, CFG `guidance`) are read
by the ground-truth checker (:mod:`.truth`): per attribute, the share of images that show what the
prompt says, their mean (``truth_accuracy``, with its standard error over images) and the measured
taste; beside them the two learned rewards. The same numbers for renders in random styles (the
training distribution) and ideal renders (the ceiling) put them in scale.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import truth, world


@torch.no_grad()
def score_images(images: torch.Tensor, prompts: list[str], clip, aesthetic, workers: int = 1) -> dict:
    specs = [world.parse_prompt(p) for p in prompts]
    reading = truth.check(images, workers)
    accuracy = reading.accuracy(specs)
    result = {
        "truth_accuracy": round(float(accuracy.mean()), 4),
        "truth_accuracy_se": round(float(accuracy.std(ddof=1) / np.sqrt(len(accuracy))), 4),
        "truth_taste": round(float(reading.taste().mean()), 4),
        **{f"truth_{k}": round(float(v.mean()), 4) for k, v in reading.correct(specs).items()},
        **{f"style_{k}": round(float(v.mean()), 4) for k, v in reading.style.items()},
    }
    scores = {"toy_clip": [], "toy_aesthetic": []}
    for start in range(0, len(images), 512):
        batch, batch_prompts = images[start : start + 512], prompts[start : start + 512]
        scores["toy_clip"].append(clip(batch, batch_prompts))
        scores["toy_aesthetic"].append(aesthetic(batch, batch_prompts))
    result.update({k: round(torch.cat(v).mean().item(), 4) for k, v in scores.items()})
    return result


def references(prompts: list[str], seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    specs = [world.parse_prompt(p) for p in prompts]
    styled = world.render_batch(specs, [world.random_style(rng) for _ in specs], list(range(len(specs))))
    ideal = world.render_batch(specs, [world.Style()] * len(specs), list(range(len(specs))))
    return {"renders_random_style": world.to_tensor_images(styled), "renders_ideal": world.to_tensor_images(ideal)}


def evaluate_base(pipe, clip, aesthetic, prompt_sets: dict[str, list[str]], seed: int, steps: int, guidance: float,
                  workers: int = 1) -> dict:  # fmt: skip
    from .diffusion import sample

    report = {"sampler": {"scheduler": "DDIM", "eta": 0.0, "steps": steps, "guidance": guidance, "seed": seed}}
    for name, prompts in prompt_sets.items():
        section = {"prompts": len(prompts)}
        images = sample(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
        section["base_samples"] = score_images(images, prompts, clip, aesthetic, workers)
        for ref_name, ref_images in references(prompts, seed).items():
            section[ref_name] = score_images(ref_images, prompts, clip, aesthetic, workers)
        report[name] = section
    return report
