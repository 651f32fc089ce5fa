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

import argparse
import json
import os
import sys

from hyperalign.atomic import write_json

from .config import check_files, load_config


def parser(description: str = __doc__, prog: str = "python -m training.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML preset, e.g. training/configs/sd15.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value (Python literals)")
    p.add_argument("--resume", help="'latest' or a checkpoint folder (same as run.resume=...)")
    p.add_argument("--check", action="store_true", help="validate the config and files, print it, and exit")
    return p


def parse(argv: list[str] | None, description: str = __doc__, extra=None, prog: str = "python -m training.train"):
    """Config + the parsed arguments. `--key.sub=value` is accepted as an override too.

    Options and overrides may come in any order (`--config a.yaml x=1 --predictor p.safetensors y=2`).
    """
    p = parser(description, prog)
    if extra:
        extra(p)
    args, unknown = p.parse_known_intermixed_args(argv)
    stray = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if stray:
        p.error(f"unrecognised arguments: {' '.join(stray)}")
    overrides = list(args.overrides) + [u[2:] for u in unknown]
    if args.resume:
        overrides.append(f"run.resume={args.resume!r}")
    return load_config(args.config, overrides), args


def cli(entry):
    """Run `entry(argv)`; a HyperAlign error (bad config, missing file) prints as one message, exit status 2."""

    def run(argv: list[str] | None = None) -> int:
        try:
            return entry(argv)
        except (ValueError, FileNotFoundError, ImportError) as err:
            if not str(err).startswith("HyperAlign:"):
                raise
            print(err, file=sys.stderr)
            return 2

    run.__doc__ = entry.__doc__
    return run


@cli
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    check_files(cfg)
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
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
        trainer.family.detach()
        close_logging()
    if accelerator.is_main_process:
        print(f"predictor: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
