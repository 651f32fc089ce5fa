"""The comparison table's baselines: the static LoRA and Best-of-N selection (no toy assets needed)."""

import torch

from hyperalign.lora import LoRAState, hooked, merged_weight
from hyperalign.targets import build_table
from training.toy import nets
from training.toy.baselines import StaticLoRA, best_of_n


def _targets():
    return build_table("sd15", nets.unet_arch()).preset("attn")


def test_static_lora_ignores_its_inputs_and_starts_as_the_identity():
    targets = _targets()
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
