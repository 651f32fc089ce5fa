"""The toy preference pairs for L_G: the trainer's local format, files present, chosen really better."""

import json

import numpy as np
from PIL import Image

import toyworld as toy
from toyworld import world


def read_rows():
    return [json.loads(line) for line in toy.PREFS_FILE.read_text().splitlines() if line.strip()]


def test_pairs_are_well_formed_and_every_file_exists():
    rows = read_rows()
    assert 200 <= len(rows) <= 500
    train = set(toy.load_prompts("train"))
    folder = toy.PREFS_FILE.parent
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"] in train  # L_G data never shows a held-out scene
        for key in ("chosen", "rejected"):
            assert not row[key].startswith("/")  # relative to the jsonl's folder
            with Image.open(folder / row[key]) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
    assert len({r["chosen"] for r in rows} | {r["rejected"] for r in rows}) == 2 * len(rows)


def test_chosen_images_match_their_prompt():
    folder = toy.PREFS_FILE.parent
    for row in read_rows()[:40]:
        spec = world.parse_prompt(row["prompt"])
        chosen = np.asarray(Image.open(folder / row["chosen"]), dtype=float) / 255
        background = np.array(world.RGB[spec.background])
        # most of the border is background, a little muted or noisy at most
        border = np.concatenate([chosen[0], chosen[-1], chosen[1:-1, 0], chosen[1:-1, -1]])
        assert np.abs(np.median(border, axis=0) - background).max() < 0.3, row
