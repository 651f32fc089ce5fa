"""The target table against a real ComfyUI: full-size models on the meta device, tiny ones for real.

Every row's `comfy` path must hold a Linear whose weight covers the row (its out_slice inside the
fused output) or, for a convolution row, a Conv2d of its kernel and channels; the fused slices must
tile qkv/linear1 exactly, and our rows must agree with ComfyUI's own diffusers key maps
(comfy.utils.unet_to_diffusers / flux_to_diffusers).
"""

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hyperalign.lora import LoRAState, hooked, resolve_modules
from hyperalign.targets import FLUX, SD15, SDXL, DiTArch, UNetArch, XLUNetArch, arch_to_dict, build_table

pytestmark = pytest.mark.comfy
DETECTION = "nodes.model_info"  # the pack module that identifies a MODEL's family

# comfy/model_detection.py's SD15 unet_config, written out
SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# SDXL base as comfy/model_detection.py detects it
SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# FLUX.1-dev as comfy/model_detection.py detects it
FLUX_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 19,
    "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "patch_size": 2,
    "qkv_bias": True,
    "guidance_embed": True,
}
TINY_UNET_CONFIG = dict(
    SD15_UNET_CONFIG,
    model_channels=32,
    channel_mult=[1, 2],
    num_res_blocks=[1, 1],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    context_dim=32,
    num_heads=2,
)
TINY_UNET_ARCH = UNetArch(block_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, context_dim=32)
TINY_FLUX_CONFIG = dict(
    FLUX_CONFIG,
    vec_in_dim=24,
    context_in_dim=32,
    hidden_size=64,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[4, 6, 6],
)
TINY_FLUX_ARCH = DiTArch(hidden_size=64, depth=2, depth_single_blocks=2)


@pytest.fixture(scope="module")
def comfy(comfy_host):
    """The real ComfyUI host (tests/conftest.py imports it once, on CPU) and the modules these tests use."""
    import comfy.ops
    import comfy.supported_models
    import comfy.utils

    assert Path(comfy.utils.__file__).resolve().parents[1] == comfy_host.path
    return comfy


def build(comfy, model_class, config, device, dtype=torch.float32):
    model_config = model_class(dict(config, **host_fields(comfy, model_class)))
    model_config.set_inference_dtype(dtype, None)
    return model_config.get_model({}, "", device=torch.device(device)).diffusion_model


@pytest.fixture(scope="module")
def sd15_unet(comfy):
    return build(comfy, comfy.supported_models.SD15, SD15_UNET_CONFIG, "meta")


@pytest.fixture(scope="module")
def sdxl_unet(comfy):
    return build(comfy, comfy.supported_models.SDXL, SDXL_UNET_CONFIG, "meta")


@pytest.fixture(scope="module")
def flux_model(comfy):
    return build(comfy, comfy.supported_models.Flux, FLUX_CONFIG, "meta", torch.bfloat16)


def comfy_path(target):
    return target.comfy


def assert_rows_fit(model, rows):
    modules = dict(model.named_modules())
    for t in rows:
        module = modules.get(t.comfy)
        if t.kernel is not None:
            assert isinstance(module, nn.Conv2d), t.comfy
            assert tuple(module.weight.shape) == (t.out_features, t.in_channels, *t.kernel), t.id
            continue
        assert isinstance(module, nn.Linear), t.comfy
        rows_out, cols_in = module.weight.shape
        assert cols_in == t.in_features, t.id
        if t.out_slice is None:
            assert rows_out == t.out_features, t.id
        else:
            assert 0 <= t.out_slice[0] < t.out_slice[1] <= rows_out, t.id
    resolved = resolve_modules(model, list(rows), comfy_path)
    assert len(resolved) == len(rows)


def test_sd15_rows_exist_in_comfy_unet(sd15_unet):
    table = build_table(SD15)
    assert type(sd15_unet).__name__ == "UNetModel" and next(sd15_unet.parameters()).is_meta
    assert_rows_fit(sd15_unet, table.rows)
    attention = {
        n for n, m in sd15_unet.named_modules() if isinstance(m, nn.Linear) and (".attn1." in n or ".attn2." in n)
    }
    assert {t.comfy for t in table.preset("attn")} == attention
    assert {t.comfy for t in table.rows if t.kernel} == resnet_convs(sd15_unet)


