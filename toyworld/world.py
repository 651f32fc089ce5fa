"""The toy world: scenes of coloured shapes, the prompts that describe them and a hidden taste.

A scene (:class:`SceneSpec`) is what a prompt says: shape kind, colour, where the group sits, size,
how many, background colour. :func:`prompt_of` writes it as text ("two small red circles on the left,
blue background") and :func:`parse_prompt` reads it back. A :class:`Style` holds what a prompt does
*not* say (how vivid the colours are, film grain, soft edges, how well the group sits in its spot);
the hidden :func:`taste` rule scores a style, and the toy aesthetic reward has to learn it from
pairwise preferences only.

Rendering is pure numpy (4x supersampled, so edges are anti-aliased) and returns uint8, so the same
spec, style and seed give the same bytes on every machine.

Held-out prompts are the scenes whose (colour, shape) pair is in :data:`HELDOUT_PAIRS`: the
diffusion model never sees a red triangle, a green circle or a blue square in training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple")
BACKGROUNDS = ("white", "black", "gray") + COLOURS
POSITIONS = ("left", "center", "right", "top", "bottom")
SIZES = ("small", "large")
COUNTS = (1, 2, 3)
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})

RGB = {
    "red": (0.86, 0.14, 0.14),
    "green": (0.16, 0.68, 0.22),
    "blue": (0.16, 0.30, 0.88),
    "yellow": (0.96, 0.84, 0.12),
    "purple": (0.58, 0.20, 0.76),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.06),
    "gray": (0.50, 0.50, 0.50),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITION_PHRASES = {
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Centre of each spot (x, y) in pixels, and whether a group there is laid out as a column.
_ANCHORS = {
    "left": (8.0, 16.0),
    "center": (16.0, 16.0),
    "right": (24.0, 16.0),
    "top": (16.0, 8.0),
    "bottom": (16.0, 24.0),
}
_COLUMN = {"left", "right"}
_RADIUS = {"small": 3.2, "large": 4.6}  # circumradius-like size in pixels
_SPACING = {"small": 8.0, "large": 10.5}
_MAX_OFFSET = 3.0  # pixels a badly composed group drifts from its spot
_MAX_BLUR = 1.0  # gaussian sigma in pixels; much above 1 a small triangle and circle look alike
_MAX_NOISE = 0.08  # grain standard deviation
_MIN_VIVID = 0.4  # colour saturation factor of the dullest style
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneSpec:
    shape: str
    colour: str
    position: str
    size: str
    count: int
    background: str

    def __post_init__(self):
        for name, allowed in (
            ("shape", SHAPES),
            ("colour", COLOURS),
            ("position", POSITIONS),
            ("size", SIZES),
            ("count", COUNTS),
            ("background", BACKGROUNDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"HyperAlign: toy scene {name} {getattr(self, name)!r} is not one of {allowed}.")
        if self.background == self.colour:
            raise ValueError(f"HyperAlign: toy scene shapes and background are both {self.colour!r}.")

    @property
    def heldout(self) -> bool:
        return (self.colour, self.shape) in HELDOUT_PAIRS


@dataclass(frozen=True)
class Style:
    """What the prompt leaves open, each in [0, 1]; the default is the ideal (clean) rendering."""

    vivid: float = 1.0  # colour saturation
    noise: float = 0.0  # film grain
    blur: float = 0.0  # soft edges
    offset: float = 0.0  # how far the group drifts from the centre of its spot

    def as_array(self) -> np.ndarray:
        return np.array([self.vivid, self.noise, self.blur, self.offset], dtype=np.float64)


# The hidden taste: vivid, clean, sharp, well-centred pictures are preferred. Only the build script
# and the preference data use it; every model has to infer it from images.
TASTE_WEIGHTS = {"vivid": 1.0, "noise": -1.0, "blur": -0.8, "offset": -0.6}


def taste(style: Style) -> float:
    return float(sum(w * getattr(style, name) for name, w in TASTE_WEIGHTS.items()))


def random_style(rng: np.random.Generator) -> Style:
    vivid, noise, blur, offset = rng.random(4)
    return Style(float(vivid), float(noise), float(blur), float(offset))


# --- prompts ---------------------------------------------------------------------------------


def prompt_of(spec: SceneSpec, with_colour: bool = True) -> str:
    """The prompt of a scene. ``with_colour=False`` leaves out the shapes' colour word (a caption the UNet may
    train on, never a toy-world prompt: :func:`parse_prompt` refuses it)."""
    noun = spec.shape if spec.count == 1 else spec.shape + "s"
    where = POSITION_PHRASES[spec.position]
    shapes = f"{spec.colour} {noun}" if with_colour else noun
    return f"{COUNT_WORDS[spec.count]} {spec.size} {shapes} {where}, {spec.background} background"


def parse_prompt(prompt: str) -> SceneSpec:
    """The scene a toy prompt describes; an error for text outside the toy grammar."""
    words = prompt.strip().lower().replace(",", " , ").split()
    try:
        count = {v: k for k, v in COUNT_WORDS.items()}[words[0]]
        size, colour, noun = words[1], words[2], words[3]
        shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
        where = " ".join(words[4:-3])
        position = {v: k for k, v in POSITION_PHRASES.items()}[where]
        if words[-3] != "," or words[-1] != "background":
            raise KeyError(prompt)
        spec = SceneSpec(shape, colour, position, size, count, words[-2])
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"HyperAlign: {prompt!r} is not a toy-world prompt. HINT: toy prompts read like "
            f"'two small red circles on the left, blue background' (see toyworld/world.py)."
        ) from error
    if prompt_of(spec) != " ".join(prompt.strip().lower().split()):
        raise ValueError(f"HyperAlign: {prompt!r} is not a toy-world prompt (expected {prompt_of(spec)!r}).")
    return spec


def all_specs() -> list[SceneSpec]:
    """Every scene of the grammar, in a fixed order."""
    specs = []
    for shape, colour, position, size, count, background in itertools.product(
        SHAPES, COLOURS, POSITIONS, SIZES, COUNTS, BACKGROUNDS
    ):
        if background != colour:
            specs.append(SceneSpec(shape, colour, position, size, count, background))
    return specs


def split_specs() -> tuple[list[SceneSpec], list[SceneSpec]]:
    """(train, held-out): held-out scenes pair a colour with a shape that training never shows."""
    specs = all_specs()
    return [s for s in specs if not s.heldout], [s for s in specs if s.heldout]


ATTRIBUTES = tuple(f.name for f in fields(SceneSpec))


def perturb(spec: SceneSpec, attribute: str, rng: np.random.Generator) -> SceneSpec:
    """`spec` with one attribute changed to another valid value (a hard negative for that attribute)."""
    options = {
        "shape": SHAPES,
        "colour": [c for c in COLOURS if c != spec.background],
        "position": POSITIONS,
        "size": SIZES,
        "count": COUNTS,
        "background": [b for b in BACKGROUNDS if b != spec.colour],
    }[attribute]
    choices = [v for v in options if v != getattr(spec, attribute)]
    return replace(spec, **{attribute: choices[int(rng.integers(len(choices)))]})


def shape_variants(spec: SceneSpec) -> list[SceneSpec]:
    """`spec` with each shape, its own first: the candidates a judge of shape must tell apart."""
    return [spec] + [replace(spec, shape=s) for s in SHAPES if s != spec.shape]


# --- rendering -------------------------------------------------------------------------------


def group_layout(position: str, size: str, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An undrifted group's shape centres (count, 2) in pixels, and the (low, high) range a drift is clipped to so
    that the whole group stays on the canvas. The renderer and the ground-truth checker share this geometry."""
    ax, ay = _ANCHORS[position]
    steps = (np.arange(count) - (count - 1) / 2) * _SPACING[size]
    centres = (
        np.stack([np.full_like(steps, ax), ay + steps], 1)
        if position in _COLUMN
        else np.stack([ax + steps, np.full_like(steps, ay)], 1)
    )
    radius = _RADIUS[size]
    low = radius + 0.5 - centres.min(0)
    high = IMAGE_SIZE - radius - 0.5 - centres.max(0)
    return centres, low, np.maximum(low, high)


