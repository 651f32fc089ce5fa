"""Write the predictor file of a checkpoint (no base model needed).

    python -m training.export runs/sd15-hps     # the newest checkpoint -> runs/sd15-hps/predictor.safetensors
    python -m training.export runs/sd15-hps/ckpt/step_00002000 --out sd15_hps.safetensors --dtype bf16

The file goes into ComfyUI's ``models/hyperalign/`` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .checkpoint import checkpoint_meta, export_checkpoint, list_checkpoints
from .cli import cli
from .models import DTYPES


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="a run directory (its newest checkpoint) or a ckpt/step_* folder")
    p.add_argument("--out", help="predictor file (default: <run dir>/predictor.safetensors)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="tensor dtype (default: as trained)")
    p.add_argument(
        "--check", action="store_true", help="validate the checkpoint, print what would be written, and exit"
    )
    args = p.parse_args(argv)
    checkpoint, run_dir = args.source, None
    if not os.path.isfile(os.path.join(checkpoint, "state.json")):
        found = list_checkpoints(args.source)
        if not found:
            p.error(f"{args.source!r} is neither a checkpoint folder nor a run directory with checkpoints")
        checkpoint, run_dir = found[-1][1], args.source
    out = args.out or os.path.join(run_dir or os.path.dirname(os.path.dirname(checkpoint)), "predictor.safetensors")
    if args.check:
        meta = checkpoint_meta(checkpoint)
        summary = {"checkpoint": checkpoint, "out": out, "dtype": args.dtype or "as trained", "family": meta.family}
        print(json.dumps({**summary, "mode": meta.mode, "steps": meta.provenance["steps"]}, indent=2))
        return 0
    path = export_checkpoint(checkpoint, out, DTYPES[args.dtype] if args.dtype else None)
    print(f"predictor: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
