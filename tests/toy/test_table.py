"""The comparison table end to end on the shipped toy world, shortened: every variant trains 2 steps."""

import json

import pytest
import torch

from training import toy


def test_table_trains_every_variant_and_scores_both_prompt_sets(tmp_path):
    from training.toy import table

    out = tmp_path / "results.md"
    argv = ["--out", str(out), "--work", str(tmp_path / "work"), "--prompts", "2", "--best-of", "2"]
    argv += ["--threads", str(torch.get_num_threads())]  # leave the session's thread count as it was
    assert table.main([*argv, "optim.max_steps=2", "optim.batch_size=2", "run.progress=False"]) == 0
    numbers = json.loads((tmp_path / "results.json").read_text())
    assert list(numbers["results"]) == list(table.SPLITS)
    expected = ["base", "Best-of-2", *(v.name for v in table.TRAINED)]
    for split, rows in numbers["results"].items():
        assert list(rows) == expected, split
        assert rows["HyperAlign S"]["hypernet_calls_per_image"] == 10
        assert rows["HyperAlign I"]["hypernet_calls_per_image"] == 1
        assert {"toy_clip", "toy_aesthetic", "reward"} <= set(rows["base"]["metrics"])
        assert rows["base"]["vs_base"]["reward"] == {"mean": 0.0, "se": 0.0}  # paired with itself
        mean_gap = rows["HyperAlign I"]["metrics"]["reward"]["mean"] - rows["base"]["metrics"]["reward"]["mean"]
        assert rows["HyperAlign I"]["vs_base"]["reward"]["mean"] == pytest.approx(mean_gap, abs=1e-5)
    text = out.read_text()
    assert all(f"### {split[0].upper()}{split[1:]}" in text for split in table.SPLITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "work"]  # nothing half-written


def test_prompt_sets_are_seeded_samples_of_their_files():
    from training.toy import table
    from training.train import parse

    cfg, _ = parse(["--config", table.CONFIG])
    held_out, trained = table.prompt_set(cfg, "eval", 5), table.prompt_set(cfg, "train", 5)
    assert held_out == table.prompt_set(cfg, "eval", 5) and len(set(held_out)) == 5
    assert not set(held_out) & set(toy.load_prompts("train")) and set(trained) <= set(toy.load_prompts("train"))
