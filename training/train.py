"""Train a HyperAlign predictor: ``python -m training.train --config <preset.yaml> [key.sub=value ...]``.

One GPU:
    python -m training.train --config training/configs/sd15.yaml
8 GPUs, one node (DDP; either launcher):
    accelerate launch --config_file training/configs/accelerate/ddp.yaml --num_processes 8 \\
        -m training.train --config training/configs/sd15.yaml
    torchrun --nproc_per_node 8 -m training.train --config training/configs/sd15.yaml
2 nodes x 8 GPUs (run on each node; NODE_RANK 0 and 1, MASTER_ADDR = node 0's address):
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --rdzv_backend c10d \\
        --rdzv_endpoint $MASTER_ADDR:29500 -m training.train --config training/configs/flux.yaml
FLUX with the frozen base sharded across GPUs (FSDP2):
    accelerate launch --config_file training/configs/accelerate/fsdp_flux.yaml -m training.train \\
        --config training/configs/flux.yaml model.shard_base=true

Overrides are dotted keys with Python-literal values: ``optim.lr=3e-5 objective.mode='P'
rewards.0.weight=2.0``; unknown keys and missing files are refused before any model loads.
``--resume latest`` continues the newest checkpoint of the run directory.
"""

from __future__ import annotations

import os
import sys

from hyperalign.atomic import write_json

from .cli import cli, print_check
from .cli import parse as parse_command_line
from .config import check_files

PROG = "python -m training.train"


def parse(argv: list[str] | None):
    """The trainer's config and arguments from its command line (also used by tools that run the trainer)."""
    return parse_command_line(argv, __doc__, PROG, resume=True)


@cli
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    check_files(cfg)
    if args.check:
        return print_check(cfg, args)
    from .engine import build, close_logging, flat_config, make_accelerator, setup_logging
    from .loop import train

    accelerator = make_accelerator(cfg)
    setup_logging(accelerator, cfg.run_dir)
    if accelerator.is_main_process:
        write_json(os.path.join(cfg.run_dir, "config.json"), cfg.to_dict())
    trainer = build(cfg, accelerator)
    if cfg.run.report_to != "none":
        accelerator.init_trackers(cfg.run.name, config=flat_config(cfg))
    try:
        path = train(trainer)
    finally:
        accelerator.end_training()
        trainer.adapter.detach()
        close_logging()
    if accelerator.is_main_process:
        print(f"predictor: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
