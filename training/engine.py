"""Setting a run up on accelerate: processes, the base model, the predictor, optimiser, data and trackers.

Only the hypernet goes through ``accelerator.prepare`` (DDP by default; FSDP when launched with an
FSDP accelerate config); the frozen base model is placed on each device in ``model.base_dtype``,
and with ``model.shard_base`` its blocks are sharded across ranks with FSDP2 (``fully_shard``), so
FLUX fits cards that cannot hold a full bf16 copy. Works unchanged under ``python -m``,
``accelerate launch`` and ``torchrun``: accelerate reads the launcher's environment.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from hyperalign.io import Predictor, new_predictor
from hyperalign.schedule import validate_keysteps

from . import data as data_mod
from .adapters import load_adapter
from .checkpoint import load_checkpoint, resolve_resume
from .config import TrainConfig
from .models import DTYPES, FamilyAdapter, SamplingSteps
from .rewards import RewardSet

logger = logging.getLogger("training")


@dataclass
class Trainer:
    cfg: TrainConfig
    accelerator: object
    adapter: FamilyAdapter
    predictor: Predictor  # header + the (unwrapped) hypernet; exported as the predictor file
    hypernet: torch.nn.Module  # the prepared (DDP/FSDP) hypernet
    hcfg: object
    optimizer: object
    lr_schedule: object  # torch LambdaLR, stepped once per optimizer step
    rewards: RewardSet | None
    steps: SamplingSteps  # the sampling steps of rollouts
    keysteps: tuple[float, ...]
    prompts: object = None  # iterator of reward-prompt micro-batches
    preferences: object = None  # iterator of preference micro-batches
    step: int = 0  # completed optimizer steps
    consumed: dict = field(default_factory=dict)  # samples consumed per stream before `start_step`
    start_step: int = 0

    @property
    def global_batch(self) -> int:
        o = self.cfg.optim
        return o.batch_size * o.grad_accum_steps * self.accelerator.num_processes


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    log_with = None if cfg.run.report_to == "none" else cfg.run.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        mixed_precision=cfg.run.mixed_precision,
        log_with=log_with,
        project_dir=cfg.run_dir,
        cpu=cfg.run.cpu,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.run.dist_timeout_minutes)),
            # the hypernet's only buffer is a constant code: broadcasting it every forward is a needless collective
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
    )
    check_world(accelerator)
    return accelerator


def check_world(accelerator) -> None:
    """Refuse a launch whose processes each think they run alone: they would all write the same run folder.

    accelerate does this silently when an FSDP (or GPU) launch config meets a machine without GPUs: it
    enables FSDP only on accelerators and otherwise leaves every process undistributed.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"HyperAlign: the launcher started {launched} processes but accelerate set up "
            f"{accelerator.num_processes} (distributed type {accelerator.distributed_type.value}, device "
            f"{accelerator.device}); every process would train alone and write the same run folder. HINT: "
            "FSDP launch configs need GPUs; on CPU launch with torchrun or accelerate's ddp.yaml and "
            "run.cpu=true (model.shard_base=true still shards the frozen base)."
        )


def setup_logging(accelerator, run_dir: str) -> None:
    """Rank 0 logs INFO to stderr and <run dir>/train.log; other ranks only warnings. Only our logger is touched."""
    root = logging.getLogger("training")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    root.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = [logging.StreamHandler(sys.stderr)]
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log")))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)


def close_logging() -> None:
    root = logging.getLogger("training")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()


def resolve_keysteps(cfg: TrainConfig) -> tuple[float, ...]:
    if cfg.objective.keysteps is not None:
        return tuple(cfg.objective.keysteps)
    if cfg.objective.mode != "P":
        return (0.0,)
    with open(cfg.keysteps_path, encoding="utf-8") as handle:
        return validate_keysteps(json.load(handle)["keysteps"])


def objective_name(o) -> str:
    """A short name of the objective, e.g. "paper x0" or "final K=all (beyond paper) + L_G at mode"."""
    reward = "paper x0" if o.reward_on == "x0" else f"final K={o.grad_steps or 'all'} (beyond paper)"
    parts = [reward + (", k per sample" if o.step_per_sample else "")]
    if o.pref_where != "noise":
        parts.append(f"L_G at {o.pref_where}")
    if o.pref_drop_prompt:
        parts.append(f"L_G prompt dropped {o.pref_drop_prompt:g}")
    if o.pref_share is not None:
        parts.append(f"lambda by share {o.pref_share:g}")
    return " + ".join(parts)


def provenance(cfg: TrainConfig, step: int = 0) -> dict:
    return {
        "base_model": cfg.model.path,
        "resolution": cfg.model.resolution,
        "rewards": [{"name": r.name, "weight": r.weight} for r in cfg.rewards],
        "data": {"preference": cfg.data.preference, "path": cfg.data.path, "prompts": cfg.data.prompts},
        "objective": {
            "mode": cfg.objective.mode,
            "pref_weight": cfg.objective.pref_weight,
            "step_range": cfg.objective.step_range,
            "reward_on": cfg.objective.reward_on,  # final: a variant beyond the paper
            "grad_steps": cfg.objective.grad_steps,
            "pref_where": cfg.objective.pref_where,
            "pref_drop_prompt": cfg.objective.pref_drop_prompt,
            "pref_share": cfg.objective.pref_share,
            "step_per_sample": cfg.objective.step_per_sample,
            "variant": objective_name(cfg.objective),
        },
        "sampling": {"num_steps": cfg.sampling.num_steps, "guidance": cfg.sampling.guidance},
        "steps": step,
    }


