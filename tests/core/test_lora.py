"""Per-sample LoRA maths and hooks (hyperalign.lora), checked against merged weights per sample."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hyperalign import HyperNet, HypernetConfig, LoRAState, hooked, lora_delta, resolve_modules, rows_to_samples
from hyperalign.lora import merged_weight
from hyperalign.targets import Target, UNetArch, build_table

IN, OUT, RANK, SCALE = 12, 10, 3, 0.7


def comfy_path(target):
    return target.comfy


def make_root(in_features=IN, out_features=OUT, dtype=torch.float32, bias=True):
    """A model with one Linear at `block.proj`: the path the hand-made targets below name."""
    torch.manual_seed(0)
    root = nn.Module()
    root.block = nn.Module()
    root.block.proj = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    return root


def random_factors(samples, target_id, in_features=IN, out_features=OUT, rank=RANK, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(samples, rank, in_features, generator=g, dtype=dtype)
    up = torch.randn(samples, out_features, rank, generator=g, dtype=dtype)
    return {target_id: (down, up)}


def hooked_forward(root, targets, factors, x, row_index=None, scale=SCALE):
    state = LoRAState(scale=scale)
    resolved = resolve_modules(root, targets, comfy_path)
    with hooked(resolved, state):
        state.bind(factors, row_index)
        y = root.block.proj(x)
    return y, state


TARGET = Target("block.proj", "block.proj", IN, OUT)


def per_row_reference(linear, x, down, up, sample_of_row, scale=SCALE, out_slice=None):
    """F.linear on W + s * up @ down for each row's own sample (the fused weight gets it in its slice only)."""
    rows = []
    for r in range(x.shape[0]):
        s = int(sample_of_row[r])
        weight = linear.weight.detach().double()
        if out_slice is None:
            weight = merged_weight(weight, down[s].double(), up[s].double(), scale)
        else:
            start, stop = out_slice
            weight = weight.clone()
            weight[start:stop] = merged_weight(weight[start:stop], down[s].double(), up[s].double(), scale)
        bias = None if linear.bias is None else linear.bias.detach().double()
        rows.append(F.linear(x[r].double(), weight, bias))
    return torch.stack(rows)


@pytest.mark.parametrize("token_shape", [(), (5,), (2, 3)])
def test_hooked_linear_matches_merged_weight_per_sample(token_shape):
    samples = 3
    root = make_root()
    factors = random_factors(samples, TARGET.id)
    x = torch.randn(samples, *token_shape, IN)
    y, state = hooked_forward(root, [TARGET], factors, x)
    down, up = factors[TARGET.id]
    expected = per_row_reference(root.block.proj, x, down, up, range(samples))
    assert y.shape == (samples, *token_shape, OUT)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert state.calls == 1


def test_lora_delta_is_scale_times_up_down_per_sample():
    x = torch.randn(4, 6, IN, dtype=torch.float64)
    down, up = random_factors(4, "t", dtype=torch.float64)["t"]
    delta = lora_delta(x, down, up, 0.25)
    for b in range(4):
        torch.testing.assert_close(delta[b], 0.25 * x[b] @ (up[b] @ down[b]).T)


def test_samples_do_not_leak_into_each_other():
    root = make_root()
    factors = random_factors(2, TARGET.id)
    x = torch.randn(2, 4, IN)
    y, _ = hooked_forward(root, [TARGET], factors, x)
    down, up = factors[TARGET.id]
    altered = {TARGET.id: (down.clone(), up.clone())}
    altered[TARGET.id][1][1] += 5.0  # change sample 1's LoRA only
    y2, _ = hooked_forward(root, [TARGET], altered, x)
    assert torch.equal(y[0], y2[0])
    assert not torch.allclose(y[1], y2[1])


