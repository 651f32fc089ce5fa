"""The SDXL family adapter on a tiny SDXL-structured folder: two text encoders, pooled text and size conditioning."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

from hyperalign.targets import SDXL, XLUNetArch, build_table
from training.adapters import load_adapter


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, prefs, tmp_path_factory):
    cfg = tiny_config(tiny_sdxl, prefs, tmp_path_factory.mktemp("out"), family="sdxl")
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


def test_arch_targets_and_frozen(sdxl):
    family, _ = sdxl
    assert family.name == SDXL
    assert family.arch == XLUNetArch(
        block_channels=(32, 64, 128), transformer_depths=(0, 1, 2), mid_depth=2, layers_per_block=1, context_dim=64
    )
    assert (family.feature_dim, family.context_dim) == (128, 64)
    targets = build_table(SDXL, family.arch).preset("attn")
    assert len(targets) == 8 * (1 + 2 + 2 + 2 * 2 + 2 * 1)  # down 1 + 2, middle 2, up 2 x 2 + 2 x 1 blocks
    family.attach(targets, 1.0)
    assert all(not p.requires_grad for m in family.frozen() for p in m.parameters())
    assert len(family.frozen()) == 4  # UNet, VAE and both text encoders
    family.detach()


def test_prompts_use_both_encoders_and_the_pooled_projection(sdxl):
    family, _ = sdxl
    cond = family.encode_prompts(["a cat", "a dog"], uncond=True)
    assert cond.context.shape == (2, 77, 64) and cond.tensors["pooled"].shape == (2, 32)
    ids = family._tokens(family.tokenizer_2, ["a cat"], 77)
    with torch.no_grad():
        second = family.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(cond.context[:1, :, 32:], second.hidden_states[-2])  # penultimate layer, as SDXL
    torch.testing.assert_close(cond.tensors["pooled"][:1], second.text_embeds)
    # one negative row ("" encoded, not zeros), repeated, with its own pooled vector
    assert torch.equal(cond.tensors["uncond"][0], cond.tensors["uncond"][1])
    assert cond.tensors["uncond_pooled"].shape == (2, 32) and cond.tensors["uncond_pooled"].abs().sum() > 0
    assert family.time_ids(2).tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2


def test_schedule_matches_sd15_ddim_on_sdxl_scheduler_config(sdxl):
    family, _ = sdxl
    assert family.sampling_steps(4).t == [999.0, 749.0, 499.0, 249.0]  # "trailing": ComfyUI's "simple"
    assert family.progress(999.0) == 0.0


def test_features_are_the_middle_block_with_text_and_size_conditioning(sdxl):
    family, cfg = sdxl
    hcfg = cfg.hypernet.resolve(family.feature_dim, family.context_dim)
    cond = family.encode_prompts(["a cat"], uncond=False)
    x, t = torch.randn(1, 4, 16, 16), family.timesteps(499, 1)
    features = family.features(x, t, cond, hcfg)
    assert features.shape == (1, 16, 128)  # (b, 4x4 mid-block grid, mid-block channels)
    seen = []
    handle = family.denoiser.mid_block.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        family.predict(x, t, cond, None, 1.0)
    handle.remove()
    from hyperalign.hypernet import feature_tokens

    assert torch.equal(features, feature_tokens(seen[0], hcfg.feature_grid))  # the model's own pass, stopped early
    other = dataclasses.replace(cond, tensors={"pooled": cond.tensors["pooled"] + 1.0})
    assert not torch.allclose(family.features(x, t, other, hcfg), features)  # the pooled text is in place
    saved = family.cfg
    family.cfg = dataclasses.replace(saved, resolution=64)
    try:
        assert not torch.allclose(family.features(x, t, cond, hcfg), features)  # and the size conditioning
    finally:
        family.cfg = saved


def test_lora_and_cfg(sdxl):
    family, _ = sdxl
    targets = build_table(SDXL, family.arch).preset("attn")
    family.attach(targets, 1.0)
    cond = family.encode_prompts(["a cat", "a dog"], uncond=True)
    x, t = torch.randn(2, 4, 16, 16), family.timesteps(499, 2)
    base = family.predict(x, t, cond, None, 3.0)
    zero = {k: (d, torch.zeros_like(u)) for k, (d, u) in _factors(targets, 2).items()}
    assert torch.equal(family.predict(x, t, cond, zero, 3.0), base)
    assert (family.predict(x, t, cond, _factors(targets, 2), 3.0) - base).abs().max() > 1e-4
    eps_c = family.predict(x, t, dataclasses.replace(cond, tensors={"pooled": cond.tensors["pooled"]}), None, 1.0)
    negative = {"pooled": cond.tensors["uncond_pooled"]}
    uncond = dataclasses.replace(cond, context=cond.tensors["uncond"], tensors=negative)
    eps_u = family.predict(x, t, uncond, None, 1.0)
    assert torch.allclose(base, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-4)
    family.detach()


def test_refiner_conditioning_is_refused(sdxl):
    """The refiner's text_time input: pooled text and five values (aesthetic score), not six sizes."""
    from training.sdxl import check_text_time

    family, _ = sdxl
    check_text_time(family.denoiser.config, 32)  # the tiny SDXL: 32 + 6 x 256
    refiner = SimpleNamespace(projection_class_embeddings_input_dim=32 + 5 * 256, addition_time_embed_dim=256)
    with pytest.raises(ValueError, match="HyperAlign: .* not an SDXL base model .*refiner is not supported"):
        check_text_time(refiner, 32)


def test_non_sdxl_unet_is_refused(tiny_sd15, prefs, tmp_path):
    cfg = tiny_config(tiny_sd15, prefs, tmp_path, family="sdxl")
    with pytest.raises(ValueError, match="HyperAlign: the sdxl family needs a UNet with SDXL's text_time"):
        load_adapter(cfg.model, "cpu")
