"""Rewards: each loader loads a tiny stand-in checkpoint through the real architecture's code path and is
differentiable w.r.t. the image; missing files and the missing optional extra give clear errors."""

import importlib.util
import json

import pytest
import torch
from conftest import write_clip_tokenizer

from training.rewards import REWARDS, RewardSet, RewardSpec, check_spec, clip_preprocess, load_reward


def _images(b=2, size=40):
    torch.manual_seed(0)
    return torch.rand(b, 3, size, size + 8, requires_grad=True)


def _check_differentiable(module, prompts=("a cat", "a red square")):
    images = _images(len(prompts))
    scores = module(images, list(prompts))
    assert scores.shape == (len(prompts),) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in module.parameters())
    return scores


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def test_toy_rewards_are_differentiable():
    for name in ("brightness", "color"):
        _check_differentiable(load_reward(RewardSpec(name), "cpu", torch.float32))
    bright = load_reward(RewardSpec("brightness"), "cpu", torch.float32)
    assert bright(torch.ones(1, 3, 8, 8), ["x"]) > bright(torch.zeros(1, 3, 8, 8), ["x"])


def test_clip_preprocess_resizes_crops_and_keeps_gradients():
    images = _images(1, 64)
    pixels = clip_preprocess(images, 32)
    assert pixels.shape == (1, 3, 32, 32)
    pixels.mean().backward()
    assert images.grad.abs().sum() > 0


def test_hps_loads_a_tiny_open_clip_checkpoint(tmp_path):
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    config_file = tmp_path / "hps-tiny-test.json"
    config_file.write_text(json.dumps(config))
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    reference = open_clip.create_model("hps-tiny-test", pretrained=None)
    checkpoint = tmp_path / "HPS_tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, checkpoint)
    spec = RewardSpec(
        "hps", path=str(checkpoint), options={"arch": "hps-tiny-test", "open_clip_config": str(config_file)}
    )
    check_spec(spec, "rewards[0]")
    model = load_reward(spec, "cpu", torch.float32)
    scores = _check_differentiable(model)
    assert scores.abs().max() <= 1.0 + 1e-5  # a cosine of normalised features
    assert torch.equal(model.model.visual.conv1.weight, reference.visual.conv1.weight)


def test_pickscore_and_clip_load_a_tiny_transformers_clip(tiny_hf_clip):
    pick = load_reward(
        RewardSpec("pickscore", path=str(tiny_hf_clip), options={"processor": str(tiny_hf_clip)}), "cpu", torch.float32
    )
    clip = load_reward(RewardSpec("clip", path=str(tiny_hf_clip)), "cpu", torch.float32)
    pick_scores, clip_scores = _check_differentiable(pick), _check_differentiable(clip)
    scale = pick.model.logit_scale.exp().item()
    assert torch.allclose(pick_scores.detach(), scale * clip_scores.detach(), atol=1e-5)


def test_aesthetic_loads_a_head_file_and_clip_vision(tiny_hf_clip, tmp_path):
    from training.reward_models import AestheticHead

    torch.manual_seed(0)
    head = AestheticHead(16)
    head_file = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), head_file)  # keys layers.{0,2,4,6,7}.*, as the LAION file
    spec = RewardSpec("aesthetic", path=str(head_file), options={"clip": str(tiny_hf_clip)})
    model = load_reward(spec, "cpu", torch.float32)
    _check_differentiable(model)
    assert torch.equal(model.head.layers[7].weight, head.layers[7].weight)


def test_reward_set_is_a_weighted_sum_with_named_terms():
    rewards = RewardSet(
        [RewardSpec("brightness", 2.0), RewardSpec("color", 0.5), RewardSpec("brightness", -1.0)], "cpu", torch.float32
    )
    images = _images(2)
    total, terms = rewards(images, ["a", "b"])
    assert list(terms) == ["brightness", "color", "brightness_1"]
    assert torch.allclose(total, 2.0 * terms["brightness"] + 0.5 * terms["color"] - terms["brightness_1"])


def test_missing_reward_file_names_the_file_and_key(tmp_path):
    missing = str(tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(FileNotFoundError, match="rewards\\[3\\].path") as info:
        check_spec(RewardSpec("hps", path=missing), "rewards[3]")
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="rewards\\[0\\].path is not set"):
        check_spec(RewardSpec("hps"), "rewards[0]")
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        load_reward(RewardSpec("hps", path=missing), "cpu", torch.float32)
    with pytest.raises(FileNotFoundError, match="rewards\\[0\\].options.clip"):
        check_spec(RewardSpec("aesthetic", path=__file__, options={"clip": str(tmp_path / "no_clip")}), "rewards[0]")


@pytest.mark.skipif(importlib.util.find_spec("ImageReward") is not None, reason="image-reward is installed")
def test_imagereward_without_the_extra_names_the_package():
    with pytest.raises(ImportError, match="pip install image-reward"):
        load_reward(RewardSpec("imagereward"), "cpu", torch.float32)


def test_registry_has_the_contracted_entries():
    for name in (
        "hps",
        "pickscore",
        "clip",
        "aesthetic",
        "imagereward",
        "brightness",
        "color",
        "toy_clip",
        "toy_aesthetic",
    ):
        assert ":" in REWARDS[name]
