"""Encode the preferred images of the preference data once, so training skips JPEG decoding and the VAE encoder.

    python -m training.cache_latents --config training/configs/sd15.yaml data.latents_dir=cache/sd15_pickapic

Writes ``shard_XXXXXX.safetensors`` files (``latents``: (n, c, h, w) in ``model.base_dtype``, rows in
dataset order) and ``meta.json`` into ``data.latents_dir``; a training run with the same model,
resolution and data reads them instead of the images (and refuses a cache made from anything else).
Only the VAE is loaded. Under ``accelerate launch``/``torchrun`` the shards are split across ranks.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

from hyperalign.atomic import atomic_path, write_json

from .cli import cli, parse, print_check


def _extra(p) -> None:
    p.add_argument("--shard-size", type=int, default=1024, help="rows per shard file (default 1024)")
    p.add_argument("--batch", type=int, default=16, help="images per VAE call (default 16)")


@cli
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv, __doc__, "python -m training.cache_latents", _extra)
    from .data import cache_expectation, load_image, read_preferences, shard_name
    from .engine import make_accelerator, setup_logging
    from .models import DTYPES, encode_images, load_vae
    from .paths import check_model_source, require_path

    if not cfg.data.latents_dir:
        raise ValueError("HyperAlign: set data.latents_dir to the folder the latents should go to.")
    if cfg.data.preference == "none":
        raise ValueError("HyperAlign: data.preference is 'none': there are no preferred images to cache.")
    check_model_source(cfg.model.path, "model.path", "model_index.json")
    if cfg.data.preference != "pickapic":
        require_path(cfg.data.path, "data.path", "preference data", "see training/README.md", kind="file")
    if args.check:
        return print_check(cfg, args)
    accelerator = make_accelerator(cfg)
    setup_logging(accelerator, cfg.run_dir)
    rows = read_preferences(cfg.data)
    vae = load_vae(cfg.model, accelerator.device)
    folder = cfg.data.latents_dir
    os.makedirs(folder, exist_ok=True)
    shards = range(accelerator.process_index, -(-len(rows) // args.shard_size), accelerator.num_processes)
    for shard in shards:
        first, stop = shard * args.shard_size, min(len(rows), (shard + 1) * args.shard_size)
        parts = []
        for start in range(first, stop, args.batch):
            images = torch.stack(
                [load_image(rows.image(i), cfg.model.resolution) for i in range(start, min(stop, start + args.batch))]
            )
            parts.append(encode_images(vae, images, accelerator.device).to(DTYPES[cfg.model.base_dtype]).cpu())
        with atomic_path(os.path.join(folder, shard_name(shard)), suffix=".safetensors.tmp") as tmp:
            save_file({"latents": torch.cat(parts).contiguous()}, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = dict(cache_expectation(cfg, rows), shard_size=args.shard_size)
        write_json(os.path.join(folder, "meta.json"), meta)
        print(f"cached {len(rows)} latents in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
