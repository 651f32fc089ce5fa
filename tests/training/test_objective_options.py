"""The objective's options (training/config.py objective section) on the tiny SD1.5 model: the defaults are the
paper's objective exactly as before the options, and each option does what its comment says."""

import pytest
import torch
import torch.nn.functional as F
from conftest import build_trainer, reset_accelerate, tiny_config

from training import objective
from training.engine import provenance
from training.loop import train_step
from training.objective import dropped_prompts, pref_lambda, preference_loss, reward_loss
from training.sampling import Trajectory, per_sample_noise, per_sample_uniform


def _trainer(tiny_sd15, prefs, tmp_path, *extra):
    reset_accelerate()
    return build_trainer(tiny_config(tiny_sd15, prefs, tmp_path, extra=list(extra)))


# The objective as it was before the options (commit bdc3ede), written out as the reference the defaults must match.
def _reference_reward_loss(tr, batch, step):
    cfg, family = tr.cfg, tr.adapter
    prompts, guidance = list(batch["prompt"]), cfg.sampling.guidance
    cond = family.encode_prompts(prompts, uncond=guidance != 1.0)
    x = per_sample_noise(family.latent_shape(1)[1:], objective._seeds(tr, objective.NOISE, batch), family.device)
    k = objective.sampled_step(cfg, step)
    trajectory = Trajectory(family, tr.hypernet, tr.hcfg, cond, tr.steps, guidance, cfg.objective.mode, tr.keysteps)
    x_k, inputs = trajectory.rollout(x, k)
    factors = inputs.run(tr.hypernet)
    t = family.timesteps(tr.steps.t[k], len(prompts))
    pred = family.predict(x_k, t, cond, factors, guidance)
    total, _ = tr.rewards(family.decode(family.x0(x_k, pred, t)), prompts)
    return -total.mean()


def _reference_preference_loss(tr, batch):
    family, prompts = tr.adapter, list(batch["prompt"])
    latents = family.encode(batch["image"])
    noise = per_sample_noise(tuple(latents.shape[1:]), objective._seeds(tr, objective.PREF_NOISE, batch), family.device)
    u = per_sample_uniform(objective._seeds(tr, objective.PREF_TIME, batch), family.device)
    x_t, t, progress, target = family.noise_for_preference(latents, noise, u)
    cond = family.encode_prompts(prompts, uncond=False)
    features = family.features(x_t, t, cond, tr.hcfg, tr.cfg.sampling.guidance)
    factors = tr.hypernet(features, progress.float(), cond.context.float())
    return F.mse_loss(family.predict(x_t, t, cond, factors, tr.cfg.sampling.guidance).float(), target.float())


def _reference_step(tr):  # train_step as it was, on the reference losses
    acc, cfg = tr.accelerator, tr.cfg
    sums = {}
    for _ in range(cfg.optim.grad_accum_steps):
        prompts, preferences = next(tr.prompts), next(tr.preferences)
        with acc.accumulate(tr.hypernet), acc.autocast():
            metrics = {}
            loss_r = _reference_reward_loss(tr, prompts, tr.step)
            acc.backward(loss_r)
            tr.adapter.state.clear()
            metrics["loss_reward"] = loss_r.detach()
            loss_g = _reference_preference_loss(tr, preferences)
            acc.backward(cfg.objective.pref_weight * loss_g)
            tr.adapter.state.clear()
            metrics["loss_pref"] = loss_g.detach()
            if acc.sync_gradients:
                metrics["grad_norm"] = acc.clip_grad_norm_(tr.hypernet.parameters(), cfg.optim.grad_clip)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + torch.as_tensor(value, dtype=torch.float32)
    tr.lr_schedule.step()
    tr.step += 1
    loss = (sums["loss_reward"] + cfg.objective.pref_weight * sums["loss_pref"]) / cfg.optim.grad_accum_steps
    return {"loss": float(loss), "grad_norm": float(sums["grad_norm"])}


def _state(tr):
    return {k: v.clone() for k, v in tr.predictor.hypernet.state_dict().items()}


