"""The target table on its own: golden counts, ids, slices, hashes, presets (hyperalign.targets)."""

from collections import defaultdict

import pytest

from hyperalign.targets import (
    FAMILIES,
    FLUX,
    SD15,
    SDXL,
    DiTArch,
    UNetArch,
    XLUNetArch,
    arch_from_dict,
    arch_to_dict,
    build_table,
    preset_names,
    targets_sha256,
)

# Pinned so that an accidental change to the table (names, order, shapes, slices) fails here: a changed
# table silently invalidates every predictor file trained against the old one.
GOLDEN_SHA256 = {
    (SD15, "attn"): "b1d9f32952a3c93f235245395c1ea3a029f018076ff5f1d2235f4eaf4251a9d8",
    (SD15, "cross_attn"): "b254acf072ca78c361d84cf50314a139373bf5e6dc704336b9748602734667e6",
    (FLUX, "attn"): "e06720a1c81fee06ef777cee1a1aeb8ec4fd971105fe679520cf1143d853b629",
    (SDXL, "attn"): "84436f7d9a726c8b83eaaf182abc1aa7431dd36eecd48db8670f151767a0953d",
    (SDXL, "cross_attn"): "ca75daefe22e0b573bbe6a7c0a4ebfb2a0b67e97b00ed52ea9589280d14cdc5a",
    (SDXL, "cross_kv"): "d65151a02c86af7f54df23a06211570c7a181095f1d13132a2ea2624cac36dd8",
    (SD15, "attn_conv"): "8014e5e457fe451e566416eefbc84c5b18ae855b6954df1d17b2179e14137f78",
    (SDXL, "attn_conv"): "ba3dcb1b2e4c32e79367a920a31a8f9e2f225897dcb54ad1d2e6dd9fd563979f",
}
# SDXL: transformer blocks down (level 1: 2 sites x 2, level 2: 2 x 10), middle 10, up (3 x 10, 3 x 2) = 70
SDXL_BLOCKS = 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2
# ResNet blocks, two 3x3 convolutions each: SD1.5 down 4 x 2, middle 2, up 4 x 3; SDXL down 3 x 2, middle 2, up 3 x 3
SD15_CONVS, SDXL_CONVS = 2 * (4 * 2 + 2 + 4 * 3), 2 * (3 * 2 + 2 + 3 * 3)

GOLDEN_COUNTS = [
    (SD15, "attn", 128),
    (SD15, "cross_attn", 64),
    (SD15, "self_attn", 64),
    (SD15, "attn_conv", 128 + SD15_CONVS),
    (FLUX, "attn", 19 * 8 + 38 * 3),
    (FLUX, "double_attn", 19 * 8),
    (FLUX, "img_attn", 19 * 4 + 38 * 3),
    (FLUX, "attn_mlp", 19 * 8 + 38 * 5),
    (SDXL, "attn", SDXL_BLOCKS * 8),
    (SDXL, "cross_attn", SDXL_BLOCKS * 4),
    (SDXL, "cross_kv", SDXL_BLOCKS * 2),
    (SDXL, "attn_conv", SDXL_BLOCKS * 8 + SDXL_CONVS),
]

TINY_UNET = UNetArch(block_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, context_dim=32)
TINY_XL = XLUNetArch(
    block_channels=(32, 64), transformer_depths=(0, 2), mid_depth=3, layers_per_block=1, context_dim=48
)


@pytest.mark.parametrize("family, preset, count", GOLDEN_COUNTS)
def test_golden_counts(family, preset, count):
    assert len(build_table(family).preset(preset)) == count


def test_default_preset_is_attn():
    for family in FAMILIES:
        table = build_table(family)
        assert table.preset() == table.preset("attn")


@pytest.mark.parametrize("family, preset", sorted(GOLDEN_SHA256))
def test_pinned_hashes(family, preset):
    assert targets_sha256(build_table(family).preset(preset)) == GOLDEN_SHA256[(family, preset)]


def test_hash_sees_order_shapes_and_slices():
    rows = build_table(FLUX).preset("attn")
    base = targets_sha256(rows)
    assert targets_sha256(rows[::-1]) != base
    assert targets_sha256(rows[:-1]) != base
    first = rows[0]
    changed = type(first)(first.id, first.comfy, first.in_features, first.out_features, (1, 3073))
    assert targets_sha256([changed, *rows[1:]]) != base
    assert targets_sha256(list(rows)) == targets_sha256(tuple(rows))


