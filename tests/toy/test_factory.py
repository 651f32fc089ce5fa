"""The toy world's build: what the rewards learn from the generator's samples, and reusing a built model."""

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from toyworld import world
from toyworld.factory import build
from toyworld.factory.grounding import label
from toyworld.factory.renders import render_pool
from toyworld.nets import LATENT_SIZE, TEXT_WIDTH, ToyClip, text_config
from toyworld.vocab import WordTokenizer, build_vocab

SPECS = world.all_specs()[7::263]  # 12 scenes


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer(build_vocab()[0])


def renders(specs):
    return world.to_tensor_images(world.render_batch(specs, [world.Style()] * len(specs), list(range(len(specs)))))


@pytest.fixture(scope="module")
def labelled(tokenizer):
    """Clean renders, the second half drawn for a prompt with the shape changed: the checker finds 5 of its 6."""
    rng = np.random.default_rng(0)
    prompts = [world.prompt_of(s) for s in SPECS[:6]]
    prompts += [world.prompt_of(world.perturb(s, "shape", rng)) for s in SPECS[6:]]
    data, summary = label(renders(SPECS), prompts, tokenizer, seed=1, workers=1, shape_weight=1.0, rank_weight=1.0)
    return data, summary


def test_label_keeps_each_samples_prompt_accuracy_and_the_scene_it_shows(labelled, tokenizer):
    data, summary = labelled
    assert summary == {"samples": 12, "valid_scenes": 12, "truth_accuracy": round((6 + 6 * 5 / 6) / 12, 4)}
    assert torch.allclose(data.accuracy, torch.tensor([1.0] * 6 + [5 / 6] * 6))
    assert torch.equal(data.token_ids, tokenizer([world.prompt_of(s) for s in SPECS]))  # what it shows
    assert torch.equal(data.shape_ids[:, 0], data.token_ids)
    variants = world.shape_variants(SPECS[3])
    assert torch.equal(data.shape_ids[3], tokenizer([world.prompt_of(v) for v in variants]))
    assert sorted(v.shape for v in variants) == sorted(world.SHAPES)
    assert all(replace(v, shape=SPECS[3].shape) == SPECS[3] for v in variants)


def test_clip_loss_terms_train_the_clip_and_the_rank_term_follows_the_checker(labelled, tokenizer):
    data, _ = labelled
    torch.manual_seed(0)
    clip = ToyClip(text_config(build_vocab()[0]))
    rng = np.random.default_rng(0)
    loss = data.clip_loss(clip, 4, rng, "cpu")
    loss.backward()
    assert torch.isfinite(loss) and clip.image.convs[0].weight.grad.abs().sum() > 0

    rank = data._rank_loss(clip, 64, np.random.default_rng(1), "cpu")
    flipped = replace(data, accuracy=1 - data.accuracy)._rank_loss(clip, 64, np.random.default_rng(1), "cpu")
    tied = replace(data, accuracy=torch.ones(12))._rank_loss(clip, 64, np.random.default_rng(1), "cpu")
    assert tied.item() == 0.0  # pairs the checker cannot tell apart teach nothing
    # the same pairs, ordered the other way: softplus(-m) and softplus(m) differ by m, so unless the
    # untrained clip scores every pair alike the two losses differ
    assert abs(rank.item() - flipped.item()) > 1e-4


def test_reuse_model_takes_only_a_model_whose_text_encoder_this_config_trains():
    cfg = build.QUICK
    pool = render_pool(world.all_specs(), cfg.per_spec, cfg.seed + 1)
    clip, _ = build._rebuild_rewards(build.train_rewards(cfg, pool.images, pool.styles))
    # the same config on another CPU: float rounding apart; the model's own encoder is kept in toy_clip
    with torch.no_grad():
        for weight in clip.text.parameters():
            weight.add_(1e-7 * torch.randn_like(weight))
    built = SimpleNamespace(text_encoder=clip.text, vae=torch.nn.Identity(), unet=torch.nn.Identity())
    vae, unet, trained = build._reuse_model(cfg, pool, built, build.Timer())
    assert vae is built.vae and unet is built.unet
    assert 0 < trained["reuse_gap"] < build.REUSE_TOLERANCE
    kept, _ = build._rebuild_rewards(trained)
    assert all(torch.equal(v, clip.text.state_dict()[k]) for k, v in kept.text.state_dict().items())

    with pytest.raises(SystemExit, match="HyperAlign: --reuse-model: .* Build without --reuse-model"):
        build._reuse_model(replace(cfg, seed=1), pool, built, build.Timer())


def test_reuse_model_needs_a_built_folder(tmp_path):
    with pytest.raises(SystemExit, match="HyperAlign: --reuse-model .*: no built toy world there"):
        build._load_reused(tmp_path, build.BuildConfig())


