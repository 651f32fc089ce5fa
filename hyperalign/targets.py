"""The one table of LoRA target layers, for SD1.5- and SDXL-family UNets and FLUX-family DiTs.

Rows are generated from a few architecture numbers (as ComfyUI derives its key maps in
``unet_to_diffusers`` / ``flux_to_diffusers``), so the same code serves the real models and the
tiny ones the tests and the toy world build. No other module spells a layer name.

A row names one diffusers ``nn.Linear`` or ``nn.Conv2d`` (its path is the canonical id, what training
produces), the ComfyUI module that computes it (under ``diffusion_model.``) and, for FLUX, the output
slice of ComfyUI's fused layer (``img_attn.qkv``, ``txt_attn.qkv``, single-block ``linear1``) that it is.
A convolution's LoRA is LoCon's: ``down`` is a (r, c, kh, kw) kernel stored flat as (r, c*kh*kw), ``up`` a
1x1 (o, r), so its ``in_features`` is c*kh*kw and ``up @ down`` reshaped is the weight's update.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

SD15 = "sd15"
FLUX = "flux"
SDXL = "sdxl"
FAMILIES = (SD15, FLUX, SDXL)


@dataclass(frozen=True)
class Target:
    id: str  # diffusers module path: canonical, stored in predictor files
    comfy: str  # ComfyUI module path under `diffusion_model.`
    in_features: int
    out_features: int
    out_slice: tuple[int, int] | None = None  # rows of ComfyUI's fused output this layer is
    kernel: tuple[int, int] | None = None  # a Conv2d's (kh, kw); None: a Linear

    @property
    def in_channels(self) -> int:
        """A convolution's input channels (a Linear's in_features)."""
        return self.in_features // (self.kernel[0] * self.kernel[1]) if self.kernel else self.in_features


def _check_arch_int(name: str, value, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"HyperAlign: {name} must be an integer in [{low}, {high}], got {value!r}.")


@dataclass(frozen=True)
class UNetArch:
    """The numbers of an SD1.5-style UNet that decide its attention layers."""

    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    transformer_depth: int = 1
    context_dim: int = 768
    mid_attention: bool = True

    def __post_init__(self):
        # these numbers also come from predictor file headers: bound them before a table is generated
        for name in ("block_channels", "attention_levels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 8:
                raise ValueError(f"HyperAlign: unet {name} must be a list of 1 to 8 entries, got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        if len(self.block_channels) != len(self.attention_levels):
            raise ValueError(
                f"HyperAlign: block_channels {self.block_channels} and attention_levels "
                f"{self.attention_levels} must have one entry per resolution level."
            )
        for width in self.block_channels:
            _check_arch_int("unet block_channels entry", width, 1, 65536)
        if not all(isinstance(flag, bool) for flag in (*self.attention_levels, self.mid_attention)):
            raise ValueError("HyperAlign: unet attention_levels and mid_attention must be true/false values.")
        _check_arch_int("unet layers_per_block", self.layers_per_block, 1, 16)
        _check_arch_int("unet transformer_depth", self.transformer_depth, 1, 64)
        _check_arch_int("unet context_dim", self.context_dim, 1, 65536)


@dataclass(frozen=True)
class DiTArch:
    """The numbers of a FLUX-style DiT that decide its attention layers."""

    hidden_size: int = 3072
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0

    def __post_init__(self):
        _check_arch_int("dit hidden_size", self.hidden_size, 1, 65536)
        _check_arch_int("dit depth", self.depth, 0, 256)
        _check_arch_int("dit depth_single_blocks", self.depth_single_blocks, 0, 256)
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 64:  # NaN fails too
            raise ValueError(f"HyperAlign: dit mlp_ratio must be a number in (0, 64], got {ratio!r}.")
        if self.mlp_hidden < 1:
            raise ValueError(
                f"HyperAlign: dit mlp_ratio {ratio!r} leaves no MLP width at hidden_size {self.hidden_size}."
            )

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class XLUNetArch:
    """The numbers of an SDXL-style UNet: a transformer depth per resolution level (0: no attention there)."""

    block_channels: tuple[int, ...] = (320, 640, 1280)
    transformer_depths: tuple[int, ...] = (0, 2, 10)
    mid_depth: int = 10  # transformer blocks in the middle block (0: none)
    layers_per_block: int = 2
    context_dim: int = 2048  # CLIP-L (768) and OpenCLIP-G (1280) hidden states, concatenated

    def __post_init__(self):
        for name in ("block_channels", "transformer_depths"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 8:
                raise ValueError(f"HyperAlign: unet {name} must be a list of 1 to 8 entries, got {value!r}.")
            object.__setattr__(self, name, tuple(value))
        if len(self.block_channels) != len(self.transformer_depths):
            raise ValueError(
                f"HyperAlign: block_channels {self.block_channels} and transformer_depths "
                f"{self.transformer_depths} must have one entry per resolution level."
            )
        for width in self.block_channels:
            _check_arch_int("unet block_channels entry", width, 1, 65536)
        for depth in self.transformer_depths:
            _check_arch_int("unet transformer_depths entry", depth, 0, 64)
        _check_arch_int("unet mid_depth", self.mid_depth, 0, 64)
        _check_arch_int("unet layers_per_block", self.layers_per_block, 1, 16)
        _check_arch_int("unet context_dim", self.context_dim, 1, 65536)


SD15_ARCH = UNetArch()
FLUX_ARCH = DiTArch()
SDXL_ARCH = XLUNetArch()

_ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def _site_rows(diffusers_prefix: str, comfy_prefix: str, width: int, depth: int, context_dim: int) -> list[Target]:
    """The attention Linears of one spatial transformer (`depth` transformer blocks of width `width`)."""
    rows = []
    for d in range(depth):
        block = f"transformer_blocks.{d}"
        for attn in ("attn1", "attn2"):
            for proj in _ATTN_PROJ:
                from_context = attn == "attn2" and proj in ("to_k", "to_v")
                rows.append(
                    Target(
                        id=f"{diffusers_prefix}.{block}.{attn}.{proj}",
                        comfy=f"{comfy_prefix}.{block}.{attn}.{proj}",
                        in_features=context_dim if from_context else width,
                        out_features=width,
                    )
                )
    return rows


_RESNET_KERNEL = (3, 3)


def _resnet_rows(diffusers_prefix: str, comfy_prefix: str, in_channels: int, out_channels: int) -> list[Target]:
    """The two 3x3 convolutions of one ResNet block (ComfyUI's ResBlock: ``in_layers.2`` and ``out_layers.3``)."""
    area = _RESNET_KERNEL[0] * _RESNET_KERNEL[1]
    return [
        Target(
            f"{diffusers_prefix}.{conv}", f"{comfy_prefix}.{comfy}", channels * area, out_channels, None, _RESNET_KERNEL
        )
        for conv, comfy, channels in (("conv1", "in_layers.2", in_channels), ("conv2", "out_layers.3", out_channels))
    ]


def _unet_resnet_rows(channels: tuple[int, ...], layers_per_block: int) -> list[Target]:
    """Every ResNet block's convolutions, with diffusers' channel arithmetic: an up block's ResNet j reads the
    previous block's output (j = 0) or its own width, concatenated with the skip of the matching down ResNet."""
    levels, per_level, rows = len(channels), layers_per_block + 1, []
    for level, width in enumerate(channels):
        for j in range(layers_per_block):
            in_ch = channels[max(level - 1, 0)] if j == 0 else width
            rows += _resnet_rows(
                f"down_blocks.{level}.resnets.{j}", f"input_blocks.{1 + level * per_level + j}.0", in_ch, width
            )
    for j, comfy in enumerate(("middle_block.0", "middle_block.2")):
        rows += _resnet_rows(f"mid_block.resnets.{j}", comfy, channels[-1], channels[-1])
    for up in range(levels):
        level = levels - 1 - up
        width, previous, skip_level = channels[level], channels[min(level + 1, levels - 1)], channels[max(level - 1, 0)]
        for j in range(per_level):
            skip = skip_level if j == layers_per_block else width
            rows += _resnet_rows(
                f"up_blocks.{up}.resnets.{j}",
                f"output_blocks.{up * per_level + j}.0",
                (previous if j == 0 else width) + skip,
                width,
            )
    return rows


def _unet_rows(
    channels: tuple[int, ...], depths: tuple[int, ...], mid_depth: int, layers_per_block: int, context_dim: int
) -> list[Target]:
    """Down, middle and up attention sites of a UNet with `depths[level]` transformer blocks per site (0: none),
    then every ResNet block's convolutions.

    ComfyUI numbers input blocks 1 + level * (layers + 1) + j (a downsample takes the last index of a level, or is
    absent at the last level) and output blocks up * (layers + 1) + j; the ResNet block is sub-module 0 of each,
    the transformer sub-module 1."""
    levels, per_level = len(channels), layers_per_block + 1
    rows = []
    for level, (width, depth) in enumerate(zip(channels, depths)):
        for j in range(layers_per_block if depth else 0):
            rows += _site_rows(
                f"down_blocks.{level}.attentions.{j}",
                f"input_blocks.{1 + level * per_level + j}.1",
                width,
                depth,
                context_dim,
            )
    rows += _site_rows("mid_block.attentions.0", "middle_block.1", channels[-1], mid_depth, context_dim)
    for up in range(levels):
        level = levels - 1 - up
        for j in range(per_level if depths[level] else 0):
            rows += _site_rows(
                f"up_blocks.{up}.attentions.{j}",
                f"output_blocks.{up * per_level + j}.1",
                channels[level],
                depths[level],
                context_dim,
            )
    return rows + _unet_resnet_rows(channels, layers_per_block)


def _sd15_rows(arch: UNetArch) -> list[Target]:
    depths = tuple(arch.transformer_depth if has_attn else 0 for has_attn in arch.attention_levels)
    mid_depth = arch.transformer_depth if arch.mid_attention else 0
    return _unet_rows(arch.block_channels, depths, mid_depth, arch.layers_per_block, arch.context_dim)


def _sdxl_rows(arch: XLUNetArch) -> list[Target]:
    return _unet_rows(
        arch.block_channels, arch.transformer_depths, arch.mid_depth, arch.layers_per_block, arch.context_dim
    )


def _flux_rows(arch: DiTArch) -> list[Target]:
    h, rows = arch.hidden_size, []
    qkv = {"q": (0, h), "k": (h, 2 * h), "v": (2 * h, 3 * h)}
    for i in range(arch.depth):
        base, comfy = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for name in ("q", "k", "v"):
            rows.append(Target(f"{base}.attn.to_{name}", f"{comfy}.img_attn.qkv", h, h, qkv[name]))
        rows.append(Target(f"{base}.attn.to_out.0", f"{comfy}.img_attn.proj", h, h))
        for name in ("q", "k", "v"):
            rows.append(Target(f"{base}.attn.add_{name}_proj", f"{comfy}.txt_attn.qkv", h, h, qkv[name]))
        rows.append(Target(f"{base}.attn.to_add_out", f"{comfy}.txt_attn.proj", h, h))
    for i in range(arch.depth_single_blocks):
        base, comfy = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for name in ("q", "k", "v"):
            rows.append(Target(f"{base}.attn.to_{name}", f"{comfy}.linear1", h, h, qkv[name]))
        rows.append(
            Target(f"{base}.proj_mlp", f"{comfy}.linear1", h, arch.mlp_hidden, (3 * h, 3 * h + arch.mlp_hidden))
        )
        rows.append(Target(f"{base}.proj_out", f"{comfy}.linear2", h + arch.mlp_hidden, h))
    return rows


def _attention(t: Target) -> bool:
    return ".attn1." in t.id or ".attn2." in t.id


def _attention_or_conv(t: Target) -> bool:
    return _attention(t) or t.kernel is not None


# Named subsets: each is a predicate over a row (its id, or its kernel). "attn" is the default for every family.
# "attn_conv" adds the ResNet blocks' convolutions: in the toy world's probe (toyworld/README.md) a supervised rank-8
# LoRA on attention alone corrected a third as much of the base model's shape errors as the whole UNet, with the
# convolutions nearly as much.
_PRESETS = {
    SD15: {
        "attn": _attention,
        "attn_conv": _attention_or_conv,
        "cross_attn": lambda t: ".attn2." in t.id,
        "self_attn": lambda t: ".attn1." in t.id,
    },
    FLUX: {
        "attn": lambda t: ".attn." in t.id,
        "double_attn": lambda t: t.id.startswith("transformer_blocks.") and ".attn." in t.id,
        "img_attn": lambda t: ".attn.to_" in t.id and "to_add_out" not in t.id,
        "attn_mlp": lambda t: True,
    },
    SDXL: {
        "attn": _attention,
        "attn_conv": _attention_or_conv,
        "cross_attn": lambda t: ".attn2." in t.id,
        # the lighter one: only the cross-attention key and value projections of the text (as Custom Diffusion
        # fine-tunes), a quarter of the attention Linears
        "cross_kv": lambda t: ".attn2.to_k" in t.id or ".attn2.to_v" in t.id,
    },
}
DEFAULT_PRESET = "attn"


@dataclass(frozen=True)
class TargetTable:
    family: str
    arch: UNetArch | DiTArch | XLUNetArch
    rows: tuple[Target, ...] = field(repr=False)

    def by_id(self) -> dict[str, Target]:
        return {t.id: t for t in self.rows}

    def select(self, ids: list[str] | tuple[str, ...]) -> list[Target]:
        """Rows for `ids`, in that order; an unknown id is an error that names it."""
        index = self.by_id()
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise ValueError(
                f"HyperAlign: {len(unknown)} target layer(s) do not exist in this {self.family} model, "
                f"e.g. {unknown[:3]}. HINT: the predictor was made for a different architecture; "
                f"use a predictor trained for this model."
            )
        return [index[i] for i in ids]

    def preset(self, name: str = DEFAULT_PRESET) -> list[Target]:
        presets = _PRESETS[self.family]
        if name not in presets:
            raise ValueError(
                f"HyperAlign: unknown target preset {name!r} for {self.family}; choose one of {sorted(presets)}."
            )
        return [t for t in self.rows if presets[name](t)]


def preset_names(family: str) -> list[str]:
    return sorted(_PRESETS[family])


_ARCH = {SD15: (UNetArch, _sd15_rows), FLUX: (DiTArch, _flux_rows), SDXL: (XLUNetArch, _sdxl_rows)}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"HyperAlign: unknown model family {family!r}; expected one of {FAMILIES}.")


