"""Parity, SD1.5 family: the trainer and the real ComfyUI give the same predictions with the same predictor.

The trainer trains a predictor on a tiny diffusers UNet2DConditionModel (SD1.5 block types, attention on every
level, SD1.5's own scheduler config) and exports it. ComfyUI gets the same weights in its own SD15 model, renamed
by ComfyUI's ``comfy.utils.unet_to_diffusers``, and the exported file through the HyperAlign nodes. At every step
of a CFG run with two different prompts the eps prediction, the hypernet's inputs and its factors agree, and whole
runs with the same sampler end in the same latents (fp32, relative error <= 1e-4). The predictor targets attention and
the ResNet convolutions (preset attn_conv), so both LoRA paths are pinned.

Conventions this pins (docs: COMFYUI.md §3.3):
- sigma <-> t: ComfyUI's ModelSamplingDiscrete and the trainer's scheduler share alphas_cumprod, and ComfyUI's
  "simple" schedule is the trainer's DDIM "trailing" one (for step counts that divide 1000, as 5 does).
- scale: ComfyUI's sampler state is x = x_t * sqrt(sigma^2 + 1); both UNets see x_t (calculate_input). Deterministic
  DDIM is Euler in ComfyUI's scale, so the trainer's DDIM run and ComfyUI's euler run are one trajectory.
- CFG rows: ComfyUI evaluates [uncond, cond] chunks, the trainer [cond, uncond]; each sample's LoRA covers both.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import parity_lib
import pytest
import torch
from parity_lib import EFFECT, TOL, call_errors, comfy_apply, comfy_sample, recording, rel_err, report

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

PROMPTS = ["a red cat on a sofa", "a lighthouse at night"]
STEPS, CFG, SEED = 5, 4.0, 7
RESOLUTION = 16  # the tiny VAE halves it: 8x8 latents
# attention and the ResNet convolutions: ComfyUI's ResBlock convs (in_layers.2, out_layers.3) take the same LoCon
# deltas as diffusers' conv1/conv2
TARGETS = ("model.targets='attn_conv'",)
# SD1.5 block types with attention on every level; ComfyUI's SD15 always has 8 heads and 32-group norms
UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
# stable-diffusion-v1-5's scheduler/scheduler_config.json (set_alpha_to_one false: the trainer still ends at sigma 0)
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@pytest.fixture(scope="module")
def hosts(comfy_host, hyperalign_pack, tmp_path_factory):
    import comfy.sample
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from testing_pack import tiny

    root = tmp_path_factory.mktemp("parity_sd15")
    model_dir = parity_lib.training_testlib().build_tiny_sd15(root / "model")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **UNET)
    parity_lib.replace_denoiser(model_dir, "unet", unet, seed=3)
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    cfg, predictor_path = parity_lib.train_predictor(model_dir, "sd15", root / "out", RESOLUTION, TARGETS)
    family, hypernet, hcfg = parity_lib.trainer_host(cfg, predictor_path)
    assert {t.kernel for t in hypernet.targets} == {None, (3, 3)}  # both kinds of target are in the file

    config = comfy.supported_models.SD15(dict(tiny.SD15_UNET_CONFIG, context_dim=UNET["cross_attention_dim"]))
    comfy_name = comfy.utils.unet_to_diffusers(config.unet_config)  # diffusers name -> ComfyUI name
    base = parity_lib.comfy_model(config, {comfy_name[k]: v for k, v in family.denoiser.state_dict().items()})

    cond = family.encode_prompts(PROMPTS, uncond=True)
    assert torch.equal(cond.tensors["uncond"][0], cond.tensors["uncond"][1])  # ComfyUI repeats one negative row
    latent = torch.zeros(family.latent_shape(len(PROMPTS)))
    return SimpleNamespace(
        family=family,
        hypernet=hypernet,
        hcfg=hcfg,
        schedule=family.sampling_steps(STEPS),
        cond=cond,
        predictor_path=predictor_path,
        base=base,
        latent=latent,
        noise=comfy.sample.prepare_noise(latent, SEED),  # at sigma_max ComfyUI starts from x_t = this noise
        positive=[[cond.context.clone(), {}]],
        negative=[[cond.tensors["uncond"][:1].clone(), {}]],
    )


def _comfy_run(hosts, pack, folder, mode="from_file", keysteps=""):
    patched, hypernet = comfy_apply(
        pack, folder, hosts.base, hosts.predictor_path, "parity_sd15.safetensors", mode, keysteps
    )
    return comfy_sample(
        patched, hypernet, hosts.noise, STEPS, CFG, "simple", hosts.positive, hosts.negative, hosts.latent, SEED
    )


@pytest.fixture(scope="module")
def comfy_s(hosts, hyperalign_pack, predictor_folder):
    return _comfy_run(hosts, hyperalign_pack, predictor_folder)


@pytest.fixture(scope="module")
def base_latent(hosts):
    """The base model's final latent (ComfyUI, no HyperAlign), to show the predictor matters."""
    return comfy_sample(
        hosts.base,
        hosts.hypernet,
        hosts.noise,
        STEPS,
        CFG,
        "simple",
        hosts.positive,
        hosts.negative,
        hosts.latent,
        SEED,
    ).latent


