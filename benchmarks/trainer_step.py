"""The trainer's reward step with the hypernet against a plain static-LoRA reward step, on one tiny SD1.5 model.

    python benchmarks/trainer_step.py                           # the defaults below
    python benchmarks/trainer_step.py --steps 20 --repeats 5 --modes S P I

Both steps do the same work but for the hypernet: encode the prompts, roll the trajectory from noise to
the same step k without gradients (CFG on, DDIM), take step k with gradients through the LoRA, decode the
one-step x0 with the checkpointed VAE, score it with the same reward, back-propagate, step the optimiser.

- hypernet: ``training.loop.reward_loss``, the trainer's own reward term, in mode S, P or I (perception
  encoder and hypernet where the mode predicts in the rollout, the prediction at k again with gradients).
- static: a peft LoRA of the same rank and alpha on the same target layers of a copy of the UNet; no
  encoder, no hypernet (DRaFT/ReFL-style fine-tuning).

The model is tests/training's tiny SD1.5 (random, 16x16 latents) in fp32 on the CPU. Steps alternate
between the two, with the same sequence of k; the ratio is total hypernet seconds over total static
seconds. The preference term is left out of both: it is the same extra work for either.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from training.loop import STEP, reward_loss, sampled_step  # noqa: E402
from training.sampling import per_sample_noise, sample_seed  # noqa: E402

KEYSTEPS = "[0.0, 0.3, 0.6]"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the trajectory")
    p.add_argument("--repeats", type=int, default=6, help="timed steps of each kind per mode (after one warm-up)")
    p.add_argument("--modes", nargs="+", default=["S", "P", "I"], choices=["S", "P", "I"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def tiny_world():
    """tests/training's builders of the tiny diffusers models and configs (one source of truth for them)."""
    path = REPO_ROOT / "tests" / "training" / "conftest.py"
    spec = importlib.util.spec_from_file_location("hyperalign_tiny_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_trainer(world, folder: Path, args, mode: str):
    model = folder / "model"
    if not (model / "model_index.json").is_file():
        world.build_tiny_sd15(model)
        world.build_prefs(folder / "prefs")
    extra = [
        f"sampling.num_steps={args.steps}",
        f"optim.batch_size={args.batch}",
        f"objective.mode={mode!r}",
        "objective.pref_weight=0.0",
    ]
    if mode == "P":
        extra.append(f"objective.keysteps={KEYSTEPS}")
    cfg = world.tiny_config(model, folder / "prefs", folder / f"run_{mode}", "sd15", extra)
    world.reset_accelerate()
    return world.build_trainer(cfg)


@contextlib.contextmanager
def denoiser(family, unet):
    """Run `family` (its CFG, scheduler and x0 formula) on another UNet for a while."""
    original, family.denoiser = family.denoiser, unet
    try:
        yield
    finally:
        family.denoiser = original


class StaticLoRA:
    """A peft LoRA (same rank, alpha and targets as the predictor) on a copy of the trainer's UNet."""

    def __init__(self, tr):
        from peft import LoraConfig, inject_adapter_in_model

        family = tr.adapter
        family.detach()  # the copy must not carry the hypernet's hooks
        unet = copy.deepcopy(family.denoiser)
        family.attach(tr.predictor.targets, tr.hcfg.scale)
        config = LoraConfig(
            r=tr.hcfg.rank, lora_alpha=tr.hcfg.alpha, target_modules=[t.id for t in tr.predictor.targets]
        )
        self.unet = inject_adapter_in_model(config, unet)
        self.params = [p for name, p in self.unet.named_parameters() if "lora_" in name]
        for param in self.params:
            param.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=tr.cfg.optim.lr)

    def loss(self, tr, batch, step: int) -> torch.Tensor:
        """The reward term of training.loop.reward_loss with the LoRA fixed: no encoder, no hypernet."""
        family, cfg = tr.adapter, tr.cfg
        prompts, guidance = list(batch["prompt"]), cfg.sampling.guidance
        cond = family.encode_prompts(prompts, uncond=guidance != 1.0)
        x = per_sample_noise(family.latent_shape(1)[1:], noise_seeds(tr, batch), family.device)
        k = sampled_step(cfg, step)
        with denoiser(family, self.unet):
            with torch.no_grad():
                for i in range(k):
                    t = family.timesteps(tr.steps.t[i], len(prompts))
                    x = family.step(x, family.predict(x, t, cond, None, guidance), i, tr.steps)
            t = family.timesteps(tr.steps.t[k], len(prompts))
            pred = family.predict(x, t, cond, None, guidance)
            images = family.decode(family.x0(x, pred, t))
        total, _ = tr.rewards(images, prompts)
        return -total.mean()


def noise_seeds(tr, batch) -> list[int]:
    return [sample_seed(tr.cfg.run.seed, 1, g) for g in batch["index"].tolist()]  # loop.NOISE's stream


def hypernet_step(tr, batch, step: int) -> None:
    loss, _ = reward_loss(tr, batch, step)
    tr.accelerator.backward(loss)
    tr.adapter.state.clear()
    tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)


def static_step(tr, static: StaticLoRA, batch, step: int) -> None:
    static.loss(tr, batch, step).backward()
    static.optimizer.step()
    static.optimizer.zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(tr, args) -> dict:
    static = StaticLoRA(tr)
    batch = next(tr.prompts)
    hypernet_step(tr, batch, 0)  # warm-up: first calls allocate and pick kernels
    static_step(tr, static, batch, 0)
    hyper, plain, ks = [], [], []
    for step in range(1, args.repeats + 1):
        ks.append(sampled_step(tr.cfg, step))
        hyper.append(timed(lambda step=step: hypernet_step(tr, batch, step)))
        plain.append(timed(lambda step=step: static_step(tr, static, batch, step)))
    return dict(
        hyper=statistics.median(hyper),
        static=statistics.median(plain),
        ratio=sum(hyper) / sum(plain),
        per_step=[h / s for h, s in zip(hyper, plain)],
        ks=ks,
        hypernet_params=sum(p.numel() for p in tr.predictor.hypernet.parameters()),
        lora_params=sum(p.numel() for p in static.params),
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    world = tiny_world()
    lines = [
        f"Command: python benchmarks/trainer_step.py {' '.join(sys.argv[1:])}",
        f"tiny SD1.5 (tests/training), fp32 CPU, {torch.get_num_threads()} torch threads; batch {args.batch}, "
        f"{args.steps} sampling steps, CFG on; {args.repeats} timed steps of each kind per mode (k drawn by "
        f"training.loop.sampled_step, stream {STEP}, the same for both)",
        "",
        "| mode | hypernet step s (median) | static-LoRA step s (median) | ratio (total) | per-step ratios |"
        " k of the steps |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="hyperalign_trainer_step_") as folder:
        for mode in args.modes:
            tr = build_trainer(world, Path(folder), args, mode)
            result = measure(tr, args)
            ratios = ", ".join(f"{r:.2f}" for r in result["per_step"])
            lines.append(
                f"| {mode} | {result['hyper']:.3f} | {result['static']:.3f} | {result['ratio']:.2f} | {ratios} | "
                f"{result['ks']} |"
            )
            print(f"{mode}: {lines[-1]}", flush=True)
            tr.adapter.detach()
            tr.accelerator.end_training()
    lines.append("")
    lines.append(
        f"hypernet {result['hypernet_params'] / 1e6:.3f} M parameters; static LoRA {result['lora_params'] / 1e3:.1f} k"
    )
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
