"""The hypernetwork (hyperalign.hypernet): shapes, identity at init, input dependence, gradients, size."""

import pytest
import torch

from hyperalign import HyperNet, HypernetConfig, feature_tokens, lora_delta
from hyperalign.hypernet import count_parameters, sinusoidal
from hyperalign.targets import FLUX, SD15, DiTArch, UNetArch, build_table

TINY_ARCH = UNetArch(block_channels=(32, 64), attention_levels=(True, True), layers_per_block=1, context_dim=32)
TINY_CFG = HypernetConfig(feature_dim=16, context_dim=32, dim=32, depth=2, heads=4, rank=4, basis=8)
SAMPLES, TOKENS, PROMPT = 3, 6, 7


@pytest.fixture(scope="module")
def targets():
    return build_table(SD15, TINY_ARCH).preset("attn")


def make_net(targets, cfg=TINY_CFG, seed=0, trained=True):
    torch.manual_seed(seed)
    net = HyperNet(cfg, targets)
    if trained:  # up-heads start at zero; give them weights, as training would
        for head in net.heads.values():
            torch.nn.init.normal_(head.up_coef.weight, std=0.2)
            torch.nn.init.normal_(head.up_coef.bias, std=0.2)
    return net


def inputs(seed=1, samples=SAMPLES):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(samples, TOKENS, TINY_CFG.feature_dim, generator=g),
        torch.rand(samples, generator=g),
        torch.randn(samples, PROMPT, TINY_CFG.context_dim, generator=g),
    )


def test_factor_shapes(targets):
    factors = make_net(targets)(*inputs())
    assert set(factors) == {t.id for t in targets}
    for t in targets:
        down, up = factors[t.id]
        assert down.shape == (SAMPLES, TINY_CFG.rank, t.in_features)
        assert up.shape == (SAMPLES, t.out_features, TINY_CFG.rank)
        assert down.dtype == up.dtype == torch.float32


def test_identity_at_init(targets):
    factors = make_net(targets, trained=False)(*inputs())
    for down, up in factors.values():
        assert torch.count_nonzero(up) == 0
        assert torch.count_nonzero(down) > 0  # the down path is live, so training can move up


def assert_factors_differ(a, b):
    assert any(not torch.allclose(a[k][1] @ a[k][0], b[k][1] @ b[k][0]) for k in a)


@pytest.mark.parametrize("changed", ["features", "progress", "context"])
def test_factors_depend_on_each_input(targets, changed):
    net = make_net(targets).eval()
    features, progress, context = inputs()
    base = net(features, progress, context)
    if changed == "features":
        features = features + torch.randn_like(features)
    elif changed == "progress":
        progress = (progress + 0.3) % 1.0
    else:
        context = context + torch.randn_like(context)
    assert_factors_differ(base, net(features, progress, context))


