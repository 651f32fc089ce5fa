"""The training loop: one optimizer step of L_R + lambda * L_G (training/objective.py), each term's gradient norm
logged before clipping, lambda from objective.pref_share when set; checkpoints, exports and logging.

The two terms are back-propagated one after the other, so that each model call's LoRA stays bound while its
checkpointed blocks are recomputed; the gradient each one adds is read off between them (TermGrads).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import torch

from .checkpoint import export_predictor, save_checkpoint
from .engine import Trainer, data_position, provenance
from .objective import STEP, pref_lambda, preference_loss, reward_loss, sampled_step

__all__ = ["STEP", "sampled_step", "reward_loss", "preference_loss", "train_step", "train"]  # benchmarks read these

logger = logging.getLogger("training")


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
                tr.adapter.state.clear()
                grads.mark("reward")
                metrics["loss_reward"] = loss_r.detach()
            if preferences is not None:
                loss_g = preference_loss(tr, preferences)
                weight = cfg.objective.pref_weight if share is None else 1.0  # pref_share: lambda set at the end
                acc.backward(weight * loss_g)
                tr.adapter.state.clear()
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
    tr.lr_schedule.step()
    tr.step += 1
    means = {k: v / cfg.optim.grad_accum_steps for k, v in sums.items()}
    means.update({k: torch.as_tensor(v, dtype=torch.float32, device=acc.device) for k, v in once.items()})
    lam = means.get("pref_lambda", cfg.objective.pref_weight)
    means["loss"] = means.get("loss_reward", 0.0) + lam * means.get("loss_pref", 0.0)
    keys = sorted(means)
    reduced = acc.reduce(torch.stack([torch.as_tensor(means[k], device=acc.device).float() for k in keys]), "mean")
    out = {k: float(v) for k, v in zip(keys, reduced.tolist())}
    out["lr"] = tr.lr_schedule.get_last_lr()[0]
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
        tr.lr_schedule,
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
