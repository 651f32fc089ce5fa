"""LoCon targets (hyperalign.lora on nn.Conv2d): per-sample hooks against merged kernels, merges, errors, export."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperalign import LoRAState, hooked, resolve_modules
from hyperalign.fusecost import measure_side
from hyperalign.lora import ConvGeometry, fused_weights, merge_weights, merged_weight, swapped_weights
from hyperalign.targets import Target

IN_CH, OUT_CH, RANK, SCALE = 5, 6, 3, 0.7
TARGET = Target("block.conv", "block.conv", IN_CH * 9, OUT_CH, None, (3, 3))


def make_root(conv: nn.Conv2d | None = None) -> nn.Module:
    torch.manual_seed(0)
    root = nn.Module()
    root.block = nn.Module()
    root.block.conv = conv if conv is not None else nn.Conv2d(IN_CH, OUT_CH, 3, padding=1)
    return root


def factors(samples: int, seed: int = 1, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(samples, RANK, IN_CH * 9, generator=g).requires_grad_(requires_grad)
    up = torch.randn(samples, OUT_CH, RANK, generator=g).requires_grad_(requires_grad)
    return {TARGET.id: (down, up)}


def run(root, fac, x, row_index=None):
    state = LoRAState(scale=SCALE)
    with hooked(resolve_modules(root, [TARGET], lambda t: t.comfy), state):
        state.bind(fac, row_index)
        return root.block.conv(x), state


def reference(conv: nn.Conv2d, x, down, up, sample_of_row):
    """Each row through the conv with its sample's merged kernel W + s * (up @ down).reshape(W.shape)."""
    rows = []
    for r, s in enumerate(sample_of_row):
        weight = merged_weight(conv.weight.detach().double(), down[s].double(), up[s].double(), SCALE)
        rows.append(
            F.conv2d(
                x[r : r + 1].double(), weight, conv.bias.detach().double(), conv.stride, conv.padding, conv.dilation
            )
        )
    return torch.cat(rows)


@pytest.mark.parametrize(
    "kwargs", [dict(padding=1), dict(padding=0), dict(padding=2, stride=2), dict(padding=2, dilation=2)]
)
def test_hooked_conv_matches_merged_kernel_per_sample(kwargs):
    root = make_root(nn.Conv2d(IN_CH, OUT_CH, 3, **kwargs))
    fac = factors(3)
    x = torch.randn(3, IN_CH, 9, 7)
    y, state = run(root, fac, x)
    torch.testing.assert_close(
        y.double(), reference(root.block.conv, x, *fac[TARGET.id], range(3)), rtol=1e-5, atol=1e-5
    )
    assert state.calls == 1


def test_cfg_rows_get_their_samples_conv_lora():
    """Chunk-major rows (cond then uncond chunk of the same 2 samples): row r takes sample r % 2's kernel."""
    root = make_root()
    fac = factors(2)
    x = torch.randn(4, IN_CH, 6, 6)
    y, _ = run(root, fac, x, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(
        y.double(), reference(root.block.conv, x, *fac[TARGET.id], [0, 1, 0, 1]), rtol=1e-5, atol=1e-5
    )


def test_gradient_reaches_the_factors_not_the_kernel():
    root = make_root()
    root.requires_grad_(False)
    fac = factors(2, requires_grad=True)
    y, _ = run(root, fac, torch.randn(2, IN_CH, 5, 5))
    y.square().sum().backward()
    down, up = fac[TARGET.id]
    assert down.grad.abs().sum() > 0 and up.grad.abs().sum() > 0
    assert root.block.conv.weight.grad is None


def test_merged_kernel_matches_hooks_and_the_original_comes_back():
    root = make_root()
    fac = factors(1)
    x = torch.randn(1, IN_CH, 6, 6)
    hooked_out, _ = run(root, fac, x)
    original = root.block.conv.weight
    saved = original.detach().clone()
    resolved = resolve_modules(root, [TARGET], lambda t: t.comfy)
    merged, rest = fused_weights(resolved, fac, 0, SCALE)
    assert rest == [] and merged[root.block.conv].shape == original.shape
    with torch.no_grad(), swapped_weights(merged):
        fused_out = root.block.conv(x)
    torch.testing.assert_close(fused_out, hooked_out, rtol=1e-5, atol=1e-5)
    assert root.block.conv.weight is original and torch.equal(original, saved)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernel_merges_in_fp32(dtype):
    weight = torch.randn(OUT_CH, IN_CH, 3, 3).to(dtype)
    down, up = factors(1)[TARGET.id]
    merged = merge_weights(weight, [(down[0], up[0], None)], SCALE)
    expected = (weight.float() + SCALE * (up[0] @ down[0]).reshape(OUT_CH, IN_CH, 3, 3)).to(dtype)
    assert merged.dtype == dtype and torch.equal(merged, expected)


@pytest.mark.parametrize(
    "conv, match",
    [
        (nn.Conv2d(IN_CH + 1, OUT_CH, 3), r"weight shape \(6, 6, 3, 3\)"),
        (nn.Conv2d(IN_CH, OUT_CH, 1), r"weight shape \(6, 5, 1, 1\)"),
        (nn.Conv2d(IN_CH, OUT_CH, 3, padding=1, padding_mode="reflect"), "zero padding"),
        (nn.Linear(IN_CH * 9, OUT_CH), "not a Conv2d layer"),
    ],
    ids=["channels", "kernel", "reflect", "linear"],
)
def test_a_mismatched_layer_is_named(conv, match):
    with pytest.raises((TypeError, ValueError), match=f"HyperAlign: .*{match}"):
        resolve_modules(make_root(conv), [TARGET], lambda t: t.comfy)


def test_geometry_and_side_cost_measure_the_conv_path():
    conv = nn.Conv2d(IN_CH, OUT_CH, 3, stride=2, padding=1)
    geometry = ConvGeometry.of(conv)
    assert geometry == ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1))
    assert geometry.output_size((9, 8)) == tuple(conv(torch.zeros(1, IN_CH, 9, 8)).shape[2:])
    down, up = factors(2)[TARGET.id]
    assert measure_side([((2, IN_CH, 9, 8), torch.float32, OUT_CH, down, up, None, geometry)], SCALE) > 0
