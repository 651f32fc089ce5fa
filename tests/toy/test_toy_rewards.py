"""The toy rewards: the trainer's signature, frozen, differentiable, and they measure what they claim."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import toyworld as toy
from toyworld import world
from toyworld.rewards import load_toy_aesthetic, load_toy_clip


def spec(name, path=None, **options):
    return SimpleNamespace(name=name, weight=1.0, path=path, options=options)


@pytest.fixture(scope="module")
def clip():
    return load_toy_clip(spec("toy_clip"), "cpu", torch.float32)


@pytest.fixture(scope="module")
def aesthetic():
    return load_toy_aesthetic(spec("toy_aesthetic"), "cpu", torch.float32)


def renders(specs, styles=None, seed=0):
    styles = styles or [world.Style()] * len(specs)
    return world.to_tensor_images(world.render_batch(specs, styles, [seed + i for i in range(len(specs))]))


FIXED_SPECS = world.all_specs()[5::61]  # 52 scenes, train and held-out


@pytest.mark.parametrize("which", ["clip", "aesthetic"])
def test_rewards_are_frozen_and_differentiable(which, request):
    model = request.getfixturevalue(which)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    prompts = [world.prompt_of(s) for s in FIXED_SPECS[:4]]
    images = torch.rand(4, 3, 64, 64, requires_grad=True)  # any size: resized inside
    scores = model(images, prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_toy_clip_prefers_the_matching_prompt(clip):
    rng = np.random.default_rng(0)
    images = renders(FIXED_SPECS)
    own = clip(images, [world.prompt_of(s) for s in FIXED_SPECS])
    wins = []
    for attribute in world.ATTRIBUTES:
        wrong = [world.prompt_of(world.perturb(s, attribute, rng)) for s in FIXED_SPECS]
        wins.append((own > clip(images, wrong)).float().mean().item())
    assert min(wins) > 0.7 and np.mean(wins) > 0.85, dict(zip(world.ATTRIBUTES, wins))


def test_toy_clip_scale_option_and_embed(clip):
    scaled = load_toy_clip(spec("toy_clip", scale=1.0), "cpu", torch.float32)
    images = renders(FIXED_SPECS[:3])
    prompts = [world.prompt_of(s) for s in FIXED_SPECS[:3]]
    assert torch.allclose(clip(images, prompts), 10.0 * scaled(images, prompts), atol=1e-5)
    embedding = clip.embed(images)
    assert embedding.shape == (3, 64) and torch.allclose(embedding.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_toy_aesthetic_prefers_the_hidden_taste(aesthetic):
    rng = np.random.default_rng(1)
    dull = [
        world.Style(
            vivid=rng.random() * 0.3, noise=0.5 + rng.random() * 0.5, blur=0.5 + rng.random() * 0.5, offset=rng.random()
        )
        for _ in FIXED_SPECS
    ]
    clean, messy = aesthetic(renders(FIXED_SPECS), None), aesthetic(renders(FIXED_SPECS, dull), None)
    assert (clean > messy).float().mean().item() > 0.9


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="toy reward file .* not found. HINT: run python -m toyworld.factory.build"
    ):
        load_toy_clip(spec("toy_clip", path=str(tmp_path / "nope.safetensors")), "cpu", torch.float32)


def test_wrong_file_and_unknown_option_are_refused():

    with pytest.raises(ValueError, match="is not a toy_clip reward file"):
        load_toy_clip(spec("toy_clip", path=str(toy.AESTHETIC_FILE)), "cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown option"):
        load_toy_aesthetic(spec("toy_aesthetic", scale=2.0), "cpu", torch.float32)


def test_unknown_words_are_refused(clip):
    with pytest.raises(ValueError, match="does not know the word"):
        clip(torch.rand(1, 3, 32, 32), ["a photo of a cat"])


def test_the_trainer_loads_the_toy_rewards_by_the_loaders_toy_yaml_names():
    from training import rewards
    from training.config import load_config

    cfg = load_config("training/configs/toy.yaml")
    loaders = [spec.loader for spec in cfg.rewards]
    assert loaders == ["toyworld.rewards:load_toy_clip", "toyworld.rewards:load_toy_aesthetic"]
    assert not set(rewards.REWARDS.values()) & {spec.loader for spec in cfg.rewards}  # the registry names no toy code
    for spec in cfg.rewards:
        model = rewards.load_reward(spec, "cpu", torch.float32)
        assert model(torch.rand(2, 3, 32, 32), [world.prompt_of(s) for s in FIXED_SPECS[:2]]).shape == (2,)
    with pytest.raises(ValueError, match="HyperAlign: unknown reward 'toy_clip'.*loader: 'module:function'"):
        rewards.RewardSpec("toy_clip")
