"""The comparison table's Markdown (toyworld/table.py): one table per prompt set, the reward-hacking flag and the
held-out rows checked against issue 14's targets."""

from __future__ import annotations

from . import truth

HELD_OUT_S, BEST_OF_20 = "HyperAlign S", "Best-of-20 (selects by the training reward)"


def hacking(row: dict) -> bool:
    """The training reward rises while a ground-truth column falls, each by more than 2 standard errors."""
    return truth.reward_hacking(row["vs_base"], ("reward",))


def _score(row: dict, name: str, is_base: bool) -> str:
    mean = f"{row['metrics'][name]['mean']:.3f}"
    if is_base:
        return mean
    delta = row["vs_base"][name]
    return f"{mean} ({delta['mean']:+.3f} ± {delta['se']:.3f})"


def _label(variant: str, row: dict) -> str:
    if "lr" in row:
        variant = f"{variant} (lr {row['lr']:g}, picked on training prompts)"
    return f"{variant} ⚠ reward hacking" if variant != "base" and hacking(row) else variant


def _table(rows: dict) -> list[str]:
    names = list(rows["base"]["metrics"])
    base_diversity = rows["base"]["diversity"]
    head = " | ".join(["variant", *names, "diversity (% of base)", "s/image", "hypernet calls/image", "‖ΔW‖/‖W‖"])
    lines = [f"| {head} | training seeds: toy_truth Δ each |", "|" + "---|" * (len(names) + 6)]
    for variant, row in rows.items():
        cells = [_score(row, n, variant == "base") for n in names]
        cells += [
            f"{row['diversity']:.3f} ({100 * row['diversity'] / base_diversity:.0f} %)",
            f"{row['seconds_per_image']:.3f}",
            f"{row['hypernet_calls_per_image']:g}",
            f"{row['relative_delta_norm']:.3f}" if "relative_delta_norm" in row else "0",
            " / ".join(f"{d:+.3f}" for d in row.get("truth_by_seed", [])) or "",
        ]
        lines.append(f"| {_label(variant, row)} | " + " | ".join(cells) + " |")
    return lines


def _delta(row: dict, name: str = "toy_truth") -> tuple[float, float]:
    return row["vs_base"][name]["mean"], row["vs_base"][name]["se"]


def targets(rows: dict) -> list[tuple[str, bool, str]]:
    """Issue 14's targets on held-out prompts: (what, met, the numbers)."""
    s_truth, s_se = _delta(rows[HELD_OUT_S])
    taste, taste_se = _delta(rows[HELD_OUT_S], "toy_taste")
    share = rows[HELD_OUT_S]["diversity"] / rows["base"]["diversity"]
    out = [
        (
            "S: toy_truth up by ≥ 0.05 and ≥ 3 SE",
            s_truth >= 0.05 and s_truth >= 3 * s_se,
            f"{s_truth:+.3f} ± {s_se:.3f}",
        ),
        ("S: toy_taste up by ≥ 3 SE", taste >= 3 * taste_se and taste > 0, f"{taste:+.3f} ± {taste_se:.3f}"),
        ("S: diversity ≥ 85 % of base", share >= 0.85, f"{100 * share:.0f} %"),
    ]
    for mode in ("I", "P"):
        gain = _delta(rows[f"HyperAlign {mode}"])[0]
        out.append((f"{mode}: at least half of S's toy_truth gain", gain >= s_truth / 2 > 0, f"{gain:+.3f}"))
    static = _delta(rows["static LoRA"])[0]
    out.append(("S above the best static LoRA on toy_truth", s_truth > static, f"{s_truth:+.3f} vs {static:+.3f}"))
    if BEST_OF_20 in rows:
        best, best_s = _delta(rows[BEST_OF_20])[0], rows[BEST_OF_20]["seconds_per_image"]
        s_s = rows[HELD_OUT_S]["seconds_per_image"]
        out.append(
            (
                "S: ≥ half of Best-of-20's toy_truth gain at ≤ 1/5 of its s/image",
                s_truth >= best / 2 and s_s <= best_s / 5,
                f"{s_truth:+.3f} vs {best:+.3f}; {s_s:.3f} vs {best_s:.3f} s",
            )
        )
    reward_only = _delta(rows["HyperAlign S, reward only (λ=0)"])[0]
    out.append(("reward only (λ=0) gains less toy_truth than S", reward_only < s_truth, f"{reward_only:+.3f}"))
    return out


