"""Shared by the parity tests: one predictor in two hosts, the trainer and the real ComfyUI, on the same weights.

- Trainer host: a tiny diffusers model is trained for a few steps by the trainer's own CLI entry
  (``training.train.main``, in-process) and exported; the trainer's family adapter then runs that file as
  ``training.evaluate`` does (``load_adapter`` + ``load_predictor`` + ``attach``) through ``training.sampling``.
- ComfyUI host: ComfyUI's own model class for the same architecture, its weights converted from the diffusers
  state dict with ComfyUI's own key maps, the same predictor file loaded by the HyperAlign Loader and Apply nodes,
  and ComfyUI's sampler (``comfy.sample.sample``, the KSampler path).

Both hosts call the hypernet as ``hypernet(features, progress, context)``: a forward hook on it records what each
host fed it and what it returned, so the tests compare the hypernet inputs and factors as well as the predictions.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
TOL = 1e-4  # relative error allowed between the hosts (fp32)
EFFECT = 100 * TOL  # what the predictor must change, so that a test ignoring it cannot pass

if str(TESTS / "nodes") not in sys.path:  # comfy_testlib and testing_pack (tiny ComfyUI models), when run alone
    sys.path.append(str(TESTS / "nodes"))

# A trained predictor that is clearly non-trivial (it moves final latents by 20-30 %) but not blown up: a few steps
# at a much larger lr give LoRA deltas several times the layers' own outputs, and the random base model then turns
# 1e-7 differences in the factors into 1e-3 differences in its prediction (measured), which says nothing about hosts.
FAST_TRAINING = [
    "optim.max_steps=2",
    "optim.lr=1e-3",
    "optim.batch_size=1",
    "sampling.num_steps=1",
    "objective.pref_weight=0.0",
    "model.gradient_checkpointing=False",
    "model.vae_checkpointing=False",
]


def training_testlib():
    """tests/training/conftest.py (tiny diffusers models, trainer configs) as a plain module, loaded once."""
    name = "hyperalign_training_testlib"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / "training" / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------- trainer host


def train_predictor(model_dir: Path, family: str, out_dir: Path, resolution: int, extra: tuple[str, ...] = ()):
    """Train on `model_dir` with the trainer's CLI entry and its toy brightness reward, plus `extra` overrides;
    (config, predictor file)."""
    from training.config import load_config
    from training.train import main

    lib = training_testlib()
    prefs = lib.build_prefs(out_dir / "prefs")
    overrides = lib.tiny_overrides(model_dir, prefs, out_dir, family) + FAST_TRAINING
    overrides += [f"model.resolution={resolution}", *extra]
    lib.reset_accelerate()
    try:
        assert main(overrides) == 0
    finally:
        lib.reset_accelerate()
    cfg = load_config(None, overrides)
    return cfg, Path(cfg.run_dir) / "predictor.safetensors"


def trainer_host(cfg, predictor_path: Path):
    """The trainer's family adapter running the exported predictor, set up as ``training.evaluate`` does."""
    from hyperalign.io import load_predictor
    from training.adapters import load_adapter

    family = load_adapter(cfg.model, "cpu")
    predictor = load_predictor(predictor_path)
    hcfg = predictor.meta.hypernet_config()
    family.attach(predictor.targets, hcfg.scale)
    return family, predictor.hypernet.float(), hcfg


def replace_denoiser(model_dir: Path, subfolder: str, denoiser, seed: int) -> None:
    """Swap a diffusers denoiser into a tiny model folder, every weight (norm scales and biases too) random."""
    from testing_pack import tiny

    tiny._initialise(denoiser, seed)  # non-trivial norms and biases: a swapped or dropped one cannot go unnoticed
    shutil.rmtree(model_dir / subfolder)
    denoiser.save_pretrained(model_dir / subfolder)


# ------------------------------------------------------------------------------------------- ComfyUI host


