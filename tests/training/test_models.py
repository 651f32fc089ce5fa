"""Family adapters: the tiny SD1.5 / FLUX folders load through the real loaders; targets, features, formulas."""

import pytest
import torch
from conftest import tiny_config

from hyperalign.targets import build_table
from training.adapters import load_adapter
from training.flux import pack, unpack


@pytest.fixture(scope="module")
def sd15(tiny_sd15, prefs, tmp_path_factory):
    cfg = tiny_config(tiny_sd15, prefs, tmp_path_factory.mktemp("out"))
    return load_adapter(cfg.model, "cpu"), cfg


@pytest.fixture(scope="module")
def flux(tiny_flux, prefs, tmp_path_factory):
    cfg = tiny_config(tiny_flux, prefs, tmp_path_factory.mktemp("out"), family="flux")
    return load_adapter(cfg.model, "cpu"), cfg


def _factors(targets, b, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        t.id: (
            torch.randn(b, 2, t.in_features, generator=g) * scale,
            torch.randn(b, t.out_features, 2, generator=g) * scale,
        )
        for t in targets
    }


def test_sd15_arch_targets_and_frozen(sd15):
    family, _ = sd15
    assert family.arch.block_channels == (16, 32) and family.arch.attention_levels == (True, False)
    assert (family.feature_dim, family.context_dim) == (32, 32)
    targets = build_table("sd15", family.arch).preset("attn")
    assert len(targets) == 32  # down level 0 (1 site), mid (1), up level 0 (2 sites): 4 x 8 projections
    family.attach(targets, 1.0)
    assert all(not p.requires_grad for m in family.frozen() for p in m.parameters())
    family.detach()


def test_sd15_schedule_progress_and_x0(sd15):
    family, _ = sd15
    schedule = family.sampling_steps(4)
    assert schedule.t == [999.0, 749.0, 499.0, 249.0]
    assert schedule.progress[0] == 0.0 and schedule.progress[1] == pytest.approx(1 - 749 / 999)
    x, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = family.timesteps(749, 2)
    reference = schedule.ddim.step(eps, 749, x).pred_original_sample
    assert torch.allclose(family.x0(x, eps, t), reference, atol=1e-5)
    x0 = torch.randn(2, 4, 16, 16)
    x_t, t, progress, target = family.noise_for_preference(x0, eps, torch.tensor([0.0, 0.9995]))
    assert t.tolist() == [0.0, 999.0] and progress.tolist() == pytest.approx([1.0, 0.0]) and target is eps
    assert torch.allclose(family.x0(x_t, eps, t), x0, atol=1e-3)


def test_sd15_features_lora_and_cfg(sd15):
    family, cfg = sd15
    hcfg = cfg.hypernet.resolve(family.feature_dim, family.context_dim)
    targets = build_table("sd15", family.arch).preset("attn")
    family.attach(targets, 1.0)
    cond = family.encode_prompts(["a cat", "a dog"], uncond=True)
    assert cond.context.shape == (2, 77, 32) and cond.tensors["uncond"].shape == (2, 77, 32)
    x, t = torch.randn(2, 4, 16, 16), family.timesteps(499, 2)
    features = family.features(x, t, cond, hcfg)
    assert features.shape == (2, 16, 32)  # (b, grid 4 x 4, mid-block channels)
    base = family.predict(x, t, cond, None, 3.0)
    zero = {k: (d, torch.zeros_like(u)) for k, (d, u) in _factors(targets, 2).items()}
    rows = family.rows(cond, 3.0, 2)
    assert rows == 4  # cond and uncond chunks in one call
    with family.bound(zero, rows, 2):
        assert torch.equal(family.predict(x, t, cond, None, 3.0), base)
    with family.bound(_factors(targets, 2), rows, 2):
        lora = family.predict(x, t, cond, None, 3.0)
    assert (lora - base).abs().max() > 1e-4
    assert torch.equal(family.predict(x, t, cond, None, 3.0), base)  # the block unbound its factors
    assert torch.equal(family.predict(x, t, cond, _factors(targets, 2), 3.0), lora)  # the old way: factors given
    eps_c = family.predict(x, t, cond.__class__(cond.prompts, cond.context), None, 1.0)
    uncond = cond.__class__(cond.prompts, cond.tensors["uncond"])
    eps_u = family.predict(x, t, uncond, None, 1.0)
    assert torch.allclose(base, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-4)  # batch 4 vs 2: float noise
    family.detach()


def test_bound_unbinds_on_error_and_does_not_nest(sd15):
    family, _ = sd15
    targets = build_table("sd15", family.arch).preset("attn")
    family.attach(targets, 1.0)
    try:
        with pytest.raises(KeyboardInterrupt), family.bound(_factors(targets, 2), 4, 2):
            assert family.state.for_target(targets[0].id) is not None
            raise KeyboardInterrupt
        assert family.state.factors is None and family.state.for_target(targets[0].id) is None
        with family.bound(None, 2, 2), pytest.raises(RuntimeError, match="do not nest"):
            with family.bound(_factors(targets, 2), 2, 2):
                pass
        with family.bound(_factors(targets, 2), 2, 2), pytest.raises(RuntimeError, match="give the factors to bound"):
            family.predict(
                torch.randn(2, 4, 16, 16),
                family.timesteps(9, 2),
                family.encode_prompts(["a", "b"], False),
                _factors(targets, 2),
                1.0,
            )
    finally:
        family.detach()