def test_defaults_are_the_objective_as_before(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    extra = ("objective.pref_weight=0.7",)
    tr = _trainer(tiny_sd15, prefs, tmp_path, *extra)
    prompts, preferences = next(tr.prompts), next(tr.preferences)
    assert torch.equal(reward_loss(tr, prompts, 3)[0], _reference_reward_loss(tr, prompts, 3))
    tr.adapter.state.clear()
    assert torch.equal(preference_loss(tr, preferences), _reference_preference_loss(tr, preferences))
    tr.adapter.state.clear()
    states, logged = [], []
    for step in (train_step, _reference_step):
        tr = _trainer(tiny_sd15, prefs, tmp_path, *extra, "optim.grad_accum_steps=2", "sampling.num_steps=2")
        logged.append([step(tr) for _ in range(2)])
        states.append(_state(tr))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    for new, old in zip(*logged):
        assert (new["loss"], new["grad_norm"]) == pytest.approx((old["loss"], old["grad_norm"]), rel=1e-6)


def test_gradient_norms_are_logged_per_term_and_pref_share_sets_lambda(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    tr = _trainer(tiny_sd15, prefs, tmp_path, "objective.pref_weight=0.5", "optim.grad_clip=0.0")
    metrics = train_step(tr)
    assert metrics["grad_norm/reward"] > 0 and metrics["grad_norm/pref"] > 0 and metrics["pref_lambda"] == 0.5
    # the two terms' gradients recombine to the (unclipped) total
    both = metrics["grad_norm"]
    assert both <= metrics["grad_norm/reward"] + 0.5 * metrics["grad_norm/pref"] + 1e-4
    assert both >= abs(metrics["grad_norm/reward"] - 0.5 * metrics["grad_norm/pref"]) - 1e-4

    # pref_share: lambda * |grad L_G| = share * |grad L_R|, so the stepped gradient is g_R + lambda g_G
    tr = _trainer(tiny_sd15, prefs, tmp_path, "objective.pref_share=0.25", "optim.grad_clip=0.0")
    captured = {}
    clip = tr.accelerator.clip_grad_norm_

    def spy(params, limit):
        params = list(params)
        captured["grad"] = [p.grad.clone() for p in params]
        return clip(params, limit)

    tr.accelerator.clip_grad_norm_ = spy
    metrics = train_step(tr)
    lam = metrics["pref_lambda"]
    assert lam * metrics["grad_norm/pref"] == pytest.approx(0.25 * metrics["grad_norm/reward"], rel=1e-5)
    assert lam == pytest.approx(pref_lambda(tr.cfg, metrics["grad_norm/reward"], metrics["grad_norm/pref"]))
    assert lam != pytest.approx(1.0, rel=1e-2)  # not the pref_weight
    assert metrics["loss"] == pytest.approx(metrics["loss_reward"] + lam * metrics["loss_pref"], rel=1e-5)
    # the gradient handed to the clip is g_R + lambda g_G: rebuild both terms by hand on the same batches
    tr2 = _trainer(tiny_sd15, prefs, tmp_path, "objective.pref_share=0.25", "optim.grad_clip=0.0")
    params = list(tr2.hypernet.parameters())
    reward_loss(tr2, next(tr2.prompts), 0)[0].backward()
    tr2.adapter.state.clear()
    g_r = [p.grad.clone() for p in params]
    tr2.optimizer.zero_grad(set_to_none=True)
    preference_loss(tr2, next(tr2.preferences)).backward()
    tr2.adapter.state.clear()
    g_g = [p.grad.clone() for p in params]
    norm = lambda gs: torch.linalg.vector_norm(torch.stack([g.norm() for g in gs])).item()  # noqa: E731
    assert metrics["grad_norm/reward"] == pytest.approx(norm(g_r), rel=1e-5)
    assert metrics["grad_norm/pref"] == pytest.approx(norm(g_g), rel=1e-5)
    for got, r, g in zip(captured["grad"], g_r, g_g):
        torch.testing.assert_close(got, r + lam * g, rtol=1e-5, atol=1e-7)


def test_pref_drop_prompt_drops_a_seeded_share_of_rows(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    tr = _trainer(tiny_sd15, prefs, tmp_path, "objective.pref_drop_prompt=0.3")
    drops = dropped_prompts(tr.cfg, list(range(2000)))
    assert drops == dropped_prompts(tr.cfg, list(range(2000)))  # deterministic per sample number
    assert drops[5:9] == dropped_prompts(tr.cfg, [5, 6, 7, 8])  # and independent of the batch it is in
    assert sum(drops) / len(drops) == pytest.approx(0.3, abs=0.03)
    assert not any(dropped_prompts(_trainer(tiny_sd15, prefs, tmp_path).cfg, list(range(200))))
    # the denoiser gets "" on dropped rows; the hypernet still sees the real prompt
    batch = next(tr.preferences)
    seen = []
    encode = tr.adapter.encode_prompts
    tr.adapter.encode_prompts = lambda prompts, uncond=True: (seen.append(list(prompts)), encode(prompts, uncond))[1]
    tr.cfg.objective.pref_drop_prompt = 1.0
    preference_loss(tr, batch)
    tr.adapter.state.clear()
    assert seen == [list(batch["prompt"]), [""] * len(batch["prompt"])]


class ProgressSpy(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, features, progress, context):
        self.seen.append(progress.tolist())
        return self.net(features, progress, context)


@pytest.mark.parametrize("mode", ["I", "P"])
def test_pref_where_mode_predicts_where_the_mode_does(mode, tiny_sd15, prefs, tmp_path, fresh_accelerate):
    tr = _trainer(
        tiny_sd15,
        prefs,
        tmp_path,
        f"objective.mode={mode!r}",
        "objective.keysteps=[0.0, 0.5]",
        "objective.pref_where='mode'",
    )
    spy = ProgressSpy(tr.hypernet)
    tr.hypernet = spy
    batch = next(tr.preferences)
    preference_loss(tr, batch)
    tr.adapter.state.clear()
    latents = tr.adapter.encode(batch["image"])
    u = per_sample_uniform(objective._seeds(tr, objective.PREF_TIME, batch), "cpu")
    _, _, progress, _ = tr.adapter.noise_for_preference(latents, torch.zeros_like(latents), u)
    steps = tr.steps.progress  # 0, .25, .5005, .75
    if mode == "I":
        expected = [0.0] * len(progress)  # from x_T, at progress 0
    else:
        expected = [steps[2] if p >= steps[2] else 0.0 for p in progress.tolist()]
    assert spy.seen == [pytest.approx(expected)]
    assert objective.prediction_steps(tr.steps, mode, tr.keysteps) == ([0] if mode == "I" else [0, 2])


def test_pref_where_mode_for_i_feeds_pure_noise(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    tr = _trainer(tiny_sd15, prefs, tmp_path, "objective.mode='I'", "objective.pref_where='mode'")
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    x, t, p = objective.where_mode_predicts(tr, latents, noise, torch.tensor([0.3, 0.9]))
    assert torch.equal(x, noise) and t.tolist() == [tr.steps.t[0]] * 2 and p.tolist() == [0.0, 0.0]


def test_step_per_sample_draws_k_per_row_and_matches_each_rows_own_loss(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    tr = _trainer(
        tiny_sd15, prefs, tmp_path, "objective.step_per_sample=True", "optim.batch_size=4", "objective.pref_weight=0.0"
    )
    ks = objective.sampled_steps_per_sample(tr.cfg, list(range(64)))
    assert len(set(ks)) == 4 and ks[:4] == objective.sampled_steps_per_sample(tr.cfg, [0, 1, 2, 3])
    batch = next(tr.prompts)
    ks = objective.sampled_steps_per_sample(tr.cfg, batch["index"].tolist())
    loss, metrics = reward_loss(tr, batch, 0)
    expected = 0.0
    for r, k in enumerate(ks):  # each row alone at its own k, as the per-step objective would
        row = {key: value[r : r + 1] if torch.is_tensor(value) else value[r : r + 1] for key, value in batch.items()}
        with torch.no_grad():
            expected += objective._x0_reward_loss(tr, row, k)[0].item() / len(ks)
        tr.adapter.state.clear()
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert metrics["k"].item() == pytest.approx(sum(ks) / len(ks))
    loss.backward()  # each group's LoRA is bound again when its call is recomputed
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.hypernet.parameters())


def test_provenance_names_the_objective(tiny_sd15, prefs, tmp_path):
    base = tiny_config(tiny_sd15, prefs, tmp_path)
    info = provenance(base)["objective"]
    assert info["reward_on"] == "x0" and info["variant"] == "paper x0"
    cfg = tiny_config(
        tiny_sd15,
        prefs,
        tmp_path,
        extra=[
            "objective.reward_on='final'",
            "objective.grad_steps=3",
            "objective.pref_where='mode'",
            "objective.pref_drop_prompt=0.1",
            "objective.pref_share=0.2",
        ],
    )
    info = provenance(cfg)["objective"]
    assert info["variant"] == "final K=3 (beyond paper) + L_G at mode + L_G prompt dropped 0.1 + lambda by share 0.2"
    assert (info["reward_on"], info["grad_steps"], info["pref_where"], info["pref_share"]) == ("final", 3, "mode", 0.2)


def test_bad_objective_options_are_refused(tiny_sd15, prefs, tmp_path):
    for bad, word in (
        ("objective.grad_steps=0", "grad_steps"),
        ("objective.pref_drop_prompt=1.5", "pref_drop_prompt"),
        ("objective.pref_share=-1.0", "pref_share"),
        ("objective.reward_on='final'", "step_per_sample"),
    ):
        extra = [bad] + (["objective.step_per_sample=True"] if "final" in bad else [])
        with pytest.raises(ValueError, match=word):
            tiny_config(tiny_sd15, prefs, tmp_path, extra=extra)


def test_all_options_together_train(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    tr = _trainer(
        tiny_sd15,
        prefs,
        tmp_path,
        "objective.mode='P'",
        "objective.keysteps=[0.0, 0.5]",
        "objective.reward_on='final'",
        "objective.grad_steps=2",
        "objective.pref_where='mode'",
        "objective.pref_drop_prompt=0.5",
        "objective.pref_share=0.1",
    )
    before = _state(tr)
    metrics = train_step(tr)
    assert metrics["grad_steps"] == 2 and metrics["pref_lambda"] > 0 and metrics["grad_norm/pref"] > 0
    assert tr.adapter.state.factors is None
    assert any(not torch.equal(before[k], v) for k, v in _state(tr).items())


def test_pref_where_mode_on_flux_noises_to_the_keystep_sigma(tiny_flux, prefs, tmp_path, fresh_accelerate):
    reset_accelerate()
    cfg = tiny_config(
        tiny_flux,
        prefs,
        tmp_path,
        family="flux",
        extra=["objective.mode='P'", "objective.keysteps=[0.0, 0.5]", "objective.pref_where='mode'"],
    )
    tr = build_trainer(cfg)
    steps = tr.steps
    opens = objective.prediction_steps(steps, "P", tr.keysteps)
    assert opens[0] == 0 and len(opens) == 2
    j = opens[1]
    latents, noise = torch.randn(2, 16, 2, 2), torch.randn(2, 16, 2, 2)
    progress = torch.tensor([steps.progress[j] / 2, steps.progress[j] + 0.01])
    x, t, p = objective.where_mode_predicts(tr, latents, noise, progress)
    s = steps.sigmas[j]
    assert torch.equal(x[0], noise[0]) and torch.allclose(x[1], (1 - s) * latents[1] + s * noise[1])
    assert t.tolist() == pytest.approx([steps.t[0], steps.t[j]]) and p.tolist() == pytest.approx(
        [0.0, steps.progress[j]]
    )
    metrics = train_step(tr)
    assert metrics["loss_pref"] > 0 and tr.adapter.state.factors is None
