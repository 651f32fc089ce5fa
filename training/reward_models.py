"""The real reward models, each behind ``load(spec, device, dtype) -> nn.Module`` (see :mod:`training.rewards`).

(Over 300 lines because it holds five independent loaders of about 60 lines each, side by side so that they read
alike; each is self-contained and could move to a file of its own.)

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
- ``imagereward``: ImageReward-v1.0 rebuilt on transformers' BLIP classes (no ``image-reward`` package):
  BlipVisionModel (ViT-L/16, 224 px), BlipTextModel (BERT-base cross-attending to the image tokens), the
  MLP head on the CLS token, then (r - mean) / std as ImageReward.score. ``path``: ImageReward.pt
  (HF THUDM/ImageReward) or a .safetensors copy, keys renamed from the original layout (unknown or missing
  keys are errors). Options: ``tokenizer`` (bert-base-uncased folder or Hub id, default bert-base-uncased;
  [DEC] and [ENC] are added as BLIP does), ``arch`` (size overrides, ``{vision: {...}, text: {...}}``).
  Score normalised to mean 0, std 1 over ImageReward's training data.

All preprocessing is differentiable (:func:`training.rewards.clip_preprocess`); models are frozen
but never wrapped in ``no_grad``, so reward gradients reach the image.
"""

from __future__ import annotations

import contextlib
import pickle
import re

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
    """The MLP of the LAION improved aesthetic predictor (its state-dict keys are layers.{0,2,4,6,7}); ImageReward's
    head is the same MLP (no activations between the Linears) on the text encoder's CLS token."""

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


# ImageReward (BLIP on transformers' own classes) ---------------------------------------------------

# ImageReward.py normalises the MLP output with these statistics of its training rewards.
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35  # ImageReward tokenises with padding="max_length", truncation, max_length 35

# ImageReward-v1.0's sizes: BLIP's ViT-L/16 at 224 px and the BERT-base text encoder of med_config.json.
# options.arch may override these keys (tests use a tiny model); everything else is fixed by the originals.
IMAGEREWARD_ARCH = {
    "vision": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 16,
    },
    "text": {
        "vocab_size": 30524,  # bert-base-uncased + BLIP's [DEC] and [ENC]
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
    },
}

# Keys of ImageReward.pt the score never reads: BLIP's contrastive projections (ImageReward scores the
# cross-attended CLS token instead) and med.py's position-id buffer, which BlipTextModel builds itself.
IMAGEREWARD_IGNORED = frozenset(
    {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
)

# (ImageReward.pt prefix, ImageRewardScore prefix); {n} is a block index. The ViT is timm's (blip/vit.py),
# whose fused qkv rows are [q; k; v] with heads contiguous, the layout BlipAttention.qkv splits the same way.
# BlipTextModel kept med.py's BERT names, so the text encoder only changes prefix.
IMAGEREWARD_RENAMES = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{n}.norm1.", "vision.encoder.layers.{n}.layer_norm1."),
    ("blip.visual_encoder.blocks.{n}.attn.qkv.", "vision.encoder.layers.{n}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{n}.attn.proj.", "vision.encoder.layers.{n}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{n}.norm2.", "vision.encoder.layers.{n}.layer_norm2."),
    ("blip.visual_encoder.blocks.{n}.mlp.", "vision.encoder.layers.{n}.mlp."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),
    ("mlp.layers.", "head.layers."),
)

_IMAGEREWARD_HINT = (
    "HINT: rewards[*].path must be ImageReward-v1.0's ImageReward.pt (HF THUDM/ImageReward) or a .safetensors "
    "copy of it with the same keys; for a differently sized model set rewards[*].options.arch."
)


