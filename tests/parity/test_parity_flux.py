"""Parity, FLUX family: the trainer and the real ComfyUI give the same velocities with the same predictor.

The trainer trains a predictor on a tiny diffusers FluxTransformer2DModel (random weights, guidance embedding) and
exports it. ComfyUI gets the same weights in its own Flux model through ComfyUI's diffusers converter, which
follows ``comfy.utils.flux_to_diffusers``: q, k, v (and the single blocks' MLP input) become row slices of the fused
``qkv`` / ``linear1`` layers, where HyperAlign's hooks add the per-layer deltas at the table's ``out_slice``. At every
step of a run with a negative prompt (cfg > 1: ComfyUI's [uncond, cond] rows) and the embedded guidance, the
velocity, the hypernet's inputs and its factors agree, and whole runs end in the same latents (fp32, <= 1e-4).

Conventions this pins (docs: COMFYUI.md §3.2-3.3): t = sigma in both hosts, the same resolution-dependent shift
(ComfyUI's ModelSamplingFlux node vs the trainer's dynamic shifting), the hypernet's context = the pooled CLIP
vector, and the perception encoder's image tokens laid on the patch grid.
"""

from __future__ import annotations

from types import SimpleNamespace

import parity_lib
import pytest
import torch
from parity_lib import EFFECT, TOL, call_errors, comfy_apply, comfy_sample, recording, rel_err, report

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

PROMPTS = ["a red cat on a sofa", "a lighthouse at night"]
STEPS, CFG, GUIDANCE, SEED = 5, 3.0, 3.5, 11
RESOLUTION = 16  # the tiny VAE halves it: 8x8 latents, 16 image tokens


class TrueCFG:
    """The trainer's FLUX family with classifier-free guidance over two of its forwards sharing one LoRA.

    The trainer's FLUX adapter only embeds the guidance value (FLUX.1-dev is guidance-distilled); ComfyUI also runs
    a negative prompt when cfg > 1, with each sample's LoRA on its cond and uncond rows. This is that, in the
    trainer's terms, so ComfyUI's CFG rows have a reference; everything else is the trainer's own code.
    """

    def __init__(self, family, negative, scale: float):
        self.family, self.negative, self.scale = family, negative, scale

    def __getattr__(self, name):
        return getattr(self.family, name)

    def predict(self, x, t, cond, factors, guidance):
        v_cond = self.family.predict(x, t, cond, factors, guidance)
        v_uncond = self.family.predict(x, t, self.negative, factors, guidance)
        return v_uncond + self.scale * (v_cond - v_uncond)


def _comfy_config(diffusers_config) -> dict:
    """ComfyUI's Flux unet_config for a diffusers FluxTransformer2DModel config."""
    from testing_pack import tiny

    c = diffusers_config
    return dict(
        tiny.FLUX_UNET_CONFIG,
        hidden_size=c.num_attention_heads * c.attention_head_dim,
        num_heads=c.num_attention_heads,
        depth=c.num_layers,
        depth_single_blocks=c.num_single_layers,
        context_in_dim=c.joint_attention_dim,
        vec_in_dim=c.pooled_projection_dim,
        axes_dim=list(c.axes_dims_rope),
        guidance_embed=c.guidance_embeds,
    )


@pytest.fixture(scope="module")
def hosts(comfy_host, hyperalign_pack, tmp_path_factory):
    import comfy.model_detection
    import comfy.sample
    import comfy.supported_models
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux
    from diffusers import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("parity_flux")
    model_dir = parity_lib.training_testlib().build_tiny_flux(root / "model")
    transformer = FluxTransformer2DModel.from_pretrained(model_dir / "transformer")
    parity_lib.replace_denoiser(model_dir, "transformer", transformer, seed=5)
    cfg, predictor_path = parity_lib.train_predictor(model_dir, "flux", root / "out", RESOLUTION)
    family, hypernet, hcfg = parity_lib.trainer_host(cfg, predictor_path)

    config = comfy.supported_models.Flux(_comfy_config(family.denoiser.config))
    # copies: the converter pops every weight it places, and writes some (swap_scale_shift) back in place
    state = {name: weight.clone() for name, weight in family.denoiser.state_dict().items()}
    converted = comfy.model_detection.convert_diffusers_mmdit(state, "")
    assert not state, f"diffusers weights ComfyUI's converter left out: {sorted(state)[:5]}"
    latent = torch.zeros(family.latent_shape(len(PROMPTS)))
    shift = family.flow_match.config
    side = latent.shape[-1] * 8  # the node counts image tokens from pixels of an 8x VAE
    base = ModelSamplingFlux().patch(
        parity_lib.comfy_model(config, converted), shift.max_shift, shift.base_shift, side, side
    )[0]

    cond, negative = family.encode_prompts(PROMPTS), family.encode_prompts([""] * len(PROMPTS))

    def comfy_cond(c, rows):
        return [
            [
                c.tensors["t5"][:rows].clone(),
                {"pooled_output": c.tensors["pooled"][:rows].clone(), "guidance": GUIDANCE},
            ]
        ]

    return SimpleNamespace(
        family=family,
        hypernet=hypernet,
        hcfg=hcfg,
        schedule=family.sampling_steps(STEPS),
        cond=cond,
        negative=negative,
        predictor_path=predictor_path,
        base=base,
        latent=latent,
        noise=comfy.sample.prepare_noise(latent, SEED),  # ComfyUI's first sigma is 1: x starts as this noise
        positive=comfy_cond(cond, len(PROMPTS)),
        comfy_negative=comfy_cond(negative, 1),
    )


