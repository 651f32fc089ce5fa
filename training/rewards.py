"""Rewards: one registry, one signature, a weighted sum (paper §4.3, reward term L_R).

Every loader has the signature ``load(spec: RewardSpec, device, dtype) -> nn.Module``; the module's
``forward(images (b, 3, H, W) float in [0, 1], prompts: list[str]) -> (b,)`` returns scores where
higher is better, differentiable w.r.t. the images, with frozen parameters. Modules with an image
encoder may also define ``embed(images) -> (b, d)``, which ``training.evaluate`` uses for diversity.

The registry maps a name to ``"module:function"`` and imports it only when the reward is used, so
open_clip or transformers load only for the rewards a run asks for.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .paths import looks_local, missing

REWARDS: dict[str, str] = {
    "hps": "training.reward_models:load_hps",
    "pickscore": "training.reward_models:load_pickscore",
    "clip": "training.reward_models:load_clip",
    "aesthetic": "training.reward_models:load_aesthetic",
    "imagereward": "training.reward_models:load_imagereward",
    "brightness": "training.rewards:load_brightness",
    "color": "training.rewards:load_color",
}

# Rewards that cannot load without a checkpoint file in `path`.
NEEDS_FILE = {
    "hps": "the HPS checkpoint (HPS_v2.1_compressed.pt)",
    "aesthetic": "the aesthetic MLP head file",
    "imagereward": "the ImageReward checkpoint (ImageReward.pt from HF THUDM/ImageReward)",
}

# OpenAI CLIP normalisation, shared by every CLIP-family reward.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class RewardSpec:
    name: str
    weight: float = 1.0
    path: str | None = None
    options: dict = field(default_factory=dict)
    # "module:function" of a loader outside the registry (e.g. toyworld.rewards:load_toy_clip); `name` then only
    # names the score in logs and tables
    loader: str | None = None

    def __post_init__(self):
        if self.loader is not None:
            module, _, function = str(self.loader).partition(":")
            if not module or not function.isidentifier():
                raise ValueError(
                    f"HyperAlign: reward {self.name!r} loader {self.loader!r} is not 'module:function'. "
                    "HINT: e.g. loader: toyworld.rewards:load_toy_clip"
                )
        elif self.name not in REWARDS:
            close = difflib.get_close_matches(self.name, list(REWARDS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"choose one of {sorted(REWARDS)}"
            raise ValueError(
                f"HyperAlign: unknown reward {self.name!r}. HINT: {hint}, or name your own loader with "
                "loader: 'module:function'."
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ValueError(f"HyperAlign: reward {self.name!r} weight must be a number, got {self.weight!r}.")
        self.weight = float(self.weight)


def check_spec(spec: RewardSpec, key: str) -> None:
    """Refuse a missing reward file before anything loads; `key` is the config key, e.g. 'rewards[0]'."""
    if spec.name in NEEDS_FILE and not spec.path:
        raise ValueError(
            f"HyperAlign: reward {spec.name!r} needs {NEEDS_FILE[spec.name]} (config key {key}.path is not set). "
            f"HINT: download it and set {key}.path to the file."
        )
    sources = [(f"{key}.path", spec.path)] + [(f"{key}.options.{k}", v) for k, v in spec.options.items()]
    for option_key, value in sources:
        if isinstance(value, str) and looks_local(value) and not os.path.exists(os.path.expanduser(value)):
            raise missing(f"reward {spec.name!r} file", value, option_key, "fix the path or download the file")


def reward_file(spec: RewardSpec) -> str:
    """The checkpoint file of `spec`, or an error that names the file and the config key."""
    if not spec.path:
        raise ValueError(
            f"HyperAlign: reward {spec.name!r} needs a checkpoint file; set its config key "
            f"rewards[*].path (the entry named {spec.name!r})."
        )
    path = os.path.expanduser(spec.path)
    if not os.path.isfile(path):
        raise missing(
            f"reward {spec.name!r} file",
            spec.path,
            f"rewards[*].path of the {spec.name!r} entry",
            "download the checkpoint and point the path at it",
        )
    return path


def resolve_loader(spec: RewardSpec):
    """The loader function: the spec's own `loader`, else the registry's entry for its name."""
    module_name, _, function = (spec.loader or REWARDS[spec.name]).partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"HyperAlign: reward {spec.name!r}: cannot load {module_name}:{function} ({error}). "
            "HINT: check the loader's module and function names."
        ) from error


def metric_only(spec: RewardSpec) -> bool:
    """Whether the loader makes an evaluation metric with no gradient (its function says `metric_only = True`):
    such a score (e.g. ground truth read from pixels) may be reported, never trained on."""
    return bool(getattr(resolve_loader(spec), "metric_only", False))


def load_reward(spec: RewardSpec, device, dtype) -> nn.Module:
    module = resolve_loader(spec)(spec, device, dtype)
    return module.eval().requires_grad_(False)


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """Differentiable CLIP preprocessing: shorter side to `size` (bicubic, antialiased), centre crop, normalise."""
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class RewardSet(nn.Module):
    """The weighted sum of the configured rewards; each term is returned for logging."""

    def __init__(self, specs: list[RewardSpec], device, dtype):
        super().__init__()
        if not specs:
            raise ValueError("HyperAlign: no rewards configured. HINT: add at least one entry under 'rewards:'.")
        self.names = _unique_names(specs)
        self.weights = [spec.weight for spec in specs]
        self.models = nn.ModuleList([load_reward(spec, device, dtype) for spec in specs])

    def forward(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms, total = {}, 0.0
        for name, weight, model in zip(self.names, self.weights, self.models):
            score = model(images, prompts).float()  # (b,)
            terms[name] = score
            total = total + weight * score
        return total, terms


def _unique_names(specs: list[RewardSpec]) -> list[str]:
    names, seen = [], {}
    for spec in specs:
        count = seen.get(spec.name, 0)
        names.append(spec.name if count == 0 else f"{spec.name}_{count}")
        seen[spec.name] = count + 1
    return names


# Toy differentiable rewards: no weights, for CPU tests and smoke runs.


class Brightness(nn.Module):
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))


class Color(nn.Module):
    """Closeness of the mean colour to `target` RGB: 0 is a perfect match."""

    def __init__(self, target):
        super().__init__()
        self.register_buffer("target", torch.tensor(target, dtype=torch.float32).view(1, 3))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        mean = images.float().mean(dim=(2, 3))  # (b, 3)
        return -((mean - self.target) ** 2).sum(dim=1)


def load_brightness(spec: RewardSpec, device, dtype) -> nn.Module:
    return Brightness().to(device)


def load_color(spec: RewardSpec, device, dtype) -> nn.Module:
    target = spec.options.get("target", [1.0, 0.5, 0.0])
    if not (isinstance(target, (list, tuple)) and len(target) == 3):
        raise ValueError(f"HyperAlign: reward 'color' option target must be three numbers in [0, 1], got {target!r}.")
    return Color([float(v) for v in target]).to(device)