def test_sigma_and_timestep_conventions_agree(hosts):
    import comfy.samplers

    ms = hosts.base.get_model_object("model_sampling")
    alphas = hosts.family.alphas.double()  # the trainer's alphas_cumprod: the same noise levels as ComfyUI's table
    assert torch.allclose(ms.sigmas.double(), ((1 - alphas) / alphas).sqrt(), rtol=TOL, atol=0)
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", STEPS)
    assert [float(ms.timestep(s)) for s in sigmas[:-1]] == hosts.schedule.t == [999.0, 799.0, 599.0, 399.0, 199.0]
    # both runs end on the clean latent: ComfyUI at sigma 0, the trainer's last DDIM step at alpha 1
    assert float(sigmas[-1]) == 0.0 and float(hosts.schedule.ddim.final_alpha_cumprod) == 1.0


# ComfyUI scheduler -> the trainer's model.timestep_spacing that walks the same timesteps, and how far apart they
# may be: "simple" indexes the 1000-entry sigma table with int(i * 1000 / N), diffusers rounds (1000 - i * 1000 / N);
# "normal" walks linspace(999, 0, N) through interpolated sigmas (whose model timestep ComfyUI rounds to the nearest
# table entry), diffusers rounds linspace(0, 999, N); a x.5 may round either way
SCHEDULE_MATCH = [("simple", "trailing"), ("sgm_uniform", "trailing"), ("normal", "linspace")]


@pytest.mark.parametrize("comfy_scheduler, spacing", SCHEDULE_MATCH)
@pytest.mark.parametrize("steps", [10, 20, 25, 30, 50])
def test_training_spacing_walks_comfyui_scheduler_timesteps(hosts, comfy_scheduler, spacing, steps):
    """Which model.timestep_spacing trains on the timesteps a ComfyUI scheduler samples (training/README.md)."""
    import dataclasses

    import comfy.samplers

    ms = hosts.base.get_model_object("model_sampling")
    comfy_t = [float(ms.timestep(s)) for s in comfy.samplers.calculate_sigmas(ms, comfy_scheduler, steps)[:-1]]
    family = hosts.family
    saved = family.cfg
    family.cfg = dataclasses.replace(saved, timestep_spacing=spacing)
    try:
        trainer_t = family.sampling_steps(steps).t
    finally:
        family.cfg = saved
    assert len(trainer_t) == len(comfy_t) == steps
    assert max(abs(a - b) for a, b in zip(trainer_t, comfy_t)) <= 1.0, (trainer_t, comfy_t)  # one table entry
    if comfy_scheduler == "simple" and 1000 % steps == 0:
        assert trainer_t == comfy_t  # the default pairing is exact when the step count divides 1000


def test_every_step_same_eps_hypernet_inputs_and_factors(hosts, comfy_s):
    import comfy.samplers

    from training.sampling import Trajectory

    family, schedule, batch = hosts.family, hosts.schedule, len(PROMPTS)
    sigmas = comfy.samplers.calculate_sigmas(hosts.base.get_model_object("model_sampling"), "simple", STEPS)
    assert len(comfy_s.x) == len(comfy_s.calls) == STEPS  # mode S: one hypernet call per step
    trajectory = Trajectory(family, hosts.hypernet, hosts.hcfg, hosts.cond, schedule, CFG, "S")
    rows = []
    with torch.no_grad(), recording(hosts.hypernet) as calls:
        for step, (x, denoised) in enumerate(zip(comfy_s.x, comfy_s.denoised)):
            sigma = float(sigmas[step])
            x_t = x / (sigma**2 + 1) ** 0.5  # the same state in the trainer's (DDPM) scale
            factors = trajectory.factors_at(step, x_t)
            eps = family.predict(x_t, family.timesteps(schedule.t[step], batch), hosts.cond, factors, CFG)
            rows.append({"eps": rel_err((x - denoised) / sigma, eps), **call_errors(calls[step], comfy_s.calls[step])})
    family.state.clear()
    worst = report("sd15", rows)
    assert worst["progress"] <= 1e-6 and worst["context"] <= 1e-6
    assert max(worst.values()) <= TOL, worst
    spread = parity_lib.sample_spread(comfy_s.calls[0].factors)
    print(f"sd15 step 0: the two samples' LoRAs differ by at least {spread:.2e} (relative, per layer)")
    assert spread > EFFECT  # per-sample LoRAs: a row mix-up between samples would show


@pytest.mark.parametrize("mode, keysteps", [("S", (0.0,)), ("P", (0.0, 0.4))])
def test_full_runs_end_in_the_same_latents(
    mode, keysteps, hosts, comfy_s, base_latent, hyperalign_pack, predictor_folder
):
    from training.sampling import Trajectory

    if mode == "S":
        comfy_run = comfy_s
    else:
        comfy_run = _comfy_run(hosts, hyperalign_pack, predictor_folder, mode, ", ".join(map(str, keysteps)))
    trajectory = Trajectory(hosts.family, hosts.hypernet, hosts.hcfg, hosts.cond, hosts.schedule, CFG, mode, keysteps)
    with recording(hosts.hypernet) as calls:
        final, _ = trajectory.generate(hosts.noise.clone())
    # the same steps ran the hypernet (P: at progress 0 and 0.4004), with the same progress
    progress = [float(c.progress[0]) for c in calls]
    assert [float(c.progress[0]) for c in comfy_run.calls] == pytest.approx(progress, abs=1e-6)
    assert len(calls) == (STEPS if mode == "S" else 2)
    error, effect = rel_err(comfy_run.latent, final), rel_err(comfy_run.latent, base_latent)
    print(f"sd15 final latents, mode {mode}: relative error {error:.2e} (the predictor's effect: {effect:.2e})")
    assert error <= TOL
    assert effect > EFFECT  # the predictor really changes the result