def test_identity_at_init_is_bit_identical():
    """A freshly built HyperNet predicts an exactly zero delta on every target of a small UNet table."""
    torch.manual_seed(0)
    table = build_table(
        "sd15", UNetArch(block_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, context_dim=32)
    )
    targets = table.preset("attn")
    cfg = HypernetConfig(feature_dim=16, context_dim=32, dim=32, depth=1, heads=2, rank=4, basis=8)
    net = HyperNet(cfg, targets)
    samples = 2
    factors = net(torch.randn(samples, 4, 16), torch.tensor([0.0, 0.7]), torch.randn(samples, 7, 32))
    assert set(factors) == {t.id for t in targets}
    root = nn.Module()
    linears = {}
    for t in targets:  # a flat stand-in model: one Linear per target, looked up by a path function
        linears[t.id] = nn.Linear(t.in_features, t.out_features)
        root.add_module(t.id.replace(".", "_"), linears[t.id])
    resolved = resolve_modules(root, targets, lambda t: t.id.replace(".", "_"))
    inputs = {t.id: torch.randn(samples * 2, 5, t.in_features) for t in targets}  # CFG: 2 rows per sample
    plain = {k: linears[k](v) for k, v in inputs.items()}
    state = LoRAState(scale=cfg.scale)
    with hooked(resolved, state):
        state.bind(factors, rows_to_samples(samples * 2, samples))
        lora = {k: linears[k](v) for k, v in inputs.items()}
    assert state.calls == len(targets)
    for key in inputs:
        assert torch.equal(plain[key], lora[key]), key


@pytest.mark.parametrize(
    "rows, samples, expected",
    [
        (2, 2, [0, 1]),
        (4, 2, [0, 1, 0, 1]),
        (6, 3, [0, 1, 2, 0, 1, 2]),
        (3, 1, [0, 0, 0]),
    ],
)
def test_rows_to_samples_is_chunk_major(rows, samples, expected):
    assert rows_to_samples(rows, samples).tolist() == expected


@pytest.mark.parametrize("rows, samples", [(5, 2), (2, 0), (3, -1), (1, 2)])
def test_rows_to_samples_rejects_uneven_batches(rows, samples):
    with pytest.raises(ValueError, match="HyperAlign: a model call with"):
        rows_to_samples(rows, samples)


@pytest.mark.parametrize("chunks", [2, 3])
def test_cfg_rows_get_their_samples_lora(chunks):
    """A host batch of chunks*B rows (uncond chunk, cond chunk, ...): every row of sample b uses b's LoRA."""
    samples = 3
    root = make_root()
    factors = random_factors(samples, TARGET.id)
    rows = chunks * samples
    x = torch.randn(rows, 4, IN)
    row_index = rows_to_samples(rows, samples)
    y, _ = hooked_forward(root, [TARGET], factors, x, row_index)
    down, up = factors[TARGET.id]
    expected = per_row_reference(root.block.proj, x, down, up, [r % samples for r in range(rows)])
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    # the cond and uncond rows of one sample with the same input give the same output
    x_same = x.clone()
    x_same[samples : 2 * samples] = x[:samples]
    y_same, _ = hooked_forward(root, [TARGET], factors, x_same, row_index)
    assert torch.equal(y_same[:samples], y_same[samples : 2 * samples])


@pytest.mark.parametrize("slice_name, out_slice", [("q", (0, 8)), ("k", (8, 16)), ("v", (16, 24)), ("mlp", (24, 56))])
def test_out_slice_delta_lands_only_in_its_slice(slice_name, out_slice):
    """FLUX's fused qkv(+mlp) layer: a to_k LoRA changes only the k rows of the fused output."""
    hidden, fused = 8, 56
    start, stop = out_slice
    target = Target(f"block.to_{slice_name}", "block.proj", hidden, stop - start, out_slice)
    root = make_root(hidden, fused)
    factors = random_factors(2, target.id, hidden, stop - start)
    x = torch.randn(2, 3, hidden)
    plain = root.block.proj(x)
    y, _ = hooked_forward(root, [target], factors, x)
    outside = torch.ones(fused, dtype=torch.bool)
    outside[start:stop] = False
    assert torch.equal(y[..., outside], plain[..., outside])
    assert not torch.allclose(y[..., start:stop], plain[..., start:stop])
    down, up = factors[target.id]
    expected = per_row_reference(root.block.proj, x, down, up, [0, 1], out_slice=out_slice)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_sliced_row_on_its_own_linear_adds_to_the_whole_output():
    """The same FLUX row on the diffusers side (a separate to_k Linear): no slicing there."""
    hidden = 8
    target = Target("block.proj", "fused.qkv", hidden, hidden, (hidden, 2 * hidden))
    root = make_root(hidden, hidden)
    factors = random_factors(2, target.id, hidden, hidden)
    x = torch.randn(2, 3, hidden)
    state = LoRAState(scale=SCALE)
    with hooked(resolve_modules(root, [target], lambda t: t.id), state):
        state.bind(factors)
        y = root.block.proj(x)
    down, up = factors[target.id]
    expected = per_row_reference(root.block.proj, x, down, up, [0, 1])
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_three_slices_of_one_fused_layer_add_up():
    hidden = 6
    names = {"q": (0, 6), "k": (6, 12), "v": (12, 18)}
    targets = [Target(f"block.to_{n}", "block.proj", hidden, hidden, s) for n, s in names.items()]
    root = make_root(hidden, 3 * hidden)
    factors = {}
    for seed, t in enumerate(targets):
        factors.update(random_factors(2, t.id, hidden, hidden, seed=seed))
    x = torch.randn(2, 4, hidden)
    y, state = hooked_forward(root, targets, factors, x)
    assert state.calls == 3
    weight = root.block.proj.weight.detach().double().clone()
    for b in range(2):
        w = weight.clone()
        for t in targets:
            down, up = factors[t.id]
            w[t.out_slice[0] : t.out_slice[1]] += SCALE * (up[b].double() @ down[b].double())
        expected = F.linear(x[b].double(), w, root.block.proj.bias.detach().double())
        torch.testing.assert_close(y[b].double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base_dtype, atol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float64])
