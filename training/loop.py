"""The HyperAlign objective (paper §4.3) and the training loop.

Reward term L_R: draw a step k, roll the trajectory from x_T to x_k without gradients (the
hypernet predicting LoRAs as the mode does at inference), re-run the prediction in force at k with
gradients, take one model step under that LoRA, form the one-step x0 prediction (SD1.5: the eps
formula; FLUX: x - sigma v), decode it with the VAE (checkpointed) and score it:
L_R = -sum_i w_i r_i(x0_hat, prompt).

Preference term L_G: noise a preferred image's latent at a random time, let the hypernet predict
the LoRA from that x_t, and take the LoRA-modulated model's denoising loss (eps target for SD1.5,
velocity eps - x0 for FLUX). The total is L_R + lambda * L_G; the two are back-propagated one after
the other so that each model call's LoRA stays bound while its checkpointed blocks are recomputed.

Every random draw is seeded from (run seed, stream, sample number or step), so a run on any
number of processes with the same global batch, and a resumed run, see the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import export_predictor, save_checkpoint
from .engine import Trainer, data_position, provenance
from .sampling import Trajectory, per_sample_noise, per_sample_uniform, sample_seed

logger = logging.getLogger("training")

NOISE, STEP, PREF_NOISE, PREF_TIME = 1, 2, 3, 4  # random streams


def sampled_step(cfg, step: int) -> int:
    """The step k whose LoRA gets the reward gradient, uniform over objective.step_range; one k per optimizer
    step, shared by the whole global batch, so gradient accumulation and more processes change nothing."""
    n = cfg.sampling.num_steps
    lo, hi = cfg.objective.step_range
    first = min(n - 1, math.floor(lo * n))
    last = max(first + 1, math.ceil(hi * n))
    return int(np.random.default_rng(sample_seed(cfg.run.seed, STEP, step)).integers(first, last))


def _seeds(tr: Trainer, stream: int, batch) -> list[int]:
    return [sample_seed(tr.cfg.run.seed, stream, g) for g in batch["index"].tolist()]


def reward_loss(tr: Trainer, batch, step: int) -> tuple[torch.Tensor, dict]:
    cfg, family = tr.cfg, tr.family
    prompts, guidance = list(batch["prompt"]), cfg.sampling.guidance
    cond = family.encode_prompts(prompts, uncond=guidance != 1.0)
    x = per_sample_noise(family.latent_shape(1)[1:], _seeds(tr, NOISE, batch), family.device)
    k = sampled_step(cfg, step)
    trajectory = Trajectory(family, tr.hypernet, tr.hcfg, cond, tr.schedule, guidance, cfg.objective.mode, tr.keysteps)
    x_k, inputs = trajectory.rollout(x, k)
    factors = inputs.run(tr.hypernet)  # with gradients: the prediction the mode uses at step k
    t = family.timesteps(tr.schedule.t[k], len(prompts))
    pred = family.predict(x_k, t, cond, factors, guidance)
    images = family.decode(family.x0(x_k, pred, t))
    total, terms = tr.rewards(images, prompts)
    metrics = {"reward": total.mean().detach(), "k": float(k), "lora_step": float(inputs.step)}
    metrics.update({f"reward/{name}": score.mean().detach() for name, score in terms.items()})
    return -total.mean(), metrics


def preference_loss(tr: Trainer, batch) -> torch.Tensor:
    family, prompts = tr.family, list(batch["prompt"])
    if "latents" in batch:
        latents = batch["latents"].to(family.device, torch.float32)
    else:
        latents = family.encode(batch["image"])
    noise = per_sample_noise(tuple(latents.shape[1:]), _seeds(tr, PREF_NOISE, batch), family.device)
    u = per_sample_uniform(_seeds(tr, PREF_TIME, batch), family.device)
    x_t, t, progress, target = family.noise_for_preference(latents, noise, u)
    cond = family.encode_prompts(prompts, uncond=False)
    features = family.features(x_t, t, cond, tr.hcfg, tr.cfg.sampling.guidance)
    factors = tr.hypernet(features, progress.float(), cond.context.float())
    pred = family.predict(x_t, t, cond, factors, tr.cfg.sampling.guidance)
    return F.mse_loss(pred.float(), target.float())


def local_tensor(value):
    """FSDP2 returns the gradient norm as a replicated DTensor; collectives and logging want a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def train_step(tr: Trainer) -> dict[str, float]:
    """One optimizer step (grad_accum_steps micro-batches); returns metrics averaged over ranks."""
    acc, cfg = tr.accelerator, tr.cfg
    sums: dict[str, torch.Tensor] = {}
    for _ in range(cfg.optim.grad_accum_steps):
        prompts = next(tr.prompts)
        preferences = next(tr.preferences) if tr.preferences is not None else None
        with acc.accumulate(tr.hypernet), acc.autocast():
            metrics = {}
            if tr.rewards is not None:
                loss_r, metrics = reward_loss(tr, prompts, tr.step)
                acc.backward(loss_r)
                tr.family.state.clear()
                metrics["loss_reward"] = loss_r.detach()
            if preferences is not None:
                loss_g = preference_loss(tr, preferences)
                acc.backward(cfg.objective.pref_weight * loss_g)
                tr.family.state.clear()
                metrics["loss_pref"] = loss_g.detach()
            if acc.sync_gradients:
                limit = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                metrics["grad_norm"] = local_tensor(acc.clip_grad_norm_(tr.hypernet.parameters(), limit))
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float32, device=acc.device)
    tr.scheduler.step()
    tr.step += 1
    means = {k: v / cfg.optim.grad_accum_steps for k, v in sums.items() if k != "grad_norm"}
    if "grad_norm" in sums:
        means["grad_norm"] = sums["grad_norm"]
    means["loss"] = means.get("loss_reward", 0.0) + cfg.objective.pref_weight * means.get("loss_pref", 0.0)
    keys = sorted(means)
    reduced = acc.reduce(torch.stack([torch.as_tensor(means[k], device=acc.device).float() for k in keys]), "mean")
    out = {k: float(v) for k, v in zip(keys, reduced.tolist())}
    out["lr"] = tr.scheduler.get_last_lr()[0]
    return out


