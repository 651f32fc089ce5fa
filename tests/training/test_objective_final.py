"""objective.reward_on='final' (a variant beyond the paper): the reward on the final image, gradient through the last
K sampling steps, each model call checkpointed (or not, with model.gradient_checkpointing off). Its gradient must
equal a plain, uncheckpointed computation."""

import pytest
import torch
from conftest import build_trainer, reset_accelerate, tiny_config

from training import objective
from training.objective import reward_loss
from training.sampling import per_sample_noise


def _trainer(tiny_sd15, prefs, tmp_path, mode, extra):
    reset_accelerate()
    cfg = tiny_config(
        tiny_sd15,
        prefs,
        tmp_path,
        extra=[f"objective.mode={mode!r}", "objective.keysteps=[0.0, 0.5]", "objective.pref_weight=0.0", *extra],
    )
    tr = build_trainer(cfg)
    torch.manual_seed(1)
    for head in tr.predictor.hypernet.heads.values():  # non-zero LoRAs, so every factor gets a gradient
        torch.nn.init.normal_(head.up_coef.weight, std=0.5)
    return tr


def _plain_final_loss(tr, batch, grad_steps):
    """The same objective written out directly: no checkpointing, the mode's prediction steps by hand (S every
    step, I step 0, P keysteps 0 and 0.5 = steps 0 and 2), steps before n - K without gradient."""
    family, steps, guidance = tr.adapter, tr.steps, tr.cfg.sampling.guidance
    prompts = list(batch["prompt"])
    b, n = len(prompts), len(steps)
    cond = family.encode_prompts(prompts, uncond=True)
    x = per_sample_noise(family.latent_shape(1)[1:], objective._seeds(tr, objective.NOISE, batch), family.device)
    opens = {"S": range(n), "I": [0], "P": [0, 2]}[tr.cfg.objective.mode]
    factors = None
    for i in range(n):
        t = family.timesteps(steps.t[i], b)
        if i in opens:
            features = family.features(x, t, cond, tr.hcfg, guidance)
            factors = tr.hypernet(features, torch.full((b,), steps.progress[i]), cond.context.float())
        with torch.set_grad_enabled(i >= n - grad_steps), family.bound(factors, family.rows(cond, guidance, b), b):
            pred = family.predict(x, t, cond, None, guidance)
        with torch.set_grad_enabled(i >= n - grad_steps):
            x = family.step(x, pred, i, steps)
    total, _ = tr.rewards(family.decode(x), prompts)
    return -total.mean()


@pytest.mark.parametrize(
    "mode, grad_steps, checkpointing",
    [("S", None, True), ("I", None, True), ("I", 2, True), ("P", 3, True), ("S", None, False)],
)
def test_final_reward_gradient_equals_the_plain_computation(
    mode, grad_steps, checkpointing, tiny_sd15, prefs, tmp_path, fresh_accelerate
):
    k = "None" if grad_steps is None else str(grad_steps)
    # the trainer: block checkpointing on (tiny_config's default) and each model call checkpointed; or neither
    extra = [
        "objective.reward_on='final'",
        f"objective.grad_steps={k}",
        f"model.gradient_checkpointing={checkpointing}",
    ]
    tr = _trainer(tiny_sd15, prefs, tmp_path, mode, extra)
    batch = next(tr.prompts)
    loss, metrics = reward_loss(tr, batch, 0)
    loss.backward()
    assert tr.adapter.state.factors is None  # nothing left bound
    got = {name: p.grad.clone() for name, p in tr.predictor.hypernet.named_parameters()}
    assert metrics["grad_steps"] == (4 if grad_steps is None else grad_steps)
    # the reference: no checkpointing anywhere
    ref = _trainer(
        tiny_sd15, prefs, tmp_path, mode, ["model.gradient_checkpointing=False", "model.vae_checkpointing=False"]
    )
    expected_loss = _plain_final_loss(ref, batch, 4 if grad_steps is None else grad_steps)
    expected_loss.backward()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    for name, p in ref.predictor.hypernet.named_parameters():
        if p.grad is None:
            assert got[name] is None or not got[name].any(), name
            continue
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_fewer_gradient_steps_give_a_different_gradient(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    """K matters: in S mode, with K = 1 only the last step's prediction is trained, with K = all every step's."""
    grads = []
    for k in ("1", "None"):
        tr = _trainer(tiny_sd15, prefs, tmp_path, "S", ["objective.reward_on='final'", f"objective.grad_steps={k}"])
        reward_loss(tr, next(tr.prompts), 0)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in tr.predictor.hypernet.parameters() if p.grad is not None]))
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


def test_grad_steps_above_the_sampling_steps_is_refused(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    tr = _trainer(tiny_sd15, prefs, tmp_path, "S", ["objective.reward_on='final'", "objective.grad_steps=9"])
    with pytest.raises(ValueError, match="grad_steps=9 is more than sampling.num_steps=4"):
        reward_loss(tr, next(tr.prompts), 0)
