"""The toy networks: configs of the SD1.5-shaped text-to-image model, and the two toy reward nets.

The text-to-image model is standard diffusers/transformers classes with tiny configs, so everything
that loads SD1.5 (the trainer, StableDiffusionPipeline, ComfyUI's SD1.5 key conversion) loads it:
32x32 RGB images, a 4-channel 16x16 latent, a three-level UNet with cross-attention at its two lower
levels and in the middle block, and a 2-layer CLIP text encoder of width 64 over 77 tokens.

The toy CLIP is a dual encoder: a small CNN for images and a ``CLIPTextModel`` for prompts (the
same text tower the generator uses, as SD1.5 uses CLIP's). The toy aesthetic model is a CNN with a
scalar head. Both read images in [0, 1] at any size (resized to 32x32, differentiably).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyperalign.targets import UNetArch

from .world import IMAGE_SIZE

LATENT_CHANNELS = 4
LATENT_SIZE = 16  # the VAE downsamples 2x: at 4x (8x8) a small shape is one latent pixel and its form is lost
TEXT_WIDTH = 64
UNET_CHANNELS = (32, 64, 64)
UNET_ATTENTION = (False, True, True)  # attention over 256 tokens at 16x16 would quadruple the cost
UNET_LAYERS_PER_BLOCK = 1
UNET_HEADS = 4
VAE_CHANNELS = (16, 32)
VAE_GROUPS = 2  # diffusers-only (ComfyUI never builds this VAE): few groups train much faster
EMBED_DIM = 64  # toy CLIP joint embedding


def unet_arch() -> UNetArch:
    """The numbers :mod:`hyperalign.targets` needs to list this UNet's attention layers."""
    return UNetArch(
        block_channels=UNET_CHANNELS,
        attention_levels=UNET_ATTENTION,
        layers_per_block=UNET_LAYERS_PER_BLOCK,
        transformer_depth=1,
        context_dim=TEXT_WIDTH,
        mid_attention=True,
    )


def unet_config() -> dict:
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=UNET_LAYERS_PER_BLOCK,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in UNET_ATTENTION),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(UNET_ATTENTION)),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=UNET_HEADS,  # diffusers' name for the number of heads in SD1.5 configs
        norm_num_groups=32,
        use_linear_projection=False,  # SD1.5 uses 1x1 convs for proj_in/proj_out
    )


def vae_config(scaling_factor: float = 1.0) -> dict:
    levels = len(VAE_CHANNELS)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=VAE_GROUPS,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def text_config(vocab: dict[str, int]):
    from transformers import CLIPTextConfig

    from .vocab import BOS, EOS, MAX_LENGTH

    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        projection_dim=EMBED_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def scheduler_config() -> dict:
    """SD1.5's training schedule: 1000 steps, scaled-linear betas, epsilon prediction."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def to_toy_resolution(images: torch.Tensor) -> torch.Tensor:
    """(b, 3, H, W) in [0, 1] -> (b, 3, 32, 32), differentiably; a no-op at 32x32."""
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)


class ImageTower(nn.Module):
    """32x32 image -> vector; flattening the last 4x4 map keeps *where* things are."""

    def __init__(self, out_dim: int, width: int = 32, hidden: int = 128):
        super().__init__()
        chans = (width, width, 2 * width, 2 * width)
        layers, previous = [], 3
        for index, c in enumerate(chans):
            layers += [
                nn.Conv2d(previous, c, 3, stride=1 if index == 0 else 2, padding=1),
                nn.GroupNorm(8, c),
                nn.SiLU(),
            ]
            previous = c
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(chans[-1] * 16, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_toy_resolution(images) * 2 - 1
        return self.head(self.convs(x))


class ToyClip(nn.Module):
    """A CLIP-like dual encoder over toy images and toy prompts."""

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPTextModel

        self.text = CLIPTextModel(config)
        self.text_projection = nn.Linear(config.hidden_size, EMBED_DIM, bias=False)
        self.image = ImageTower(EMBED_DIM)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The text tower is causal and pools the first EOS token, so the padding after it changes
        # nothing: dropping it gives the same embedding about 5x cheaper.
        eos = self.text.config.eos_token_id
        length = int((input_ids == eos).int().argmax(dim=1).max()) + 1
        pooled = self.text(input_ids=input_ids[:, :length]).pooler_output  # the EOS token's state
        return F.normalize(self.text_projection(pooled), dim=-1)


class ToyAesthetic(nn.Module):
    """Image -> one preference score, standardised over the toy render distribution."""

    def __init__(self):
        super().__init__()
        self.net = ImageTower(1, width=16, hidden=64)
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.raw(images) - self.offset) / self.scale