def test_reuse_model_refuses_a_model_built_with_other_model_settings(tmp_path):
    (tmp_path / "model").mkdir()
    config = {k: v for k, v in build.asdict(build.BuildConfig()).items() if k != "unet_colour_dropout"}
    (tmp_path / "report.json").write_text(json.dumps({"config": config, "seconds": {}}))
    with pytest.raises(SystemExit, match=r"built with unet_colour_dropout=0\.0, not this config's values"):
        build._load_reused(tmp_path, replace(build.BuildConfig(), unet_colour_dropout=0.3))
    with pytest.raises(SystemExit, match=f"built with unet_steps={build.BuildConfig().unet_steps}"):
        build._load_reused(tmp_path, replace(build.BuildConfig(), unet_steps=10))


def test_reuse_model_keeps_the_note_of_a_model_trained_outside_a_build(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    config = build.asdict(build.BuildConfig())
    note = "trained by a probe script"
    (tmp_path / "report.json").write_text(json.dumps({"config": config, "seconds": {"unet": 9.0}, "note": note}))
    monkeypatch.setattr(build.publish, "load_pipe", lambda folder: folder)
    reused = build._load_reused(tmp_path, build.BuildConfig())
    assert (reused["note"], reused["seconds"], reused["pipe"]) == (note, {"unet": 9.0}, tmp_path)


def test_the_shipped_model_was_built_with_the_default_model_settings():
    from toyworld import ASSETS

    assert build._load_reused(ASSETS, build.BuildConfig())["pipe"].unet is not None


def test_spearman_se_bootstraps_over_prompts_not_images():
    # Two prompts, each with 20 samples that agree within the prompt and disagree across: the image-level
    # correlation rests on two prompts, so its standard error must be large.
    from toyworld.factory.grounding import spearman_se

    rng = np.random.default_rng(0)
    truth = np.concatenate([np.full(20, 1.0), np.full(20, 0.0)]) + rng.normal(0, 0.01, 40)
    score = np.concatenate([np.linspace(0, 1, 20), np.linspace(2, 3, 20)])  # one prompt scored high, wrongly
    clustered = spearman_se(score, truth, ["a"] * 20 + ["b"] * 20)
    independent = spearman_se(score, truth, [str(i) for i in range(40)])
    assert clustered > 3 * independent
    assert spearman_se(truth, truth, ["a"] * 20 + ["b"] * 20) == pytest.approx(0.0)


def test_published_model_configs_name_no_source_path(tmp_path):
    from toyworld.factory.publish import _drop_source_paths

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_name_or_path": "/home/me/old", "sample_size": 16}')
    _drop_source_paths(tmp_path)
    assert json.loads((tmp_path / "unet" / "config.json").read_text()) == {"sample_size": 16}


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_colour_dropout_conditions_that_share_of_rows_on_the_colour_free_captions(monkeypatch, dropout):
    from diffusers import UNet2DConditionModel

    from toyworld.factory.diffusion import train_unet

    seen = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, **kwargs):
        seen.append(encoder_hidden_states[:, 0, 0].detach().clone())
        return forward(self, sample, timestep, encoder_hidden_states, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    width, size = TEXT_WIDTH, LATENT_SIZE
    coloured, colour_free, empty = torch.ones(3, 77, width), torch.full((3, 77, width), 2.0), torch.zeros(1, 77, width)
    latents = torch.zeros(6, 4, size, size)
    train_unet(
        latents, torch.ones_like(latents), coloured, torch.arange(6) // 2, empty, 1.0, steps=6, batch=8, seed=0,
        threads=1, log=lambda *_: None, uncond_rate=0.0, colour_free_context=colour_free, colour_dropout=dropout,
    )  # fmt: skip
    marks = torch.cat(seen)
    assert set(marks.unique().tolist()) <= {1.0, 2.0}
    share = (marks == 2.0).float().mean().item()
    assert share == 0.0 if dropout == 0.0 else 0.3 < share < 0.7


def test_colour_dropout_needs_the_colour_free_captions():
    from toyworld.factory.diffusion import train_unet

    latents = torch.zeros(2, 4, LATENT_SIZE, LATENT_SIZE)
    with pytest.raises(ValueError, match="colour_free_context"):
        train_unet(
            latents, latents + 1, torch.ones(1, 77, TEXT_WIDTH), torch.zeros(2, dtype=torch.long),
            torch.zeros(1, 77, TEXT_WIDTH),
            1.0, steps=1, batch=2, seed=0, threads=1, log=print, colour_dropout=0.3,
        )  # fmt: skip
