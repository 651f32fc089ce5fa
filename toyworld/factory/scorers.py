"""Stage 2: the toy reward models.

toy_clip is trained contrastively (CLIP's symmetric InfoNCE) on renders of *every* scene, held-out
ones included: it is the judge, and a judge must know red triangles even though the generator never
sees one. Each batch is built from groups of a scene plus one hard negative per attribute (the same
scene with only its colour, or only its count, ... changed), so fine attributes are learned early.

toy_aesthetic never sees the taste rule: it is trained with the Bradley-Terry loss on pairs of
renders of the same scene in two styles, labelled by which one the hidden taste prefers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import world
from ..nets import ToyAesthetic, ToyClip
from .fitting import Progress, deterministic, set_lr
from .renders import RenderPool


@dataclass
class Generated:
    """The generator's own samples, judged by the ground-truth checker. Real preference models are
    trained on generated images judged by people (HPSv2, PickScore; ImageReward ranks several
    generations of one prompt); here the checker plays the people, so the rewards learn to judge what
    the generator actually draws, not only clean renders.

    Every sample keeps the prompt it was drawn for and how much of it the checker finds (`accuracy`):
    toy_clip learns to rank samples by it. Samples that show a valid scene (`valid`) also pair with the
    prompt of the scene they really show, its hard negatives and its shape variants."""

    images: torch.Tensor  # (n, 3, 32, 32) in [0, 1]
    prompt_ids: torch.Tensor  # (n, 77): the prompt each image was sampled for
    accuracy: torch.Tensor  # (n,) share of that prompt's attributes the checker finds
    taste: torch.Tensor  # (n,) measured taste
    valid: torch.Tensor  # (v,) rows that show a valid scene
    token_ids: torch.Tensor  # (v, 77): the prompt of the scene each valid image shows
    negative_ids: torch.Tensor  # (v, 6, 77): that prompt with one attribute changed, per attribute
    shape_ids: torch.Tensor  # (v, 3, 77): that prompt with each shape, its own first
    shape_weight: float = 0.0
    rank_weight: float = 0.0

    def clip_loss(self, clip: ToyClip, rows: int, rng: np.random.Generator, device) -> torch.Tensor:
        loss = self._scene_loss(clip, self.negative_ids, rows, rng, device, own_in_batch=True)
        if self.shape_weight:
            loss = loss + self.shape_weight * self._scene_loss(clip, self.shape_ids[:, 1:], rows, rng, device)
        if self.rank_weight:
            loss = loss + self.rank_weight * self._rank_loss(clip, rows, rng, device)
        return loss

    def _scene_loss(self, clip, negatives, rows, rng, device, own_in_batch=False) -> torch.Tensor:
        """InfoNCE of each valid image against the prompt of the scene it shows and its `negatives`; with
        `own_in_batch`, against the batch's other prompts too. The shape variants alone are the task
        toy_clip is weakest at (a corner or two tells a triangle from a dome)."""
        local = torch.from_numpy(rng.choice(len(self.valid), size=rows, replace=False))  # rows of token_ids
        image_emb = clip.embed_images(self.images[self.valid[local]].to(device))
        texts = torch.cat([self.token_ids[local, None], negatives[local]], 1)  # (rows, k, 77)
        text_emb = clip.embed_text(texts.flatten(0, 1).to(device))
        scale = clip.logit_scale.clamp(max=4.6).exp()
        if own_in_batch:
            logits = scale * image_emb @ text_emb.T
            return F.cross_entropy(logits, torch.arange(rows, device=device) * texts.shape[1])
        logits = scale * (image_emb[:, None] * text_emb.view(rows, texts.shape[1], -1)).sum(-1)
        return F.cross_entropy(logits, torch.zeros(rows, dtype=torch.long, device=device))

    def _rank_loss(self, clip, rows, rng, device) -> torch.Tensor:
        """Bradley-Terry on random pairs of samples, each scored for the prompt it was drawn for and ordered
        by the checker's accuracy: the score must be comparable across images and prompts, as a reward is."""
        pairs = torch.from_numpy(rng.integers(len(self.images), size=2 * rows))
        order = torch.sign(self.accuracy[pairs[:rows]] - self.accuracy[pairs[rows:]]).to(device)
        image_emb = clip.embed_images(self.images[pairs].to(device))
        text_emb = clip.embed_text(self.prompt_ids[pairs].to(device))
        score = clip.logit_scale.clamp(max=4.6).exp() * (image_emb * text_emb).sum(-1)
        margin = score[:rows] - score[rows:]
        return (F.softplus(-order * margin) * order.abs()).sum() / order.abs().sum().clamp(min=1)

    def aesthetic_loss(self, model: ToyAesthetic, rows: int, rng: np.random.Generator, device) -> torch.Tensor:
        """Bradley-Terry on random pairs of samples that show a valid scene, ordered by their measured taste."""
        a, b = (self.valid[torch.from_numpy(rng.choice(len(self.valid), size=rows))] for _ in range(2))
        scores = model.raw(torch.cat([self.images[a], self.images[b]]).to(device))
        sign = torch.sign(self.taste[a] - self.taste[b]).to(device)
        return F.softplus(-sign * (scores[:rows] - scores[rows:])).mean()


