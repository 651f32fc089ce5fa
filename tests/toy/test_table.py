"""The comparison table end to end on the shipped toy world, shortened: every variant trains 2 steps."""

import json

import pytest
import torch

import toyworld as toy


def test_table_trains_every_variant_and_scores_both_prompt_sets(tmp_path):
    """Sweeps on training prompts, the static LoRA's lr picked there, 2 training seeds pooled on held-out prompts;
    and a second run reuses every trained run and scored row."""
    from toyworld import table

    out = tmp_path / "results.md"
    argv = ["--out", str(out), "--work", str(tmp_path / "work"), "--prompts", "2", "--best-of", "2", "--seeds", "2"]
    argv += ["--static-lrs", "1e-4,1e-2", "--hyper-lrs", "1e-3"]
    argv += ["optim.max_steps=2", "optim.batch_size=2", "run.progress=False", "eval.seeds=[0, 1]"]
    argv += ["objective.grad_steps=2"]  # a short trajectory gradient keeps the test fast
    threads = torch.get_num_threads()
    try:
        assert table.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # leave the session's thread count as it was
    numbers = json.loads((tmp_path / "results.json").read_text())
    held_out, training = (numbers["results"][split] for split in table.SPLITS)
    best = table.best_of_name(2)
    oracle = table.oracle_name(2)
    assert list(held_out) == ["base", best, oracle, *(v.name for v in table.TRAINED)]
    sweeps = ["static LoRA, lr 0.0001", "static LoRA, lr 0.01", "HyperAlign S, lr 0.001"]
    assert list(training) == ["base", best, oracle, *sweeps, *(v.name for v in table.TRAINED if not v.static)]
    for split in table.SPLITS:  # the truth picks the best of the same candidates, so it never falls below base
        assert numbers["results"][split][oracle]["vs_base"]["toy_truth"]["mean"] >= 0
        assert set(numbers["agreement"][split]) == {"toy_clip", "toy_aesthetic", "reward"}
    assert held_out["static LoRA"]["lr"] in (1e-4, 1e-2) and held_out["static LoRA"]["training_seeds"] == 2
    for name in ("HyperAlign S", "HyperAlign I", "static LoRA"):
        assert len(held_out[name]["truth_by_seed"]) == 2 and held_out[name]["training_seeds"] == 2
    assert training["HyperAlign S"]["training_seeds"] == 1 and "truth_by_seed" not in training["HyperAlign S"]
    for rows in (held_out, training):
        assert rows["HyperAlign S"]["hypernet_calls_per_image"] == 10
        assert rows["HyperAlign I"]["hypernet_calls_per_image"] == 1
        assert rows["HyperAlign S"]["relative_delta_norm"] > 0 and "relative_delta_norm" not in rows["base"]
        assert {"toy_truth", "toy_taste", "toy_clip", "toy_aesthetic", "reward"} <= set(rows["base"]["metrics"])
        assert rows["base"]["vs_base"]["reward"] == {"mean": 0.0, "se": 0.0}  # paired with itself
        mean_gap = rows["HyperAlign I"]["metrics"]["reward"]["mean"] - rows["base"]["metrics"]["reward"]["mean"]
        assert rows["HyperAlign I"]["vs_base"]["reward"]["mean"] == pytest.approx(mean_gap, abs=1e-5)
    text = out.read_text()
    assert all(f"### {split[0].upper()}{split[1:]}" in text for split in table.SPLITS)
    assert "Issue 14's targets" in text and "static LoRA (lr" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "work"]  # nothing half-written
    assert (
        numbers["protocol"]["objective"]["reward_on"]
        == table.train.parse(["--config", table.CONFIG])[0].objective.reward_on
    )

    # a second run trains and scores nothing again, and writes the same numbers
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.json")}
    assert table.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.json")} == stamp
    again = json.loads((tmp_path / "results.json").read_text())["results"]
    assert again == numbers["results"]


def test_merged_seeds_pool_each_prompts_images():
    from toyworld.table import merge_seeds

    one = [{"scores": {"toy_truth": [1.0, 0.0]}, "diversity": 0.2, "seconds": 1.0, "calls": 10}]
    two = [{"scores": {"toy_truth": [0.5, 0.5]}, "diversity": 0.4, "seconds": 3.0, "calls": 10}]
    (merged,) = merge_seeds([one, two])
    assert merged["scores"]["toy_truth"] == [1.0, 0.0, 0.5, 0.5]
    assert merged["diversity"] == pytest.approx(0.3) and merged["seconds"] == 2.0