def lr_lambda(optim):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(1, optim.max_steps - optim.warmup_steps)
        done = min(1.0, (step - optim.warmup_steps) / span)
        if optim.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * done))
        if optim.lr_schedule == "linear":
            return 1.0 - done
        return 1.0

    return factor


def shard_base(adapter: FamilyAdapter) -> None:
    """FSDP2-shard each block of the frozen denoiser; embedders and heads stay whole (the encoder calls them)."""
    from torch.distributed.fsdp import fully_shard

    model = adapter.denoiser
    if adapter.name == "flux":
        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    else:
        blocks = list(model.down_blocks) + [model.mid_block] + list(model.up_blocks)
    for block in blocks:
        fully_shard(block, reshard_after_forward=True)
    logger.info("sharded %d frozen %s blocks across ranks (FSDP2)", len(blocks), adapter.name)


def build(cfg: TrainConfig, accelerator, with_data: bool = True) -> Trainer:
    """Everything a run needs, resumed from a checkpoint when run.resume says so."""
    device = accelerator.device
    adapter = load_adapter(cfg.model, device)
    from accelerate.utils import DistributedType

    if accelerator.num_processes > 1 and (cfg.model.shard_base or accelerator.distributed_type == DistributedType.FSDP):
        shard_base(adapter)
    hcfg = cfg.hypernet.resolve(adapter.feature_dim, adapter.context_dim)
    keysteps = resolve_keysteps(cfg)
    torch.manual_seed(cfg.run.seed)  # the same initial hypernet on every rank
    predictor = new_predictor(
        adapter.name, hcfg, adapter.arch, cfg.model.targets, cfg.objective.mode, keysteps, provenance(cfg)
    )
    adapter.attach(predictor.targets, hcfg.scale)
    model = predictor.hypernet.to(device).train()
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o))
    # the LR schedule is stepped by hand once per optimizer step: accelerate would step it once per process
    hypernet, optimizer = accelerator.prepare(model, optimizer)
    rewards = RewardSet(cfg.rewards, device, DTYPES[cfg.model.base_dtype]) if cfg.rewards else None
    trainer = Trainer(
        cfg,
        accelerator,
        adapter,
        predictor,
        hypernet,
        hcfg,
        optimizer,
        lr_schedule,
        rewards,
        adapter.sampling_steps(cfg.sampling.num_steps),
        keysteps,
    )
    checkpoint = resolve_resume(cfg.run_dir, cfg.run.resume)
    if checkpoint:
        state = load_checkpoint(accelerator, checkpoint, hypernet, optimizer, lr_schedule)
        trainer.step = trainer.start_step = int(state["step"])
        trainer.consumed = state["data"]
        logger.info("resumed from %s at step %d", checkpoint, trainer.step)
    if with_data:
        attach_data(trainer)
    return trainer


def attach_data(trainer: Trainer) -> None:
    cfg, acc = trainer.cfg, trainer.accelerator
    rows = data_mod.read_preferences(cfg.data)
    prompts = (
        data_mod.read_prompts(cfg.data.prompts) if cfg.data.prompts else [rows.prompt(i) for i in range(len(rows))]
    )

    def stream(dataset, name: str, workers: int):
        start = trainer.consumed.get(name, 0)
        sampler = data_mod.RankBatches(
            len(dataset),
            cfg.run.seed + (0 if name == "prompts" else 7919),
            start,
            cfg.optim.batch_size,
            cfg.optim.grad_accum_steps,
            acc.num_processes,
            acc.process_index,
        )
        trainer.consumed.setdefault(name, start)
        return iter(data_mod.loader(dataset, sampler, workers))

    trainer.prompts = stream(data_mod.PromptSet(prompts), "prompts", 0)
    if rows is not None and cfg.objective.pref_weight > 0:
        latents = None
        if cfg.data.latents_dir:
            latents = data_mod.LatentCache(cfg.data.latents_dir, data_mod.cache_expectation(cfg, rows))
        dataset = data_mod.PreferenceSet(rows, cfg.model.resolution, latents)
        trainer.preferences = stream(dataset, "preferences", cfg.data.num_workers)


def data_position(trainer: Trainer) -> dict:
    """Samples consumed per stream after `trainer.step` optimizer steps (what a checkpoint stores)."""
    done = (trainer.step - trainer.start_step) * trainer.global_batch
    return {name: start + done for name, start in trainer.consumed.items()}


def flat_config(cfg: TrainConfig) -> dict:
    """Scalars only, as trackers (tensorboard hparams) want them."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", cfg.to_dict())
    return flat
