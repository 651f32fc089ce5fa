"""P-mode keysteps from base-model trajectories (paper §4.2, Fig. 4).

    python -m training.keysteps --config training/configs/sd15.yaml [--num 4] [--samples 8] [--out PATH]

Samples `--samples` trajectories of the *base* model (no LoRA) over prompts from ``data.prompts``
(or the preference captions) with ``sampling.num_steps`` and ``sampling.guidance``, collects every
step's one-step x0 prediction and lets :func:`hyperalign.schedule.discover_keysteps` choose the
steps where the trajectory's curvature peaks. Writes ``{"keysteps": [...], ...}`` to
``objective.keysteps_file`` (default ``<run dir>/keysteps.json``), where ``training.train`` (mode P)
and the exported predictor pick them up. Runs on the main process; extra processes wait.
"""

from __future__ import annotations

import hashlib
import sys

import torch

from hyperalign.atomic import write_json
from hyperalign.schedule import discover_keysteps

from .cli import cli, parse, print_check
from .config import check_files


def _extra(p) -> None:
    p.add_argument("--num", type=int, default=4, help="number of keysteps, the first always 0 (default 4)")
    p.add_argument("--samples", type=int, default=8, help="trajectories to average over (default 8)")
    p.add_argument("--batch", type=int, default=4, help="trajectories per batch (default 4)")
    p.add_argument("--out", help="output JSON (default: objective.keysteps_file or <run dir>/keysteps.json)")


def base_x0_curves(
    adapter, prompts: list[str], seeds: list[int], num_steps: int, guidance: float, batch: int
) -> torch.Tensor:
    """(num_steps, samples, c, h, w): the base model's x0 prediction at every step of every trajectory."""
    from .sampling import Trajectory, per_sample_noise

    steps = adapter.sampling_steps(num_steps)
    shape = adapter.latent_shape(1)[1:]
    chunks = []
    for start in range(0, len(seeds), batch):
        part_prompts, part_seeds = prompts[start : start + batch], seeds[start : start + batch]
        cond = adapter.encode_prompts(part_prompts, uncond=guidance != 1.0)
        trajectory = Trajectory(adapter, None, None, cond, steps, guidance)
        _, x0s = trajectory.generate(per_sample_noise(shape, part_seeds, adapter.device), collect_x0=True)
        chunks.append(torch.stack(x0s))  # (steps, b, c, h, w)
    return torch.cat(chunks, dim=1)


@cli
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv, __doc__, "python -m training.keysteps", _extra)
    check_files(cfg, purpose="keysteps")
    if args.check:
        return print_check(cfg, args)
    from .adapters import load_adapter
    from .data import read_preferences, read_prompts
    from .engine import make_accelerator, setup_logging

    accelerator = make_accelerator(cfg)
    setup_logging(accelerator, cfg.run_dir)
    out = args.out or cfg.keysteps_path
    if accelerator.is_main_process:
        if cfg.data.prompts:
            pool = read_prompts(cfg.data.prompts)
        else:
            rows = read_preferences(cfg.data)
            pool = [rows.prompt(i) for i in range(len(rows))]
        prompts = [pool[i % len(pool)] for i in range(args.samples)]
        adapter = load_adapter(cfg.model, accelerator.device)
        curves = base_x0_curves(
            adapter, prompts, list(range(args.samples)), cfg.sampling.num_steps, cfg.sampling.guidance, args.batch
        )
        steps = adapter.sampling_steps(cfg.sampling.num_steps)
        keysteps, detail = discover_keysteps(curves, args.num, steps.progress)
        result = {
            "keysteps": keysteps,
            "num_steps": cfg.sampling.num_steps,
            "guidance": cfg.sampling.guidance,
            "base_model": cfg.model.path,
            "samples": args.samples,
            "prompt_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "progress": steps.progress,
            **detail,
        }
        write_json(out, result)  # train and export read it: never half-written
        print(f"keysteps {keysteps} -> {out}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
