"""Pools of rendered training images: every scene of a list, rendered `per_spec` times in random styles."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import world


@dataclass
class RenderPool:
    specs: list[world.SceneSpec]
    per_spec: int
    images: np.ndarray  # (len(specs) * per_spec, 32, 32, 3) uint8; rows of spec i are i*per_spec ...
    styles: np.ndarray  # (rows, 4) vivid, noise, blur, offset

    @property
    def prompts(self) -> list[str]:
        return [world.prompt_of(s) for s in self.specs]

    def spec_of_row(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.specs)), self.per_spec)

    def tastes(self) -> np.ndarray:
        weights = np.array([world.TASTE_WEIGHTS[k] for k in ("vivid", "noise", "blur", "offset")])
        return self.styles @ weights

    def tensor(self, rows=None) -> torch.Tensor:
        """Float (n, 3, 32, 32) in [0, 1]."""
        images = self.images if rows is None else self.images[rows]
        return world.to_tensor_images(np.ascontiguousarray(images))


def render_pool(specs: list[world.SceneSpec], per_spec: int, seed: int) -> RenderPool:
    rng = np.random.default_rng(seed)
    rows = len(specs) * per_spec
    styles = rng.random((rows, 4))
    seeds = rng.integers(0, 2**31 - 1, size=rows)
    images = np.empty((rows, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), dtype=np.uint8)
    for row in range(rows):
        style = world.Style(*(float(v) for v in styles[row]))
        images[row] = world.render(specs[row // per_spec], style, int(seeds[row]))
    return RenderPool(list(specs), per_spec, images, styles)
