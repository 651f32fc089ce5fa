"""Preference data and reward prompts, with a deterministic, resumable, rank-sharded order.

Preference rows are (prompt, preferred image); three readers produce them:
- ``local``: ``pairs.jsonl`` rows ``{"prompt", "chosen"[, "rejected"]}``, image paths relative to the file;
- ``pickapic``: Pick-a-Pic v2 parquet (a file, a folder of shards, or a dataset id): ``caption``,
  ``jpg_0``/``jpg_1`` bytes, ``label_0``/``label_1``; ties (0.5/0.5) are dropped;
- ``hpdv2``: HPDv2 ``train.json`` ``[{"prompt", "file_path": [a, b], "human_preference": [1, 0]}]``.

Order: sample number g (counted over the whole run, all ranks) reads row ``perm_e[g mod n]`` of a
seeded permutation per epoch e. Step s, micro-step m, rank r, slot j reads
``g = start + s * G + (m * world + r) * batch + j``, G the global batch: the same samples in the same
order for any number of processes, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .paths import looks_local


def load_image(source, resolution: int) -> torch.Tensor:
    """Path, bytes or PIL image -> (3, res, res) float in [0, 1]: shorter side resized, centre-cropped."""
    from PIL import Image

    if isinstance(source, dict):  # datasets' undecoded Image feature
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, os.PathLike)):
        image = Image.open(source)
    else:
        image = source
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.size[0] * scale)), max(resolution, round(image.size[1] * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


# Readers: each returns an object with __len__, prompt(i) and image(i) (a path, bytes or PIL image).


class LocalPairs:
    def __init__(self, path: str):
        self.root = os.path.dirname(os.path.abspath(path))
        self.rows = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "chosen" not in row:
                    raise ValueError(f"HyperAlign: {path}:{number} must be a JSON object with 'prompt' and 'chosen'.")
                self.rows.append((row["prompt"], os.path.join(self.root, row["chosen"])))
        if not self.rows:
            raise ValueError(f"HyperAlign: {path} holds no preference rows.")

    def __len__(self):
        return len(self.rows)

    def prompt(self, i: int) -> str:
        return self.rows[i][0]

    def image(self, i: int):
        path = self.rows[i][1]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"HyperAlign: preferred image {path!r} (row {i} of pairs.jsonl) does not exist.")
        return path


class PickAPic:
    """Pick-a-Pic v2: the preferred image is jpg_0 when label_0 == 1, jpg_1 when label_1 == 1; ties dropped."""

    def __init__(self, path: str, split: str = "train"):
        import datasets

        if looks_local(path):
            files = (
                [path]
                if os.path.isfile(path)
                else sorted(
                    os.path.join(folder, name)
                    for folder, _, names in os.walk(path)
                    for name in names
                    if name.endswith(".parquet")
                )
            )
            if not files:
                raise FileNotFoundError(f"HyperAlign: no .parquet files under data.path {path!r}.")
            self.table = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            self.table = datasets.load_dataset(path, split=split)
        label_0, label_1 = list(self.table["label_0"]), list(self.table["label_1"])
        self.rows = [(i, 0 if a == 1 else 1) for i, (a, b) in enumerate(zip(label_0, label_1)) if {a, b} == {0, 1}]
        if not self.rows:
            raise ValueError(f"HyperAlign: Pick-a-Pic data {path!r} has no decided pairs (all ties or unlabelled).")

    def __len__(self):
        return len(self.rows)

    def prompt(self, i: int) -> str:
        return self.table[self.rows[i][0]]["caption"]

    def image(self, i: int):
        row, chosen = self.rows[i]
        return self.table[row][f"jpg_{chosen}"]


class HPDv2:
    def __init__(self, path: str, image_root: str | None = None):
        root = image_root or os.path.dirname(os.path.abspath(path))
        with open(path, encoding="utf-8") as handle:
            entries = json.load(handle)
        self.rows = []
        for entry in entries:
            files = entry.get("file_path") or entry.get("image_path")
            votes = entry.get("human_preference")
            if not files or not votes or len(files) != len(votes) or max(votes) == min(votes):
                continue
            self.rows.append((entry["prompt"], os.path.join(root, files[int(np.argmax(votes))])))
        if not self.rows:
            raise ValueError(f"HyperAlign: HPDv2 file {path!r} has no decided pairs.")

    def __len__(self):
        return len(self.rows)

    def prompt(self, i: int) -> str:
        return self.rows[i][0]

    def image(self, i: int):
        return self.rows[i][1]


def read_preferences(data_cfg):
    kind = data_cfg.preference
    if kind == "local":
        return LocalPairs(data_cfg.path)
    if kind == "pickapic":
        return PickAPic(data_cfg.path, data_cfg.split)
    if kind == "hpdv2":
        return HPDv2(data_cfg.path, data_cfg.image_root)
    return None


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise ValueError(f"HyperAlign: prompt file {path!r} is empty.")
    return prompts


# Datasets: items are addressed by (g, row) pairs from RankBatches.


class PromptSet(Dataset):
    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, key):
        g, row = key
        return {"index": g, "prompt": self.prompts[row]}


class PreferenceSet(Dataset):
    def __init__(self, rows, resolution: int, latents=None):
        self.rows, self.resolution, self.latents = rows, resolution, latents

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, key):
        g, row = key
        item = {"index": g, "prompt": self.rows.prompt(row)}
        if self.latents is not None:
            item["latents"] = self.latents.get(row)
        else:
            item["image"] = load_image(self.rows.image(row), self.resolution)
        return item


class GlobalOrder:
    """Row of sample number g: a seeded permutation per epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, None

    def row(self, g: int) -> int:
        epoch, position = divmod(g, self.size)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator).tolist()
        return self._perm[position]