def test_low_precision_base_weights(base_dtype, atol, factor_dtype):
    """The delta is computed in the factors' dtype and cast back to the layer's output dtype."""
    root = make_root(dtype=base_dtype)
    factors = random_factors(2, TARGET.id, dtype=factor_dtype)
    x = torch.randn(2, 5, IN).to(base_dtype)
    plain = root.block.proj(x)
    y, _ = hooked_forward(root, [TARGET], factors, x)
    assert y.dtype == base_dtype
    down, up = factors[TARGET.id]
    expected = per_row_reference(root.block.proj, x, down, up, [0, 1])  # fp64 of the same weights/inputs
    torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=atol)
    # the delta itself: fp32/fp64 maths, then one rounding to the base dtype
    exact_delta = lora_delta(x.to(factor_dtype), down, up, SCALE)
    assert exact_delta.dtype == factor_dtype
    torch.testing.assert_close((y - plain).double(), exact_delta.double(), rtol=2e-2, atol=atol)


@pytest.mark.parametrize("base_dtype", [torch.float16, torch.bfloat16])
def test_delta_is_not_computed_in_the_base_dtype(base_dtype):
    """A delta with cancellation: 1000 - 999.9 is 0.1 in fp32, but 0.5 in fp16 and 0 in bf16."""
    root = make_root(2, 1, dtype=base_dtype, bias=False)
    with torch.no_grad():
        root.block.proj.weight.zero_()
    target = Target("block.proj", "block.proj", 2, 1)
    down = torch.tensor([[[1000.0, -999.9]]])  # (1, r=1, i=2), fp32
    up = torch.ones(1, 1, 1)
    with torch.no_grad():
        y, _ = hooked_forward(root, [target], {target.id: (down, up)}, torch.ones(1, 2, dtype=base_dtype), scale=1.0)
    assert y.dtype == base_dtype
    assert abs(y.item() - 0.1) < 1e-3


def test_bf16_factors_on_fp32_layer_keep_fp32_output():
    root = make_root()
    factors = random_factors(2, TARGET.id, dtype=torch.bfloat16)
    x = torch.randn(2, 3, IN)
    y, _ = hooked_forward(root, [TARGET], factors, x)
    assert y.dtype == torch.float32
    down, up = factors[TARGET.id]
    plain = root.block.proj(x)
    # exactly the bf16 delta (the factors' dtype) added in fp32, and that is within bf16 rounding of fp64 maths
    torch.testing.assert_close(y, plain + lora_delta(x.to(torch.bfloat16), down, up, SCALE).float(), rtol=0, atol=0)
    expected = per_row_reference(root.block.proj, x, down, up, [0, 1])
    torch.testing.assert_close(y.double(), expected, rtol=1e-2, atol=5e-2)  # the delta's entries reach about 7


def test_mismatched_batch_names_the_target():
    root = make_root()
    factors = random_factors(2, TARGET.id)
    x = torch.randn(4, 3, IN)  # 4 rows, but factors bound for 2 (the host forgot rows_to_samples)
    with pytest.raises(ValueError, match=r"factor batch 2 does not match input batch 4 at target 'block.proj'"):
        hooked_forward(root, [TARGET], factors, x)


