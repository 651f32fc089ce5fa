"""FLOPs of HyperAlign's perception encoder against a plain CFG step, for the real SDXL UNet (meta device).

    python benchmarks/encoder_flops.py            # latent sides 8, 64 and 128 (128 = 1024 px)

An S-mode step adds one encoder pass (input blocks and middle block, on the B positive rows) to the two-row CFG
step; P and I add it at their few prediction steps. Counted with torch's FlopCounterMode on a diffusers
UNet2DConditionModel built on the meta device (no weights, seconds), so the share holds wherever sampling is
compute-bound (GPUs at real resolutions); on a CPU at tiny latents reading the weights dominates instead
(docs/performance.md).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the fields that shape it
SDXL_CONFIG = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


class _Stop(Exception):
    """Raised after the middle block: the encoder ends there."""


def _stop(module, args, output):
    raise _Stop


def count(unet, rows: int, side: int, encoder_only: bool) -> int:
    meta = dict(device="meta")
    added = {"text_embeds": torch.zeros(rows, 1280, **meta), "time_ids": torch.zeros(rows, 6, **meta)}
    handle = unet.mid_block.register_forward_hook(_stop) if encoder_only else None
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            unet(
                torch.zeros(rows, 4, side, side, **meta),
                torch.zeros(rows, **meta),
                encoder_hidden_states=torch.zeros(rows, 77, 2048, **meta),
                added_cond_kwargs=added,
            )
    except _Stop:
        pass
    finally:
        if handle is not None:
            handle.remove()
    return counter.get_total_flops()


def main(argv=None) -> None:
    from diffusers import UNet2DConditionModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, nargs="+", default=[8, 64, 128])
    args = parser.parse_args(argv)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_CONFIG).eval()
    print("| latent | plain CFG step (2 rows) TFLOP | encoder (1 row) TFLOP | encoder / step |")
    print("|---|---|---|---|")
    for side in args.latent:
        step, encoder = count(unet, 2, side, False), count(unet, 1, side, True)
        print(f"| {side}x{side} | {step / 1e12:.3f} | {encoder / 1e12:.3f} | {encoder / step:.3f} |")


if __name__ == "__main__":
    main()