def test_samples_are_independent(targets):
    """Sample 0's LoRA depends on sample 0's inputs only."""
    net = make_net(targets).eval()
    features, progress, context = inputs()
    base = net(features, progress, context)
    features2, progress2, context2 = features.clone(), progress.clone(), context.clone()
    features2[1] += 1.0
    progress2[1] = 1 - progress2[1]
    context2[1] -= 1.0
    other = net(features2, progress2, context2)
    for key in base:
        for part in (0, 1):
            torch.testing.assert_close(base[key][part][0], other[key][part][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(base[key][part][2], other[key][part][2], rtol=1e-5, atol=1e-6)
    assert_factors_differ(
        {k: (v[0][1:2], v[1][1:2]) for k, v in base.items()}, {k: (v[0][1:2], v[1][1:2]) for k, v in other.items()}
    )


def test_scalar_progress_is_broadcast(targets):
    net = make_net(targets).eval()
    features, _, context = inputs()
    a = net(features, torch.tensor(0.25), context)
    b = net(features, torch.full((SAMPLES,), 0.25), context)
    for key in a:
        torch.testing.assert_close(a[key][1], b[key][1])


def delta_loss(net, targets, seed=2):
    """A loss through lora_delta on every target, as a reward would reach the factors."""
    g = torch.Generator().manual_seed(seed)
    factors = net(*inputs())
    loss = 0.0
    for t in targets:
        down, up = factors[t.id]
        x = torch.randn(SAMPLES, 3, t.in_features, generator=g)
        direction = torch.randn(SAMPLES, 3, t.out_features, generator=g)  # linear: non-zero gradient at delta = 0
        loss = loss + (lora_delta(x, down, up, TINY_CFG.scale) * direction).sum()
    return loss


def test_gradients_reach_all_parameters(targets):
    net = make_net(targets)
    delta_loss(net, targets).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero = [n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
    assert no_grad == [] and zero == []


def test_at_init_only_the_up_heads_get_gradient(targets):
    """From the identity, the first step moves the up-heads (as LoRA's zero B), nothing else is blocked."""
    net = make_net(targets, trained=False)
    delta_loss(net, targets).backward()
    moving = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moving and all(".up_coef." in n for n in moving)
    assert {n for n in dict(net.named_parameters()) if ".up_coef.weight" in n} <= moving


def test_context_is_required_when_configured(targets):
    net = make_net(targets)
    features, progress, _ = inputs()
    with pytest.raises(ValueError, match="HyperAlign: this predictor needs the prompt embedding"):
        net(features, progress, None)


def test_no_context_config(targets):
    cfg = HypernetConfig(feature_dim=16, context_dim=0, dim=32, depth=1, heads=4, rank=2, basis=4)
    net = HyperNet(cfg, targets)
    features, progress, _ = inputs()
    factors = net(features, progress)
    assert net.context_proj is None and len(factors) == len(targets)


def test_needs_a_target():
    with pytest.raises(ValueError, match="HyperAlign: the hypernetwork needs at least one target layer"):
        HyperNet(TINY_CFG, [])


def test_heads_are_shared_per_shape(targets):
    net = make_net(targets)
    shapes = {f"{t.in_features}x{t.out_features}" for t in targets}
    assert set(net.heads) == shapes
    assert sum(h.down_basis.shape[0] for h in net.heads.values()) == len(targets)


def test_state_dict_has_no_buffers_to_save(targets):
    keys = set(make_net(targets).state_dict())
    assert "query_code" not in keys
    assert keys == {n for n, _ in make_net(targets).named_parameters()}


def test_feature_tokens_pools_to_the_grid():
    fmap = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    tokens = feature_tokens(fmap, 4)
    assert tokens.shape == (2, 16, 3)
    torch.testing.assert_close(tokens[1, 0, 2], fmap[1, 2, :2, :2].mean())
    torch.testing.assert_close(tokens[0, 5, 1], fmap[0, 1, 2:4, 2:4].mean())
    small = feature_tokens(torch.randn(1, 5, 2, 3), 8)  # smaller than the grid: kept as is
    assert small.shape == (1, 6, 5)


def test_sinusoidal_is_distinct_per_index():
    emb = sinusoidal(torch.arange(128), 33)
    assert emb.shape == (128, 33)
    assert torch.unique(emb, dim=0).shape[0] == 128


PRESET = dict(dim=512, depth=4, heads=8, rank=8, basis=32, feature_grid=8)  # training/configs/sd15.yaml, flux.yaml


# Exact counts: docs/architecture.md (Sizes: 10 M, 56 M at the defaults) and training/README.md (Memory: 26M, 72M
# for the presets) quote them rounded; a change to the hypernet's shape must show up here first.
@pytest.mark.parametrize(
    "family, arch, cfg, expected",
    [
        (SD15, None, HypernetConfig(feature_dim=1280, context_dim=768, rank=8), 9_964_032),
        (SD15, None, HypernetConfig(feature_dim=1280, context_dim=768, rank=8, dim=512), 18_003_968),
        (FLUX, DiTArch(), HypernetConfig(feature_dim=3072, context_dim=768, rank=8), 55_720_448),
        (SD15, None, HypernetConfig(feature_dim=1280, context_dim=768, **PRESET), 26_412_032),
        (FLUX, DiTArch(), HypernetConfig(feature_dim=3072, context_dim=768, **PRESET), 72_007_168),
    ],
)
def test_real_size_parameter_count(family, arch, cfg, expected):
    targets = build_table(family, arch).preset("attn")
    with torch.device("meta"):
        net = HyperNet(cfg, targets)
    assert count_parameters(net) == expected
    assert next(net.parameters()).is_meta
