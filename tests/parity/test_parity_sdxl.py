"""Parity, SDXL family: the trainer and the real ComfyUI give the same predictions with the same predictor.

The trainer trains a predictor on a tiny diffusers UNet2DConditionModel with SDXL's structure (no attention at the
first level, deeper transformers below and in the middle, linear projections, ``text_time`` conditioning, two CLIP
text encoders; SDXL base's own scheduler config) and exports it. ComfyUI gets the same weights in its own SDXL model
(``comfy.supported_models.SDXL``), renamed by ComfyUI's ``comfy.utils.unet_to_diffusers`` (``add_embedding`` becomes
``label_emb``), and the exported file through the HyperAlign nodes. The conditioning carries the trainer's pooled
text and its size conditioning (original = target = the training resolution, no crop), as CLIPTextEncodeSDXL
writes them; ComfyUI's SDXL turns them into ``y``. At every step of a CFG run with two different prompts the eps
prediction, the hypernet's inputs and its factors agree, and whole runs end in the same latents (fp32, <= 1e-4).

The conventions are SD1.5's (test_parity_sd15.py): shared alphas_cumprod, "simple" = the trainer's "trailing" DDIM
steps, DDIM = Euler in ComfyUI's scale, each sample's LoRA on its cond and uncond rows.
"""

from __future__ import annotations

from types import SimpleNamespace

import parity_lib
import pytest
import torch
from parity_lib import EFFECT, TOL, call_errors, comfy_apply, comfy_sample, recording, rel_err, report

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

PROMPTS = ["a red cat on a sofa", "a lighthouse at night"]
STEPS, CFG, SEED = 5, 4.0, 7
RESOLUTION = 16  # the tiny VAE halves it: 8x8 latents
SIZE = {  # CLIPTextEncodeSDXL's size conditioning for what the trainer conditions on
    "width": RESOLUTION,
    "height": RESOLUTION,
    "crop_w": 0,
    "crop_h": 0,
    "target_width": RESOLUTION,
    "target_height": RESOLUTION,
}


@pytest.fixture(scope="module")
def hosts(comfy_host, hyperalign_pack, tmp_path_factory):
    import comfy.sample
    import comfy.supported_models
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from testing_pack import tiny

    lib = parity_lib.training_testlib()
    root = tmp_path_factory.mktemp("parity_sdxl")
    model_dir = lib.build_tiny_sdxl(root / "model")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, **lib.TINY_SDXL_UNET)
    parity_lib.replace_denoiser(model_dir, "unet", unet, seed=3)
    cfg, predictor_path = parity_lib.train_predictor(model_dir, "sdxl", root / "out", RESOLUTION)
    family, hypernet, hcfg = parity_lib.trainer_host(cfg, predictor_path)
    assert family.name == "sdxl" and hcfg.feature_dim == 128 and hcfg.context_dim == 64

    config = comfy.supported_models.SDXL(dict(tiny.SDXL_UNET_CONFIG))
    comfy_name = comfy.utils.unet_to_diffusers(config.unet_config)  # diffusers name -> ComfyUI name
    base = parity_lib.comfy_model(config, {comfy_name[k]: v for k, v in family.denoiser.state_dict().items()})

    cond = family.encode_prompts(PROMPTS, uncond=True)
    latent = torch.zeros(family.latent_shape(len(PROMPTS)))
    negative = {"pooled_output": cond.tensors["uncond_pooled"][:1].clone(), **SIZE}
    return SimpleNamespace(
        family=family,
        hypernet=hypernet,
        hcfg=hcfg,
        schedule=family.sampling_steps(STEPS),
        cond=cond,
        predictor_path=predictor_path,
        base=base,
        latent=latent,
        noise=comfy.sample.prepare_noise(latent, SEED),
        positive=[[cond.context.clone(), {"pooled_output": cond.tensors["pooled"].clone(), **SIZE}]],
        negative=[[cond.tensors["uncond"][:1].clone(), negative]],
    )


def _comfy_run(hosts, pack, folder, mode="from_file", keysteps=""):
    patched, hypernet = comfy_apply(
        pack, folder, hosts.base, hosts.predictor_path, "parity_sdxl.safetensors", mode, keysteps
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
    args = (hosts.noise, STEPS, CFG, "simple", hosts.positive, hosts.negative, hosts.latent, SEED)
    return comfy_sample(hosts.base, hosts.hypernet, *args).latent


def test_comfy_y_is_the_trainers_pooled_text_and_time_ids(hosts):
    """ComfyUI's SDXL `y` and the trainer's add_embedding input: pooled text then the six size embeddings."""
    family, cond = hosts.family, hosts.cond
    model = hosts.base.model
    _, extras = hosts.positive[0]
    y = model.encode_adm(**extras)  # what the sampler puts in the conditioning as `y`
    unet = family.denoiser
    time_embeds = unet.add_time_proj(family.time_ids(len(PROMPTS)).flatten()).reshape(len(PROMPTS), -1)
    expected = torch.cat([cond.tensors["pooled"], time_embeds], dim=-1)
    assert y.shape == expected.shape == (len(PROMPTS), 32 + 6 * 256)
    assert rel_err(y, expected) <= 1e-6


def test_sigma_and_timestep_conventions_agree(hosts):
    import comfy.samplers

    ms = hosts.base.get_model_object("model_sampling")
    alphas = hosts.family.alphas.double()
    assert torch.allclose(ms.sigmas.double(), ((1 - alphas) / alphas).sqrt(), rtol=TOL, atol=0)
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", STEPS)
    assert [float(ms.timestep(s)) for s in sigmas[:-1]] == hosts.schedule.t == [999.0, 799.0, 599.0, 399.0, 199.0]
    assert float(sigmas[-1]) == 0.0 and float(hosts.schedule.ddim.final_alpha_cumprod) == 1.0


@pytest.mark.parametrize("comfy_scheduler, spacing", [("simple", "trailing"), ("normal", "linspace")])
@pytest.mark.parametrize("steps", [10, 20, 25, 30, 50])
def test_training_spacing_walks_comfyui_scheduler_timesteps(hosts, comfy_scheduler, spacing, steps):
    """SDXL's sampling steps follow the same table as SD1.5's (training/README.md), on SDXL's scheduler config."""
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
    assert max(abs(a - b) for a, b in zip(trainer_t, comfy_t)) <= 1.0, (trainer_t, comfy_t)
    if comfy_scheduler == "simple" and 1000 % steps == 0:
        assert trainer_t == comfy_t


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
    worst = report("sdxl", rows)
    assert worst["progress"] <= 1e-6 and worst["context"] <= 1e-6
    assert max(worst.values()) <= TOL, worst
    spread = parity_lib.sample_spread(comfy_s.calls[0].factors)
    print(f"sdxl step 0: the two samples' LoRAs differ by at least {spread:.2e} (relative, per layer)")
    assert spread > EFFECT


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
    progress = [float(c.progress[0]) for c in calls]
    assert [float(c.progress[0]) for c in comfy_run.calls] == pytest.approx(progress, abs=1e-6)
    assert len(calls) == (STEPS if mode == "S" else 2)
    error, effect = rel_err(comfy_run.latent, final), rel_err(comfy_run.latent, base_latent)
    print(f"sdxl final latents, mode {mode}: relative error {error:.2e} (the predictor's effect: {effect:.2e})")
    assert error <= TOL
    assert effect > EFFECT
