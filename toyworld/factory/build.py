"""Regenerate every toy asset: ``python -m toyworld.factory.build [--out DIR] [--threads 1] [--quick]``.

Stages, each seeded from --seed, each on a fixed number of torch threads with deterministic kernels:

1. prompts and renders (numpy, bit-exact everywhere);
2. in parallel, in two processes: the VAE (this process) and the two reward models (a spawned
   child: toy_clip, then toy_aesthetic); toy_clip's text tower becomes the generator's text
   encoder, as CLIP's does in SD1.5;
3. the UNet, on VAE latents and text-encoder states of the training prompts;
4. the rewards go on training on the base model's own samples, labelled by the ground-truth checker
   (toyworld/factory/grounding.py): toy_clip learns the scene each sample shows (optionally also its shape
   among the three, and to rank samples for their own prompts as the checker does); the build then
   measures how well the rewards rank fresh held-out samples;
5. the model folder, the preference pairs, and the base model's scores by ground truth and by the
   rewards (report.json, samples.png).

Two processes of one thread each use two cores without the thread-synchronisation stalls that a
two-thread torch suffers on a busy machine. ``--device cuda`` runs the training stages on a GPU (the same
config; results then match a CPU build only statistically). ``--quick`` runs a few steps of everything,
for smoke tests; its assets are useless. ``--reuse-model DIR`` takes the VAE and UNet of an earlier
build with the same config (checked) and redoes the rest. toyworld/README.md lists sizes, times and scores.

One file over 300 lines on purpose: the stage order, the build config and the report are read together.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import ASSETS, truth, world
from . import publish
from .renders import RenderPool, render_pool

logger = logging.getLogger("toyworld.factory.build")


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    threads: int = 1  # torch threads per process; results depend on it
    device: str = "cpu"
    parallel: bool = True  # train the rewards in a second process while the VAE trains
    per_spec: int = 8  # renders of each scene in the training pool
    vae_steps: int = 6000  # at 1500 the codec lost small squares (toyworld/README.md)
    vae_batch: int = 32
    clip_steps: int = 600
    clip_groups: int = 24  # a batch is groups x (scene + one hard negative per attribute)
    aesthetic_steps: int = 400
    aesthetic_batch: int = 64
    unet_steps: int = 6500  # held-out truth ~0.92: room to align (5000: shape at chance; 10000: 0.96)
    unet_batch: int = 32
    unet_lr: float = 2e-3
    unet_offset_noise: float = 0.1  # without it the background follows the starting noise (diffusion.train_unet)
    unet_colour_dropout: float = 0.0  # share of rows captioned without the shapes' colour (diffusion.train_unet)
    tune_passes: int = 6  # samples of every scene the rewards go on training with
    tune_guidances: tuple = (1.5, 3.0, 5.0, 7.5)
    tune_steps: int = 400  # toy_aesthetic
    tune_clip_steps: int = 4000
    # toy_clip: InfoNCE over the shape variants of the scene a sample shows, and ranking samples for their
    # own prompts as the checker does; toyworld/README.md gives what they measured.
    tune_shape_weight: float = 1.0
    tune_rank_weight: float = 1.0
    pairs: int = 300
    eval_prompts: int = 128  # per split
    agreement_noises: int = 8  # held-out samples per prompt on which the rewards are compared with truth
    eval_steps: int = 10  # as the comparison table samples
    eval_guidance: float = 5.0
    checker_images: int = 400


QUICK = BuildConfig(
    per_spec=2,
    vae_steps=4,
    clip_steps=4,
    clip_groups=4,
    aesthetic_steps=4,
    aesthetic_batch=8,
    unet_steps=4,
    unet_batch=8,
    tune_passes=1,
    tune_steps=2,
    tune_clip_steps=2,
    agreement_noises=1,
    pairs=6,
    eval_prompts=4,
    eval_steps=2,
    checker_images=8,
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


def train_rewards(cfg: BuildConfig, images: np.ndarray, styles: np.ndarray) -> dict:
    """Stage 2b (the child process): toy_clip and toy_aesthetic on the pool of every scene."""
    from ..nets import text_config
    from ..vocab import WordTokenizer, build_vocab
    from .scorers import train_aesthetic, train_clip

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [rewards] %(message)s", datefmt="%H:%M:%S")
    pool = RenderPool(world.all_specs(), cfg.per_spec, images, styles)
    vocab, _ = build_vocab()
    started = time.perf_counter()
    clip = train_clip(
        pool, text_config(vocab), WordTokenizer(vocab)(pool.prompts), cfg.clip_steps, cfg.clip_groups,
        cfg.seed + 4, cfg.threads, logger.info, cfg.device,
    )  # fmt: skip
    clip_seconds = time.perf_counter() - started
    aesthetic = train_aesthetic(
        pool, cfg.aesthetic_steps, cfg.aesthetic_batch, cfg.seed + 5, cfg.threads, logger.info, cfg.device
    )
    return {
        "clip": clip.state_dict(),
        "text_config": clip.text.config.to_dict(),
        "vocab": vocab,
        "aesthetic": aesthetic.state_dict(),
        "seconds": {
            "toy_clip": round(clip_seconds, 1),
            "toy_aesthetic": round(time.perf_counter() - started - clip_seconds, 1),
        },
    }


def _rebuild_rewards(trained: dict):
    from transformers import CLIPTextConfig

    from ..nets import ToyAesthetic, ToyClip

    clip = ToyClip(CLIPTextConfig(**trained["text_config"]))
    clip.load_state_dict(trained["clip"])
    aesthetic = ToyAesthetic()
    aesthetic.load_state_dict(trained["aesthetic"])
    return clip.eval().requires_grad_(False), aesthetic.eval().requires_grad_(False)


def _vae_and_rewards(cfg: BuildConfig, pool: RenderPool, train_rows: np.ndarray, timer: Timer):
    from .codec import train_vae

    def vae_stage():
        with timer("vae"):
            return train_vae(
                pool.tensor(train_rows), cfg.vae_steps, cfg.vae_batch, cfg.seed + 3, cfg.threads, logger.info,
                device=cfg.device,
            )  # fmt: skip

    if not cfg.parallel:
        vae = vae_stage()
        with timer("rewards"):
            trained = train_rewards(cfg, pool.images, pool.styles)
        return vae, trained
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
        with timer("vae+rewards (parallel)"):
            future = executor.submit(train_rewards, cfg, pool.images, pool.styles)
            vae = vae_stage()
            trained = future.result()
    return vae, trained


def _train_model(cfg: BuildConfig, pool: RenderPool, timer: Timer):
    """Stages 2-3: the VAE and the first rewards, then the UNet. Returns (vae, unet, trained rewards)."""
    from ..vocab import WordTokenizer
    from .codec import encode, scaling_factor
    from .diffusion import embed_prompts, train_unet

    train_rows = np.flatnonzero([not s.heldout for s in pool.specs for _ in range(cfg.per_spec)])
    vae, trained = _vae_and_rewards(cfg, pool, train_rows, timer)
    clip, _ = _rebuild_rewards(trained)
    tokenizer = WordTokenizer(trained["vocab"])
    with timer("unet"):
        latent_mean, latent_std = encode(vae, pool.tensor(train_rows))
        scaling = scaling_factor(latent_mean)
        vae.register_to_config(scaling_factor=scaling)
        train_specs = [s for s in pool.specs if not s.heldout]
        contexts = embed_prompts(clip.text, tokenizer([world.prompt_of(s) for s in train_specs]))
        empty = embed_prompts(clip.text, tokenizer([""]))
        context_of_row = torch.arange(len(train_rows)) // cfg.per_spec
        colour_free = None
        if cfg.unet_colour_dropout:
            captions = [world.prompt_of(s, with_colour=False) for s in train_specs]
            colour_free = embed_prompts(clip.text, tokenizer(captions))
        unet = train_unet(
            latent_mean, latent_std, contexts, context_of_row, empty, scaling, cfg.unet_steps, cfg.unet_batch,
            cfg.seed + 6, cfg.threads, logger.info, lr=cfg.unet_lr, device=cfg.device,
            offset_noise=cfg.unet_offset_noise, colour_free_context=colour_free,
            colour_dropout=cfg.unet_colour_dropout,
        )  # fmt: skip
    return vae, unet, trained


def _reuse_model(cfg: BuildConfig, pool: RenderPool, pipe, timer: Timer):
    """``--reuse-model``: stage 2's rewards are retrained (two minutes), the VAE and UNet are taken from an
    earlier build of the same config, so that the later stages can be rebuilt without the UNet's half
    hour. Refused unless that build's text encoder encodes prompts as the toy_clip text tower trained here
    does; the model's own text encoder is then kept in toy_clip, so the UNet keeps the encoder it learned on.
    (The same config on another CPU differs by float rounding: about 1e-6 in the encoder's states.)"""
    from ..vocab import WordTokenizer

    with timer("rewards"):
        trained = train_rewards(cfg, pool.images, pool.styles)
    clip, _ = _rebuild_rewards(trained)
    theirs = pipe.text_encoder.float().state_dict()
    gap = _text_encoder_gap(pipe.text_encoder.float(), clip.text, WordTokenizer(trained["vocab"])(pool.prompts))
    if theirs.keys() != clip.text.state_dict().keys() or gap > REUSE_TOLERANCE:
        raise SystemExit(
            "HyperAlign: --reuse-model: that model's text encoder is not the toy_clip text tower this build "
            f"trains (prompt states differ by up to {gap:.3g}; it was built with another seed or config). "
            "Build without --reuse-model."
        )
    trained["clip"].update({f"text.{k}": v.clone() for k, v in theirs.items()})
    trained["reuse_gap"] = gap
    return pipe.vae.float(), pipe.unet.float(), trained


REUSE_TOLERANCE = 1e-3  # largest difference of prompt states for the same config; another seed differs by ~1


@torch.no_grad()
def _text_encoder_gap(a, b, token_ids: torch.Tensor) -> float:
    """Largest absolute difference of the two encoders' hidden states over the given prompts."""
    rows = token_ids[:: max(1, len(token_ids) // 256)]
    return float((a(input_ids=rows).last_hidden_state - b(input_ids=rows).last_hidden_state).abs().max())


def build(out: Path, cfg: BuildConfig, reuse: Path | None = None) -> dict:
    from ..rewards import (
        CLIP_SCALE,
        ToyAestheticReward,
        ToyClipReward,
        load_toy_aesthetic,
        load_toy_clip,
        save_reward,
    )
    from ..vocab import WordTokenizer
    from .base_report import evaluate_base
    from .codec import decode, encode
    from .diffusion import sample
    from .grounding import agreement, label, sample_scenes
    from .prefs import write_pairs
    from .scorers import aesthetic_accuracy, clip_accuracy, train_aesthetic, train_clip

    timer, report = Timer(), {"config": asdict(cfg)}
    started = time.perf_counter()
    reused = _load_reused(reuse, cfg) if reuse is not None else None  # before clean(): `reuse` may be `out`
    out.mkdir(parents=True, exist_ok=True)
    publish.clean(out)
    train_specs, heldout_specs = world.split_specs()
    with timer("renders"):
        publish.write_prompts(out, train_specs, heldout_specs)
        pool = render_pool(world.all_specs(), cfg.per_spec, cfg.seed + 1)
        fresh = render_pool(world.all_specs(), 1, cfg.seed + 2)  # evaluation renders, never trained on

    if reused is None:
        vae, unet, trained = _train_model(cfg, pool, timer)
    else:
        vae, unet, trained = _reuse_model(cfg, pool, reused["pipe"], timer)
        report["reused_model"] = {
            "from": str(reuse),
            "seconds": reused["seconds"],
            "text_encoder_gap": trained.pop("reuse_gap"),
            **({"note": reused["note"]} if reused["note"] else {}),
        }
    timer.seconds.update({f"{k} (child)": v for k, v in trained.pop("seconds").items()})
    clip, aesthetic = _rebuild_rewards(trained)
    tokenizer = WordTokenizer(trained["vocab"])
    scaling = vae.config.scaling_factor
    publish.save_model(out, vae, clip.text, unet)
    pipe = publish.load_pipe(out).to(cfg.device)
    workers = min(16, len(os.sched_getaffinity(0)))  # processes for the ground-truth checker
    prompt_sets = {
        "train": _sample([world.prompt_of(s) for s in train_specs], cfg.eval_prompts, cfg.seed + 10),
        "heldout": _sample([world.prompt_of(s) for s in heldout_specs], cfg.eval_prompts, cfg.seed + 11),
    }
    agreement_prompts = [p for p in prompt_sets["heldout"] for _ in range(cfg.agreement_noises)]
    heldout_samples = sample(pipe, agreement_prompts, cfg.seed + 14, cfg.eval_steps, cfg.eval_guidance).cpu()

    with timer("grounding"):
        report["rewards_vs_truth"] = {
            "renders_only": agreement(
                ToyClipReward(clip, tokenizer, CLIP_SCALE), ToyAestheticReward(aesthetic), heldout_samples,
                agreement_prompts, workers,
            )
        }  # fmt: skip
        images, prompts = sample_scenes(
            pipe, world.all_specs() * cfg.tune_passes, cfg.seed + 15, cfg.eval_steps, tuple(cfg.tune_guidances)
        )
        generated, report["grounding"] = label(
            images.cpu(), prompts, tokenizer, cfg.seed + 16, workers, cfg.tune_shape_weight, cfg.tune_rank_weight
        )
        clip = train_clip(
            pool, None, tokenizer(pool.prompts), cfg.tune_clip_steps, cfg.clip_groups, cfg.seed + 17, cfg.threads,
            logger.info, cfg.device, init=clip, generated=generated,
        )  # fmt: skip
        aesthetic = train_aesthetic(
            pool, cfg.tune_steps, cfg.aesthetic_batch, cfg.seed + 18, cfg.threads, logger.info, cfg.device,
            init=aesthetic, generated=generated,
        )  # fmt: skip
    clip_meta = {"kind": "toy_clip", "text_config": trained["text_config"], "vocab": trained["vocab"]}
    save_reward(out / "rewards" / "toy_clip.safetensors", clip, clip_meta)
    save_reward(out / "rewards" / "toy_aesthetic.safetensors", aesthetic, {"kind": "toy_aesthetic"})

    with timer("prefs"):
        report["prefs"] = write_pairs(out / "prefs", train_specs, cfg.pairs, cfg.seed + 7)

    with timer("evaluate"):
        specs = _shipped_reward_specs(out)
        clip_reward = load_toy_clip(specs[0], "cpu", torch.float32)
        aesthetic_reward = load_toy_aesthetic(specs[1], "cpu", torch.float32)
        report["rewards_vs_truth"]["with_samples"] = agreement(
            clip_reward, aesthetic_reward, heldout_samples, agreement_prompts, workers
        )
        report["truth_checker"] = truth.validate(cfg.checker_images, cfg.seed + 19)
        check = fresh.tensor(np.flatnonzero([not s.heldout for s in fresh.specs]))
        recon = decode(vae, encode(vae, check)[0])
        recon_truth = truth.check(recon, workers).correct([s for s in fresh.specs if not s.heldout])
        report["vae"] = {
            "scaling_factor": scaling,
            "recon_mse_fresh": round((recon - check).pow(2).mean().item(), 6),
            "recon_truth": {k: round(float(v.mean()), 4) for k, v in recon_truth.items()},
        }
        all_ids = tokenizer(fresh.prompts)
        report["toy_clip"] = {
            split: clip_accuracy(clip, _subset(fresh, held), all_ids, all_ids, fresh.specs, cfg.seed + 8)
            for split, held in (("train_prompts", False), ("heldout_prompts", True))
        }
        report["toy_aesthetic"] = aesthetic_accuracy(aesthetic, fresh, 2000, cfg.seed + 9)
        report["base_model"] = evaluate_base(
            pipe, clip_reward, aesthetic_reward, prompt_sets, cfg.seed + 12, cfg.eval_steps, cfg.eval_guidance, workers
        )
        grid_prompts = prompt_sets["train"][:8] + prompt_sets["heldout"][:8]
        publish.samples_grid(out, pipe, grid_prompts, cfg.seed + 13, cfg.eval_steps, cfg.eval_guidance)
    report["sizes"] = publish.sizes(out)
    report["seconds"] = {**timer.seconds, "total": round(time.perf_counter() - started, 1)}
    report["environment"] = {
        "threads_per_process": cfg.threads,
        "processes": 2 if cfg.parallel else 1,
        "cpus_visible": torch.multiprocessing.cpu_count(),
        "load_average_at_end": list(_load_average()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# The settings that make the VAE and UNet; a reused model must have been built with this config's values.
MODEL_SETTINGS = (
    "seed", "per_spec", "vae_steps", "vae_batch", "unet_steps", "unet_batch", "unet_lr", "unet_offset_noise",
    "unet_colour_dropout",
)  # fmt: skip


def _load_reused(folder: Path, cfg: BuildConfig) -> dict:
    """The model of an earlier build, and what its training stages cost (from its report)."""
    report = folder / "report.json"
    if not (folder / "model").is_dir() or not report.is_file():
        raise SystemExit(f"HyperAlign: --reuse-model {folder}: no built toy world there (model/ and report.json).")
    built = json.loads(report.read_text())
    defaults = asdict(BuildConfig())  # a setting older than the report was built at its default
    theirs = {k: built["config"].get(k, defaults[k]) for k in MODEL_SETTINGS}
    differ = [k for k, v in theirs.items() if v != getattr(cfg, k)]
    if differ:
        shown = ", ".join(f"{k}={theirs[k]!r}" for k in differ)
        raise SystemExit(
            f"HyperAlign: --reuse-model {folder}: that model was built with {shown}, not this config's values. "
            "Set them as it did, or build without --reuse-model."
        )
    seconds = {k: v for k, v in built["seconds"].items() if k in ("vae", "unet")}
    # a model trained outside a build (e.g. by a probe) says how in its report's "note"; the new report keeps it
    return {"pipe": publish.load_pipe(folder), "seconds": seconds, "note": built.get("note", "")}


def _load_average() -> tuple[float, ...]:
    try:
        import os

        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return ()


def _subset(pool: RenderPool, heldout: bool) -> RenderPool:
    keep = [i for i, s in enumerate(pool.specs) if s.heldout == heldout]
    rows = np.concatenate([np.arange(i * pool.per_spec, (i + 1) * pool.per_spec) for i in keep])
    return RenderPool([pool.specs[i] for i in keep], pool.per_spec, pool.images[rows], pool.styles[rows])


def _sample(prompts: list[str], count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in sorted(rng.choice(len(prompts), size=min(count, len(prompts)), replace=False))]


def _shipped_reward_specs(out: Path):
    from types import SimpleNamespace

    return [
        SimpleNamespace(name=name, weight=1.0, path=str(out / "rewards" / f"{name}.safetensors"), options={})
        for name in ("toy_clip", "toy_aesthetic")
    ]


def _parse_setting(cfg: BuildConfig, item: str) -> BuildConfig:
    key, _, value = item.partition("=")
    if key not in BuildConfig.__dataclass_fields__:
        raise SystemExit(
            f"HyperAlign: unknown build setting {key!r}; allowed: {sorted(BuildConfig.__dataclass_fields__)}"
        )
    kind = type(getattr(cfg, key))
    if kind is bool:
        parsed = value.lower() in ("1", "true", "yes")
    elif kind is tuple:
        parsed = tuple(float(v) for v in value.split(","))
    else:
        parsed = kind(value)
    return replace(cfg, **{key: parsed})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="asset folder (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (results depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the networks train: cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke test, not assets")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override BuildConfig fields")
    parser.add_argument(
        "--reuse-model", type=Path, metavar="DIR",
        help="take the VAE and UNet from the toy world built in DIR with the same config (rebuilds the rewards, "
        "preference pairs and report without the UNet's half hour)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = replace(QUICK if args.quick else BuildConfig(), seed=args.seed, threads=args.threads, device=args.device)
    for item in args.set:
        cfg = _parse_setting(cfg, item)
    report = build(args.out, cfg, args.reuse_model)
    logger.info("done in %.0f s; report: %s", report["seconds"]["total"], args.out / "report.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
