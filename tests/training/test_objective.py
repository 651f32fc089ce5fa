"""The objective (paper §4.3) on the tiny SD1.5 model: what trains, what stays frozen, what the loss does,
and which LoRA the S, I and P modes use at each step."""

import copy

import pytest
import torch
from conftest import build_trainer, reset_accelerate, tiny_config

from training.loop import preference_loss, reward_loss, train_step
from training.sampling import Trajectory, per_sample_noise


def _cfg(tiny_sd15, prefs, tmp_path, *extra):
    return tiny_config(tiny_sd15, prefs, tmp_path, extra=list(extra))


def test_only_hypernet_gets_gradients_and_the_base_is_unchanged(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    tr = build_trainer(_cfg(tiny_sd15, prefs, tmp_path))
    frozen = {f"{i}.{k}": v.clone() for i, m in enumerate(tr.adapter.frozen()) for k, v in m.state_dict().items()}
    initial = copy.deepcopy(tr.predictor.hypernet.state_dict())
    # as train_step does: each term is back-propagated while its own LoRA is bound (checkpoint recomputation)
    reward_loss(tr, next(tr.prompts), 0)[0].backward()
    tr.adapter.state.clear()
    preference_loss(tr, next(tr.preferences)).backward()
    tr.adapter.state.clear()
    trainable = list(tr.predictor.hypernet.parameters())
    assert trainable and all(p.requires_grad and p.grad is not None for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in trainable)
    for module in tr.adapter.frozen() + list(tr.rewards.models):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    tr.optimizer.zero_grad(set_to_none=True)
    train_step(tr)
    after = {f"{i}.{k}": v for i, m in enumerate(tr.adapter.frozen()) for k, v in m.state_dict().items()}
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    changed = [k for k, v in tr.predictor.hypernet.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "the hypernet did not train"


def test_gradient_accumulation_equals_the_larger_batch(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    runs = []
    for batch, accum in ((2, 1), (1, 2)):
        reset_accelerate()
        cfg = _cfg(
            tiny_sd15,
            prefs,
            tmp_path,
            f"optim.batch_size={batch}",
            f"optim.grad_accum_steps={accum}",
            "optim.eps=1e-6",
            "sampling.num_steps=2",
            "model.gradient_checkpointing=False",
        )
        tr = build_trainer(cfg)
        metrics = train_step(tr)
        runs.append((metrics, {k: v.clone() for k, v in tr.predictor.hypernet.state_dict().items()}))
    (big, big_state), (accumulated, accumulated_state) = runs
    for key in ("loss", "reward", "loss_pref", "grad_norm"):
        assert accumulated[key] == pytest.approx(big[key], rel=1e-4, abs=1e-6), key
    assert all(torch.allclose(accumulated_state[k], big_state[k], atol=1e-5) for k in big_state)


def test_reward_loss_falls_on_a_toy_reward(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    cfg = _cfg(
        tiny_sd15,
        prefs,
        tmp_path,
        "objective.pref_weight=0.0",
        "sampling.num_steps=2",
        "optim.lr=0.001",
        "sampling.guidance=1.0",
        "model.gradient_checkpointing=False",
        "model.vae_checkpointing=False",
    )
    tr = build_trainer(cfg)
    held_out = next(tr.prompts)  # fixed prompts and noise; both steps k of the 2-step schedule

    def loss_on_held_out():
        with torch.no_grad():
            losses = [reward_loss(tr, held_out, step)[0].item() for step in range(2)]
        tr.adapter.state.clear()
        return sum(losses) / len(losses)

    curve = [loss_on_held_out()]
    for _ in range(2):
        for _ in range(3):
            train_step(tr)
        curve.append(loss_on_held_out())
    print("toy brightness reward loss on a held-out batch every 3 steps:", [round(v, 4) for v in curve])
    assert curve[0] > curve[1] >= curve[2] - 0.005 and curve[-1] < curve[0] - 0.03, curve


def test_preference_loss_pulls_the_prediction_toward_the_data(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    cfg = _cfg(tiny_sd15, prefs, tmp_path, "rewards=[]", "optim.lr=0.01", "model.gradient_checkpointing=False")
    tr = build_trainer(cfg)
    assert tr.rewards is None
    batch = next(tr.preferences)

    def held_out():
        with torch.no_grad():
            value = preference_loss(tr, batch).item()
        tr.adapter.state.clear()
        return value

    before = held_out()
    for _ in range(6):
        train_step(tr)
    after = held_out()
    print(f"preference (denoising) loss on a fixed batch: {before:.4f} -> {after:.4f}")
    assert after < before * 0.9


class Tagged(dict):
    """Factors that remember the progress of the prediction that made them."""


class Spy(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, features, progress, context):
        out = Tagged(self.net(features, progress, context))
        out.progress = float(progress[0])
        return out


EXPECTED_PREDICTION_STEP = {  # 4 steps at progress 0, .25, .5005, .75 (t = 999, 749, 499, 249); P keysteps (0, 0.5)
    "S": lambda i: i,
    "I": lambda i: 0,
    "P": lambda i: 0 if i < 2 else 2,
}


@pytest.mark.parametrize("mode", ["S", "I", "P"])
def test_modes_use_the_intended_lora_at_each_step(mode, tiny_sd15, prefs, tmp_path, fresh_accelerate):
    cfg = _cfg(
        tiny_sd15,
        prefs,
        tmp_path,
        f"objective.mode={mode!r}",
        "objective.keysteps=[0.0, 0.5]",
        "objective.pref_weight=0.0",
    )
    tr = build_trainer(cfg)
    net = tr.predictor.hypernet
    torch.manual_seed(1)
    for head in net.heads.values():  # make the LoRAs non-zero so they can be told apart
        torch.nn.init.normal_(head.up_coef.weight, std=0.5)
    spy, family = Spy(net), tr.adapter
    bound = []
    original_bind = family.bind
    family.bind = lambda factors, rows, samples: (
        bound.append(getattr(factors, "progress", None)),
        original_bind(factors, rows, samples),
    )[1]
    schedule = tr.steps
    cond = family.encode_prompts(["a cat"], uncond=True)
    x = per_sample_noise(family.latent_shape(1)[1:], [0], "cpu")
    expect = EXPECTED_PREDICTION_STEP[mode]
    for k in range(len(schedule)):
        bound.clear()
        trajectory = Trajectory(family, spy, tr.hcfg, cond, schedule, 2.0, mode, tr.keysteps)
        x_k, inputs = trajectory.rollout(x, k)
        assert bound == pytest.approx([schedule.progress[expect(i)] for i in range(k)])
        assert inputs.step == expect(k)  # the prediction in force at step k is the one made there
        assert [c.step for c in trajectory.run.calls] == sorted({expect(i) for i in range(k + 1)})
        with torch.no_grad():
            again = inputs.run(net)
            first = trajectory.run._factors
        assert all(torch.allclose(again[key][1], first[key][1]) for key in again)
    # and the trainer's reward step trains that prediction
    for step in range(2):
        _, metrics = reward_loss(tr, next(tr.prompts), step)
        tr.adapter.state.clear()
        assert metrics["lora_step"] == expect(int(metrics["k"]))