@pytest.mark.parametrize(
    "family, arch",
    [
        (SD15, None),
        (FLUX, None),
        (SDXL, None),
        (SD15, TINY_UNET),
        (FLUX, DiTArch(hidden_size=64, depth=2, depth_single_blocks=3)),
        (SDXL, XLUNetArch(block_channels=(32, 64, 64), transformer_depths=(0, 1, 2), mid_depth=2, context_dim=48)),
    ],
)
def test_ids_are_unique_and_comfy_slices_distinct(family, arch):
    rows = build_table(family, arch).rows
    assert len({t.id for t in rows}) == len(rows)
    assert len({(t.comfy, t.out_slice) for t in rows}) == len(rows)
    # a non-fused ComfyUI layer belongs to exactly one row
    plain = [t.comfy for t in rows if t.out_slice is None]
    assert len(set(plain)) == len(plain)
    assert not set(plain) & {t.comfy for t in rows if t.out_slice is not None}


@pytest.mark.parametrize("hidden, ratio", [(3072, 4.0), (64, 4.0), (48, 2.0)])
def test_fused_slices_tile_the_fused_width(hidden, ratio):
    table = build_table(FLUX, DiTArch(hidden_size=hidden, depth=2, depth_single_blocks=2, mlp_ratio=ratio))
    slices = defaultdict(list)
    for t in table.rows:
        if t.out_slice is not None:
            assert t.out_slice[1] - t.out_slice[0] == t.out_features
            slices[t.comfy].append(t.out_slice)
    assert set(slices) == {f"double_blocks.{i}.{s}_attn.qkv" for i in range(2) for s in ("img", "txt")} | {
        f"single_blocks.{i}.linear1" for i in range(2)
    }
    for comfy, spans in slices.items():
        spans.sort()
        assert spans[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), comfy
        fused_width = 3 * hidden + (int(hidden * ratio) if comfy.endswith("linear1") else 0)
        assert spans[-1][1] == fused_width


def test_sd15_shapes():
    table = build_table(SD15)
    index = table.by_id()
    assert index["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].in_features == 768
    assert index["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"].in_features == 320
    assert index["mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"].out_features == 1280
    up = index["up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v"]
    assert (up.comfy, up.in_features) == ("output_blocks.11.1.transformer_blocks.0.attn1.to_v", 320)
    assert index["down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q"].comfy == (
        "input_blocks.8.1.transformer_blocks.0.attn1.to_q"
    )
    attention = build_table(SD15).preset("attn")
    assert not any(t.id.startswith("down_blocks.3") or t.id.startswith("up_blocks.0") for t in attention)


@pytest.mark.parametrize(
    "id_, comfy, in_channels, out_channels",
    [
        ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", 320, 320),
        ("down_blocks.1.resnets.0.conv1", "input_blocks.4.0.in_layers.2", 320, 640),
        ("down_blocks.3.resnets.1.conv2", "input_blocks.11.0.out_layers.3", 1280, 1280),
        ("mid_block.resnets.1.conv1", "middle_block.2.in_layers.2", 1280, 1280),
        ("up_blocks.0.resnets.0.conv1", "output_blocks.0.0.in_layers.2", 2560, 1280),
        ("up_blocks.1.resnets.2.conv1", "output_blocks.5.0.in_layers.2", 1920, 1280),  # the skip of a 640 level
        ("up_blocks.3.resnets.0.conv1", "output_blocks.9.0.in_layers.2", 960, 320),
        ("up_blocks.3.resnets.2.conv2", "output_blocks.11.0.out_layers.3", 320, 320),
    ],
)
def test_sd15_resnet_convolutions(id_, comfy, in_channels, out_channels):
    """ComfyUI's ResBlock keeps conv1 at in_layers.2 and conv2 at out_layers.3; a LoCon down factor is c*3*3 wide."""
    row = build_table(SD15).by_id()[id_]
    assert (row.comfy, row.kernel, row.in_channels, row.out_features) == (comfy, (3, 3), in_channels, out_channels)
    assert row.in_features == 9 * in_channels and row.out_slice is None


def test_transformer_depth_multiplies_sites():
    assert len(build_table(SD15, UNetArch(transformer_depth=2)).preset("attn")) == 2 * 128


def test_no_mid_attention():
    rows = build_table(SD15, UNetArch(mid_attention=False)).preset("attn")
    assert len(rows) == 120 and not any(t.id.startswith("mid_block") for t in rows)


def test_select_keeps_order_and_names_unknown_ids():
    table = build_table(SD15)
    ids = [t.id for t in table.preset("attn")][::-1][:5]
    assert [t.id for t in table.select(ids)] == ids
    with pytest.raises(ValueError, match=r"HyperAlign: 1 target layer\(s\) do not exist in this sd15 model.*bogus"):
        table.select([ids[0], "bogus.layer"])


def test_unknown_preset_and_family():
    with pytest.raises(ValueError, match="HyperAlign: unknown target preset 'mlp' for sd15"):
        build_table(SD15).preset("mlp")
    with pytest.raises(ValueError, match="HyperAlign: unknown model family 'sd3'"):
        build_table("sd3")
    assert preset_names(FLUX) == ["attn", "attn_mlp", "double_attn", "img_attn"]


@pytest.mark.parametrize(
    "family, arch",
    [(SD15, TINY_UNET), (SD15, UNetArch()), (FLUX, DiTArch(64, 1, 1)), (SDXL, XLUNetArch()), (SDXL, TINY_XL)],
)
def test_arch_dict_round_trip(family, arch):
    data = arch_to_dict(arch)
    assert arch_from_dict(family, data) == arch
    assert build_table(family, data).rows == build_table(family, arch).rows


def test_arch_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"HyperAlign: unknown flux architecture keys \['block_channels'\]"):
        arch_from_dict(FLUX, {"block_channels": [32, 64]})