class RankBatches(Sampler):
    """This rank's micro-batches, forever, from sample number `start` on."""

    def __init__(self, size: int, seed: int, start: int, batch: int, accum: int, world: int, rank: int):
        self.order = GlobalOrder(size, seed)
        self.start, self.batch, self.accum, self.world, self.rank = start, batch, accum, world, rank

    @property
    def global_batch(self) -> int:
        return self.batch * self.accum * self.world

    def __iter__(self):
        step = 0
        while True:
            base = self.start + step * self.global_batch
            for micro in range(self.accum):
                first = base + (micro * self.world + self.rank) * self.batch
                yield [(g, self.order.row(g)) for g in range(first, first + self.batch)]
            step += 1


def loader(dataset: Dataset, sampler: RankBatches, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


class LatentCache:
    """Preferred-image latents written by ``python -m training.cache_latents``: shards of rows + meta.json."""

    def __init__(self, folder: str, expect: dict):
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as handle:
            self.meta = json.load(handle)
        stale = {k: (self.meta.get(k), v) for k, v in expect.items() if self.meta.get(k) != v}
        if stale:
            raise ValueError(
                f"HyperAlign: the latent cache in {folder!r} does not match this config: {stale} "
                "(cached, wanted). HINT: re-run python -m training.cache_latents with this config."
            )
        self.folder, self.shard_size = folder, int(self.meta["shard_size"])

    def get(self, row: int) -> torch.Tensor:
        from safetensors import safe_open

        shard, offset = divmod(row, self.shard_size)
        with safe_open(os.path.join(self.folder, shard_name(shard)), "pt") as handle:
            return handle.get_slice("latents")[offset : offset + 1][0].float()


def shard_name(shard: int) -> str:
    return f"shard_{shard:06d}.safetensors"


def cache_expectation(cfg, rows) -> dict:
    """What a latent cache must have been made from to be valid for `cfg`."""
    return {
        "family": cfg.model.family,
        "model": cfg.model.path,
        "resolution": cfg.model.resolution,
        "preference": cfg.data.preference,
        "data": cfg.data.path,
        "count": len(rows),
    }
