"""The toy world: grammar round trip, train/held-out split, deterministic rendering, hidden taste."""

import hashlib

import numpy as np
import pytest

import toyworld as toy
from toyworld import world


def test_every_prompt_parses_back_to_its_scene():
    specs = world.all_specs()
    assert len(specs) == 3 * 5 * 5 * 2 * 3 * 7
    assert all(world.parse_prompt(world.prompt_of(s)) == s for s in specs)
    assert world.prompt_of(world.SceneSpec("circle", "red", "left", "small", 2, "blue")) == (
        "two small red circles on the left, blue background"
    )


def test_a_colour_free_caption_drops_only_the_colour_word_and_is_no_prompt():
    spec = world.SceneSpec("circle", "red", "left", "small", 2, "blue")
    caption = world.prompt_of(spec, with_colour=False)
    assert caption == "two small circles on the left, blue background"
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.parse_prompt(caption)


@pytest.mark.parametrize(
    "bad", ["a cat", "two small red circle on the left, blue background", "one small red circle on the left"]
)
def test_text_outside_the_grammar_is_refused(bad):
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.parse_prompt(bad)


def test_split_holds_out_colour_shape_pairs():
    train, heldout = world.split_specs()
    assert {(s.colour, s.shape) for s in train}.isdisjoint(world.HELDOUT_PAIRS)
    assert {(s.colour, s.shape) for s in heldout} == set(world.HELDOUT_PAIRS)
    # every attribute value still appears in training, only the pairs are new
    for attribute in world.ATTRIBUTES:
        assert {getattr(s, attribute) for s in heldout} <= {getattr(s, attribute) for s in train}


def test_shipped_prompt_files_are_the_split():
    train, heldout = world.split_specs()
    assert toy.load_prompts("train") == [world.prompt_of(s) for s in train]
    assert toy.load_prompts("heldout") == [world.prompt_of(s) for s in heldout]
    assert set(toy.load_prompts("train")).isdisjoint(toy.load_prompts("heldout"))
    assert toy.sample_prompts("heldout", 5, seed=3) == toy.sample_prompts("heldout", 5, seed=3)


def test_rendering_is_deterministic_and_matches_golden_bytes():
    spec = world.SceneSpec("triangle", "yellow", "bottom", "large", 3, "purple")
    style = world.Style(vivid=0.3, noise=0.5, blur=0.4, offset=0.7)
    first, second = world.render(spec, style, seed=11), world.render(spec, style, seed=11)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, second)
    assert not np.array_equal(first, world.render(spec, style, seed=12))  # the seed moves grain and drift
    digest = hashlib.sha256(world.render(spec).tobytes() + first.tobytes()).hexdigest()
    assert digest == GOLDEN_RENDER_SHA256


def test_render_shows_the_scene():
    spec = world.SceneSpec("square", "red", "left", "large", 1, "white")
    image = world.render(spec).astype(float) / 255
    red = (image[..., 0] > 0.7) & (image[..., 1] < 0.3)
    ys, xs = np.nonzero(red)
    assert 40 < red.sum() < 120  # one large square, about 8x8 pixels
    assert xs.mean() < 12 and 12 < ys.mean() < 20  # on the left, vertically centred
    assert np.allclose(image[0, -1], world.RGB["white"], atol=0.01)


def test_hidden_taste_prefers_the_clean_style():
    assert world.taste(world.Style()) == max(
        world.taste(s) for s in [world.Style(), world.Style(0.5, 0, 0, 0), world.Style(1, 0.2, 0, 0)]
    )
    assert world.taste(world.Style(vivid=0.0, noise=1.0, blur=1.0, offset=1.0)) < world.taste(world.Style())


def test_perturb_changes_exactly_one_attribute():
    rng = np.random.default_rng(0)
    for spec in world.all_specs()[::97]:
        for attribute in world.ATTRIBUTES:
            other = world.perturb(spec, attribute, rng)
            changed = [a for a in world.ATTRIBUTES if getattr(other, a) != getattr(spec, a)]
            assert changed == [attribute]


GOLDEN_RENDER_SHA256 = "744ae9118568cf1c54a872e89fd971fec1c538f2254911a08edec6b542713a2d"
