"""The real reward models, each behind ``load(spec, device, dtype) -> nn.Module`` (see :mod:`training.rewards`).

- ``hps``: HPSv2 / v2.1, an open_clip ViT-H-14 with the HPS checkpoint (``path``: HPS_v2.1_compressed.pt
  or .safetensors). Score = cosine of the normalised image and text features (about 0.25-0.35).
  Options: ``arch`` (open_clip config name, default ViT-H-14), ``open_clip_config`` (a JSON model
  config to register first, for custom architectures), ``grad_checkpointing`` (default true).
- ``pickscore``: PickScore_v1, a transformers CLIPModel (``path``: folder or Hub id, default
  yuvalkirstain/PickScore_v1; ``options.processor``: where the tokenizer lives, default
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Score = logit_scale.exp() * cosine (about 18-23).
- ``clip``: CLIP score, a transformers CLIPModel (default openai/clip-vit-large-patch14). Score = cosine.
- ``aesthetic``: LAION aesthetic v2, CLIP ViT-L/14 image embeddings (``options.clip``, default
  openai/clip-vit-large-patch14) through the MLP head 768-1024-128-64-16-1 (``path``: the head file,
  e.g. sac+logos+ava1-l14-linearMSE.pth, or .safetensors). Score about 5-7.
- ``imagereward``: ImageReward-v1.0 through the optional ``image-reward`` package (``path``: the
  ImageReward.pt file or the name "ImageReward-v1.0"; ``options.med_config``, ``options.download_root``).

All preprocessing is differentiable (:func:`training.rewards.clip_preprocess`); models are frozen
but never wrapped in ``no_grad``, so reward gradients reach the image.
"""

from __future__ import annotations

import pickle

import torch
import torch.nn.functional as F
from torch import nn

from .paths import offline
from .rewards import CLIP_MEAN, CLIP_STD, RewardSpec, clip_preprocess, reward_file


