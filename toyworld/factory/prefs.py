"""Stage 4: the preference pairs for the regulariser L_G, in the trainer's local-folder format.

``prefs/pairs.jsonl`` rows are ``{"prompt", "chosen", "rejected"}`` with image paths relative to the
jsonl's folder. Prompts come from the training split only. The chosen image matches its prompt and
has the best hidden taste of a few candidate styles; the rejected one is either the same scene in
the worst of those styles, or (every third row) a scene with one attribute wrong, in another of
those (no better) styles.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from .. import world

CANDIDATE_STYLES = 6


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def write_pairs(folder: Path, specs: list[world.SceneSpec], count: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows, gaps, wrong = [], [], 0
    for number, index in enumerate(rng.choice(len(specs), size=count, replace=False), start=1):
        spec = specs[int(index)]
        styles = sorted((world.random_style(rng) for _ in range(CANDIDATE_STYLES)), key=world.taste)
        chosen_style, seeds = styles[-1], rng.integers(0, 2**31 - 1, size=2)
        if number % 3 == 0:
            attribute = world.ATTRIBUTES[int(rng.integers(len(world.ATTRIBUTES)))]
            rejected_spec = world.perturb(spec, attribute, rng)
            rejected_style = styles[int(rng.integers(CANDIDATE_STYLES - 1))]  # never better than chosen
            wrong += 1
        else:
            rejected_spec, rejected_style = spec, styles[0]
        names = (f"img/{number:06d}_a.png", f"img/{number:06d}_b.png")
        (folder / names[0]).write_bytes(_png(world.render(spec, chosen_style, int(seeds[0]))))
        (folder / names[1]).write_bytes(_png(world.render(rejected_spec, rejected_style, int(seeds[1]))))
        rows.append({"prompt": world.prompt_of(spec), "chosen": names[0], "rejected": names[1]})
        gaps.append(world.taste(chosen_style) - world.taste(rejected_style))
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (folder / "pairs.jsonl").write_text(lines)
    return {"pairs": count, "rejected_wrong_scene": wrong, "mean_taste_gap": round(float(np.mean(gaps)), 4)}