def test_lora_delta_rejects_wrong_in_features():
    down, up = random_factors(2, "t")["t"]
    with pytest.raises(ValueError, match="in_features"):
        lora_delta(torch.randn(2, IN + 1), down, up, 1.0)


@pytest.mark.parametrize(
    "module",
    [nn.Conv2d(IN, OUT, 3), nn.LayerNorm(IN), nn.SiLU(), nn.Sequential()],
    ids=["conv2d", "layernorm", "silu", "sequential"],
)
def test_non_linear_module_is_rejected(module):
    root = nn.Module()
    root.block = nn.Module()
    root.block.proj = module
    with pytest.raises(TypeError, match=r"HyperAlign: 'block.proj' is a \w+, not a Linear layer"):
        resolve_modules(root, [TARGET], comfy_path)


@pytest.mark.parametrize("in_features, out_features", [(IN + 1, OUT), (IN, OUT - 1), (IN, OUT + 4), (OUT, IN)])
def test_wrong_shape_is_rejected(in_features, out_features):
    root = make_root(in_features, out_features)
    with pytest.raises(ValueError, match=r"HyperAlign: layer 'block.proj' has weight shape"):
        resolve_modules(root, [TARGET], comfy_path)


def test_fused_layer_too_small_for_slice_is_rejected():
    root = make_root(8, 16)
    target = Target("block.to_v", "block.proj", 8, 8, (16, 24))
    with pytest.raises(ValueError, match="at least 24 outputs"):
        resolve_modules(root, [target], comfy_path)


def test_missing_module_is_named():
    root = make_root()
    missing = Target("block.gone", "block.gone", IN, OUT)
    with pytest.raises(ValueError, match=r"HyperAlign: 1 of 2 target layers are missing.*'block.gone'"):
        resolve_modules(root, [TARGET, missing], comfy_path)


def test_hooks_removed_after_exception():
    root = make_root()
    linear = root.block.proj
    state = LoRAState(scale=SCALE)
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(resolve_modules(root, [TARGET], comfy_path), state):
            assert len(linear._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(linear._forward_hooks) == 0


def test_hooks_removed_after_error_inside_the_hook():
    root = make_root()
    linear = root.block.proj
    state = LoRAState(scale=SCALE)
    with pytest.raises(ValueError, match="at target"):
        with hooked(resolve_modules(root, [TARGET], comfy_path), state):
            state.bind(random_factors(3, TARGET.id))
            linear(torch.randn(2, IN))
    assert len(linear._forward_hooks) == 0
    assert torch.equal(linear(torch.ones(1, IN)), F.linear(torch.ones(1, IN), linear.weight, linear.bias))


def test_unbound_or_cleared_state_adds_nothing():
    root = make_root()
    linear = root.block.proj
    x = torch.randn(2, IN)
    plain = linear(x)
    state = LoRAState(scale=SCALE)
    with hooked(resolve_modules(root, [TARGET], comfy_path), state):
        assert torch.equal(linear(x), plain)  # never bound
        state.bind(random_factors(2, TARGET.id))
        assert not torch.equal(linear(x), plain)
        state.clear()
        assert torch.equal(linear(x), plain)
    assert state.calls == 1


def test_bind_moves_and_expands_factors():
    state = LoRAState()
    factors = random_factors(2, "t")
    state.bind(factors, rows_to_samples(6, 2), device="cpu")
    down, up = state.for_target("t")
    assert down.shape == (6, RANK, IN) and up.shape == (6, OUT, RANK)
    assert torch.equal(down[4], factors["t"][0][0]) and torch.equal(up[3], factors["t"][1][1])
    assert state.for_target("other") is None


@pytest.mark.parametrize("out_slice", [None, (OUT, 2 * OUT)])
def test_gradient_flows_to_factors_not_to_base_weights(out_slice):
    target = Target(TARGET.id, TARGET.comfy, IN, OUT, out_slice)
    root = make_root(IN, 3 * OUT if out_slice else OUT)
    root.requires_grad_(False)
    down, up = random_factors(2, TARGET.id)[TARGET.id]
    down.requires_grad_(True)
    up.requires_grad_(True)
    x = torch.randn(2, 3, IN)
    y, _ = hooked_forward(root, [target], {TARGET.id: (down, up)}, x)
    y.square().sum().backward()
    assert down.grad is not None and down.grad.abs().sum() > 0
    assert up.grad is not None and up.grad.abs().sum() > 0
    assert root.block.proj.weight.grad is None
