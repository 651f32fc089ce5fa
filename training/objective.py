"""The HyperAlign objective (paper §4.3), and its options (training/config.py ``objective``).

Reward term L_R (``reward_on: x0``, the paper): draw a step k, roll the trajectory from x_T to x_k without
gradients (the hypernet predicting LoRAs as the mode does at inference), re-run the prediction in force at k with
gradients, take one model step under that LoRA, form the one-step x0 prediction (SD1.5: the eps formula; FLUX:
x - sigma v), decode it with the VAE (checkpointed) and score it: L_R = -sum_i w_i r_i(x0_hat, prompt).
``reward_on: final`` (a variant beyond the paper) scores the final decoded image instead, with gradient through
the last ``grad_steps`` sampling steps (training/sampling.py ``Trajectory.final_with_grad``).

Preference term L_G: noise a preferred image's latent at a random time, let the hypernet predict the LoRA from
that x_t (``pref_where: mode``: from where the mode predicts at that noise level), and take the LoRA-modulated
model's denoising loss (eps target for SD1.5, velocity eps - x0 for FLUX), the prompt dropped on a seeded share
of rows (``pref_drop_prompt``). training/loop.py back-propagates L_R + lambda * L_G one term after the other, so
that each model call's LoRA stays bound while its checkpointed blocks are recomputed.

Every random draw is seeded from (run seed, stream, sample number or step), so a run on any number of processes
with the same global batch, and a resumed run, see the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from hyperalign.runtime import AlignRun

from .engine import Trainer
from .sampling import Trajectory, checkpointed_predict, per_sample_noise, per_sample_uniform, sample_seed

NOISE, STEP, PREF_NOISE, PREF_TIME, PREF_DROP, SAMPLE_STEP = 1, 2, 3, 4, 5, 6  # random streams


def _step_bounds(cfg) -> tuple[int, int]:
    n = cfg.sampling.num_steps
    lo, hi = cfg.objective.step_range
    first = min(n - 1, math.floor(lo * n))
    return first, max(first + 1, math.ceil(hi * n))


def sampled_step(cfg, step: int) -> int:
    """The step k whose LoRA gets the reward gradient, uniform over objective.step_range; one k per optimizer
    step, shared by the whole global batch, so gradient accumulation and more processes change nothing."""
    first, last = _step_bounds(cfg)
    return int(np.random.default_rng(sample_seed(cfg.run.seed, STEP, step)).integers(first, last))


def sampled_steps_per_sample(cfg, indices: list[int]) -> list[int]:
    """objective.step_per_sample: each sample's own k, seeded by its sample number (any batching agrees)."""
    first, last = _step_bounds(cfg)
    return [
        int(np.random.default_rng(sample_seed(cfg.run.seed, SAMPLE_STEP, g)).integers(first, last)) for g in indices
    ]


def _seeds(tr: Trainer, stream: int, batch) -> list[int]:
    return [sample_seed(tr.cfg.run.seed, stream, g) for g in batch["index"].tolist()]


def reward_loss(tr: Trainer, batch, step: int) -> tuple[torch.Tensor, dict]:
    """L_R of one micro-batch: on the one-step x0 at step k (the paper), or on the final image (reward_on final)."""
    o = tr.cfg.objective
    if o.reward_on == "final":
        return _final_reward_loss(tr, batch)
    if o.step_per_sample:
        return _per_sample_reward_loss(tr, batch)
    return _x0_reward_loss(tr, batch, sampled_step(tr.cfg, step))


def _x0_reward_loss(tr: Trainer, batch, k: int, checkpointed: bool = False) -> tuple[torch.Tensor, dict]:
    """`checkpointed`: the model call binds its LoRA itself (checkpointed_predict), so several calls can be
    back-propagated together; otherwise the factors stay bound until train_step clears them after backward."""
    cfg, family = tr.cfg, tr.adapter
    prompts, guidance = list(batch["prompt"]), cfg.sampling.guidance
    cond = family.encode_prompts(prompts, uncond=guidance != 1.0)
    x = per_sample_noise(family.latent_shape(1)[1:], _seeds(tr, NOISE, batch), family.device)
    trajectory = Trajectory(family, tr.hypernet, tr.hcfg, cond, tr.steps, guidance, cfg.objective.mode, tr.keysteps)
    x_k, inputs = trajectory.rollout(x, k)
    factors = inputs.run(tr.hypernet)  # with gradients: the prediction the mode uses at step k
    t = family.timesteps(tr.steps.t[k], len(prompts))
    if checkpointed:
        pred = checkpointed_predict(family, x_k, t, cond, factors, guidance)
    else:
        pred = family.predict(x_k, t, cond, factors, guidance)
    images = family.decode(family.x0(x_k, pred, t))
    total, terms = tr.rewards(images, prompts)
    metrics = {"reward": total.mean().detach(), "k": float(k), "lora_step": float(inputs.step)}
    metrics.update({f"reward/{name}": score.mean().detach() for name, score in terms.items()})
    return -total.mean(), metrics


def _per_sample_reward_loss(tr: Trainer, batch) -> tuple[torch.Tensor, dict]:
    """Step k per sample: rows are grouped by k (each group rolls its own trajectory); the loss and metrics are
    row means over the whole micro-batch."""
    ks = sampled_steps_per_sample(tr.cfg, batch["index"].tolist())
    b, loss, metrics = len(ks), 0.0, {}
    for k in sorted(set(ks)):
        rows = [i for i, v in enumerate(ks) if v == k]
        part = {
            key: (value[rows] if torch.is_tensor(value) else [value[i] for i in rows]) for key, value in batch.items()
        }
        group_loss, group_metrics = _x0_reward_loss(tr, part, k, checkpointed=True)
        loss = loss + group_loss * (len(rows) / b)
        for key, value in group_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float32) * (len(rows) / b)
    return loss, metrics