def _comfy_run(hosts, pack, folder, cfg):
    patched, hypernet = comfy_apply(pack, folder, hosts.base, hosts.predictor_path, "parity_flux.safetensors")
    return comfy_sample(
        patched, hypernet, hosts.noise, STEPS, cfg, "simple", hosts.positive, hosts.comfy_negative, hosts.latent, SEED
    )


@pytest.fixture(scope="module")
def comfy_cfg(hosts, hyperalign_pack, predictor_folder):
    return _comfy_run(hosts, hyperalign_pack, predictor_folder, CFG)


def _sigmas(hosts):
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(hosts.base.get_model_object("model_sampling"), "simple", STEPS)


def test_shifted_flow_schedules_agree(hosts):
    sigmas = _sigmas(hosts)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert rel_err(sigmas, torch.tensor(hosts.schedule.sigmas)) <= 1e-6
    ms = hosts.base.get_model_object("model_sampling")
    assert [float(ms.timestep(s)) for s in sigmas[:-1]] == pytest.approx(hosts.schedule.t, rel=1e-6)  # t = sigma


def test_every_step_same_velocity_hypernet_inputs_and_factors(hosts, comfy_cfg):
    from training.sampling import Trajectory

    family, schedule, batch = hosts.family, hosts.schedule, len(PROMPTS)
    guided = TrueCFG(family, hosts.negative, CFG)
    sigmas = _sigmas(hosts)
    assert len(comfy_cfg.x) == len(comfy_cfg.calls) == STEPS  # mode S: one hypernet call per step
    trajectory = Trajectory(guided, hosts.hypernet, hosts.hcfg, hosts.cond, schedule, GUIDANCE, "S")
    rows = []
    with torch.no_grad(), recording(hosts.hypernet) as calls:
        for step, (x, denoised) in enumerate(zip(comfy_cfg.x, comfy_cfg.denoised)):
            factors = trajectory.factors_at(step, x)  # FLUX: both hosts' state is x_t itself
            v = guided.predict(x, family.timesteps(schedule.t[step], batch), hosts.cond, factors, GUIDANCE)
            rows.append(
                {
                    "velocity": rel_err((x - denoised) / float(sigmas[step]), v),
                    **call_errors(calls[step], comfy_cfg.calls[step]),
                }
            )
    family.state.clear()
    worst = report("flux", rows)
    assert worst["progress"] <= 1e-6 and worst["context"] <= 1e-6
    assert max(worst.values()) <= TOL, worst
    spread = parity_lib.sample_spread(comfy_cfg.calls[0].factors)
    print(f"flux step 0: the two samples' LoRAs differ by at least {spread:.2e} (relative, per layer)")
    assert spread > EFFECT  # per-sample LoRAs: a row mix-up between samples would show


@pytest.mark.parametrize("cfg", [CFG, 1.0])
def test_full_runs_end_in_the_same_latents(cfg, hosts, comfy_cfg, hyperalign_pack, predictor_folder):
    """cfg > 1: ComfyUI's CFG rows against TrueCFG; cfg 1: the trainer's own FLUX sampler, unchanged."""
    from training.sampling import Trajectory

    comfy_run = comfy_cfg if cfg != 1.0 else _comfy_run(hosts, hyperalign_pack, predictor_folder, cfg)
    family = TrueCFG(hosts.family, hosts.negative, cfg) if cfg != 1.0 else hosts.family
    trajectory = Trajectory(family, hosts.hypernet, hosts.hcfg, hosts.cond, hosts.schedule, GUIDANCE, "S")
    final, _ = trajectory.generate(hosts.noise.clone())
    base = comfy_sample(
        hosts.base,
        hosts.hypernet,
        hosts.noise,
        STEPS,
        cfg,
        "simple",
        hosts.positive,
        hosts.comfy_negative,
        hosts.latent,
        SEED,
    )
    error, effect = rel_err(comfy_run.latent, final), rel_err(comfy_run.latent, base.latent)
    print(f"flux final latents, cfg {cfg}: relative error {error:.2e} (the predictor's effect: {effect:.2e})")
    assert error <= TOL
    assert effect > EFFECT  # the predictor really changes the result