class ImageRewardScore(nn.Module):
    """ImageReward: BLIP ViT image tokens, BERT text encoder cross-attending to them, MLP on the CLS token,
    normalised by the training statistics; differentiable w.r.t. the image."""

    def __init__(self, vision, text, head: AestheticHead, tokenizer):
        super().__init__()
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.size = int(vision.config.image_size)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's last hidden state after its final LayerNorm, as blip.visual_encoder returns it."""
        pixels = clip_preprocess(images, self.size).to(self.vision.dtype)
        return self.vision(pixel_values=pixels).last_hidden_state

    def text_features(self, image_tokens: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The CLS output of the text encoder. ImageReward keeps [CLS] first (it does not swap in [ENC] as
        BLIP's matching head does) and attends to every image token (its encoder mask is all ones)."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt"
        )
        output = self.text(
            input_ids=tokens.input_ids.to(image_tokens.device),
            attention_mask=tokens.attention_mask.to(image_tokens.device),
            encoder_hidden_states=image_tokens,
        )
        return output.last_hidden_state[:, 0, :]

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        features = self.text_features(self.image_tokens(images), prompts)
        reward = self.head(features.float()).squeeze(-1)
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def rename_imagereward_key(key: str, renames=IMAGEREWARD_RENAMES) -> str | None:
    """`key` of ImageReward.pt as an ImageRewardScore state-dict key (None when no rule knows it). Pass the
    rules swapped, ``[(ours, theirs) for theirs, ours in IMAGEREWARD_RENAMES]``, to map back."""
    for source, target in renames:
        pattern = re.escape(source).replace(re.escape("{n}"), r"(?P<n>\d+)")
        match = re.match(pattern, key)
        if match:
            return target.format(**match.groupdict()) + key[match.end() :]
    return None


def imagereward_state(original: dict, expected: dict, path: str) -> dict:
    """ImageReward.pt's tensors under ImageRewardScore's names; any key or shape that does not fit is an error."""
    renamed = {rename_imagereward_key(k): v for k, v in original.items() if k not in IMAGEREWARD_IGNORED}
    unexpected = [k for k in original if k not in IMAGEREWARD_IGNORED and rename_imagereward_key(k) not in expected]
    back = [(ours, theirs) for theirs, ours in IMAGEREWARD_RENAMES]
    missing = [rename_imagereward_key(k, back) for k in expected if k not in renamed]
    if unexpected or missing:
        raise ValueError(
            f"HyperAlign: ImageReward checkpoint {path!r} does not fit the ImageReward architecture: unknown keys "
            f"{unexpected[:8]}, missing keys {missing[:8]}. {_IMAGEREWARD_HINT}"
        )
    wrong = [
        f"{theirs} {tuple(original[theirs].shape)} (model {tuple(expected[ours].shape)})"
        for theirs, ours in ((k, rename_imagereward_key(k)) for k in original if k not in IMAGEREWARD_IGNORED)
        if original[theirs].shape != expected[ours].shape
    ]
    if wrong:
        raise ValueError(
            f"HyperAlign: ImageReward checkpoint {path!r} has tensors of other sizes: {wrong[:8]}. {_IMAGEREWARD_HINT}"
        )
    return renamed


def _imagereward_arch(options: dict) -> dict:
    """IMAGEREWARD_ARCH with options.arch's overrides; unknown keys are refused, not ignored."""
    arch = options.get("arch") or {}
    if not isinstance(arch, dict) or not set(arch) <= set(IMAGEREWARD_ARCH):
        raise ValueError(
            f"HyperAlign: rewards[*].options.arch of 'imagereward' must be a mapping with 'vision' and/or 'text', "
            f"got {arch!r}. HINT: e.g. arch: {{vision: {{num_hidden_layers: 24}}}}."
        )
    merged = {}
    for part, defaults in IMAGEREWARD_ARCH.items():
        overrides = arch.get(part) or {}
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise ValueError(
                f"HyperAlign: rewards[*].options.arch.{part} has unknown keys {unknown}. HINT: use {sorted(defaults)}."
            )
        merged[part] = {**defaults, **overrides}
    return merged


def _imagereward_towers(arch: dict, tokenizer):
    """BlipVisionModel and BlipTextModel configured as ImageReward's timm ViT and med.py BERT."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    # timm's ViT: LayerNorm eps 1e-6, exact (erf) GELU, qkv bias, learned positions; BlipVisionModel has all four.
    vision_config = BlipVisionConfig(**arch["vision"], layer_norm_eps=1e-6, hidden_act="gelu")
    # med.py's BERT: eps 1e-12, exact GELU, learned absolute positions, no token types, keys/values of the
    # cross-attention read the ViT width. is_decoder=True only builds the cross-attention layers; forward
    # runs with is_decoder=False, the bidirectional encoder mode ImageReward uses.
    text_config = BlipTextConfig(
        **arch["text"],
        encoder_hidden_size=arch["vision"]["hidden_size"],
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        is_decoder=True,
        # unused by the encoder; taken from the tokenizer so they are valid ids for any vocabulary
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    with _skip_init():  # every parameter is overwritten by the checkpoint
        return BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)


def _skip_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: random init, only slower
        return contextlib.nullcontext()
    return no_init_weights()


def _imagereward_tokenizer(source: str, vocab_size: int):
    """bert-base-uncased with BLIP's init_tokenizer additions: [DEC] as bos and [ENC] as an extra special token."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(source, local_files_only=offline())
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"HyperAlign: the ImageReward tokenizer {source!r} has {len(tokenizer)} tokens with [DEC] and [ENC], "
            f"but the text encoder has {vocab_size}. HINT: set rewards[*].options.tokenizer to bert-base-uncased "
            f"(a local copy or the Hub id)."
        )
    return tokenizer


def load_imagereward(spec: RewardSpec, device, dtype) -> nn.Module:
    path = reward_file(spec)
    arch = _imagereward_arch(spec.options)
    tokenizer = _imagereward_tokenizer(spec.options.get("tokenizer", "bert-base-uncased"), arch["text"]["vocab_size"])
    vision, text = _imagereward_towers(arch, tokenizer)
    head = AestheticHead(arch["text"]["hidden_size"])  # ImageReward's MLP is the LAION one on the BERT width
    model = ImageRewardScore(vision, text, head, tokenizer)
    state = imagereward_state(_read_state(path, "ImageReward checkpoint"), model.state_dict(), path)
    model.load_state_dict(state, strict=True)
    model.vision.to(device, dtype)
    model.text.to(device, dtype)
    model.head.to(device, torch.float32)  # tiny; fp32 keeps the normalised score precise
    return model