def resnet_convs(unet):
    """ComfyUI's ResBlock convolutions: in_layers.2 and out_layers.3 of every ResBlock."""
    return {
        f"{name}.{part}"
        for name, m in unet.named_modules()
        if type(m).__name__ == "ResBlock"
        for part in ("in_layers.2", "out_layers.3")
    }


def test_sdxl_rows_exist_in_comfy_sdxl_unet(sdxl_unet):
    table = build_table(SDXL)
    assert type(sdxl_unet).__name__ == "UNetModel" and next(sdxl_unet.parameters()).is_meta
    assert_rows_fit(sdxl_unet, table.rows)
    attention = {
        n for n, m in sdxl_unet.named_modules() if isinstance(m, nn.Linear) and (".attn1." in n or ".attn2." in n)
    }
    assert {t.comfy for t in table.preset("attn")} == attention
    assert {t.comfy for t in table.rows if t.kernel} == resnet_convs(sdxl_unet)


def is_table_key(key: str) -> bool:
    """A diffusers weight key of a kind the UNet table covers: attention Linears and ResNet convolutions."""
    return key.endswith(".weight") and (
        ".attn1." in key
        or ".attn2." in key
        or (".resnets." in key and key.endswith((".conv1.weight", ".conv2.weight")))
    )


def test_sdxl_rows_agree_with_unet_to_diffusers(comfy):
    key_map = comfy.utils.unet_to_diffusers(dict(SDXL_UNET_CONFIG))
    rows = build_table(SDXL).rows
    for t in rows:
        assert key_map[f"{t.id}.weight"] == f"{t.comfy}.weight", t.id
    theirs = {k[: -len(".weight")] for k in key_map if is_table_key(k)}
    assert theirs == {t.id for t in rows}


def test_sdxl_nodes_read_the_table_numbers_from_comfy_config(comfy, hyperalign_pack):
    """The nodes' model detection turns ComfyUI's SDXL unet_config into the default SDXL architecture."""
    config = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    model = SimpleNamespace(model=config.get_model({}, "", device=torch.device("meta")))
    info = hyperalign_pack.submodule(DETECTION).identify_model(model)
    assert (info.family, info.feature_dim, info.context_dim) == (SDXL, 1280, 2048)
    assert arch_to_dict(info.arch) == arch_to_dict(XLUNetArch())  # the pack has its own copy of the class


def test_flux_rows_exist_in_comfy_flux(flux_model):
    table = build_table(FLUX)
    assert type(flux_model).__name__ == "Flux" and next(flux_model.parameters()).is_meta
    assert_rows_fit(flux_model, table.rows)


def test_flux_fused_slices_tile_the_fused_weights(flux_model):
    modules = dict(flux_model.named_modules())
    slices = defaultdict(list)
    for t in build_table(FLUX).rows:
        if t.out_slice is not None:
            slices[t.comfy].append(t.out_slice)
    assert len(slices) == 19 * 2 + 38
    for comfy_name, spans in slices.items():
        covered = torch.zeros(modules[comfy_name].weight.shape[0], dtype=torch.int)
        for start, stop in spans:
            covered[start:stop] += 1
        assert bool((covered == 1).all()), comfy_name  # every output row exactly once


def test_sd15_rows_agree_with_unet_to_diffusers(comfy):
    key_map = comfy.utils.unet_to_diffusers(dict(SD15_UNET_CONFIG))
    rows = build_table(SD15).rows
    for t in rows:
        assert key_map[f"{t.id}.weight"] == f"{t.comfy}.weight", t.id
    theirs = {k[: -len(".weight")] for k in key_map if is_table_key(k)}
    assert theirs == {t.id for t in rows}


def host_fields(comfy, model_class) -> dict:
    """Config fields newer hosts require, at FLUX.1's value: ComfyUI 0.33's FluxParams needs txt_ids_dims."""
    import dataclasses

    import comfy.ldm.flux.model as flux_model

    required = {field.name for field in dataclasses.fields(flux_model.FluxParams)}
    flux = model_class is comfy.supported_models.Flux
    return {"txt_ids_dims": []} if flux and "txt_ids_dims" in required else {}


