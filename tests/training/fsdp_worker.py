"""A tiny hypernet trained with FSDP2 (``fully_shard``) through the trainer's checkpoint and export code.

Run by ``test_fsdp.py`` under ``torchrun --nproc_per_node 2`` (gloo, CPU) and as one plain process. accelerate
turns FSDP on only on accelerators, so on CPU the hypernet is sharded here by hand, as accelerate's FSDP2
plugin does it on GPUs (decoder layers, LoRA heads, then the root). Writes ``result.json`` in the output folder:
the loss and gradient norm of every step, and the same for step 3 replayed after resuming from step 2;
and ``predictor.safetensors``, exported from the step-2 checkpoint.
"""

import json
import os
import sys

import torch

from hyperalign.config import HypernetConfig
from hyperalign.io import new_predictor
from hyperalign.targets import UNetArch
from training.checkpoint import export_checkpoint, load_checkpoint, save_checkpoint
from training.loop import local_tensor

GLOBAL_BATCH = 4


def build(accelerator):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    arch = UNetArch(block_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, context_dim=32)
    cfg = HypernetConfig(feature_dim=8, context_dim=8, dim=16, depth=2, heads=2, rank=2, basis=4)
    predictor = new_predictor("sd15", cfg, arch)
    model = predictor.hypernet
    if accelerator.num_processes > 1:
        for module in [*model.decoder.layers, *model.heads.values(), model]:
            fully_shard(module)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return predictor, model, optimizer, scheduler


def rows(step: int, accelerator):
    """This rank's share of the step's global batch (the same global batch on any world size)."""
    generator = torch.Generator().manual_seed(step)
    features = torch.randn(GLOBAL_BATCH, 6, 8, generator=generator)
    progress = torch.rand(GLOBAL_BATCH, generator=generator)
    context = torch.randn(GLOBAL_BATCH, 5, 8, generator=generator)
    share = GLOBAL_BATCH // accelerator.num_processes
    first = accelerator.process_index * share
    return features[first : first + share], progress[first : first + share], context[first : first + share]


def train_step(step: int, accelerator, model, optimizer, scheduler) -> dict:
    factors = model(*rows(step, accelerator))
    loss = sum(down.pow(2).mean() + (up - 0.1).pow(2).mean() for down, up in factors.values())
    loss.backward()
    grad_norm = local_tensor(accelerator.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    mean_loss = accelerator.reduce(loss.detach(), "mean")
    return {"loss": mean_loss.item(), "grad_norm": float(grad_norm)}


def main(out: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    predictor, model, optimizer, scheduler = build(accelerator)
    curve = [train_step(step, accelerator, model, optimizer, scheduler) for step in (1, 2)]
    checkpoint = save_checkpoint(
        accelerator, out, 2, model, optimizer, scheduler, {"data": 2}, predictor.meta, keep_last=1
    )
    curve.append(train_step(3, accelerator, model, optimizer, scheduler))

    _, resumed, resumed_optimizer, resumed_scheduler = build(accelerator)
    state = load_checkpoint(accelerator, checkpoint, resumed, resumed_optimizer, resumed_scheduler)
    replay = train_step(3, accelerator, resumed, resumed_optimizer, resumed_scheduler)
    if accelerator.is_main_process:
        result = {"world": accelerator.num_processes, "curve": curve, "replay": replay, "state": state}
        with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle)
        export_checkpoint(checkpoint, os.path.join(out, "predictor.safetensors"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
