"""Hooked side paths vs fused weights on the real SD1.5 attention layers: when does fusing pay?

The two ways HyperAlign applies a LoRA (``hyperalign.lora``) cost different things:
- hooked: every model call runs a forward hook and two small matmuls per target (the side path);
- fused: once per prediction, every target weight is copied and the LoRA merged into the copy; each
  model call then only swaps the weights in and out.
This script times both on the 128 attention Linears of the real-size SD1.5 UNet (random weights), each
fed the token count it sees at the given latent size (attn2 k/v: the 77 text tokens), CFG rows (2 per
sample). It prints the cost per model call of each path and the break-even: the model calls one prediction
must serve before fusing is cheaper. An I-mode run serves every call of the run; P mode a segment (about
steps / keysteps calls); S mode one call. Compare with a whole UNet call (docs/performance.md).

    python benchmarks/lora_paths.py --latent 8 32 64 --threads 1
    python benchmarks/lora_paths.py --device cuda --dtype fp16 --latent 64 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_measure import sync, timed  # noqa: E402

from hyperalign.lora import (  # noqa: E402
    LoRAState,
    fused_weights,
    hooked,
    resolve_modules,
    rows_to_samples,
    swapped_weights,
)
from hyperalign.targets import SD15, UNetArch, build_table  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEXT_TOKENS = 77
WIDTH_DOWNSCALE = {320: 1, 640: 2, 1280: 4}  # SD1.5: a level's width tells its downsampling


def tokens(target, latent: int) -> int:
    """Tokens a target's input holds at a latent of side `latent`."""
    if ".attn2.to_k" in target.id or ".attn2.to_v" in target.id:
        return TEXT_TOKENS
    down = 8 if target.id.startswith("mid_block") else WIDTH_DOWNSCALE[target.out_features]
    return max(1, latent // down) ** 2


class Layers(nn.Module):
    """The target Linears, registered under their ids (dots as underscores)."""

    def __init__(self, targets, device, dtype):
        super().__init__()
        for target in targets:
            layer = nn.Linear(target.in_features, target.out_features, device=device, dtype=dtype)
            self.add_module(target.id.replace(".", "_"), layer)


def median_seconds(fn, device, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, device).wall for _ in range(repeats))


def measure(latent: int, rows: int, rank: int, device, dtype, repeats: int) -> dict:
    targets = list(build_table(SD15, UNetArch()).rows)
    layers = Layers(targets, device, dtype).requires_grad_(False)
    resolved = resolve_modules(layers, targets, lambda t: t.id.replace(".", "_"))
    inputs = [torch.randn(rows, tokens(t, latent), t.in_features, device=device, dtype=dtype) for t in targets]
    factors = {
        t.id: (
            torch.randn(1, rank, t.in_features, device=device, dtype=dtype) * 0.01,
            torch.randn(1, t.out_features, rank, device=device, dtype=dtype) * 0.01,
        )
        for t in targets
    }

    def call():
        for (_, _, module), x in zip(resolved, inputs):
            module(x)

    state = LoRAState(scale=1.0)
    with torch.no_grad():
        plain = median_seconds(call, device, repeats)
        with hooked(resolved, state):
            state.bind(factors, rows_to_samples(rows, 1), device)
            hooked_call = median_seconds(call, device, repeats)
            state.clear()
        merged = {}

        def merge():
            merged.update(fused_weights(resolved, factors, 0, 1.0)[0])

        merge_time = median_seconds(merge, device, repeats)

        def fused_call():
            with swapped_weights(merged):
                call()

        fused = median_seconds(fused_call, device, repeats)
    side, swap = hooked_call - plain, fused - plain
    saved = side - swap
    return {
        "latent": latent,
        "plain_ms": plain * 1e3,
        "side_ms": side * 1e3,
        "swap_ms": swap * 1e3,
        "merge_ms": merge_time * 1e3,
        "break_even": merge_time / saved if saved > 0 else float("inf"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, nargs="+", default=[8, 32, 64], help="latent sides (64 = 512 px)")
    p.add_argument("--rows", type=int, default=2, help="rows per model call (2 = one sample with CFG)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("SD1.5: 128 attention Linears (real sizes), rank", args.rank, "| rows per call", args.rows)
    columns = ["latent", "128 Linears, plain ms", "hooked side path ms/call", "fused swap ms/call", "merge ms"]
    print("| " + " | ".join(columns + ["break-even calls"]) + " |")
    print("|---|---|---|---|---|---|")
    for latent in args.latent:
        r = measure(latent, args.rows, args.rank, device, DTYPES[args.dtype], args.repeats)
        print(
            f"| {r['latent']} | {r['plain_ms']:.1f} | {r['side_ms']:.2f} | {r['swap_ms']:.2f} | {r['merge_ms']:.1f} "
            f"| {r['break_even']:.1f} |"
        )
        sync(device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
