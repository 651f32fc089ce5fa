"""The comparison table's baselines: the static LoRA, Best-of-N selection and ‖ΔW‖/‖W‖ (no toy assets needed)."""

import math

import pytest
import torch

from hyperalign.lora import LoRAState, hooked, merged_weight
from hyperalign.targets import build_table
from toyworld import nets
from toyworld.baselines import DeltaNormRecorder, StaticLoRA, best_of_n, relative_delta_norm, target_weights


def _targets():
    return build_table("sd15", nets.unet_arch()).preset("attn")


def test_static_lora_ignores_its_inputs_and_starts_as_the_identity():
    targets = _targets()
    torch.manual_seed(0)  # peft draws the down factors from torch's global generator
    static = StaticLoRA(targets, rank=4)
    a = static(torch.randn(3, 5, 64), torch.rand(3), torch.randn(3, 7, 64))
    b = static(torch.randn(3, 5, 64), torch.rand(3), torch.randn(3, 7, 64))
    assert list(a) == [t.id for t in targets]
    for key, (down, up) in a.items():
        target = next(t for t in targets if t.id == key)
        assert down.shape == (3, 4, target.in_features) and up.shape == (3, target.out_features, 4)
        assert torch.equal(down, b[key][0]) and torch.equal(up, b[key][1])
        assert torch.equal(down[0], down[2])  # one LoRA for every sample
        assert not up.any()  # zero up: the base model exactly, until trained
        # peft's default down: Kaiming-uniform (a = sqrt(5)), i.e. uniform in +-1/sqrt(in_features)
        bound = 1 / math.sqrt(target.in_features)
        assert down.abs().max() <= bound and down.abs().max() > 0.8 * bound
        assert down.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_static_lora_equals_a_peft_lora_with_its_factors():
    """Applied through the trainer's hooks, the static LoRA is what peft's own LoRA layer computes with the same
    factors (lora_alpha = rank: scale 1)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    target = _targets()[0]
    static = StaticLoRA([target], rank=2)
    with torch.no_grad():
        static.up[0].normal_()
    base = torch.nn.Module()
    base.add_module("layer", torch.nn.Linear(target.in_features, target.out_features))
    x = torch.randn(2, 3, target.in_features)
    state = LoRAState(scale=1.0)
    state.bind(static(x, torch.zeros(2)))
    with hooked([(target, "layer", base.layer)], state), torch.no_grad():
        hooked_out = base.layer(x)
    peft_model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["layer"]), base)
    with torch.no_grad():
        peft_model.layer.lora_A["default"].weight.copy_(static.down[0])
        peft_model.layer.lora_B["default"].weight.copy_(static.up[0])
        torch.testing.assert_close(peft_model.layer(x), hooked_out, rtol=1e-5, atol=1e-6)


def test_static_conv_lora_equals_peft_conv_lora_with_its_factors():
    """A ResNet-convolution target: the static LoRA through the hooks is peft's conv LoRA (a 3x3 kernel down to r
    channels, then a 1x1 up) with the same factors."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    target = next(t for t in build_table("sd15", nets.unet_arch()).preset("attn_conv") if t.kernel)
    static = StaticLoRA([target], rank=2)
    with torch.no_grad():
        static.up[0].normal_()
    base = torch.nn.Module()
    base.add_module("conv", torch.nn.Conv2d(target.in_channels, target.out_features, 3, padding=1))
    x = torch.randn(2, target.in_channels, 6, 6)
    state = LoRAState(scale=1.0)
    state.bind(static(x, torch.zeros(2)))
    with hooked([(target, "conv", base.conv)], state), torch.no_grad():
        hooked_out = base.conv(x)
    peft_model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["conv"]), base)
    with torch.no_grad():
        peft_model.conv.lora_A["default"].weight.copy_(static.down[0].reshape(2, target.in_channels, 3, 3))
        peft_model.conv.lora_B["default"].weight.copy_(static.up[0][..., None, None])
        torch.testing.assert_close(peft_model.conv(x), hooked_out, rtol=1e-5, atol=1e-5)


def test_static_lora_trains_through_the_shared_lora_path():
    """Gradients reach the static factors through the hooks the trainer uses, and the trained LoRA acts as
    a merged weight would."""
    torch.manual_seed(0)
    target = _targets()[0]
    layer = torch.nn.Linear(target.in_features, target.out_features)
    static = StaticLoRA([target], rank=2)
    with torch.no_grad():
        static.up[0].normal_()
    state = LoRAState(scale=0.5)
    x = torch.randn(2, 3, target.in_features)
    state.bind(static(x, torch.zeros(2)))
    with hooked([(target, "layer", layer)], state):
        y = layer(x)
    y.square().sum().backward()
    assert static.down[0].grad is not None and static.up[0].grad.abs().sum() > 0
    merged = merged_weight(layer.weight.detach(), static.down[0].detach(), static.up[0].detach(), 0.5)
    torch.testing.assert_close(y.detach(), x @ merged.T + layer.bias.detach(), rtol=1e-5, atol=1e-5)


def test_best_of_n_keeps_the_best_candidate_of_each_slot():
    # 3 candidates x 2 slots, candidate-major: candidate j of slot s sits at j * 2 + s
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.95])
    assert best_of_n(scores, slots=2).tolist() == [2, 5]
    # ties keep the first candidate: the slot's own seed
    assert best_of_n(torch.zeros(6), slots=2).tolist() == [0, 1]


def test_relative_delta_norm_is_the_mean_over_samples_and_targets():
    targets = _targets()[:2]
    denoiser = torch.nn.Module()
    weights = {}
    for i, t in enumerate(targets):  # modules at the targets' paths, W = (i + 1) * ones
        parent = denoiser
        *path, leaf = t.id.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        layer = torch.nn.Linear(t.in_features, t.out_features, bias=False)
        torch.nn.init.constant_(layer.weight, float(i + 1))
        parent.add_module(leaf, layer)
        weights[t.id] = layer.weight
    found = target_weights(denoiser, targets)
    assert all(torch.equal(found[t.id], weights[t.id]) for t in targets)
    # sample 0: zero delta; sample 1: delta = 0.5 * W exactly (rank 1: up = c * ones, down = ones)
    factors = {}
    for i, t in enumerate(targets):
        down = torch.ones(2, 1, t.in_features)
        up = torch.ones(2, t.out_features, 1) * (i + 1)
        up[0] = 0
        factors[t.id] = (down, up)
    assert relative_delta_norm(factors, found, scale=0.5) == pytest.approx((0 + 0.5 + 0 + 0.5) / 4)
    static = StaticLoRA(targets, rank=2)
    assert relative_delta_norm(static(torch.zeros(3, 1, 1), torch.zeros(3)), found, 1.0) == 0.0  # zero up
    # the recorder keeps one ratio per prediction and averages them
    recorder = DeltaNormRecorder(static, found, 1.0)
    recorder(torch.zeros(1, 1, 1), torch.zeros(1))
    with torch.no_grad():
        for i, t in enumerate(targets):
            static.down[i].fill_(1.0)
            static.up[i].fill_(0.0)
            static.up[i][:, 0] = (i + 1) / 2  # delta = 0.5 W
    out = recorder(torch.zeros(2, 1, 1), torch.zeros(2))
    assert list(out) == [t.id for t in targets]
    assert recorder.ratios == pytest.approx([0.0, 0.5]) and recorder.mean() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no prediction"):
        DeltaNormRecorder(static, found, 1.0).mean()
