"""Fused LoRA helpers (hyperalign.lora): merged weights, FLUX slices, swapping and restoring, the in-place side path."""

import pytest
import torch
from torch import nn

from hyperalign import LoRAState, hooked, lora_delta, resolve_modules
from hyperalign.lora import (
    add_lora_delta,
    fused_weights,
    fusible_weight,
    merge_weights,
    merged_weight,
    swapped_weights,
)
from hyperalign.targets import Target

IN, OUT, RANK, SCALE = 12, 9, 3, 0.7
SLICES = {"q": (0, 3), "k": (3, 6), "v": (6, 9)}  # a fused qkv layer of width 3 per part


def factors_for(targets, samples=1, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        t.id: (
            torch.randn(samples, RANK, t.in_features, generator=g, dtype=dtype),
            torch.randn(samples, t.out_features, RANK, generator=g, dtype=dtype),
        )
        for t in targets
    }


def fused_root(dtype=torch.float32):
    """`qkv`: one Linear holding three targets' rows (as FLUX's img_attn.qkv); `proj`: a plain target."""
    torch.manual_seed(0)
    root = nn.Module()
    root.qkv = nn.Linear(IN, OUT).to(dtype)
    root.proj = nn.Linear(OUT, IN).to(dtype)
    targets = [Target(f"attn.to_{n}", "qkv", IN, 3, span) for n, span in SLICES.items()]
    targets.append(Target("attn.to_out", "proj", OUT, IN))
    return root, targets


def resolve(root, targets):
    return resolve_modules(root, targets, lambda t: t.comfy)


def forward(root, x):
    return root.proj(root.qkv(x))


def test_merge_weights_equals_merged_weight_and_leaves_the_input_alone():
    weight = torch.randn(OUT, IN)
    copy = weight.clone()
    down, up = torch.randn(RANK, IN), torch.randn(OUT, RANK)
    merged = merge_weights(weight, [(down, up, None)], SCALE)
    torch.testing.assert_close(merged, merged_weight(weight, down, up, SCALE), rtol=1e-6, atol=1e-6)
    assert torch.equal(weight, copy) and merged.data_ptr() != weight.data_ptr()


def test_merge_weights_writes_each_slice_into_its_own_rows_only():
    weight = torch.randn(OUT, IN)
    parts = [(torch.randn(RANK, IN), torch.randn(3, RANK), span) for span in SLICES.values()]
    merged = merge_weights(weight, parts[:2], SCALE)  # q and k, not v
    for down, up, (start, stop) in parts[:2]:
        torch.testing.assert_close(merged[start:stop], merged_weight(weight[start:stop], down, up, SCALE))
    start, stop = SLICES["v"]
    assert torch.equal(merged[start:stop], weight[start:stop])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merges_in_fp32_and_rounds_once(dtype):
    weight = torch.randn(OUT, IN).to(dtype)
    down, up = torch.randn(RANK, IN), torch.randn(OUT, RANK) * 1e-3  # small: a sum in half precision would lose it
    merged = merge_weights(weight, [(down, up, None)], SCALE)
    expected = (weight.float() + SCALE * up @ down).to(dtype)
    assert merged.dtype == dtype and torch.equal(merged, expected)