def _centres(spec: SceneSpec, style: Style, rng: np.random.Generator) -> np.ndarray:
    centres, low, high = group_layout(spec.position, spec.size, spec.count)
    angle = rng.random() * 2 * np.pi
    shift = style.offset * _MAX_OFFSET * np.array([np.cos(angle), np.sin(angle)])
    return centres + np.clip(shift, low, high)


def coverage(shape: str, size: str, centres: np.ndarray) -> np.ndarray:
    """(32, 32) share of each pixel the shapes cover, from 4x4 supersampling (anti-aliased edges)."""
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    hit = np.zeros((n, n), dtype=bool)
    for cx, cy in centres:
        hit |= _mask(shape, x, y, cx, cy, _RADIUS[size])
    return hit.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE).mean(axis=(1, 3))


def _mask(kind: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        half = r * 0.88
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # upward triangle inscribed in a circle of radius 1.2 r, its centroid on the centre
    big = r * 1.2
    inside_base = dy <= big / 2
    slope = np.sqrt(3.0)
    return inside_base & (dy >= -big + slope * np.abs(dx))


def _muted(rgb: tuple[float, float, float], vivid: float) -> np.ndarray:
    colour = np.asarray(rgb, dtype=np.float64)
    grey = colour @ np.array([0.299, 0.587, 0.114])
    factor = _MIN_VIVID + (1 - _MIN_VIVID) * vivid
    return grey + factor * (colour - grey)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 1e-6:
        return image
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    size = image.shape[0]
    rows = sum(t * padded[i : i + size, :, :] for i, t in enumerate(taps))
    return sum(t * rows[:, i : i + size, :] for i, t in enumerate(taps))


def render(spec: SceneSpec, style: Style = Style(), seed: int = 0) -> np.ndarray:
    """The scene as a (32, 32, 3) uint8 image; `seed` picks the drift direction and the grain."""
    rng = np.random.default_rng(seed)
    cover = coverage(spec.shape, spec.size, _centres(spec, style, rng))[..., None]
    image = cover * _muted(RGB[spec.colour], style.vivid) + (1 - cover) * _muted(RGB[spec.background], style.vivid)
    image = _gaussian_blur(image, style.blur * _MAX_BLUR)
    image = image + rng.normal(0.0, 1.0, image.shape) * style.noise * _MAX_NOISE
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def render_batch(specs: list[SceneSpec], styles: list[Style], seeds: list[int]) -> np.ndarray:
    """(n, 32, 32, 3) uint8."""
    return np.stack([render(s, st, seed) for s, st, seed in zip(specs, styles, seeds)])


def to_tensor_images(images: np.ndarray):
    """uint8 (n, h, w, 3) -> float tensor (n, 3, h, w) in [0, 1], the rewards' input convention."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