def comfy_model(config, diffusion_model_state: dict):
    """A fp32 CPU ModelPatcher of ComfyUI's model for `config`, with exactly these diffusion-model weights."""
    import comfy.model_management as mm
    import comfy.model_patcher

    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(diffusion_model_state, strict=True)  # every weight converted, none left over
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def comfy_apply(pack, folder: Path, model, predictor_path: Path, name: str, mode="from_file", keysteps=""):
    """The predictor file as a user has it: in models/hyperalign, through HyperAlign Loader and Apply."""
    shutil.copyfile(predictor_path, folder / name)
    loaded = pack.nodes["HyperAlignLoader"].execute(predictor_name=name).args[0]
    patched = (
        pack.nodes["HyperAlignApply"]
        .execute(
            model=model,
            predictor=loaded,
            mode=mode,
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
            keysteps=keysteps,
        )
        .args[0]
    )
    return patched, loaded.predictor.hypernet


# ------------------------------------------------------------------------------------- what is compared


@dataclass
class HypernetCall:
    features: torch.Tensor
    progress: torch.Tensor
    context: torch.Tensor
    factors: dict


@contextmanager
def recording(hypernet):
    """Record every hypernet call (its inputs and factors) while the block runs."""
    calls: list[HypernetCall] = []

    def hook(module, args, output):
        features, progress, context = (a.detach().clone() for a in args)
        factors = {key: (down.detach().clone(), up.detach().clone()) for key, (down, up) in output.items()}
        calls.append(HypernetCall(features, progress, context, factors))

    handle = hypernet.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def call_errors(trainer: HypernetCall, comfy: HypernetCall) -> dict[str, float]:
    """How far ComfyUI's hypernet call is from the trainer's: inputs and factors (relative; progress absolute)."""
    assert sorted(trainer.factors) == sorted(comfy.factors), "the hosts predicted factors for different layers"
    return {
        "features": rel_err(comfy.features, trainer.features),
        "progress": float((comfy.progress.double() - trainer.progress.double()).abs().max()),
        "context": rel_err(comfy.context, trainer.context),
        "factors": max(
            rel_err(c, t) for key in trainer.factors for c, t in zip(comfy.factors[key], trainer.factors[key])
        ),
    }


def sample_spread(factors: dict) -> float:
    """How different the two samples' LoRAs are (a row mix-up between samples would then show)."""
    return min(rel_err(up[1] @ down[1], up[0] @ down[0]) for down, up in factors.values())


@dataclass
class ComfyRun:
    latent: torch.Tensor  # final latent in the model's space (process_latent_in of the sampler's output)
    x: list[torch.Tensor] = field(default_factory=list)  # sampler state at each step (k-diffusion scale)
    denoised: list[torch.Tensor] = field(default_factory=list)  # the guided x0 prediction at each step
    calls: list[HypernetCall] = field(default_factory=list)


def comfy_sample(model, hypernet, noise, steps, cfg, scheduler, positive, negative, latent, seed) -> ComfyRun:
    """ComfyUI's KSampler path (euler), recording each step's state and the hypernet's calls."""
    import comfy.sample

    xs, denoised = [], []

    def callback(step, x0, x, total_steps):
        xs.append(x.detach().clone())
        denoised.append(x0.detach().clone())

    with recording(hypernet) as calls:
        out = comfy.sample.sample(
            model,
            noise,
            steps,
            cfg,
            "euler",
            scheduler,
            positive,
            negative,
            latent,
            seed=seed,
            callback=callback,
            disable_pbar=True,
        )
    return ComfyRun(model.model.process_latent_in(out), xs, denoised, calls)


def report(label: str, rows: list[dict[str, float]]) -> dict[str, float]:
    """Print each step's errors (visible with -s) and return the maxima."""
    for step, row in enumerate(rows):
        print(f"{label} step {step}: " + ", ".join(f"{k} {v:.2e}" for k, v in row.items()))
    worst = {key: max(row[key] for row in rows) for key in rows[0]}
    print(f"{label} max: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    return worst