def _mean_se(value: dict) -> str:
    if value["se"] is None:
        return "n/a (too few prompts with pairs the truth tells apart)"
    return f"{value['mean']:.3f} ± {value['se']:.3f}"


def _agreement(shares: dict) -> str:
    """One line: how often each reward orders two images of one prompt as the truth does."""
    parts = [f"{name} {_mean_se(v)}" for name, v in shares.items()]
    prompts = max(v["prompts"] for v in shares.values())
    return (
        f"Same-prompt agreement with toy_truth ({prompts} prompts; share of pairs of one prompt's Best-of-N "
        f"candidates that toy_truth tells apart which the reward orders the same way; 0.5 is chance): "
        + ", ".join(parts)
        + "."
    )


def markdown(results: dict, agreement: dict, protocol: dict, seconds: dict, command: str) -> str:
    """`results`: split heading -> variant -> row; the first split is the held-out one. `agreement`: split ->
    reward -> same-prompt agreement with the truth."""
    held_out = next(iter(results))
    lines = []
    for split, rows in results.items():
        lines += [f"### {split[0].upper()}{split[1:]}", "", *_table(rows), "", _agreement(agreement[split]), ""]
    checks = [
        f"- {'met' if met else '**not met**'}: {what} ({numbers})" for what, met, numbers in targets(results[held_out])
    ]
    o = protocol["objective"]
    objective = f"`reward_on: {o['reward_on']}`" + (
        f", gradient through {'all' if o['grad_steps'] is None else o['grad_steps']} steps"
        if o["reward_on"] == "final"
        else ""
    )
    train_lines = [f"| {name} | {value:.0f} |" for name, value in seconds.items()]
    return "\n".join(
        [
            "# HyperAlign on the toy world: the comparison table",
            "",
            f"Made by `{command}` (toyworld/table.py; {protocol['total_minutes']:.0f} min for this invocation, "
            "which reuses the trained runs and scored rows its work folder holds).",
            "",
            f"Prompts: {protocol['prompts']} per set, a seeded random sample of each set "
            "(held-out: colour-shape pairs never seen in training; training: the prompts the predictor trained on), "
            f"{len(protocol['seeds'])} noises per prompt "
            f"(prompt i: seeds {protocol['seeds']} + {protocol['noise_stride']}·i, "
            "fresh for every image, the same for every row); "
            f"DDIM {protocol['num_steps']} steps, CFG {protocol['guidance']}. "
            f"Every trained row: toy.yaml's objective ({protocol['mode_objective']} unless stated, {objective}), "
            f"{protocol['max_steps']} optimizer steps of batch {protocol['batch_size']}, lr {protocol['lr']}, "
            f"λ = {protocol['pref_weight']} unless stated. On held-out prompts a trained row pools "
            f"{protocol['training_seeds']} training seeds; on training prompts, where the settings were chosen, "
            "it has seed 0. The static LoRA's lr was swept "
            f"({', '.join(f'{v:g}' for v in protocol['static_lrs'])}) and picked by toy_truth on training prompts; "
            f"the hypernet's sweep adds lr {', '.join(f'{v:g}' for v in protocol['hyper_lrs']) or 'nothing'}. "
            f"Best-of-N uses the first {protocol['best_of_slots']} noises of each prompt, N samples each, and "
            "selects by the training reward it is then scored on; Best-of-N by ground truth selects by toy_truth "
            "itself among the same candidates: no method can use it, it shows how much truth the generator's own "
            "samples hold for a reward to find. "
            "Scores are means over all images, with (in brackets) the difference from base paired by prompt ± its "
            "standard error over prompts; `toy_truth` (share of the prompt's attributes the image shows) and "
            "`toy_taste` (the hidden taste of its measured style) are ground truth read from pixels "
            "(toyworld/truth.py), never a training reward; `reward` is the training reward "
            f"({' + '.join(f'{w:g}·{n}' for n, w in protocol['reward_weights'].items())}). "
            "⚠ marks a row whose training reward rises while ground truth falls (each by > 2 SE): reward hacking. "
            "Diversity is the mean pairwise cosine distance of toy_clip image embeddings across a prompt's noises. "
            f"Machine: {protocol['machine']}.",
            "",
            *lines,
            "Issue 14's targets, held-out prompts:",
            "",
            *checks,
            "",
            "Training wall time of each run (seconds, this machine, as measured when it trained):",
            "",
            "| run | seconds |",
            "|---|---|",
            *train_lines,
            "",
        ]
    )
