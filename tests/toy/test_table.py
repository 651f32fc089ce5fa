"""The comparison table end to end on the shipped toy world, shortened: every variant trains 2 steps."""

import json

import pytest
import torch

import toyworld as toy


def test_table_trains_every_variant_and_scores_both_prompt_sets(tmp_path):
    from toyworld import table

    out = tmp_path / "results.md"
    argv = ["--out", str(out), "--work", str(tmp_path / "work"), "--prompts", "2", "--best-of", "2"]
    argv += ["--threads", str(torch.get_num_threads())]  # leave the session's thread count as it was
    assert table.main([*argv, "optim.max_steps=2", "optim.batch_size=2", "run.progress=False"]) == 0
    numbers = json.loads((tmp_path / "results.json").read_text())
    assert list(numbers["results"]) == list(table.SPLITS)
    expected = ["base", "Best-of-2 (selects by the training reward)", *(v.name for v in table.TRAINED)]
    for split, rows in numbers["results"].items():
        assert list(rows) == expected, split
        assert rows["HyperAlign S"]["hypernet_calls_per_image"] == 10
        assert rows["HyperAlign I"]["hypernet_calls_per_image"] == 1
        assert rows["static LoRA"]["relative_delta_norm"] > 0 and "relative_delta_norm" not in rows["base"]
        assert {"toy_truth", "toy_taste", "toy_clip", "toy_aesthetic", "reward"} <= set(rows["base"]["metrics"])
        assert rows["base"]["vs_base"]["reward"] == {"mean": 0.0, "se": 0.0}  # paired with itself
        mean_gap = rows["HyperAlign I"]["metrics"]["reward"]["mean"] - rows["base"]["metrics"]["reward"]["mean"]
        assert rows["HyperAlign I"]["vs_base"]["reward"]["mean"] == pytest.approx(mean_gap, abs=1e-5)
    text = out.read_text()
    assert all(f"### {split[0].upper()}{split[1:]}" in text for split in table.SPLITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "work"]  # nothing half-written


def test_prompt_sets_are_seeded_samples_of_their_files():
    from toyworld import table
    from training.train import parse

    cfg, _ = parse(["--config", table.CONFIG])
    held_out, trained = table.prompt_set(cfg, "eval", 5), table.prompt_set(cfg, "train", 5)
    assert held_out == table.prompt_set(cfg, "eval", 5) and len(set(held_out)) == 5
    assert not set(held_out) & set(toy.load_prompts("train")) and set(trained) <= set(toy.load_prompts("train"))


def test_the_docs_table_records_the_protocol_that_ships():
    """docs/toy-results.md is made by the table from what ships: when training/configs/toy.yaml changes, the table
    must be made again (python -m toyworld.table), or this fails."""
    from pathlib import Path

    from toyworld import table
    from training.train import parse

    cfg, _ = parse(["--config", table.CONFIG])
    recorded = json.loads((Path(__file__).parents[2] / "docs" / "toy-results.json").read_text())["protocol"]
    shipped = {
        "seeds": list(cfg.eval.seeds),
        "num_steps": cfg.sampling.num_steps,
        "guidance": cfg.sampling.guidance,
        "max_steps": cfg.optim.max_steps,
        "batch_size": cfg.optim.batch_size,
        "lr": cfg.optim.lr,
        "pref_weight": cfg.objective.pref_weight,
        "reward_weights": {spec.name: spec.weight for spec in cfg.rewards},
        "step_range": list(cfg.objective.step_range),
        "mode_objective": cfg.objective.mode,
    }
    assert {k: recorded.get(k) for k in shipped} == shipped
    assert recorded["prompts"] >= 100 and recorded["noise_stride"] > 0


def test_hacking_flag_needs_reward_up_and_truth_down_beyond_two_standard_errors():
    from toyworld.table import hacking

    def row(reward, truth):
        return {"vs_base": {"reward": {"mean": reward, "se": 0.1}, "toy_truth": {"mean": truth, "se": 0.01}}}

    assert hacking(row(0.5, -0.05))
    assert not hacking(row(0.5, -0.01))  # truth within noise
    assert not hacking(row(0.1, -0.05))  # reward within noise
    assert not hacking(row(-0.5, -0.05))  # reward fell too: worse, not hacking