def test_fused_forward_equals_hooked_forward_with_fused_slices():
    root, targets = fused_root()
    factors = factors_for(targets)
    resolved = resolve(root, targets)
    x = torch.randn(2, 5, IN)  # two rows (cond and uncond) of the one sample
    state = LoRAState(scale=SCALE)
    with torch.no_grad(), hooked(resolved, state):
        state.bind(factors, torch.zeros(2, dtype=torch.long))
        expected = forward(root, x)
    merged, rest = fused_weights(resolved, factors, 0, SCALE)
    assert rest == [] and set(merged) == {root.qkv, root.proj}  # the three qkv targets share one merged weight
    with torch.no_grad(), swapped_weights(merged):
        got = forward(root, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert float((forward(root, x) - expected).abs().max()) > 1e-2  # and the LoRA mattered


def test_fused_weights_takes_the_chosen_sample_and_leaves_unfusible_modules_to_the_hooks():
    root, targets = fused_root()
    factors = factors_for(targets, samples=3)
    resolved = resolve(root, targets)
    merged, rest = fused_weights(resolved, factors, 2, SCALE, fusible=lambda module: module is root.proj)
    assert set(merged) == {root.proj} and [t.id for t, _, _ in rest] == [t.id for t in targets[:3]]
    down, up = factors["attn.to_out"]
    torch.testing.assert_close(merged[root.proj], merged_weight(root.proj.weight.detach(), down[2], up[2], SCALE))


def test_swapped_weights_restores_the_same_parameter_objects_bit_identical():
    root, targets = fused_root()
    originals = {name: (p, p.detach().clone()) for name, p in root.named_parameters()}
    merged, _ = fused_weights(resolve(root, targets), factors_for(targets), 0, SCALE)
    with swapped_weights(merged):
        assert root.qkv.weight is merged[root.qkv] and root.proj.weight is merged[root.proj]
    for name, param in root.named_parameters():
        assert param is originals[name][0] and torch.equal(param, originals[name][1])


def test_swapped_weights_restores_on_an_exception():
    root, targets = fused_root()
    qkv, proj = root.qkv.weight, root.proj.weight
    merged, _ = fused_weights(resolve(root, targets), factors_for(targets), 0, SCALE)
    with pytest.raises(RuntimeError, match="boom"), swapped_weights(merged):
        raise RuntimeError("boom")
    assert root.qkv.weight is qkv and root.proj.weight is proj


def test_fusible_weight_only_for_plain_float_parameters():
    assert fusible_weight(nn.Linear(2, 2)) and fusible_weight(nn.Linear(2, 2).half())
    assert fusible_weight(nn.Linear(2, 2).to(torch.bfloat16))

    class Quantised(nn.Parameter):
        pass

    layer = nn.Linear(2, 2)
    layer.weight = Quantised(layer.weight.detach())
    assert not fusible_weight(layer)
    fp8 = nn.Linear(2, 2)
    fp8.weight = nn.Parameter(fp8.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    assert not fusible_weight(fp8)
    assert not fusible_weight(nn.Module())


@pytest.mark.parametrize("out_slice", [None, (3, 6)])
def test_in_place_side_path_equals_the_reference(out_slice):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, IN, generator=g)
    width = 3 if out_slice else OUT
    down, up = torch.randn(2, RANK, IN, generator=g), torch.randn(2, width, RANK, generator=g)
    output = torch.randn(2, 5, OUT, generator=g)
    expected = output.clone()
    start, stop = out_slice or (0, OUT)
    expected[..., start:stop] += lora_delta(x, down, up, SCALE)
    with torch.no_grad():
        got = add_lora_delta(output, x, down, up, SCALE, out_slice)
    assert got.data_ptr() == output.data_ptr()  # written in place: no (b, n, o) delta allocated
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_side_path_keeps_gradients_to_the_factors():
    g = torch.Generator().manual_seed(4)
    x, output = torch.randn(2, 5, IN, generator=g), torch.randn(2, 5, OUT, generator=g)
    down = torch.randn(2, RANK, IN, generator=g, requires_grad=True)
    up = torch.randn(2, OUT, RANK, generator=g, requires_grad=True)
    add_lora_delta(output, x, down, up, SCALE).sum().backward()
    reference_down, reference_up = down.detach().requires_grad_(), up.detach().requires_grad_()
    (output + lora_delta(x, reference_down, reference_up, SCALE)).sum().backward()
    torch.testing.assert_close(down.grad, reference_down.grad)
    torch.testing.assert_close(up.grad, reference_up.grad)
