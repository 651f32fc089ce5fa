"""Rewards: each loader loads a tiny stand-in checkpoint through the real architecture's code path and is
differentiable w.r.t. the image; missing files and checkpoints that do not fit give clear errors."""

import importlib
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import write_clip_tokenizer
from safetensors.torch import save_file

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
    scores = _check_differentiable(model, prompts=("a cat", "a red square"))
    # the whole checkpoint was loaded ('module.' prefixes stripped) and scored as HPS does: the cosine of the
    # reference model's own image and text embeddings
    with torch.no_grad():
        image = F.normalize(reference.encode_image(clip_preprocess(_images(2), 32)), dim=-1)
        text = F.normalize(
            reference.encode_text(open_clip.get_tokenizer("hps-tiny-test")(["a cat", "a red square"])), dim=-1
        )
    torch.testing.assert_close(scores.detach(), (image * text).sum(-1), rtol=1e-5, atol=1e-6)


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
    with pytest.raises(ValueError, match="ImageReward.pt.*rewards\\[1\\].path is not set"):
        check_spec(RewardSpec("imagereward"), "rewards[1]")
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        load_reward(RewardSpec("hps", path=missing), "cpu", torch.float32)
    with pytest.raises(FileNotFoundError, match="rewards\\[0\\].options.clip"):
        check_spec(RewardSpec("aesthetic", path=__file__, options={"clip": str(tmp_path / "no_clip")}), "rewards[0]")


# ImageReward: a tiny checkpoint in the ORIGINAL layout (ImageReward.pt's key names, written out here, not
# derived from the loader's renaming) and a hand-written forward of it in plain torch.

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
TINY_TEXT = {
    "vocab_size": 11,  # the 9 words of TINY_VOCAB + [DEC] + [ENC]
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 40,
}
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "red", "square"]
# Keys of ImageReward.pt that the score does not read.
UNUSED_BY_THE_SCORE = {
    "blip.vision_proj.weight",
    "blip.vision_proj.bias",
    "blip.text_proj.weight",
    "blip.text_proj.bias",
    "blip.text_encoder.embeddings.position_ids",
}


