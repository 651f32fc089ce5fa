"""Preference readers (local jsonl, Pick-a-Pic parquet, HPDv2 json), the rank-sharded order, the latent cache."""

import io
import json

import pytest
import torch

from training.data import HPDv2, LocalPairs, PickAPic, PreferenceSet, PromptSet, RankBatches, load_image


def _png(color) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_local_pairs_and_image_loading(prefs):
    rows = LocalPairs(str(prefs / "pairs.jsonl"))
    assert len(rows) == 6 and rows.prompt(0) == "a red square number 0"
    image = load_image(rows.image(2), 16)
    assert image.shape == (3, 16, 16)
    assert abs(image[0].mean().item() - 200 / 255) < 0.02  # the chosen (red) image, not the rejected one
    item = PreferenceSet(rows, 16)[(5, 1)]
    assert item["index"] == 5 and item["prompt"] == rows.prompt(1) and item["image"].shape == (3, 16, 16)


def test_local_pairs_errors(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:1 must be a JSON object with 'prompt' and 'chosen'"):
        LocalPairs(str(bad))
    bad.write_text('{"prompt": "x", "chosen": "missing.png"}\n')
    with pytest.raises(FileNotFoundError, match="missing.png"):
        LocalPairs(str(bad)).image(0)


def test_pickapic_parquet_keeps_decided_pairs_and_the_winner(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    table = pa.table(
        {
            "caption": ["first wins", "second wins", "a tie"],
            "jpg_0": [red, blue, red],
            "jpg_1": [blue, red, blue],
            "label_0": [1.0, 0.0, 0.5],
            "label_1": [0.0, 1.0, 0.5],
        }
    )
    pq.write_table(table, tmp_path / "train-00000.parquet")
    rows = PickAPic(str(tmp_path))
    assert len(rows) == 2
    assert [rows.prompt(i) for i in range(2)] == ["first wins", "second wins"]
    for i in range(2):
        assert load_image(rows.image(i), 8)[0].mean() > 0.9  # the red image is always the preferred one


def test_hpdv2_json(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for name, color in (("a.jpg", (255, 0, 0)), ("b.jpg", (0, 0, 255))):
        Image.new("RGB", (8, 8), color).save(tmp_path / "images" / name)
    entries = [
        {"prompt": "p1", "file_path": ["a.jpg", "b.jpg"], "human_preference": [1, 0]},
        {"prompt": "p2", "file_path": ["a.jpg", "b.jpg"], "human_preference": [0, 1]},
        {"prompt": "tie", "file_path": ["a.jpg", "b.jpg"], "human_preference": [0, 0]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    rows = HPDv2(str(tmp_path / "train.json"), str(tmp_path / "images"))
    assert len(rows) == 2 and rows.image(0).endswith("a.jpg") and rows.image(1).endswith("b.jpg")


def _take(sampler, count):
    it = iter(sampler)
    return [next(it) for _ in range(count)]


def test_rank_batches_same_global_order_for_any_world_size_and_resume():
    one = _take(RankBatches(10, 3, 0, batch=4, accum=1, world=1, rank=0), 5)
    two = [_take(RankBatches(10, 3, 0, batch=2, accum=1, world=2, rank=r), 5) for r in range(2)]
    for step in range(5):
        assert one[step] == two[0][step] + two[1][step]  # rank 0 takes the first half of each global batch
    accum = _take(RankBatches(10, 3, 0, batch=2, accum=2, world=1, rank=0), 10)
    assert [accum[2 * s] + accum[2 * s + 1] for s in range(5)] == one
    rows = [row for batch in one[:3] for _, row in batch]
    assert sorted(rows[:10]) == list(range(10))  # each epoch visits every row once
    resumed = _take(RankBatches(10, 3, 8, batch=4, accum=1, world=1, rank=0), 3)
    assert resumed == one[2:]


def test_prompt_set_items():
    assert PromptSet(["a", "b"])[(7, 1)] == {"index": 7, "prompt": "b"}


def test_cache_latents_writes_shards_training_reads(tiny_sd15, prefs, tmp_path, fresh_accelerate):
    from conftest import tiny_config, tiny_overrides

    from training.cache_latents import main
    from training.data import LatentCache, cache_expectation, read_preferences

    cache = tmp_path / "latents"
    overrides = tiny_overrides(tiny_sd15, prefs, tmp_path) + [f"data.latents_dir={str(cache)!r}"]
    assert main([*overrides, "--shard-size", "4", "--batch", "3"]) == 0
    assert sorted(p.name for p in cache.iterdir()) == [
        "meta.json",
        "shard_000000.safetensors",
        "shard_000001.safetensors",
    ]
    cfg = tiny_config(tiny_sd15, prefs, tmp_path, extra=[f"data.latents_dir={str(cache)!r}"])
    rows = read_preferences(cfg.data)
    latents = LatentCache(str(cache), cache_expectation(cfg, rows))
    from training.models import encode_images, load_vae

    vae = load_vae(cfg.model, "cpu")
    expected = encode_images(vae, load_image(rows.image(5), cfg.model.resolution)[None], "cpu")[0]
    assert torch.allclose(latents.get(5), expected, atol=1e-5)
    with pytest.raises(ValueError, match="re-run python -m training.cache_latents"):
        LatentCache(str(cache), dict(cache_expectation(cfg, rows), resolution=64))
