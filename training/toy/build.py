"""Regenerate every toy asset: ``python -m training.toy.build [--out DIR] [--threads 2] [--quick]``.

Stages (each seeded from --seed; torch runs deterministic kernels on a fixed number of threads):
prompts and renders -> tokenizer -> VAE -> toy_clip (its text tower becomes the generator's text
encoder, as CLIP's does in SD1.5) -> toy_aesthetic -> UNet -> model folder -> preference pairs ->
base-model scores (report.json, samples.png). ``--quick`` runs a few steps of each, for smoke tests;
its assets are useless. See training/toy/README.md for sizes, times and scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import ASSETS, world
from .renders import render_pool

logger = logging.getLogger("training.toy.build")
ROUND_TRIPS = 2  # renders per scene that the rewards also see through the VAE
GENERATED = ("model", "rewards", "prefs", "prompts", "report.json", "samples.png")


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    threads: int = 2
    per_spec: int = 8  # renders of each scene in the training pool
    vae_steps: int = 1200
    vae_batch: int = 64
    clip_steps: int = 1200
    clip_groups: int = 24  # a batch is groups x (scene + one hard negative per attribute)
    aesthetic_steps: int = 600
    aesthetic_batch: int = 128
    unet_steps: int = 2500
    unet_batch: int = 128
    unet_lr: float = 1e-3
    pairs: int = 300
    eval_prompts: int = 64  # per split
    eval_steps: int = 20
    eval_guidance: float = 5.0


QUICK = BuildConfig(
    per_spec=2,
    vae_steps=4,
    clip_steps=4,
    clip_groups=4,
    aesthetic_steps=4,
    aesthetic_batch=8,
    unet_steps=4,
    unet_batch=8,
    pairs=6,
    eval_prompts=4,
    eval_steps=2,
)


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                logger.info("stage %s ...", name)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = round(time.perf_counter() - self.start, 1)
                logger.info("stage %s done in %.1f s", name, timer.seconds[name])

        return _Stage()


def _clean(out: Path) -> None:
    for name in GENERATED:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _write_prompts(out: Path, train_specs, heldout_specs) -> None:
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    for name, specs in (("train", train_specs), ("heldout", heldout_specs)):
        (folder / f"{name}.txt").write_text("".join(world.prompt_of(s) + "\n" for s in specs))


def _round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """What the generator can express: images through the VAE, as uint8 (n, 3, 32, 32)."""
    from .codec import decode, encode

    mean, _ = encode(vae, images)
    return (decode(vae, mean) * 255).round().to(torch.uint8)


def _save_model(out: Path, vae, clip, unet) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from .nets import scheduler_config
    from .vocab import write_tokenizer

    folder = out / "model"
    write_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True)
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=clip.text,
        tokenizer=tokenizer,
        unet=unet.half(),
        scheduler=DDPMScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")  # keep vocab.json + merges.txt (what every CLIP tokenizer reads)
    write_tokenizer(folder / "tokenizer")
    vae.float(), unet.float()


def _load_pipe(out: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"), safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sizes(out: Path) -> dict:
    sizes = {}
    for name in ("model", "rewards", "prefs", "prompts"):
        files = [p for p in (out / name).rglob("*") if p.is_file()]
        sizes[name] = {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    sizes["total_bytes"] = sum(v["bytes"] for v in sizes.values())
    return sizes


def _samples_grid(out: Path, pipe, prompts: list[str], seed: int, cfg: BuildConfig) -> None:
    """Rows: ideal render, base sample; 16 prompts (8 train, 8 held-out)."""
    from PIL import Image

    from .diffusion import sample

    ideal = world.render_batch(
        [world.parse_prompt(p) for p in prompts], [world.Style()] * len(prompts), list(range(len(prompts)))
    )
    images = sample(pipe, prompts, seed=seed, steps=cfg.eval_steps, guidance=cfg.eval_guidance)
    made = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    grid = np.concatenate([np.concatenate(list(ideal), 1), np.concatenate(list(made), 1)], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "samples.png")


def build(out: Path, cfg: BuildConfig) -> dict:
    from .codec import encode, scaling_factor, train_vae
    from .diffusion import embed_prompts, train_unet
    from .nets import text_config
    from .prefs import write_pairs
    from .rewards import load_toy_aesthetic, load_toy_clip, save_reward
    from .scorers import aesthetic_accuracy, clip_accuracy, train_aesthetic, train_clip
    from .vocab import WordTokenizer, build_vocab

    timer, report = Timer(), {"config": asdict(cfg)}
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    train_specs, heldout_specs = world.split_specs()
    specs = world.all_specs()
    with timer("renders"):
        _write_prompts(out, train_specs, heldout_specs)
        pool = render_pool(specs, cfg.per_spec, cfg.seed + 1)
        fresh = render_pool(specs, 1, cfg.seed + 2)  # evaluation renders, never trained on
        train_rows = np.flatnonzero([not s.heldout for s in pool.specs for _ in range(cfg.per_spec)])
    vocab, _ = build_vocab()
    tokenizer = WordTokenizer(vocab)
    token_ids = tokenizer(pool.prompts)

    with timer("vae"):
        vae = train_vae(pool.tensor(train_rows), cfg.vae_steps, cfg.vae_batch, cfg.seed + 3, cfg.threads, logger.info)
        check = fresh.tensor(np.flatnonzero([not s.heldout for s in fresh.specs]))
        recon = _round_trip(vae, check).float() / 255
        report["vae"] = {"recon_mse_fresh": round((recon - check).pow(2).mean().item(), 6)}
        # The rewards also learn from VAE round trips (what generated images look like): the first
        # ROUND_TRIPS renders of each scene are swapped for their round trip half of the time.
        tripped = np.flatnonzero(np.arange(len(pool.images)) % cfg.per_spec < ROUND_TRIPS)
        slot = torch.full((len(pool.images),), -1, dtype=torch.long)
        slot[tripped] = torch.arange(len(tripped))
        round_trip = _round_trip(vae, pool.tensor(tripped))

    def augment(images, generator, rows):
        where = slot[torch.as_tensor(rows)]
        swap = (torch.rand(len(rows), generator=generator) < 0.5) & (where >= 0)
        return torch.where(swap.view(-1, 1, 1, 1), round_trip[where.clamp(min=0)].float() / 255, images)

    with timer("toy_clip"):
        clip = train_clip(
            pool,
            text_config(vocab),
            token_ids,
            cfg.clip_steps,
            cfg.clip_groups,
            cfg.seed + 4,
            cfg.threads,
            logger.info,
            augment,
        )
    with timer("toy_aesthetic"):
        aesthetic = train_aesthetic(
            pool, cfg.aesthetic_steps, cfg.aesthetic_batch, cfg.seed + 5, cfg.threads, logger.info, augment
        )
    meta_clip = {"kind": "toy_clip", "text_config": clip.text.config.to_dict(), "vocab": vocab}
    save_reward(out / "rewards" / "toy_clip.safetensors", clip, meta_clip)
    save_reward(out / "rewards" / "toy_aesthetic.safetensors", aesthetic, {"kind": "toy_aesthetic"})

    with timer("unet"):
        latent_mean, latent_std = encode(vae, pool.tensor(train_rows))
        scaling = scaling_factor(latent_mean)
        vae.register_to_config(scaling_factor=scaling)
        train_prompt_ids = token_ids[[i for i, s in enumerate(pool.specs) if not s.heldout]]
        contexts = embed_prompts(clip.text, train_prompt_ids)
        empty = embed_prompts(clip.text, tokenizer([""]))
        context_of_row = torch.arange(len(train_rows)) // cfg.per_spec
        unet = train_unet(
            latent_mean,
            latent_std,
            contexts,
            context_of_row,
            empty,
            scaling,
            cfg.unet_steps,
            cfg.unet_batch,
            cfg.seed + 6,
            cfg.threads,
            logger.info,
            lr=cfg.unet_lr,
        )
    _save_model(out, vae, clip, unet)

    with timer("prefs"):
        report["prefs"] = write_pairs(out / "prefs", train_specs, cfg.pairs, cfg.seed + 7)

    with timer("evaluate"):
        rewards = _shipped_rewards(out)
        clip_r, aesthetic_r = (
            load_toy_clip(rewards[0], "cpu", torch.float32),
            load_toy_aesthetic(rewards[1], "cpu", torch.float32),
        )
        fresh_ids = tokenizer(fresh.prompts)
        report["toy_clip"] = {
            split: clip_accuracy(clip, _subset(fresh, held), token_ids, fresh_ids, fresh.specs, cfg.seed + 8)
            for split, held in (("train_prompts", False), ("heldout_prompts", True))
        }
        report["toy_aesthetic"] = aesthetic_accuracy(aesthetic, fresh, 2000, cfg.seed + 9)
        pipe = _load_pipe(out)
        prompt_sets = {
            "train": _sample([world.prompt_of(s) for s in train_specs], cfg.eval_prompts, cfg.seed + 10),
            "heldout": _sample([world.prompt_of(s) for s in heldout_specs], cfg.eval_prompts, cfg.seed + 11),
        }
        from .baseline import evaluate_base

        report["base_model"] = evaluate_base(
            pipe, clip_r, aesthetic_r, prompt_sets, cfg.seed + 12, cfg.eval_steps, cfg.eval_guidance
        )
        _samples_grid(out, pipe, prompt_sets["train"][:8] + prompt_sets["heldout"][:8], cfg.seed + 13, cfg)
    report["vae"]["scaling_factor"] = scaling
    report["sizes"] = _sizes(out)
    report["seconds"] = {**timer.seconds, "total": round(time.perf_counter() - started, 1)}
    report["environment"] = {
        "threads": cfg.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _subset(pool, heldout: bool):
    from .renders import RenderPool

    keep = [i for i, s in enumerate(pool.specs) if s.heldout == heldout]
    rows = np.concatenate([np.arange(i * pool.per_spec, (i + 1) * pool.per_spec) for i in keep])
    return RenderPool([pool.specs[i] for i in keep], pool.per_spec, pool.images[rows], pool.styles[rows])


def _sample(prompts: list[str], count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in sorted(rng.choice(len(prompts), size=min(count, len(prompts)), replace=False))]


def _shipped_rewards(out: Path):
    from types import SimpleNamespace

    return [
        SimpleNamespace(name=name, weight=1.0, path=str(out / "rewards" / f"{name}.safetensors"), options={})
        for name in ("toy_clip", "toy_aesthetic")
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="asset folder (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke test, not assets")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override BuildConfig fields")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = replace(QUICK if args.quick else BuildConfig(), seed=args.seed, threads=args.threads)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in BuildConfig.__dataclass_fields__:
            raise SystemExit(
                f"HyperAlign: unknown build setting {key!r}; allowed: {sorted(BuildConfig.__dataclass_fields__)}"
            )
        cfg = replace(cfg, **{key: type(getattr(cfg, key))(value)})
    report = build(args.out, cfg)
    logger.info("done in %.0f s; report: %s", report["seconds"]["total"], args.out / "report.json")


if __name__ == "__main__":
    main()