def _features(output) -> torch.Tensor:
    """transformers < 5 returns the projected features; >= 5 a model output holding them as pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _read_state(path: str, what: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"HyperAlign: {what} {path!r} holds Python objects besides tensors, which are not loaded for safety "
            f"({err}). HINT: convert it once to .safetensors in a trusted environment and point the path at that."
        ) from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


# HPSv2 (open_clip) ---------------------------------------------------------------------------------


class OpenClipScore(nn.Module):
    def __init__(self, model, tokenizer, size: int, mean, std):
        super().__init__()
        self.model, self.tokenizer, self.size, self.mean, self.std = model, tokenizer, size, mean, std

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images, self.size, self.mean, self.std)
        dtype = next(self.model.parameters()).dtype
        return F.normalize(self.model.encode_image(pixels.to(dtype)).float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(images.device)
        text = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (self.embed(images) * text).sum(dim=-1)


def load_hps(spec: RewardSpec, device, dtype) -> nn.Module:
    import open_clip

    path = reward_file(spec)
    if spec.options.get("open_clip_config"):
        open_clip.add_model_config(spec.options["open_clip_config"])
    arch = spec.options.get("arch", "ViT-H-14")
    model = open_clip.create_model(arch, pretrained=None, device="cpu")
    state = _read_state(path, "HPS checkpoint")
    if next(iter(state)).startswith("module."):
        state = {k[len("module.") :]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"HyperAlign: HPS checkpoint {path!r} does not fit open_clip {arch!r}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}. HINT: set rewards[*].options.arch."
        )
    if spec.options.get("grad_checkpointing", True):
        model.set_grad_checkpointing(True)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    model = model.to(device, dtype)
    return OpenClipScore(
        model, open_clip.get_tokenizer(arch), int(size), cfg.get("mean", CLIP_MEAN), cfg.get("std", CLIP_STD)
    )


# PickScore and CLIP score (transformers CLIPModel) -------------------------------------------------


class HFClipScore(nn.Module):
    def __init__(self, model, tokenizer, scaled: bool):
        super().__init__()
        self.model, self.tokenizer, self.scaled = model, tokenizer, scaled
        self.size = int(model.config.vision_config.image_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images, self.size).to(self.model.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        tokens = {k: v.to(images.device) for k, v in tokens.items()}
        text = F.normalize(_features(self.model.get_text_features(**tokens)).float(), dim=-1)
        cosine = (self.embed(images) * text).sum(dim=-1)
        return self.model.logit_scale.exp().float() * cosine if self.scaled else cosine


def _hf_clip(path: str, tokenizer_path: str, device, dtype):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(path, local_files_only=offline()).to(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=offline())
    return model, tokenizer


def load_pickscore(spec: RewardSpec, device, dtype) -> nn.Module:
    path = spec.path or "yuvalkirstain/PickScore_v1"
    model, tokenizer = _hf_clip(
        path, spec.options.get("processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"), device, dtype
    )
    return HFClipScore(model, tokenizer, scaled=True)


def load_clip(spec: RewardSpec, device, dtype) -> nn.Module:
    path = spec.path or "openai/clip-vit-large-patch14"
    model, tokenizer = _hf_clip(path, spec.options.get("processor", path), device, dtype)
    return HFClipScore(model, tokenizer, scaled=False)


# LAION aesthetic v2 --------------------------------------------------------------------------------


class AestheticHead(nn.Module):
    """The MLP of the LAION improved aesthetic predictor (its state-dict keys are layers.{0,2,4,6,7})."""

    def __init__(self, in_features: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


class Aesthetic(nn.Module):
    def __init__(self, clip, head: AestheticHead):
        super().__init__()
        self.clip, self.head = clip, head
        self.size = int(clip.config.vision_config.image_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images, self.size).to(self.clip.dtype)
        return F.normalize(_features(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embedding = self.embed(images)
        return self.head(embedding.to(next(self.head.parameters()).dtype)).float().squeeze(-1)


def load_aesthetic(spec: RewardSpec, device, dtype) -> nn.Module:
    from transformers import CLIPModel

    state = _read_state(reward_file(spec), "aesthetic head")
    state = {k.split("layers.", 1)[-1]: v for k, v in state.items()}  # tolerate 'mlp.layers.' style prefixes
    head = AestheticHead(state["0.weight"].shape[1])
    head.layers.load_state_dict(state, strict=True)
    # the whole CLIPModel (its text tower is unused): projection sizes then always come from one config
    clip = CLIPModel.from_pretrained(
        spec.options.get("clip", "openai/clip-vit-large-patch14"), local_files_only=offline()
    )
    return Aesthetic(clip.to(device, dtype), head.to(device, dtype))


# ImageReward (optional extra) ----------------------------------------------------------------------


class ImageRewardScore(nn.Module):
    """Differentiable ImageReward: BLIP image encoder, text encoder cross-attending to it, MLP, normalised."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        blip = self.model.blip
        tokens = blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        tokens = tokens.to(images.device)
        pixels = clip_preprocess(images, 224).to(next(blip.parameters()).dtype)
        image_embeds = blip.visual_encoder(pixels)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=images.device)
        text = blip.text_encoder(
            tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=mask,
            return_dict=True,
        )
        reward = self.model.mlp(text.last_hidden_state[:, 0, :]).float().squeeze(-1)
        return (reward - self.model.mean) / self.model.std


def load_imagereward(spec: RewardSpec, device, dtype) -> nn.Module:
    try:
        import ImageReward as image_reward
    except ImportError:
        raise ImportError(
            "HyperAlign: the 'imagereward' reward needs the optional image-reward package, which is not installed. "
            "HINT: pip install image-reward (it pins timm==0.6.13 and fairscale; a separate environment is safest)."
        ) from None
    name = spec.path or "ImageReward-v1.0"
    model = image_reward.load(
        name, device=device, download_root=spec.options.get("download_root"), med_config=spec.options.get("med_config")
    )
    return ImageRewardScore(model.to(device, dtype))