def soften(images: torch.Tensor, generator: torch.Generator, max_sigma: float = 1.5, pairs: bool = False):
    """Blur a random half of a batch (gaussian, sigma up to `max_sigma` px): generated images come
    through the VAE a little soft, and the rewards must judge those too. With `pairs`, the batch is
    [firsts; seconds] and both images of a pair get the same blur, so their taste order still holds."""
    b, c, h, w = images.shape
    n = b // 2 if pairs else b
    sigma = torch.rand(n, generator=generator) * max_sigma * (torch.rand(n, generator=generator) < 0.5)
    sigma = sigma.repeat(2) if pairs else sigma
    taps = torch.arange(-3, 4, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma.clamp(min=1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, 7)
    x = F.pad(images.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="replicate")
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def _group_batch(specs: list[world.SceneSpec], index: dict, groups: int, rng: np.random.Generator) -> list[int]:
    rows = []
    for base in rng.choice(len(specs), size=groups, replace=False):
        rows.append(int(base))
        for attribute in world.ATTRIBUTES:
            rows.append(index[world.perturb(specs[base], attribute, rng)])
    return rows


def train_clip(
    pool: RenderPool,
    text_config,
    token_ids: torch.Tensor,
    steps: int,
    groups: int,
    seed: int,
    threads: int,
    log,
    device: str = "cpu",
    init: ToyClip | None = None,
    generated: Generated | None = None,
) -> ToyClip:
    """`token_ids` (len(pool.specs), 77): the prompt of each scene of the pool. With `init`, training goes on
    from that model; with `generated`, every step also sees the generator's own samples (see Generated)."""
    generator = deterministic(seed, threads, device)
    rng = np.random.default_rng(seed)
    clip = (init if init is not None else ToyClip(text_config)).train().requires_grad_(True).to(device)
    token_ids = token_ids.to(device)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.01)
    index = {s: i for i, s in enumerate(pool.specs)}
    progress = Progress("toy_clip", steps, max(1, steps // 10), log)
    for step in range(steps):
        set_lr(optimizer, step, steps, 2e-3)
        spec_rows = _group_batch(pool.specs, index, groups, rng)
        image_rows = [r * pool.per_spec + int(rng.integers(pool.per_spec)) for r in spec_rows]
        images = soften(pool.tensor(image_rows), generator).to(device)
        image_emb = clip.embed_images(images)
        text_emb = clip.embed_text(token_ids[spec_rows])
        logits = clip.logit_scale.clamp(max=4.6).exp() * image_emb @ text_emb.T
        same = torch.tensor(spec_rows, device=device)[:, None] == torch.tensor(spec_rows, device=device)[None, :]
        eye = torch.eye(len(spec_rows), dtype=torch.bool, device=device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        labels = torch.arange(len(spec_rows), device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        if generated is not None:
            loss = loss + generated.clip_loss(clip, groups, rng, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress(step, loss.item())
    return clip.cpu().eval().requires_grad_(False)


@torch.no_grad()
def clip_accuracy(
    clip: ToyClip, pool: RenderPool, token_ids: torch.Tensor, candidates: torch.Tensor, candidate_specs: list, seed: int
) -> dict:
    """On fresh renders: top-1 retrieval of the prompt among all `candidates`, and per attribute the
    share of images that score their own prompt above the prompt with that attribute changed."""
    rng = np.random.default_rng(seed)
    rows = np.arange(len(pool.images))
    image_emb = torch.cat([clip.embed_images(pool.tensor(rows[s : s + 512])) for s in range(0, len(rows), 512)])
    cand_emb = torch.cat([clip.embed_text(candidates[s : s + 512]) for s in range(0, len(candidates), 512)])
    where = {s: i for i, s in enumerate(candidate_specs)}
    truth = torch.tensor([where[pool.specs[r // pool.per_spec]] for r in rows])
    top1 = (image_emb @ cand_emb.T).argmax(1).eq(truth).float().mean().item()
    own = (image_emb * cand_emb[truth]).sum(-1)
    result = {"retrieval_top1": round(top1, 4), "candidates": len(candidate_specs)}
    for attribute in world.ATTRIBUTES:
        other = torch.tensor([where[world.perturb(pool.specs[r // pool.per_spec], attribute, rng)] for r in rows])
        result[f"beats_wrong_{attribute}"] = round(
            (own > (image_emb * cand_emb[other]).sum(-1)).float().mean().item(), 4
        )
    return result


def _pairs(pool: RenderPool, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    spec = rng.integers(len(pool.specs), size=count)
    first = rng.integers(pool.per_spec, size=count)
    second = (first + 1 + rng.integers(pool.per_spec - 1, size=count)) % pool.per_spec
    return spec * pool.per_spec + first, spec * pool.per_spec + second


def train_aesthetic(
    pool: RenderPool,
    steps: int,
    batch: int,
    seed: int,
    threads: int,
    log,
    device: str = "cpu",
    init: ToyAesthetic | None = None,
    generated: Generated | None = None,
):
    generator = deterministic(seed, threads, device)
    rng = np.random.default_rng(seed)
    model = (init if init is not None else ToyAesthetic()).train().requires_grad_(True).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    tastes = torch.from_numpy(pool.tastes()).float().to(device)
    progress = Progress("toy_aesthetic", steps, max(1, steps // 10), log)
    for step in range(steps):
        set_lr(optimizer, step, steps, 2e-3)
        a, b = _pairs(pool, batch, rng)
        images = soften(pool.tensor(np.concatenate([a, b])), generator, pairs=True).to(device)
        score_a, score_b = model.raw(images).split(batch)
        sign = torch.sign(tastes[torch.from_numpy(a).to(device)] - tastes[torch.from_numpy(b).to(device)])
        loss = F.softplus(-sign * (score_a - score_b)).mean()
        if generated is not None:
            loss = loss + generated.aesthetic_loss(model, batch, rng, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress(step, loss.item())
    model = model.cpu().eval().requires_grad_(False)
    with torch.no_grad():  # standardise over the render distribution
        raw = torch.cat(
            [
                model.raw(pool.tensor(np.arange(s, min(s + 512, len(pool.images)))))
                for s in range(0, min(len(pool.images), 4096), 512)
            ]
        )
        model.offset.fill_(raw.mean().item())
        model.scale.fill_(raw.std().item())
    return model


@torch.no_grad()
def aesthetic_accuracy(model: ToyAesthetic, pool: RenderPool, pairs: int, seed: int) -> dict:
    """Share of fresh pairs (any two renders) ordered as the hidden taste orders them; also for clear
    pairs (|Δtaste| > 0.5)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(len(pool.images), size=pairs)
    b = (a + 1 + rng.integers(len(pool.images) - 1, size=pairs)) % len(pool.images)
    tastes = pool.tastes()
    scores = torch.cat([model(pool.tensor(r)) for r in np.array_split(np.concatenate([a, b]), 8)]).numpy()
    agree = np.sign(scores[:pairs] - scores[pairs:]) == np.sign(tastes[a] - tastes[b])
    clear = np.abs(tastes[a] - tastes[b]) > 0.5
    spearman = np.corrcoef(
        np.argsort(np.argsort(scores)), np.argsort(np.argsort(np.concatenate([tastes[a], tastes[b]])))
    )
    return {
        "pairwise_accuracy": round(float(agree.mean()), 4),
        "pairwise_accuracy_clear": round(float(agree[clear].mean()), 4),
        "spearman_taste": round(float(spearman[0, 1]), 4),
        "pairs": pairs,
    }
