"""Writing what the build made: the diffusers model folder, prompt files, sizes, the samples grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .. import ASSET_FOLDERS, world

GENERATED = (*ASSET_FOLDERS, "report.json", "samples.png")


def clean(out: Path) -> None:
    """Remove what an earlier build wrote (and nothing else) from `out`."""
    for name in GENERATED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def write_prompts(out: Path, train_specs, heldout_specs) -> None:
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    for name, specs in (("train", train_specs), ("heldout", heldout_specs)):
        (folder / f"{name}.txt").write_text("".join(world.prompt_of(s) + "\n" for s in specs))


def save_model(out: Path, vae, text_encoder, unet) -> None:
    """A StableDiffusionPipeline folder; UNet and VAE in fp16 (diffusers loads them as fp32 by default)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from ..nets import scheduler_config
    from ..vocab import write_tokenizer

    folder = out / "model"
    write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=DDPMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    _drop_source_paths(folder)
    shutil.rmtree(folder / "tokenizer")  # keep vocab.json + merges.txt (what every CLIP tokenizer reads)
    write_tokenizer(folder / "tokenizer")
    vae.float(), unet.float()


def load_pipe(out: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _drop_source_paths(folder: Path) -> None:
    """A model loaded from disk (``--reuse-model``) remembers where it came from in ``_name_or_path``;
    the published folder must not carry the builder's paths."""
    import json

    for config in folder.glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def sizes(out: Path) -> dict:
    result = {}
    for name in ASSET_FOLDERS:
        files = [p for p in (out / name).rglob("*") if p.is_file()]
        result[name] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    result["total_bytes"] = sum(v["bytes"] for v in result.values())
    return result


def samples_grid(out: Path, pipe, prompts: list[str], seed: int, steps: int, guidance: float) -> None:
    """samples.png: the ideal render of each prompt above the base model's sample."""
    from PIL import Image

    from .diffusion import sample

    ideal = world.render_batch(
        [world.parse_prompt(p) for p in prompts], [world.Style()] * len(prompts), list(range(len(prompts)))
    )
    images = sample(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
    made = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    grid = np.concatenate([np.concatenate(list(ideal), 1), np.concatenate(list(made), 1)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(out / "samples.png")
