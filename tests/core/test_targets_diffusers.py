"""The target table against diffusers models: full-size ones on the meta device, tiny ones for real.

Every row's id must be a diffusers nn.Linear (or, for a convolution row, nn.Conv2d) of the stated shape, and
every attention Linear and ResNet convolution of the model must be a row (so the table neither invents nor
misses layers).
"""

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel  # the [train] extra, installed for tests
from torch import nn

from hyperalign.lora import LoRAState, hooked, resolve_modules
from hyperalign.targets import FLUX, SD15, SDXL, DiTArch, UNetArch, XLUNetArch, build_table

# The real SD1.5 UNet config (runwayml/stable-diffusion-v1-5 unet/config.json, the fields that shape it)
SD15_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# The real SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the fields that shape it)
SDXL_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# The real FLUX.1 transformer config (black-forest-labs/FLUX.1-dev transformer/config.json)
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2,
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_UNET_ARCH = UNetArch(block_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, context_dim=32)
TINY_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
TINY_FLUX_ARCH = DiTArch(hidden_size=64, depth=2, depth_single_blocks=2)


@pytest.fixture(scope="module")
def sd15_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_CONFIG)


@pytest.fixture(scope="module")
def sdxl_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_CONFIG)


@pytest.fixture(scope="module")
def flux_transformer():
    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_CONFIG)


def linear_names(model, keep):
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and keep(name)}


def assert_rows_are_linears(model, rows):
    modules = dict(model.named_modules())
    for t in rows:
        module = modules.get(t.id)
        if t.kernel is not None:
            assert isinstance(module, nn.Conv2d), t.id
            assert tuple(module.weight.shape) == (t.out_features, t.in_channels, *t.kernel), t.id
            continue
        assert isinstance(module, nn.Linear), t.id
        assert (module.in_features, module.out_features) == (t.in_features, t.out_features), t.id
    resolved = resolve_modules(model, list(rows), lambda t: t.id)
    assert [r[0] for r in resolved] == list(rows)


def resnet_convs(model):
    return {
        n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and ".resnets." in n and n[-6:-1] == ".conv"
    }


def is_sd_attention(name):
    return ".attn1." in name or ".attn2." in name


def is_flux_attention(name):
    return ".attn." in name


def test_sd15_rows_are_the_unets_attention_linears(sd15_unet):
    table = build_table(SD15)
    assert next(sd15_unet.parameters()).is_meta
    assert_rows_are_linears(sd15_unet, table.rows)
    assert {t.id for t in table.preset("attn")} == linear_names(sd15_unet, is_sd_attention)
    assert {t.id for t in table.preset("cross_attn")} == linear_names(sd15_unet, lambda n: ".attn2." in n)
    assert {t.id for t in table.preset("attn_conv") if t.kernel} == resnet_convs(sd15_unet)


def test_sdxl_rows_are_the_unets_attention_linears(sdxl_unet):
    table = build_table(SDXL)
    assert next(sdxl_unet.parameters()).is_meta
    assert_rows_are_linears(sdxl_unet, table.rows)
    assert {t.id for t in table.preset("attn")} == linear_names(sdxl_unet, is_sd_attention)
    assert {t.id for t in table.preset("cross_attn")} == linear_names(sdxl_unet, lambda n: ".attn2." in n)
    assert {t.id for t in table.preset("attn_conv") if t.kernel} == resnet_convs(sdxl_unet)


def test_sdxl_trainer_reads_the_table_numbers_from_the_config(sdxl_unet):
    from training.sdxl import xl_unet_arch

    assert xl_unet_arch(sdxl_unet.config) == XLUNetArch()


def test_flux_rows_are_the_transformers_linears(flux_transformer):
    table = build_table(FLUX)
    assert next(flux_transformer.parameters()).is_meta
    assert_rows_are_linears(flux_transformer, table.rows)  # attn_mlp: every row of the table
    assert {t.id for t in table.preset("attn")} == linear_names(flux_transformer, is_flux_attention)
    single_mlp = linear_names(
        flux_transformer,
        lambda n: n.startswith("single_transformer_blocks.") and (n.endswith(".proj_mlp") or n.endswith(".proj_out")),
    )
    assert {t.id for t in table.rows if t.id.startswith("single_") and not is_flux_attention(t.id)} == single_mlp


def fire_counts(resolved):
    """Count calls per target with plain hooks beside HyperAlign's."""
    counts = {t.id: 0 for t, _, _ in resolved}
    handles = []
    for target, _, module in resolved:

        def count(module, args, output, key=target.id):
            counts[key] += 1

        handles.append(module.register_forward_hook(count))
    return counts, handles


def random_factors(rows, samples, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        t.id: (
            torch.randn(samples, rank, t.in_features, generator=g) * 0.1,
            torch.randn(samples, t.out_features, rank, generator=g) * 0.1,
        )
        for t in rows
    }


def run_hooked(model, rows, factors, forward):
    resolved = resolve_modules(model, rows, lambda t: t.id)
    counts, handles = fire_counts(resolved)
    state = LoRAState(scale=1.0)
    try:
        with torch.no_grad(), hooked(resolved, state):
            state.bind(factors)
            out = forward()
    finally:
        for handle in handles:
            handle.remove()
    return out, counts, state


def test_tiny_unet_every_row_is_called_once_and_changes_the_output():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    rows = build_table(SD15, TINY_UNET_ARCH).preset("attn_conv")
    assert {t.id for t in rows} == linear_names(unet, is_sd_attention) | resnet_convs(unet)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)

    def forward():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample

    with torch.no_grad():
        plain = forward()
    out, counts, state = run_hooked(unet, rows, random_factors(rows, 2), forward)
    assert set(counts.values()) == {1}
    assert state.calls == len(rows)
    assert not torch.allclose(out, plain)
    zero = {k: (d, torch.zeros_like(u)) for k, (d, u) in random_factors(rows, 2).items()}
    out_zero, _, _ = run_hooked(unet, rows, zero, forward)
    assert torch.equal(out_zero, plain)


def test_tiny_flux_every_row_is_called_once():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX_CONFIG).eval()
    rows = build_table(FLUX, TINY_FLUX_ARCH).preset("attn_mlp")
    assert_rows_are_linears(model, rows)
    tokens, text = 16, 6

    def forward():
        return model(
            hidden_states=torch.randn(2, tokens, 16, generator=torch.Generator().manual_seed(1)),
            encoder_hidden_states=torch.randn(2, text, 32, generator=torch.Generator().manual_seed(2)),
            pooled_projections=torch.randn(2, 24, generator=torch.Generator().manual_seed(3)),
            timestep=torch.tensor([0.3, 0.8]),
            img_ids=torch.zeros(tokens, 3),
            txt_ids=torch.zeros(text, 3),
            guidance=torch.tensor([3.5, 3.5]),
        ).sample

    with torch.no_grad():
        plain = forward()
    out, counts, state = run_hooked(model, rows, random_factors(rows, 2), forward)
    assert set(counts.values()) == {1}
    assert state.calls == len(rows)
    assert not torch.allclose(out, plain)