def export(tr: Trainer, path: str) -> str:
    """Write the predictor file (rank 0 writes; every rank must call: FSDP gathers are collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(tr.hypernet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if tr.accelerator.is_main_process:
        info = dict(provenance(tr.cfg, tr.step), global_batch=tr.global_batch)
        meta = dataclasses.replace(tr.predictor.meta, provenance=info)
        from .models import DTYPES

        export_predictor(path, meta, state, DTYPES[tr.cfg.run.export_dtype])
    tr.accelerator.wait_for_everyone()
    return path


def save(tr: Trainer) -> None:
    state = {"data": data_position(tr), "config": tr.cfg.to_dict()}
    save_checkpoint(
        tr.accelerator,
        tr.cfg.run_dir,
        tr.step,
        tr.hypernet,
        tr.optimizer,
        tr.scheduler,
        state,
        tr.predictor.meta,
        tr.cfg.run.keep_last,
    )
    export(tr, os.path.join(tr.cfg.run_dir, f"predictor_step_{tr.step:08d}.safetensors"))


def log_metrics(tr: Trainer, metrics: dict, seconds: float) -> None:
    acc = tr.accelerator
    acc.log(metrics, step=tr.step)
    if not acc.is_main_process:
        return
    with open(os.path.join(tr.cfg.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": tr.step, **metrics}) + "\n")
    line = f"step {tr.step} | loss {metrics['loss']:.4f}"
    if "reward" in metrics:
        line += f" | reward {metrics['reward']:.4f}"
    if "loss_pref" in metrics:
        line += f" | pref {metrics['loss_pref']:.4f}"
    line += f" | lr {metrics['lr']:.1e} | {seconds:.2f} s/it"
    if torch.cuda.is_available():
        line += f" | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    logger.info(line)


def train(tr: Trainer) -> str:
    """Run to optim.max_steps from wherever `tr` stands; returns the final predictor's path."""
    from tqdm.auto import tqdm

    from .grids import sample_grid

    cfg, acc = tr.cfg, tr.accelerator
    bar = tqdm(
        total=cfg.optim.max_steps, initial=tr.step, disable=not (acc.is_main_process and cfg.run.progress), desc="train"
    )
    last = time.perf_counter()
    while tr.step < cfg.optim.max_steps:
        metrics = train_step(tr)
        bar.update(1)
        now = time.perf_counter()
        if tr.step % cfg.run.log_every == 0 or tr.step == cfg.optim.max_steps:
            log_metrics(tr, metrics, now - last)
        last = now
        if cfg.run.sample_every and tr.step % cfg.run.sample_every == 0:
            sample_grid(tr)
        if tr.step % cfg.run.save_every == 0 or tr.step == cfg.optim.max_steps:
            save(tr)
    bar.close()
    return export(tr, os.path.join(cfg.run_dir, "predictor.safetensors"))