def _final_reward_loss(tr: Trainer, batch) -> tuple[torch.Tensor, dict]:
    """Variant beyond the paper: the reward on the final decoded image, gradient through the last K steps."""
    cfg, family = tr.cfg, tr.adapter
    n = len(tr.steps)
    k_grad = n if cfg.objective.grad_steps is None else cfg.objective.grad_steps
    if k_grad > n:
        raise ValueError(
            f"HyperAlign: objective.grad_steps={k_grad} is more than sampling.num_steps={n}. "
            "HINT: set grad_steps <= num_steps, or null for all steps."
        )
    prompts, guidance = list(batch["prompt"]), cfg.sampling.guidance
    cond = family.encode_prompts(prompts, uncond=guidance != 1.0)
    x = per_sample_noise(family.latent_shape(1)[1:], _seeds(tr, NOISE, batch), family.device)
    trajectory = Trajectory(family, tr.hypernet, tr.hcfg, cond, tr.steps, guidance, cfg.objective.mode, tr.keysteps)
    images = family.decode(trajectory.final_with_grad(x, k_grad, cfg.model.gradient_checkpointing))
    total, terms = tr.rewards(images, prompts)
    metrics = {"reward": total.mean().detach(), "grad_steps": float(k_grad)}
    metrics.update({f"reward/{name}": score.mean().detach() for name, score in terms.items()})
    return -total.mean(), metrics


def prediction_steps(steps, mode: str, keysteps) -> list[int]:
    """The sampling steps at which the mode runs the hypernet (S every step, I step 0, P each keystep's first)."""
    run = AlignRun(mode, tuple(keysteps))
    for i, progress in enumerate(steps.progress):
        run.factors_at(i, progress, dict)
    return [call.step for call in run.calls]


def _noised_at_step(family, steps, latents: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
    """The latent a sampler would hold at sampling step i, on the forward process: step 0 is pure noise (x_T, where
    sampling starts); later steps noise the clean latent to that step's sigma (FLUX) or alpha (SD)."""
    if i == 0:
        return noise
    if steps.sigmas is not None:
        s = steps.sigmas[i]
        return (1 - s) * latents + s * noise
    alpha = family.alphas[round(steps.t[i])]
    return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def where_mode_predicts(tr: Trainer, latents, noise, progress) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pref_where mode: per row, the hypernet input of the prediction in force at that row's noise level (the last
    prediction step at or before its progress): x, model time and progress there."""
    steps = tr.steps
    opens = prediction_steps(steps, tr.cfg.objective.mode, tr.keysteps)
    chosen = []
    for p in progress.tolist():
        before = [i for i in opens if steps.progress[i] <= p + 1e-6]
        chosen.append(before[-1] if before else opens[0])
    x = torch.stack(
        [_noised_at_step(tr.adapter, steps, latents[r : r + 1], noise[r : r + 1], i)[0] for r, i in enumerate(chosen)]
    )
    t = torch.tensor([float(steps.t[i]) for i in chosen], device=latents.device)
    p_in = torch.tensor([float(steps.progress[i]) for i in chosen], device=latents.device)
    return x, t, p_in


def dropped_prompts(cfg, indices: list[int]) -> list[bool]:
    """Which L_G rows get the empty prompt (pref_drop_prompt): a seeded draw per sample number, so any batching and
    a resumed run agree; the share is pref_drop_prompt in expectation."""
    share = cfg.objective.pref_drop_prompt
    return [bool(np.random.default_rng(sample_seed(cfg.run.seed, PREF_DROP, g)).random() < share) for g in indices]


def preference_loss(tr: Trainer, batch) -> torch.Tensor:
    family, prompts, o = tr.adapter, list(batch["prompt"]), tr.cfg.objective
    if "latents" in batch:
        latents = batch["latents"].to(family.device, torch.float32)
    else:
        latents = family.encode(batch["image"])
    noise = per_sample_noise(tuple(latents.shape[1:]), _seeds(tr, PREF_NOISE, batch), family.device)
    u = per_sample_uniform(_seeds(tr, PREF_TIME, batch), family.device)
    x_t, t, progress, target = family.noise_for_preference(latents, noise, u)
    cond = family.encode_prompts(prompts, uncond=False)
    x_in, t_in, p_in = x_t, t, progress
    if o.pref_where == "mode" and o.mode != "S":
        x_in, t_in, p_in = where_mode_predicts(tr, latents, noise, progress)
    features = family.features(x_in, t_in, cond, tr.hcfg, tr.cfg.sampling.guidance)
    factors = tr.hypernet(features, p_in.float(), cond.context.float())
    model_cond = cond
    if o.pref_drop_prompt > 0:
        # the LoRA is still predicted from the real prompt, as at sampling, where the CFG uncond rows share it
        drop = dropped_prompts(tr.cfg, batch["index"].tolist())
        model_cond = family.encode_prompts(["" if d else p for d, p in zip(drop, prompts)], uncond=False)
    pred = family.predict(x_t, t, model_cond, factors, tr.cfg.sampling.guidance)
    return F.mse_loss(pred.float(), target.float())


def pref_lambda(cfg, reward_norm: float, pref_norm: float) -> float:
    """lambda of L_G. objective.pref_share set: the rule lambda * |grad L_G| = pref_share * |grad L_R| (norms of
    this optimizer step's hypernet gradients before clipping), so L_G's pull is a fixed share of the reward's
    however their scales differ; else objective.pref_weight."""
    o = cfg.objective
    if o.pref_share is None:
        return o.pref_weight
    return o.pref_share * reward_norm / max(pref_norm, 1e-12)
