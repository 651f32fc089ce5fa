"""The ground-truth checker (toyworld/truth.py): it reads what the world drew, and it is no reward."""

import numpy as np
import pytest
import torch

from toyworld import truth, world

SPEC = world.SceneSpec("triangle", "red", "left", "small", 3, "blue")


def test_checker_reads_the_worlds_own_renders():
    """The acceptance bar of the toy world: >= 0.97 per attribute on clean renders and on renders in random
    styles, and >= 0.9 rank correlation of each measured taste term with the true style value."""
    report = truth.validate(150, seed=0)
    for split in ("clean", "random_style"):
        low = {k: v for k, v in report[split].items() if v < 0.97}
        assert not low, f"{split}: {low}"
    weak = {k: v for k, v in report["taste_spearman"].items() if v < 0.9}
    assert not weak, weak


@pytest.mark.parametrize("attribute", world.ATTRIBUTES)
def test_a_wrong_scene_is_read_as_wrong_in_that_attribute_only(attribute):
    rng = np.random.default_rng(3)
    wrong = world.perturb(SPEC, attribute, rng)
    correct = truth.check(world.render(wrong)[None]).correct([SPEC])
    assert correct[attribute][0] == 0.0
    assert all(correct[a][0] == 1.0 for a in world.ATTRIBUTES if a != attribute)


def test_style_terms_move_with_the_style():
    clean = truth.check(world.render(SPEC)[None])
    styled = truth.check(world.render(SPEC, world.Style(vivid=0.0, noise=1.0, blur=1.0, offset=1.0), seed=2)[None])
    assert clean.taste()[0] > 0.5 and styled.taste()[0] < -1.5  # ideal +1, worst -2.4
    for term, sign in (("vivid", -1), ("noise", 1), ("blur", 1), ("offset", 1)):
        assert sign * (styled.style[term][0] - clean.style[term][0]) > 0.5, term


def test_float_tensors_at_any_size_read_like_uint8():
    image = world.render(SPEC)
    as_uint8 = truth.check(image[None])
    big = torch.nn.functional.interpolate(world.to_tensor_images(image[None]), size=(64, 64), mode="nearest")
    assert truth.check(big).attributes == as_uint8.attributes


def test_metrics_have_the_reward_signature_but_no_training_use():
    from training.config import check_files, load_config

    wrong_count = world.perturb(SPEC, "count", np.random.default_rng(0))
    images = world.to_tensor_images(np.stack([world.render(SPEC), world.render(wrong_count)]))
    prompts = [world.prompt_of(SPEC)] * 2
    accuracy = truth.load_truth(None)(images, prompts)
    taste = truth.load_taste(None)(images, prompts)
    assert accuracy.tolist() == pytest.approx([1.0, 5 / 6])
    assert taste.shape == (2,) and taste[0] > 0.5
    truth_as_reward = "rewards=[{'name': 'toy_truth', 'loader': 'toyworld.truth:load_truth'}]"
    with pytest.raises(ValueError, match="HyperAlign: rewards\\[0\\] \\('toy_truth'\\) is an evaluation metric"):
        check_files(load_config("training/configs/toy.yaml", [truth_as_reward]))