def test_features_see_the_base_model_inside_a_block(sd15):
    family, cfg = sd15
    hcfg = cfg.hypernet.resolve(family.feature_dim, family.context_dim)
    targets = build_table("sd15", family.arch).preset("attn")
    family.attach(targets, 1.0)
    cond = family.encode_prompts(["a cat"], uncond=False)
    x, t = torch.randn(1, 4, 16, 16), family.timesteps(499, 1)
    base = family.features(x, t, cond, hcfg)
    factors = _factors(targets, 1)
    with family.bound(factors, 1, 1):
        assert torch.equal(family.features(x, t, cond, hcfg), base)
        assert family.state.factors is factors  # and the block's LoRA is back after the encoder
    family.detach()


def test_sd15_decode_encode(sd15):
    family, _ = sd15
    latents = torch.randn(1, 4, 16, 16, requires_grad=True)
    images = family.decode(latents)
    from diffusers.image_processor import VaeImageProcessor

    with torch.no_grad():  # diffusers' own postprocessing of the VAE's output
        raw = family.vae.decode(latents / family.vae.config.scaling_factor).sample
    torch.testing.assert_close(images.detach(), VaeImageProcessor().postprocess(raw, output_type="pt"))
    images.mean().backward()
    assert latents.grad.abs().sum() > 0
    assert family.encode(images.detach()).shape == (1, 4, 16, 16)


def test_flux_arch_targets_and_features(flux):
    family, cfg = flux
    assert (family.arch.hidden_size, family.arch.depth, family.arch.depth_single_blocks) == (32, 2, 2)
    assert family.guidance_embeds and (family.feature_dim, family.context_dim) == (32, 32)
    targets = build_table("flux", family.arch).preset("attn")
    assert len(targets) == 2 * 8 + 2 * 3
    family.attach(targets, 1.0)
    hcfg = cfg.hypernet.resolve(family.feature_dim, family.context_dim)
    cond = family.encode_prompts(["a cat"])
    assert cond.context.shape == (1, 1, 32) and cond.tensors["t5"].shape == (1, 16, 32)
    x, t = torch.randn(1, 16, 16, 16), family.timesteps(0.7, 1)
    assert family.features(x, t, cond, hcfg, 3.5).shape == (1, 16, 32)  # 8x8 patch grid pooled to 4x4
    base = family.predict(x, t, cond, None, 3.5)
    assert base.shape == x.shape
    assert (family.predict(x, t, cond, _factors(targets, 1), 3.5) - base).abs().max() > 1e-4
    family.detach()


def test_flux_schedule_x0_and_euler_step(flux):
    from diffusers import FlowMatchEulerDiscreteScheduler

    family, _ = flux
    schedule = family.sampling_steps(4)
    assert schedule.t[0] == pytest.approx(1.0) and schedule.sigmas[-1] == 0.0
    assert schedule.progress == pytest.approx([1 - s for s in schedule.t])
    reference = FlowMatchEulerDiscreteScheduler.from_config(family.flow_match.config)
    reference.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=family._mu())
    assert schedule.sigmas == pytest.approx(reference.sigmas.tolist())
    x, v = torch.randn(1, 16, 16, 16), torch.randn(1, 16, 16, 16)
    reference.step(v, reference.timesteps[0], x)  # the scheduler counts its steps: advance it to step 1
    assert torch.allclose(
        family.step(x, v, 1, schedule), reference.step(v, reference.timesteps[1], x).prev_sample, atol=1e-6
    )
    sigma = family.timesteps(schedule.t[1], 1)
    assert torch.allclose(family.x0(x, v, sigma), x - schedule.t[1] * v)
    x0, noise = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16)
    x_t, s, progress, target = family.noise_for_preference(x0, noise, torch.tensor([0.2, 0.8]))
    assert torch.allclose(target, noise - x0) and torch.allclose(progress, 1 - s)
    assert torch.allclose(family.x0(x_t, target, s), x0, atol=1e-5)  # the velocity target recovers x0
    assert torch.equal(unpack(pack(x0), 16, 16), x0)


def test_every_configurable_family_has_one_registered_adapter():
    import typing

    from training.adapters import ADAPTERS
    from training.config import ModelConfig

    families = typing.get_args(typing.get_type_hints(ModelConfig)["family"])
    assert sorted(ADAPTERS) == sorted(families)
    for name, adapter in ADAPTERS.items():
        assert adapter.name == name and len(build_table(name).preset("attn")) > 0  # the core's family string
        assert adapter.load.__qualname__ == f"{adapter.__name__}.load"  # each adapter loads its own model