def _original_imagereward_shapes(vocab_words: int = len(TINY_VOCAB)) -> dict[str, tuple]:
    """ImageReward.pt's keys (BLIP_Pretrain as blip.*, the MLP as mlp.*) for the tiny sizes."""
    v, v_mlp, t, t_mlp, patch = 32, 64, 32, 37, 8
    shapes = {
        "blip.visual_encoder.cls_token": (1, 1, v),
        "blip.visual_encoder.pos_embed": (1, (32 // patch) ** 2 + 1, v),
        "blip.visual_encoder.patch_embed.proj.weight": (v, 3, patch, patch),
        "blip.visual_encoder.patch_embed.proj.bias": (v,),
        "blip.visual_encoder.norm.weight": (v,),
        "blip.visual_encoder.norm.bias": (v,),
        "blip.text_encoder.embeddings.position_ids": (1, 40),
        "blip.text_encoder.embeddings.word_embeddings.weight": (vocab_words + 2, t),
        "blip.text_encoder.embeddings.position_embeddings.weight": (40, t),
        "blip.text_encoder.embeddings.LayerNorm.weight": (t,),
        "blip.text_encoder.embeddings.LayerNorm.bias": (t,),
        "blip.vision_proj.weight": (16, v),
        "blip.vision_proj.bias": (16,),
        "blip.text_proj.weight": (16, t),
        "blip.text_proj.bias": (16,),
    }
    for i in range(2):
        block = f"blip.visual_encoder.blocks.{i}."
        for name, shape in (
            ("norm1", (v,)),
            ("attn.qkv", (3 * v, v)),
            ("attn.proj", (v, v)),
            ("norm2", (v,)),
            ("mlp.fc1", (v_mlp, v)),
            ("mlp.fc2", (v, v_mlp)),
        ):
            shapes[f"{block}{name}.weight"], shapes[f"{block}{name}.bias"] = shape, shape[:1]
        layer = f"blip.text_encoder.encoder.layer.{i}."
        for part, memory_width in (("attention", t), ("crossattention", v)):
            for name, shape in (
                ("self.query", (t, t)),
                ("self.key", (t, memory_width)),
                ("self.value", (t, memory_width)),
                ("output.dense", (t, t)),
                ("output.LayerNorm", (t,)),
            ):
                shapes[f"{layer}{part}.{name}.weight"], shapes[f"{layer}{part}.{name}.bias"] = shape, shape[:1]
        for name, shape in (
            ("intermediate.dense", (t_mlp, t)),
            ("output.dense", (t, t_mlp)),
            ("output.LayerNorm", (t,)),
        ):
            shapes[f"{layer}{name}.weight"], shapes[f"{layer}{name}.bias"] = shape, shape[:1]
    for index, shape in zip((0, 2, 4, 6, 7), ((1024, t), (128, 1024), (64, 128), (16, 64), (1, 16))):
        shapes[f"mlp.layers.{index}.weight"], shapes[f"mlp.layers.{index}.bias"] = shape, shape[:1]
    return shapes


def _random_tensor(name: str, shape: tuple) -> torch.Tensor:
    if name.endswith("position_ids"):
        return torch.arange(shape[1]).view(shape)
    if "norm" in name.lower() and name.endswith(".weight"):
        return 1 + 0.1 * torch.randn(shape)
    if len(shape) == 1:
        return 0.1 * torch.randn(shape)
    return torch.randn(shape) / math.prod(shape[1:]) ** 0.5


def _tiny_imagereward_checkpoint() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: _random_tensor(name, shape) for name, shape in _original_imagereward_shapes().items()}


def _write_bert_vocab(folder, words=TINY_VOCAB):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_imagereward")
    checkpoint = _tiny_imagereward_checkpoint()
    torch.save(checkpoint, folder / "ImageReward.pt")
    _write_bert_vocab(folder / "bert")
    return folder, checkpoint


def _imagereward_spec(folder, checkpoint=None, tokenizer=None, vision=None):
    arch = {"vision": {**TINY_VISION, **(vision or {})}, "text": TINY_TEXT}
    options = {"tokenizer": str(tokenizer or folder / "bert"), "arch": arch}
    return RewardSpec("imagereward", path=str(checkpoint or folder / "ImageReward.pt"), options=options)


def test_imagereward_loads_the_original_layout_uses_every_key_and_is_differentiable(tiny_imagereward):
    folder, checkpoint = tiny_imagereward
    spec = _imagereward_spec(folder)
    check_spec(spec, "rewards[0]")
    model = load_reward(spec, "cpu", torch.float32)
    _check_differentiable(model)
    loaded = list(model.state_dict().values())
    used = {k: v for k, v in checkpoint.items() if k not in UNUSED_BY_THE_SCORE}
    assert len(loaded) == len(used)  # nothing left at random init
    for key, tensor in used.items():
        assert any(t.shape == tensor.shape and torch.equal(t, tensor) for t in loaded), key
    assert model.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [9, 10]  # BLIP's init_tokenizer


def _layer_norm(x, state, name, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def _linear(x, state, name):
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def _attention(q, k, v, heads, bias=None):
    def split(x):  # (b, n, d) -> (b, heads, n, d / heads): consecutive channels form one head
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads)
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(q.shape)


def _reference_vit(pixels, s):
    """blip/vit.py VisionTransformer.forward: timm blocks, LayerNorm eps 1e-6, exact GELU, final norm."""
    p = "blip.visual_encoder."
    x = F.conv2d(pixels, s[p + "patch_embed.proj.weight"], s[p + "patch_embed.proj.bias"], stride=8)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s[p + "cls_token"].expand(len(x), -1, -1), x], dim=1) + s[p + "pos_embed"]
    for i in range(2):
        block = f"{p}blocks.{i}."
        q, k, v = _linear(_layer_norm(x, s, block + "norm1", 1e-6), s, block + "attn.qkv").chunk(3, dim=-1)
        x = x + _linear(_attention(q, k, v, heads=2), s, block + "attn.proj")
        hidden = F.gelu(_linear(_layer_norm(x, s, block + "norm2", 1e-6), s, block + "mlp.fc1"))
        x = x + _linear(hidden, s, block + "mlp.fc2")
    return _layer_norm(x, s, p + "norm", 1e-6)


