"""The toy rewards, with the trainer's reward signature.

``load_toy_clip(spec, device, dtype)`` and ``load_toy_aesthetic(spec, device, dtype)`` return frozen
modules whose ``forward(images (b, 3, H, W) in [0, 1], prompts) -> (b,)`` is differentiable w.r.t.
the images; higher is better. ``spec`` has ``name``, ``weight``, ``path`` (None: the shipped file)
and ``options``:

- toy_clip: ``scale`` (default 10.0): score = scale * cosine(image, prompt), like CLIPScore's
  100 * cos but sized for a loss; ``embed(images)`` gives unit image embeddings (diversity metrics).
- toy_aesthetic: no options; the score is standardised over the toy render distribution (mean 0,
  std 1), ideal renderings score about +2. The prompts are ignored.

Each file is one safetensors holding the weights and, in its header, the JSON that rebuilds the net
(and, for toy_clip, the word vocabulary), so nothing else needs to be on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from . import AESTHETIC_FILE, BUILD_HINT, CLIP_FILE

META_KEY = "hyperalign_toy"
CLIP_SCALE = 10.0  # toy_clip's default score scale (option `scale`)


def save_reward(path: Path, module: nn.Module, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)})


def _read(spec, default: Path, kind: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(spec.path).expanduser() if getattr(spec, "path", None) else default
    if not path.is_file():
        raise FileNotFoundError(f"HyperAlign: toy reward file '{path}' not found. HINT: {BUILD_HINT}")
    with safe_open(str(path), "pt") as handle:
        meta = json.loads((handle.metadata() or {}).get(META_KEY, "{}"))
    if meta.get("kind") != kind:
        raise ValueError(
            f"HyperAlign: '{path}' is not a {kind} reward file (header kind {meta.get('kind')!r}). "
            f"HINT: point the reward's path at toyworld/assets/rewards/{kind}.safetensors or {BUILD_HINT}."
        )
    return meta, load_file(str(path))


def _options(spec, allowed: dict) -> dict:
    given = dict(getattr(spec, "options", None) or {})
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(
            f"HyperAlign: unknown option(s) {unknown} for reward {spec.name!r}; allowed: {sorted(allowed) or 'none'}."
        )
    return {**allowed, **given}


def _frozen(module: nn.Module, device, dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


class ToyClipReward(nn.Module):
    def __init__(self, clip, tokenizer, scale: float):
        super().__init__()
        self.clip, self.tokenizer, self.scale = clip, tokenizer, float(scale)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.clip.text_projection.weight.dtype
        return self.clip.embed_images(images.to(dtype))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"HyperAlign: toy_clip got {images.shape[0]} images but {len(prompts)} prompts.")
        ids = self.tokenizer(prompts).to(images.device)
        text = self.clip.embed_text(ids)
        return (self.embed(images) * text).sum(-1).float() * self.scale


class ToyAestheticReward(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        return self.model(images.to(self.model.offset.dtype)).float()


def build_clip(meta: dict):
    from transformers import CLIPTextConfig

    from .nets import ToyClip

    return ToyClip(CLIPTextConfig(**meta["text_config"]))


def load_toy_clip(spec, device="cpu", dtype=torch.float32) -> nn.Module:
    from .vocab import WordTokenizer

    options = _options(spec, {"scale": CLIP_SCALE})
    meta, tensors = _read(spec, CLIP_FILE, "toy_clip")
    clip = build_clip(meta)
    clip.load_state_dict(tensors, strict=True)
    reward = ToyClipReward(clip, WordTokenizer(meta["vocab"]), options["scale"])
    return _frozen(reward, device, dtype)


def load_toy_aesthetic(spec, device="cpu", dtype=torch.float32) -> nn.Module:
    from .nets import ToyAesthetic

    _options(spec, {})
    _, tensors = _read(spec, AESTHETIC_FILE, "toy_aesthetic")
    model = ToyAesthetic()
    model.load_state_dict(tensors, strict=True)
    return _frozen(ToyAestheticReward(model), device, dtype)