def test_prompt_sets_are_seeded_samples_of_their_files():
    from toyworld import table
    from training.train import parse

    cfg, _ = parse(["--config", table.CONFIG])
    held_out, trained = table.prompt_set(cfg, "eval", 5), table.prompt_set(cfg, "train", 5)
    assert held_out == table.prompt_set(cfg, "eval", 5) and len(set(held_out)) == 5
    assert not set(held_out) & set(toy.load_prompts("train")) and set(trained) <= set(toy.load_prompts("train"))


def test_the_docs_table_records_the_protocol_that_ships():
    """docs/toy-results.md is made by the table from what ships: when training/configs/toy.yaml or the toy world's
    assets change, the table must be made again (python -m toyworld.table), or this fails."""
    from dataclasses import asdict
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
        "objective": {k: v for k, v in asdict(cfg.objective).items() if k != "keysteps_file"},
    }
    assert {k: recorded.get(k) for k in shipped} == shipped
    assert recorded["prompts"] >= 100 and recorded["noise_stride"] > 0 and len(recorded["seeds"]) >= 8


def test_hacking_flag_needs_reward_up_and_truth_down_beyond_two_standard_errors():
    from toyworld.table import hacking

    def row(reward, truth):
        return {"vs_base": {"reward": {"mean": reward, "se": 0.1}, "toy_truth": {"mean": truth, "se": 0.01}}}

    assert hacking(row(0.5, -0.05))
    assert not hacking(row(0.5, -0.01))  # truth within noise
    assert not hacking(row(0.1, -0.05))  # reward within noise
    assert not hacking(row(-0.5, -0.05))  # reward fell too: worse, not hacking


def test_pair_agreement_counts_only_pairs_the_truth_tells_apart():
    import torch

    from toyworld.table_runs import pair_agreement

    truth = torch.tensor([1.0, 0.5, 0.5, 0.0])
    assert pair_agreement(torch.tensor([3.0, 2.0, 1.0, 0.0]), truth) == 1.0  # the tie in truth is left out
    assert pair_agreement(torch.tensor([0.0, 1.0, 2.0, 3.0]), truth) == 0.0
    assert pair_agreement(torch.tensor([1.0, 1.0, 1.0, 1.0]), truth) == 0.5  # a reward that ties is chance
    assert pair_agreement(torch.tensor([0.0, 1.0]), torch.tensor([0.7, 0.7])) is None


def test_agreement_summary_leaves_out_prompts_without_pairs():
    from toyworld.table import summarise_agreement

    summary = summarise_agreement([{"toy_clip": 1.0}, {"toy_clip": 0.5}, {"toy_clip": None}])
    assert summary["toy_clip"]["prompts"] == 2 and summary["toy_clip"]["mean"] == 0.75
    assert summarise_agreement([{"toy_clip": None}])["toy_clip"] == {"mean": None, "se": None, "prompts": 0}


def test_a_work_folder_made_with_another_config_is_refused(tmp_path):
    from toyworld.table import check_work

    key = {"config": {"optim": {"lr": 1e-4}, "rewards": [1.0]}, "world": "abc"}
    check_work(str(tmp_path), key)
    check_work(str(tmp_path), key)  # the same config: its runs are reused
    with pytest.raises(SystemExit, match=r"different config\.rewards.*HINT: pass --work"):
        check_work(str(tmp_path), {**key, "config": {"optim": {"lr": 1e-4}, "rewards": [0.5]}})
    with pytest.raises(SystemExit, match="the toy world's files"):
        check_work(str(tmp_path), {**key, "world": "abd"})


def test_the_assets_digest_changes_with_any_file_the_table_depends_on(tmp_path, monkeypatch):
    import toyworld

    for name, folder in (("MODEL_DIR", "model"), ("PREFS_FILE", "prefs/pairs.jsonl"), ("PROMPTS_DIR", "prompts")):
        monkeypatch.setattr(toyworld, name, tmp_path / folder)
    monkeypatch.setattr(toyworld, "CLIP_FILE", tmp_path / "rewards" / "toy_clip.safetensors")
    monkeypatch.setattr(toyworld, "ASSETS", tmp_path)
    for path in ("model/unet/w.safetensors", "rewards/toy_clip.safetensors", "prefs/pairs.jsonl", "prompts/a.txt"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"v1")
    (tmp_path / "report.json").write_text("{}")
    first = toyworld.assets_digest()
    (tmp_path / "report.json").write_text('{"seconds": 1}')  # the report's timings are not what the table measures
    assert toyworld.assets_digest() == first
    for path in ("model/unet/w.safetensors", "rewards/toy_clip.safetensors", "prefs/pairs.jsonl", "prompts/a.txt"):
        (tmp_path / path).write_bytes(b"v2")
        changed = toyworld.assets_digest()
        assert changed != first
        first = changed
