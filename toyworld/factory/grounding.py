"""Stage 4: the rewards learn the generator's own samples, and the build measures how well they judge them.

Rewards trained on clean renders only are easy to fool with what a generator actually draws (soft,
grainy, half-right scenes). As HPSv2 and PickScore learned from people judging generated images, the
toy rewards go on training on the base model's samples, each labelled by the ground-truth checker
(:mod:`.truth`) with the scene it really shows, how much of its own prompt it shows (as ImageReward's
annotators ranked several generations of a prompt) and its measured taste. The checker labels data; it is
never a training reward for the hypernetwork. :func:`agreement` then measures, on fresh held-out
samples, how well each learned reward ranks images the way the truth does: the learned rewards may
stay exploitable (as HPSv2 is), and the evaluation shows it when they are.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import truth, world
from .scorers import Generated


def sample_scenes(pipe, specs: list[world.SceneSpec], seed: int, steps: int, guidances: tuple[float, ...]):
    """One sample of each scene, the guidance scale cycling over `guidances` by chunk, so the samples
    span sloppy to over-guided: (images (n, 3, 32, 32), prompts)."""
    from .diffusion import sample

    prompts = [world.prompt_of(s) for s in specs]
    chunk = -(-len(prompts) // len(guidances))
    images = [
        sample(pipe, prompts[i : i + chunk], seed=seed + k, steps=steps, guidance=g)
        for k, (i, g) in enumerate(zip(range(0, len(prompts), chunk), guidances))
    ]
    return torch.cat(images), prompts


def label(
    images: torch.Tensor,
    prompts: list[str],
    tokenizer,
    seed: int,
    workers: int,
    shape_weight: float,
    rank_weight: float,
) -> tuple[Generated, dict]:
    """The checker's reading of each sample as training data for the rewards: how much of its prompt it
    shows, its measured taste, and the scene it really shows. Images that show no valid scene (counted)
    still rank for their prompt; they pair with no scene prompt and train no toy_aesthetic pair."""
    reading = truth.check(images, workers)
    scenes = reading.scenes()
    keep = [i for i, s in enumerate(scenes) if s is not None]
    rng = np.random.default_rng(seed)
    own = [scenes[i] for i in keep]
    negatives = [world.prompt_of(world.perturb(s, a, rng)) for s in own for a in world.ATTRIBUTES]
    shapes = [world.prompt_of(v) for s in own for v in world.shape_variants(s)]
    accuracy = reading.accuracy([world.parse_prompt(p) for p in prompts])
    data = Generated(
        images=images,
        prompt_ids=tokenizer(prompts),
        accuracy=torch.from_numpy(accuracy).float(),
        taste=torch.from_numpy(reading.taste()).float(),
        valid=torch.tensor(keep, dtype=torch.long),
        token_ids=tokenizer([world.prompt_of(s) for s in own]),
        negative_ids=tokenizer(negatives).view(len(keep), len(world.ATTRIBUTES), -1),
        shape_ids=tokenizer(shapes).view(len(keep), len(world.SHAPES), -1),
        shape_weight=shape_weight,
        rank_weight=rank_weight,
    )
    summary = {"samples": len(images), "valid_scenes": len(keep), "truth_accuracy": round(float(accuracy.mean()), 4)}
    return data, summary


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def spearman_se(a: np.ndarray, b: np.ndarray, prompts: list[str], resamples: int = 200, seed: int = 0) -> float:
    """Standard error of the per-image Spearman by a bootstrap over prompts: a prompt's samples share its
    errors (the base model draws some prompts' shape wrong on every noise), so images are not independent."""
    groups = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    members = [np.asarray(rows) for rows in groups.values()]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        rows = np.concatenate([members[k] for k in rng.integers(len(members), size=len(members))])
        draws.append(_spearman(a[rows], b[rows]))
    return float(np.nanstd(draws, ddof=1))


@torch.no_grad()
def agreement(clip_reward, aesthetic_reward, images: torch.Tensor, prompts: list[str], workers: int = 1) -> dict:
    """Per image, Spearman rank correlation of toy_clip with the truth's attribute accuracy for its prompt
    and of toy_aesthetic with the truth's taste, each ± its standard error over prompts; with the truth's own
    means."""
    specs = [world.parse_prompt(p) for p in prompts]
    reading = truth.check(images, workers)
    accuracy, taste = reading.accuracy(specs), reading.taste()
    clip = torch.cat([clip_reward(images[i : i + 512], prompts[i : i + 512]) for i in range(0, len(images), 512)])
    aesthetic = torch.cat([aesthetic_reward(images[i : i + 512]) for i in range(0, len(images), 512)])
    return {
        "images": len(images),
        "prompts": len(set(prompts)),
        "toy_clip_vs_truth_accuracy": round(_spearman(clip.numpy(), accuracy), 4),
        "toy_clip_vs_truth_accuracy_se": round(spearman_se(clip.numpy(), accuracy, prompts), 4),
        "toy_aesthetic_vs_truth_taste": round(_spearman(aesthetic.numpy(), taste), 4),
        "toy_aesthetic_vs_truth_taste_se": round(spearman_se(aesthetic.numpy(), taste, prompts), 4),
        "truth_accuracy": round(float(accuracy.mean()), 4),
        "truth_taste": round(float(taste.mean()), 4),
    }
