"""The toy world's comparison table: ``python -m toyworld.table [--out docs/toy-results.md]``.

Every variant samples the same prompts with the same noises (fresh noise for every image: prompt i
uses seeds ``seed + NOISE_STRIDE * i``, as ``training.evaluate`` does), sampler (DDIM), steps and CFG
scale as ``training/configs/toy.yaml``:

- base: the toy model alone;
- Best-of-N (N = 20): per seed slot, the best of N samples by the training reward;
- static LoRA: the fine-tuning baseline (toyworld/baselines.py), trained by the same objective,
  data, steps, batch and learning rate as HyperAlign;
- HyperAlign S trained on the reward only (lambda = 0), and on the preference term only;
- HyperAlign I, P and S, each trained in its own mode.

Two prompt sets, each a seeded random sample: held-out prompts (colour-shape pairs the base model and
the predictor never saw: compositional generalisation) and training prompts (the distribution the
predictor was trained on). Columns: ground truth (``toy_truth``: share of the prompt's attributes the
image shows; ``toy_taste``: the hidden taste of its measured style; both read from pixels by
toyworld/truth.py, never trained on), each learned reward, the training reward (their weighted
sum), diversity (mean pairwise cosine distance of toy_clip image embeddings across a prompt's noises)
and seconds per image on this machine; each with its difference from base paired by prompt ± the
standard error over prompts. A row whose training reward rises while a truth column falls (each by
more than 2 standard errors) is flagged as reward hacking. The Markdown goes to --out, the numbers
next to it as JSON; trained predictors stay in --work.

One file over 300 lines on purpose: the variants, how each is trained and evaluated, and the report are one
protocol that a reader checks end to end (and a test pins against toy.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from hyperalign.atomic import atomic_path, write_json, write_text
from training import evaluate, keysteps, train

from . import ASSETS, truth

CONFIG = "training/configs/toy.yaml"
BEST_OF = 20
SPLITS = {  # table heading -> where its prompts come from
    "held-out prompts (unseen colour-shape pairs)": "eval",
    "training prompts": "train",
}


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str  # the mode it trains and samples in
    overrides: tuple[str, ...] = ()
    static: bool = False

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-")


TRAINED = (
    Variant("static LoRA", "I", static=True),
    Variant("HyperAlign S, reward only (λ=0)", "S", ("objective.pref_weight=0.0",)),
    Variant("HyperAlign S, preference only", "S", ("rewards=[]",)),
    Variant("HyperAlign I", "I"),
    Variant("HyperAlign P", "P"),
    Variant("HyperAlign S", "S"),
)


def _run(entry, argv: list[str], what: str) -> float:
    print(f"\n== {what}", flush=True)
    started = time.perf_counter()
    if entry(argv):
        raise SystemExit(f"HyperAlign: {what} failed; see the messages above.")
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------ training


def train_static(argv: list[str]) -> int:
    """training.train with the hypernet swapped for a StaticLoRA before the first step."""
    from tqdm.auto import tqdm

    from training.config import check_files
    from training.engine import build, close_logging, lr_lambda, make_accelerator, setup_logging
    from training.loop import log_metrics, train_step

    from .baselines import StaticLoRA

    cfg, _ = train.parse(argv)
    check_files(cfg)
    accelerator = make_accelerator(cfg)
    setup_logging(accelerator, cfg.run_dir)
    tr = build(cfg, accelerator)
    o = cfg.optim
    static = StaticLoRA(tr.predictor.targets, tr.hcfg.rank).to(accelerator.device)
    optimizer = torch.optim.AdamW(
        static.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
    )
    tr.hypernet, tr.optimizer = accelerator.prepare(static, optimizer)
    tr.lr_schedule = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lr_lambda(o))
    try:
        last = time.perf_counter()
        for _ in tqdm(range(o.max_steps), desc="train static LoRA", disable=not cfg.run.progress):
            metrics = train_step(tr)
            if tr.step % cfg.run.log_every == 0:
                log_metrics(tr, metrics, time.perf_counter() - last)
            last = time.perf_counter()
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in static.state_dict().items()}
        with atomic_path(os.path.join(cfg.run_dir, "static_lora.safetensors"), ".safetensors.tmp") as tmp:
            save_file(state, tmp, {"targets": json.dumps(static.ids)})
    finally:
        accelerator.end_training()
        tr.adapter.detach()
        close_logging()
    return 0


def train_all(common: list[str], work: str) -> dict[str, float]:
    """Train every variant; returns wall seconds per variant."""
    seconds = {}
    keysteps_file = os.path.join(work, "keysteps.json")
    seconds["keysteps"] = _run(
        keysteps.main,
        common + [f"objective.keysteps_file={keysteps_file!r}", "--num", "3", "--samples", "4"],
        "keysteps",
    )
    for variant in TRAINED:
        argv = common + [f"run.name={variant.slug!r}", f"objective.mode={variant.mode!r}", *variant.overrides]
        if variant.mode == "P":
            argv.append(f"objective.keysteps_file={keysteps_file!r}")
        entry = train_static if variant.static else train.main
        seconds[variant.name] = _run(entry, argv, f"training {variant.name}")
    return seconds


# ---------------------------------------------------------------------------------------- evaluation


class Scorer:
    """The metrics of the config, and the training reward: the weighted sum of the training rewards."""

    def __init__(self, cfg, device):
        from training.models import DTYPES
        from training.rewards import RewardSet

        self.metrics = RewardSet(cfg.eval.metrics, device, DTYPES[cfg.model.base_dtype])
        self.weights = {spec.name: spec.weight for spec in cfg.rewards}
        missing = set(self.weights) - set(self.metrics.names)
        if missing:
            raise ValueError(f"HyperAlign: the training rewards {sorted(missing)} are not among eval.metrics.")

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        _, terms = self.metrics(images, prompts)
        terms = {name: value.float() for name, value in terms.items()}
        terms["reward"] = sum(w * terms[name] for name, w in self.weights.items())
        return terms


def _row(records: list[dict]) -> dict:
    """Mean and std over every image of every prompt; diversity, seconds and calls averaged per prompt."""
    names = list(records[0]["scores"])
    metrics = {}
    for name in names:
        values = [v for r in records for v in r["scores"][name]]
        metrics[name] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}
    return {
        "metrics": metrics,
        "diversity": statistics.fmean(r["diversity"] for r in records),
        "seconds_per_image": statistics.fmean(r["seconds"] for r in records),
        "hypernet_calls_per_image": statistics.fmean(r["calls"] for r in records),
    }


def _with_reward(record: dict, weights: dict[str, float]) -> dict:
    scores = record["scores"]
    count = len(next(iter(scores.values())))
    scores["reward"] = [sum(w * scores[n][i] for n, w in weights.items()) for i in range(count)]
    return record


def best_of_n_prompt(ctx, scorer: Scorer, prompt: str, index: int, n: int) -> dict:
    """Base samples of n seeds per slot; keep the best of each slot by the training reward."""
    from training.evaluate import _embed, diversity, prompt_seeds
    from training.sampling import Trajectory, per_sample_noise

    from .baselines import best_of_n

    adapter, seeds, guidance = ctx["adapter"], prompt_seeds(ctx["seeds"], index), ctx["guidance"]
    candidates = [seed + 1000 * j for j in range(n) for seed in seeds]  # candidate 0 = the slot's own seed
    started = time.perf_counter()
    with torch.no_grad():
        cond = adapter.encode_prompts([prompt] * len(candidates), uncond=guidance != 1.0)
        x = per_sample_noise(adapter.latent_shape(1)[1:], candidates, adapter.device)
        latents, _ = Trajectory(adapter, None, ctx["hcfg"], cond, ctx["steps"], guidance).generate(x)
        images = adapter.decode(latents)
        terms = scorer(images, [prompt] * len(candidates))
        chosen = best_of_n(terms["reward"].cpu(), len(seeds))
    seconds = (time.perf_counter() - started) / len(seeds)
    embedding, _ = _embed(scorer.metrics, images[chosen])
    scores = {name: value[chosen].tolist() for name, value in terms.items()}
    return {"scores": scores, "seconds": seconds, "diversity": diversity(embedding), "calls": 0}


def prompt_set(cfg, source: str, count: int) -> list[str]:
    """A seeded random sample of eval.prompts ("eval") or data.prompts ("train"): the files are sorted by attribute."""
    from training.data import read_prompts

    prompts = read_prompts(cfg.eval.prompts if source == "eval" else cfg.data.prompts)
    return random.Random(cfg.run.seed).sample(prompts, min(count, len(prompts)))


def evaluate_all(cfg, work: str, prompts: list[str], best: int) -> dict[str, dict]:
    from hyperalign.io import load_predictor
    from training.adapters import load_adapter
    from training.engine import make_accelerator

    from .baselines import DeltaNormRecorder, StaticLoRA, target_weights

    accelerator = make_accelerator(cfg)
    adapter = load_adapter(cfg.model, accelerator.device)
    scorer = Scorer(cfg, accelerator.device)
    loaded = {
        v.name: load_predictor(os.path.join(work, v.slug, "predictor.safetensors")) for v in TRAINED if not v.static
    }
    reference = loaded["HyperAlign S"]
    hcfg = reference.meta.hypernet_config()
    adapter.attach(reference.targets, hcfg.scale)  # every variant has the same targets, rank and alpha
    ctx = {
        "adapter": adapter,
        "hcfg": hcfg,
        "seeds": list(cfg.eval.seeds),
        "guidance": cfg.sampling.guidance,
        "steps": adapter.sampling_steps(cfg.sampling.num_steps),
        "accelerator": accelerator,
        "metrics": scorer.metrics,
        "save_images": False,
    }

    base: list[dict] = []

    def row(records: list[dict]) -> dict:
        return dict(_row(records), vs_base=evaluate.paired(records, base or records))

    weights = target_weights(adapter.denoiser, reference.targets)

    def run_variant(hypernet, mode: str, keys=(0.0,)) -> dict:
        recorder = DeltaNormRecorder(hypernet, weights, hcfg.scale)  # how far each LoRA moves the model
        ctx.update(hypernet=recorder, variants=[mode], keysteps=keys)
        records = [
            _with_reward(evaluate.evaluate_prompt(ctx, p, i)[mode], scorer.weights) for i, p in enumerate(prompts)
        ]
        return dict(row(records), relative_delta_norm=recorder.mean())

    ctx.update(hypernet=None, variants=["base"], keysteps=(0.0,))
    for i, p in enumerate(prompts):
        base.append(_with_reward(evaluate.evaluate_prompt(ctx, p, i)["base"], scorer.weights))
    results = {"base": row(base)}
    print(f"== Best-of-{best}", flush=True)
    results[f"Best-of-{best} (selects by the training reward)"] = row(
        [best_of_n_prompt(ctx, scorer, p, i, best) for i, p in enumerate(prompts)]
    )
    for variant in TRAINED:
        print(f"== evaluating {variant.name}", flush=True)
        if variant.static:
            static = StaticLoRA(reference.targets, hcfg.rank)
            from safetensors.torch import load_file

            static.load_state_dict(load_file(os.path.join(work, variant.slug, "static_lora.safetensors")))
            results[variant.name] = run_variant(static.to(adapter.device).eval(), variant.mode)
        else:
            predictor = loaded[variant.name]
            results[variant.name] = run_variant(
                predictor.hypernet.float().eval(), variant.mode, predictor.meta.keysteps
            )
    adapter.detach()
    return results


# ------------------------------------------------------------------------------------------- report


def _cell(row: dict, name: str, is_base: bool) -> str:
    mean = f"{row['metrics'][name]['mean']:.2f}"
    if is_base:
        return mean
    delta = row["vs_base"][name]
    return f"{mean} ({delta['mean']:+.2f} ± {delta['se']:.2f})"


def hacking(row: dict) -> bool:
    """The training reward rises while a ground-truth column falls, each by more than 2 standard errors."""
    return truth.reward_hacking(row["vs_base"], ("reward",))


def _table(results: dict) -> list[str]:
    names = list(next(iter(results.values()))["metrics"])
    head = "| variant | " + " | ".join(names) + " | diversity | s/image | hypernet calls/image | ‖ΔW‖/‖W‖ |"
    lines = [head, "|" + "---|" * (len(names) + 5)]
    for variant, row in results.items():
        cells = [_cell(row, n, variant == "base") for n in names]
        variant = f"{variant} ⚠ reward hacking" if variant != "base" and hacking(row) else variant
        cells += [f"{row['diversity']:.4f}", f"{row['seconds_per_image']:.4f}", f"{row['hypernet_calls_per_image']:g}"]
        cells.append(f"{row['relative_delta_norm']:.3f}" if "relative_delta_norm" in row else "0")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict, protocol: dict, seconds: dict, command: str) -> str:
    """`results`: split heading -> variant -> row."""
    lines = []
    for split, rows in results.items():
        lines += [f"### {split[0].upper()}{split[1:]}", "", *_table(rows), ""]
    train_lines = [f"| {name} | {value:.0f} |" for name, value in seconds.items()]
    return "\n".join(
        [
            "# HyperAlign on the toy world: the comparison table",
            "",
            f"Made by `{command}` (toyworld/table.py; {protocol['total_minutes']:.0f} min in all).",
            "",
            f"Prompts: {protocol['prompts']} per set, a seeded random sample of each set "
            "(held-out: colour-shape pairs never seen in training; training: the prompts the predictor trained on), "
            f"{len(protocol['seeds'])} noises per prompt "
            f"(prompt i: seeds {protocol['seeds']} + {protocol['noise_stride']}·i, "
            "fresh for every image, the same for every variant); "
            f"DDIM {protocol['num_steps']} steps, CFG {protocol['guidance']}. "
            f"Every trained variant: {protocol['max_steps']} optimizer steps of batch {protocol['batch_size']}, "
            f"lr {protocol['lr']}, λ = {protocol['pref_weight']} unless stated. Scores are means over all images, "
            "with (in brackets) the difference from base paired by prompt ± its standard error over prompts; "
            "`toy_truth` (share of the prompt's six attributes the image shows) and `toy_taste` (the hidden taste "
            "of its measured style) are ground truth read from pixels (toyworld/truth.py), never a training "
            "reward; `reward` is the training reward "
            f"({' + '.join(f'{w:g}·{n}' for n, w in protocol['reward_weights'].items())}). "
            "⚠ marks a row whose training reward rises while ground truth falls (each by > 2 SE): reward hacking. "
            "Diversity is the mean pairwise cosine distance of toy_clip image embeddings across a prompt's noises. "
            f"Machine: {protocol['machine']}.",
            "",
            *lines,
            "Training wall time (seconds, this machine):",
            "",
            "| run | seconds |",
            "|---|---|",
            *train_lines,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toyworld.table", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/toy-results.md", help="Markdown table (JSON next to it)")
    p.add_argument("--work", default="outputs/table", help="folder for the trained variants")
    p.add_argument("--prompts", type=int, default=100, help="prompts per set, held-out and training (default 100)")
    p.add_argument("--best-of", type=int, default=BEST_OF)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (see toyworld/demo.py)")
    p.add_argument("--skip-training", action="store_true", help="evaluate the variants already in --work")
    p.add_argument("overrides", nargs="*", help="config overrides for every variant, e.g. optim.max_steps=50")
    args = p.parse_args(argv)
    torch.set_num_threads(max(args.threads, 1))
    started = time.perf_counter()
    work = os.path.abspath(args.work)
    common = ["--config", CONFIG, f"run.output_dir={work!r}", "run.save_every=100000", *args.overrides]
    if not os.path.isfile(os.path.join(train.parse(common)[0].model.path, "model_index.json")):
        raise SystemExit(
            f"HyperAlign: the toy world is not built in {ASSETS}. HINT: run python -m toyworld.factory.build."
        )
    seconds = {} if args.skip_training else train_all(common, work)
    cfg, _ = train.parse(common)
    results = {}
    for split, source in SPLITS.items():
        print(f"\n== {split}", flush=True)
        results[split] = evaluate_all(cfg, work, prompt_set(cfg, source, args.prompts), args.best_of)
    protocol = {
        "prompts": args.prompts,
        "seeds": list(cfg.eval.seeds),
        "noise_stride": evaluate.NOISE_STRIDE,
        "num_steps": cfg.sampling.num_steps,
        "guidance": cfg.sampling.guidance,
        "max_steps": cfg.optim.max_steps,
        "batch_size": cfg.optim.batch_size,
        "lr": cfg.optim.lr,
        "pref_weight": cfg.objective.pref_weight,
        "step_range": list(cfg.objective.step_range),
        "mode_objective": cfg.objective.mode,
        "reward_weights": {spec.name: spec.weight for spec in cfg.rewards},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "total_minutes": (time.perf_counter() - started) / 60,
    }
    command = "python -m toyworld.table " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, protocol, seconds, command.strip())
    numbers = {"protocol": protocol, "training_seconds": seconds, "results": results}
    write_json(os.path.splitext(args.out)[0] + ".json", numbers)
    write_text(args.out, text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
