"""Fixed-seed sample grids during training: one row per prompt, one column per seed."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from .sampling import Trajectory, per_sample_noise

logger = logging.getLogger("training")


def to_uint8_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of images (s, 3, H, W) in [0, 1] -> one (rows*H, s*W, 3) uint8 array."""
    tiles = [torch.cat(list(images), dim=2) for images in rows]  # each (3, H, s*W)
    grid = torch.cat(tiles, dim=1)  # (3, rows*H, s*W)
    return (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def generate_images(tr, prompts: list[str], seeds: list[int]) -> list[torch.Tensor]:
    cfg, adapter = tr.cfg, tr.adapter
    steps = adapter.sampling_steps(cfg.sampling.num_steps)
    shape = adapter.latent_shape(1)[1:]
    rows = []
    for prompt in prompts:
        cond = adapter.encode_prompts([prompt] * len(seeds), uncond=cfg.sampling.guidance != 1.0)
        x = per_sample_noise(shape, seeds, adapter.device)
        trajectory = Trajectory(
            adapter, tr.hypernet, tr.hcfg, cond, steps, cfg.sampling.guidance, cfg.objective.mode, tr.keysteps
        )
        with tr.accelerator.autocast():
            latents, _ = trajectory.generate(x)
        rows.append(adapter.decode(latents).float().cpu())
    return rows


def sample_grid(tr) -> str | None:
    """Every rank samples (a sharded base needs all of them); rank 0 writes the PNG and logs it."""
    from PIL import Image

    grid = to_uint8_grid(generate_images(tr, tr.cfg.run.sample_prompts, tr.cfg.run.sample_seeds))
    if not tr.accelerator.is_main_process:
        return None
    folder = os.path.join(tr.cfg.run_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{tr.step:08d}.png")
    Image.fromarray(grid).save(path)
    for tracker in tr.accelerator.trackers:
        if hasattr(tracker, "log_images"):
            try:
                tracker.log_images({"samples": grid[None]}, step=tr.step, dataformats="NHWC")
            except TypeError:  # trackers differ in their image arguments
                tracker.log_images({"samples": [grid]}, step=tr.step)
    logger.info("sample grid: %s", path)
    return path