@pytest.mark.parametrize(
    "family, data",
    [
        (SD15, {"block_channels": [320, 640], "attention_levels": [True]}),
        (SD15, {"block_channels": [320, 0], "attention_levels": [True, True]}),
        (SD15, {"layers_per_block": 10**9}),
        (SD15, {"layers_per_block": "2"}),
        (SD15, {"context_dim": -1}),
        (SD15, {"attention_levels": [1, 1, 1, 0]}),
        (SD15, {"block_channels": [], "attention_levels": []}),
        (FLUX, {"depth": 10**12}),
        (FLUX, {"hidden_size": 3072.0}),
        (FLUX, {"mlp_ratio": float("inf")}),
        (FLUX, {"mlp_ratio": -1.0}),
        (FLUX, {"mlp_ratio": float("nan")}),
        (SDXL, {"transformer_depths": [0, 2]}),
        (SDXL, {"transformer_depths": [0, -1, 10]}),
        (SDXL, {"transformer_depths": [0, 2, 65]}),
        (SDXL, {"mid_depth": 1.5}),
        (SDXL, {"attention_levels": [False, True, True]}),
    ],
)
def test_absurd_architectures_are_rejected(family, data):
    """Architecture numbers come from file headers: they are bounded before any table is generated."""
    with pytest.raises(ValueError, match="HyperAlign: "):
        build_table(family, data)


def test_tiny_unet_rows():
    rows = build_table(SD15, TINY_UNET).preset("attn")
    assert len(rows) == 8 * (2 * 1 + 1 + 2 * 2)  # down 2 levels x 1, mid, up 2 levels x 2; 8 Linears per site
    assert {t.in_features for t in rows} == {32, 64}


def test_sdxl_shapes_and_comfy_paths():
    index = {t.id: t for t in build_table(SDXL).preset("attn")}
    assert not any(i.startswith(("down_blocks.0.", "up_blocks.2.")) for i in index)  # no attention at level 0
    k = index["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"]
    assert (k.comfy, k.in_features, k.out_features) == ("input_blocks.4.1.transformer_blocks.1.attn2.to_k", 2048, 640)
    q = index["down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_q"]
    assert (q.comfy, q.in_features) == ("input_blocks.8.1.transformer_blocks.9.attn1.to_q", 1280)
    mid = index["mid_block.attentions.0.transformer_blocks.9.attn2.to_out.0"]
    assert (mid.comfy, mid.out_features) == ("middle_block.1.transformer_blocks.9.attn2.to_out.0", 1280)
    up = index["up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_v"]
    assert (up.comfy, up.in_features) == ("output_blocks.5.1.transformer_blocks.1.attn1.to_v", 640)
    assert "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_q" in index
    assert "down_blocks.1.attentions.0.transformer_blocks.2.attn1.to_q" not in index  # depth 2 at level 1


def test_tiny_sdxl_rows():
    rows = build_table(SDXL, TINY_XL).preset("attn")
    assert len(rows) == 8 * (1 * 2 + 3 + 2 * 2)  # level 1: 1 down site and 2 up sites of depth 2; middle depth 3
    assert {t.in_features for t in rows} == {64, 48}


def test_sd15_and_sdxl_arch_are_not_interchangeable():
    with pytest.raises(ValueError, match="HyperAlign: unknown sdxl architecture keys"):
        build_table(SDXL, arch_to_dict(UNetArch()))
    with pytest.raises(ValueError, match="HyperAlign: sdxl targets need XLUNetArch numbers"):
        build_table(SDXL, UNetArch())