def build_table(family: str, arch: UNetArch | DiTArch | XLUNetArch | dict | None = None) -> TargetTable:
    """All candidate target rows of one architecture (defaults: the real SD1.5 / FLUX.1 / SDXL base)."""
    _check_family(family)
    arch = arch_from_dict(family, arch) if isinstance(arch, dict) or arch is None else arch
    cls, rows_of = _ARCH[family]
    if not isinstance(arch, cls):
        raise ValueError(f"HyperAlign: {family} targets need {cls.__name__} numbers, got a {type(arch).__name__}.")
    return TargetTable(family, arch, tuple(rows_of(arch)))


def arch_from_dict(family: str, data: dict | None) -> UNetArch | DiTArch | XLUNetArch:
    _check_family(family)
    cls = _ARCH[family][0]
    data = dict(data or {})
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"HyperAlign: unknown {family} architecture keys {unknown}; allowed: {sorted(allowed)}.")
    for key, value in data.items():
        if isinstance(value, list):
            data[key] = tuple(value)
    return cls(**data)


def arch_to_dict(arch: UNetArch | DiTArch | XLUNetArch) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(arch).items()}


def targets_sha256(targets: list[Target] | tuple[Target, ...]) -> str:
    """A stable fingerprint of the ordered target rows (names, shapes, slices and, for convolutions, kernels)."""
    canonical = [
        [t.id, t.comfy, t.in_features, t.out_features, list(t.out_slice or [])] + ([list(t.kernel)] if t.kernel else [])
        for t in targets
    ]
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()
