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

from hyperalign.runtime import AlignRun

from .checkpoint import export_predictor, save_checkpoint
from .engine import Trainer, data_position, provenance
from .sampling import Trajectory, checkpointed_predict, per_sample_noise, per_sample_uniform, sample_seed

logger = logging.getLogger("training")

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
    cfg, family = tr.cfg, tr.family
    prompts, guidance = list(batch["prompt"]), cfg.sampling.guidance
    cond = family.encode_prompts(prompts, uncond=guidance != 1.0)
    x = per_sample_noise(family.latent_shape(1)[1:], _seeds(tr, NOISE, batch), family.device)
    trajectory = Trajectory(family, tr.hypernet, tr.hcfg, cond, tr.schedule, guidance, cfg.objective.mode, tr.keysteps)
    x_k, inputs = trajectory.rollout(x, k)
    factors = inputs.run(tr.hypernet)  # with gradients: the prediction the mode uses at step k
    t = family.timesteps(tr.schedule.t[k], len(prompts))
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
    cfg, family = tr.cfg, tr.family
    n = len(tr.schedule)
    k_grad = n if cfg.objective.grad_steps is None else cfg.objective.grad_steps
    if k_grad > n:
        raise ValueError(
            f"HyperAlign: objective.grad_steps={k_grad} is more than sampling.num_steps={n}. "
            "HINT: set grad_steps <= num_steps, or null for all steps."
        )
    prompts, guidance = list(batch["prompt"]), cfg.sampling.guidance
    cond = family.encode_prompts(prompts, uncond=guidance != 1.0)
    x = per_sample_noise(family.latent_shape(1)[1:], _seeds(tr, NOISE, batch), family.device)
    trajectory = Trajectory(family, tr.hypernet, tr.hcfg, cond, tr.schedule, guidance, cfg.objective.mode, tr.keysteps)
    images = family.decode(trajectory.final_with_grad(x, k_grad))
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
    steps = tr.schedule
    opens = prediction_steps(steps, tr.cfg.objective.mode, tr.keysteps)
    chosen = []
    for p in progress.tolist():
        before = [i for i in opens if steps.progress[i] <= p + 1e-6]
        chosen.append(before[-1] if before else opens[0])
    x = torch.stack(
        [_noised_at_step(tr.family, steps, latents[r : r + 1], noise[r : r + 1], i)[0] for r, i in enumerate(chosen)]
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
    family, prompts, o = tr.family, list(batch["prompt"]), tr.cfg.objective
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


def local_tensor(value):
    """FSDP2 returns the gradient norm as a replicated DTensor; collectives and logging want a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class TermGrads:
    """Each term's share of the accumulated hypernet gradient, read off .grad after each term's backward (one
    clone per term per micro-batch: cheap next to the model calls). Exact on one process, and on several without
    gradient accumulation (DDP averages each backward's gradient); with both, DDP averages the local sums of the
    earlier micro-batches into the last one's reward term, so there the per-term norms are approximate."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.last = [torch.zeros_like(p) for p in self.params]
        self.sums: dict[str, list[torch.Tensor]] = {}

    def mark(self, term: str, scale: float = 1.0) -> None:
        """Attribute what .grad gained since the last mark to `term` (divided by `scale`, the weight it had)."""
        now = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]
        gained = [(n - last) / scale for n, last in zip(now, self.last)]
        self.sums[term] = [s + g for s, g in zip(self.sums[term], gained)] if term in self.sums else gained
        self.last = now

    def norm(self, term: str) -> torch.Tensor:
        if term not in self.sums:
            return torch.zeros(())
        return local_tensor(torch.linalg.vector_norm(torch.stack([local_tensor(g.norm()) for g in self.sums[term]])))

    def combine(self, weights: dict[str, float]) -> None:
        """Replace .grad by the weighted sum of the terms."""
        for j, p in enumerate(self.params):
            p.grad = sum(w * self.sums[term][j] for term, w in weights.items() if term in self.sums)


def pref_lambda(cfg, reward_norm: float, pref_norm: float) -> float:
    """lambda of L_G. objective.pref_share set: the rule lambda * |grad L_G| = pref_share * |grad L_R| (norms of
    this optimizer step's hypernet gradients before clipping), so L_G's pull is a fixed share of the reward's
    however their scales differ; else objective.pref_weight."""
    o = cfg.objective
    if o.pref_share is None:
        return o.pref_weight
    return o.pref_share * reward_norm / max(pref_norm, 1e-12)


def train_step(tr: Trainer) -> dict[str, float]:
    """One optimizer step (grad_accum_steps micro-batches); returns metrics averaged over ranks."""
    acc, cfg = tr.accelerator, tr.cfg
    share = cfg.objective.pref_share
    if share is not None and acc.num_processes > 1 and cfg.optim.grad_accum_steps > 1:
        raise ValueError(
            "HyperAlign: objective.pref_share splits the gradient by term, which with several processes is exact "
            "only without gradient accumulation (TermGrads). HINT: set optim.grad_accum_steps=1 (raise "
            "optim.batch_size), or objective.pref_share=null and choose pref_weight."
        )
    sums: dict[str, torch.Tensor] = {}
    once: dict[str, torch.Tensor] = {}  # per optimizer step, not averaged over micro-batches
    grads = TermGrads(tr.hypernet.parameters())
    for _ in range(cfg.optim.grad_accum_steps):
        prompts = next(tr.prompts)
        preferences = next(tr.preferences) if tr.preferences is not None else None
        with acc.accumulate(tr.hypernet), acc.autocast():
            metrics = {}
            if tr.rewards is not None:
                loss_r, metrics = reward_loss(tr, prompts, tr.step)
                acc.backward(loss_r)
                tr.family.state.clear()
                grads.mark("reward")
                metrics["loss_reward"] = loss_r.detach()
            if preferences is not None:
                loss_g = preference_loss(tr, preferences)
                weight = cfg.objective.pref_weight if share is None else 1.0  # pref_share: lambda set at the end
                acc.backward(weight * loss_g)
                tr.family.state.clear()
                grads.mark("pref", weight or 1.0)
                metrics["loss_pref"] = loss_g.detach()
            if acc.sync_gradients:
                reward_norm, pref_norm = grads.norm("reward"), grads.norm("pref")
                lam = pref_lambda(cfg, float(reward_norm), float(pref_norm))
                if share is not None:
                    grads.combine({"reward": 1.0, "pref": lam})
                once.update({"grad_norm/reward": reward_norm, "grad_norm/pref": pref_norm, "pref_lambda": lam})
                limit = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                once["grad_norm"] = local_tensor(acc.clip_grad_norm_(tr.hypernet.parameters(), limit))
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float32, device=acc.device)
    tr.scheduler.step()
    tr.step += 1
    means = {k: v / cfg.optim.grad_accum_steps for k, v in sums.items()}
    means.update({k: torch.as_tensor(v, dtype=torch.float32, device=acc.device) for k, v in once.items()})
    lam = means.get("pref_lambda", cfg.objective.pref_weight)
    means["loss"] = means.get("loss_reward", 0.0) + lam * means.get("loss_pref", 0.0)
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
    if "grad_norm/reward" in metrics:  # before clipping; lambda * |grad L_G| is L_G's pull
        line += f" | |g_R| {metrics['grad_norm/reward']:.3g} |g_G| {metrics['grad_norm/pref']:.3g}"
        line += f" lambda {metrics['pref_lambda']:.3g}"
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
