"""Sizes of real-size HyperAlign predictors: targets, parameters, file size, generated LoRA per sample.

    python scripts/model_sizes.py            # the table (meta device: no weights allocated, ~seconds)
    python scripts/model_sizes.py --rank 16  # another rank

The main table uses one preset for every family that has it; a second table lists each SDXL preset.

Hypernets are built on the meta device, so the numbers come from shapes alone; one bf16 SD1.5
predictor is also written to a temporary folder to show the real file size next to the estimate.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperalign import HyperNet, HypernetConfig, new_predictor, save_predictor  # noqa: E402
from hyperalign.targets import FLUX, SD15, SDXL, build_table, preset_names  # noqa: E402

MB = 1024 * 1024
# perception-encoder width and prompt-token width of the real models (see the brief's conventions)
FAMILIES = {
    SD15: dict(feature_dim=1280, context_dim=768),
    FLUX: dict(feature_dim=3072, context_dim=768),
    SDXL: dict(feature_dim=1280, context_dim=2048),  # middle block width; CLIP-L + OpenCLIP-G token width
}


@dataclass
class Row:
    family: str
    preset: str
    dim: int
    rank: int
    targets: int
    params: int
    file_fp32_mb: float
    file_bf16_mb: float
    factors: int

    def cells(self) -> list[str]:
        return [
            self.family,
            self.preset,
            str(self.dim),
            str(self.rank),
            str(self.targets),
            f"{self.params / 1e6:.2f} M",
            f"{self.file_fp32_mb:.1f}",
            f"{self.file_bf16_mb:.1f}",
            f"{self.factors / 1e6:.3f} M",
            f"{self.factors * 4 / MB:.2f}",
            f"{self.factors * 2 / MB:.2f}",
        ]


HEADER = [
    "family",
    "preset",
    "dim",
    "rank",
    "targets",
    "trainable",
    "file fp32 MB",
    "file bf16 MB",
    "factors/sample",
    "MB/sample fp32",
    "MB/sample bf16",
]


def measure(family: str, dim: int | None, rank: int, preset: str) -> Row:
    extra = {"dim": dim} if dim else {}
    cfg = HypernetConfig(**FAMILIES[family], rank=rank, **extra)
    targets = build_table(family).preset(preset)
    with torch.device("meta"):
        net = HyperNet(cfg, targets)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    stored = sum(t.numel() for t in net.state_dict().values())
    factors = sum(cfg.rank * (t.in_features + t.out_features) for t in targets)  # down (r, i) + up (o, r)
    return Row(family, preset, cfg.dim, cfg.rank, len(targets), params, stored * 4 / MB, stored * 2 / MB, factors)


def real_bf16_file_mb(rank: int, preset: str) -> tuple[float, int]:
    """Write the default SD1.5 predictor in bf16 and return its size on disk (MB) and its tensor bytes."""
    torch.manual_seed(0)
    predictor = new_predictor(SD15, HypernetConfig(**FAMILIES[SD15], rank=rank), targets=preset)
    tensor_bytes = sum(t.numel() * 2 for t in predictor.hypernet.state_dict().values())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "sd15_default_bf16.safetensors")
        save_predictor(path, predictor, dtype=torch.bfloat16)
        return os.path.getsize(path) / MB, os.path.getsize(path) - tensor_bytes


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=HypernetConfig(1, 0).rank)
    parser.add_argument("--preset", default="attn", help="target preset (default: attn, every family has it)")
    args = parser.parse_args(argv)
    default_dim = HypernetConfig(1, 0).dim
    families = [family for family in FAMILIES if args.preset in preset_names(family)]
    rows = [measure(family, dim, args.rank, args.preset) for family in families for dim in (None, 512)]
    print(
        f"HyperAlign predictor sizes (preset {args.preset!r}; dim {default_dim} is the default; "
        "file sizes exclude the JSON header)"
    )
    print_table([HEADER] + [r.cells() for r in rows])
    xl = [measure(SDXL, dim, args.rank, preset) for preset in preset_names(SDXL) for dim in (None, 512)]
    print(
        "\nSDXL presets (attn: every attention Linear; attn_conv: plus the ResNet 3x3 convolutions; cross_attn: attn2 "
        "only; cross_kv: attn2 to_k/to_v only)"
    )
    print_table([HEADER] + [r.cells() for r in xl])
    size, overhead = real_bf16_file_mb(args.rank, args.preset)
    estimate = measure(SD15, None, args.rank, args.preset).file_bf16_mb
    print(
        f"\nSD1.5 default predictor written in bf16: {size:.2f} MB on disk "
        f"(estimate {estimate:.2f} MB + {overhead / 1024:.1f} KiB header)"
    )


if __name__ == "__main__":
    main()