# ComfyUI 0.33 also maps FLUX.2's diffusers names onto the same single-block weights: aliases, not more layers
FLUX2_ALIASES = (".attn.to_qkv_mlp_proj.weight", ".attn.to_out.weight")


def flux_row_keys(key_map):
    """Diffusers ids that ComfyUI maps onto the attention and single-block Linears our table covers."""
    covered = (".qkv.weight", ".linear1.weight", ".linear2.weight", "_attn.proj.weight")
    ids = set()
    for key, value in key_map.items():
        comfy_key = value[0] if isinstance(value, tuple) else value
        if key.endswith(".weight") and comfy_key.endswith(covered) and not key.endswith(FLUX2_ALIASES):
            ids.add(key[: -len(".weight")])
    return ids


@pytest.mark.parametrize(
    "config, arch", [(FLUX_CONFIG, None), (TINY_FLUX_CONFIG, TINY_FLUX_ARCH)], ids=["real", "tiny"]
)
def test_flux_rows_agree_with_flux_to_diffusers(comfy, config, arch):
    key_map = comfy.utils.flux_to_diffusers(dict(config), output_prefix="")
    rows = build_table(FLUX, arch).rows
    for t in rows:
        expected = f"{t.comfy}.weight"
        if t.out_slice is not None:
            start, stop = t.out_slice
            expected = (expected, (0, start, stop - start))  # (dim, offset, size)
        assert key_map[f"{t.id}.weight"] == expected, t.id
    assert flux_row_keys(key_map) == {t.id for t in rows}


def test_tiny_unet_rows_agree_with_unet_to_diffusers(comfy):
    key_map = comfy.utils.unet_to_diffusers(dict(TINY_UNET_CONFIG))
    rows = build_table(SD15, TINY_UNET_ARCH).rows
    for t in rows:
        assert key_map[f"{t.id}.weight"] == f"{t.comfy}.weight", t.id
    assert len(rows) == 56 + 2 * (2 + 2 + 4)  # attention, then 8 ResNet blocks' convolutions


def initialise(model, seed=0):
    """ComfyUI's ops skip weight init (params are torch.empty): fill them deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(p.shape[-1], 1) ** 0.5))
    return model.eval()


def run_with_hooks(model, rows, forward, samples):
    g = torch.Generator().manual_seed(7)
    factors = {
        t.id: (
            torch.randn(samples, 2, t.in_features, generator=g),
            torch.randn(samples, t.out_features, 2, generator=g),
        )
        for t in rows
    }
    resolved = resolve_modules(model, rows, comfy_path)
    state = LoRAState(scale=0.1)
    with torch.no_grad(), hooked(resolved, state):
        state.bind(factors)
        out = forward()
    assert all(len(m._forward_hooks) == 0 for _, _, m in resolved)
    return out, state


def test_tiny_comfy_unet_every_row_fires(comfy):
    torch.manual_seed(0)
    unet = initialise(build(comfy, comfy.supported_models.SD15, TINY_UNET_CONFIG, "cpu"))
    rows = build_table(SD15, TINY_UNET_ARCH).preset("attn_conv")
    assert_rows_fit(unet, rows)
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)

    def forward():
        return unet(x, torch.tensor([10.0, 500.0]), context=context)

    with torch.no_grad():
        plain = forward()
    out, state = run_with_hooks(unet, rows, forward, 2)
    assert state.calls == len(rows)  # each attention Linear and ResNet convolution ran once, with its LoRA
    assert not torch.allclose(out, plain)


def test_tiny_comfy_flux_every_row_fires(comfy):
    torch.manual_seed(0)
    model = initialise(build(comfy, comfy.supported_models.Flux, TINY_FLUX_CONFIG, "cpu"))
    rows = build_table(FLUX, TINY_FLUX_ARCH).preset("attn_mlp")
    assert_rows_fit(model, rows)
    x, context, y = torch.randn(2, 16, 8, 8), torch.randn(2, 6, 32), torch.randn(2, 24)

    def forward():
        return model(x, torch.tensor([0.3, 0.8]), context, y=y, guidance=torch.tensor([3.5, 3.5]))

    with torch.no_grad():
        plain = forward()
    out, state = run_with_hooks(model, rows, forward, 2)
    assert state.calls == len(rows)  # q, k, v and mlp slices of each fused layer all fired
    assert not torch.allclose(out, plain)
