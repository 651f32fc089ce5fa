"""A toy world in which the whole HyperAlign chain runs on a CPU in minutes (see README.md here).

Helpers for drivers and tests; nothing heavy is imported here:

- :data:`ASSETS`, :data:`MODEL_DIR`, :data:`CLIP_FILE`, :data:`AESTHETIC_FILE`, :data:`PREFS_FILE`,
  :data:`PROMPTS_DIR`: where ``python -m toyworld.factory.build`` writes what it makes;
- :func:`load_prompts` ("train" or "heldout"), :func:`sample_prompts`;
- :func:`render_prompt`: a toy prompt as an ideal (or styled) 32x32 image;
- :func:`unet_arch`: the ``hyperalign.targets.UNetArch`` of the toy UNet;
- :func:`assets_digest`: what the comparison table records of the assets it was made with.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "model"  # a diffusers Stable Diffusion folder
CLIP_FILE = ASSETS / "rewards" / "toy_clip.safetensors"
AESTHETIC_FILE = ASSETS / "rewards" / "toy_aesthetic.safetensors"
PREFS_FILE = ASSETS / "prefs" / "pairs.jsonl"
PROMPTS_DIR = ASSETS / "prompts"
REPORT_FILE = ASSETS / "report.json"
ASSET_FOLDERS = ("model", "rewards", "prefs", "prompts")  # what a build makes besides its report and picture
SPLITS = ("train", "heldout")
BUILD_HINT = "run python -m toyworld.factory.build"


def prompts_file(split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"HyperAlign: unknown toy prompt split {split!r}; choose one of {SPLITS}.")
    return PROMPTS_DIR / f"{split}.txt"


def load_prompts(split: str = "train") -> list[str]:
    path = prompts_file(split)
    if not path.is_file():
        raise FileNotFoundError(f"HyperAlign: toy prompt file '{path}' not found. HINT: {BUILD_HINT}")
    return [line for line in path.read_text().splitlines() if line.strip()]


def sample_prompts(split: str, count: int, seed: int = 0) -> list[str]:
    """`count` distinct prompts of a split, the same for the same seed."""
    import random

    prompts = load_prompts(split)
    return random.Random(seed).sample(prompts, min(count, len(prompts)))


def render_prompt(prompt: str, seed: int = 0, style=None):
    """The (32, 32, 3) uint8 image of a toy prompt; `style` None is the ideal, clean rendering."""
    from . import world

    return world.render(world.parse_prompt(prompt), style or world.Style(), seed)


def unet_arch():
    from .nets import unet_arch as arch

    return arch()


def assets_digest() -> str:
    """sha256 of every shipped asset the table's numbers depend on (model, rewards, preference pairs, prompts),
    recorded in docs/toy-results.json so that a rebuilt world cannot ship beside a table made on the old one."""
    import hashlib

    digest = hashlib.sha256()
    for name in ASSET_FOLDERS:
        for path in sorted(p for p in (ASSETS / name).rglob("*") if p.is_file()):
            digest.update(path.relative_to(ASSETS).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def assets_built() -> bool:
    """Whether the toy world's trained assets exist (they are built by ``python -m toyworld.factory.build``)."""
    return (MODEL_DIR / "model_index.json").is_file() and PREFS_FILE.is_file()