def _reference_text_cls(input_ids, attention_mask, image_tokens, s):
    """blip/med.py BertModel.forward in 'multimodal' mode: post-norm BERT layers with cross-attention."""
    p = "blip.text_encoder."
    x = s[p + "embeddings.word_embeddings.weight"][input_ids]
    x = _layer_norm(
        x + s[p + "embeddings.position_embeddings.weight"][: x.shape[1]], s, p + "embeddings.LayerNorm", 1e-12
    )
    padding = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # med.py's extended mask
    for i in range(2):
        layer = f"{p}encoder.layer.{i}."
        for part, bias in (("attention", padding), ("crossattention", None)):
            memory, name = (x if part == "attention" else image_tokens), layer + part
            q = _linear(x, s, f"{name}.self.query")
            k, v = _linear(memory, s, f"{name}.self.key"), _linear(memory, s, f"{name}.self.value")
            context = _attention(q, k, v, heads=2, bias=bias)
            x = _layer_norm(_linear(context, s, f"{name}.output.dense") + x, s, f"{name}.output.LayerNorm", 1e-12)
        hidden = F.gelu(_linear(x, s, layer + "intermediate.dense"))
        x = _layer_norm(_linear(hidden, s, layer + "output.dense") + x, s, layer + "output.LayerNorm", 1e-12)
    return x[:, 0]


def _reference_mlp(features, s):
    for index in (0, 2, 4, 6, 7):  # Linears only: ImageReward's MLP has its activations commented out
        features = _linear(features, s, f"mlp.layers.{index}")
    return features.squeeze(-1)


def test_imagereward_matches_a_hand_written_forward_of_the_original_weights(tiny_imagereward):
    folder, s = tiny_imagereward
    model = load_reward(_imagereward_spec(folder), "cpu", torch.float32)
    prompts = ["a cat", "a red square", "red " * 50]
    # bert-base-uncased style ids of TINY_VOCAB: [CLS] first (ImageReward does not swap in [ENC]),
    # padded to 35 and truncated at 35 as ImageReward.score tokenises.
    rows = [[2, 5, 6, 3], [2, 5, 7, 8, 3], [2] + [7] * 33 + [3]]
    input_ids = torch.tensor([row + [0] * (35 - len(row)) for row in rows])
    attention_mask = (torch.arange(35) < torch.tensor([len(row) for row in rows])[:, None]).long()
    images = _images(3)
    with torch.no_grad():
        tokens = _reference_vit(clip_preprocess(images, 32), s)
        assert torch.allclose(model.image_tokens(images), tokens, atol=1e-5)
        cls = _reference_text_cls(input_ids, attention_mask, tokens, s)
        assert torch.allclose(model.text_features(tokens, prompts), cls, atol=1e-5)
        expected = (_reference_mlp(cls, s) - 0.16717362830052426) / 1.0333394966054072
        assert torch.allclose(model(images, prompts), expected, atol=1e-5)


def test_imagereward_refuses_unknown_missing_and_missized_keys(tiny_imagereward, tmp_path):
    folder, checkpoint = tiny_imagereward
    lost = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
    torch.save({**checkpoint, "blip.itm_head.weight": torch.zeros(2, 32)}, tmp_path / "extra.pt")
    save_file({k: v for k, v in checkpoint.items() if k != lost}, tmp_path / "lost.safetensors")
    for file, key in (("extra.pt", "blip.itm_head.weight"), ("lost.safetensors", lost)):
        with pytest.raises(
            ValueError, match=r"HyperAlign: .*" + re.escape(key) + r".*HINT: rewards\[\*\]\.path must be"
        ):
            load_reward(_imagereward_spec(folder, checkpoint=tmp_path / file), "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight \(64, 32\).*options\.arch"):
        load_reward(_imagereward_spec(folder, vision={"intermediate_size": 48}), "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"unknown keys \['layers'\]"):
        load_reward(_imagereward_spec(folder, vision={"layers": 2}), "cpu", torch.float32)
    bigger_vocab = _write_bert_vocab(tmp_path / "bert_plus", TINY_VOCAB + ["dog"])
    with pytest.raises(ValueError, match=r"12 tokens.*has 11.*options\.tokenizer"):
        load_reward(_imagereward_spec(folder, tokenizer=bigger_vocab), "cpu", torch.float32)


def test_registry_has_the_contracted_entries():
    for name in (
        "hps",
        "pickscore",
        "clip",
        "aesthetic",
        "imagereward",
        "brightness",
        "color",
    ):
        assert name in REWARDS
    for name, spec in REWARDS.items():  # every entry resolves to a loader, not just a string with a ':'
        module, _, function = spec.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), (name, spec)
