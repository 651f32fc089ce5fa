"""The toy world's comparison table: ``python -m toyworld.table [--out docs/toy-results.md] [--jobs 2]``.

Every row samples the same prompts with the same noises (fresh noise for every image: prompt i uses seeds
``seed + NOISE_STRIDE * i`` over toy.yaml's eval.seeds, as ``training.evaluate`` does), sampler (DDIM), steps and
CFG scale as ``training/configs/toy.yaml``, and every trained row is trained by toy.yaml's objective, data, steps
and batch:

- base: the toy model alone;
- Best-of-N (N = 4, 20): per noise slot, the best of N base samples by the training reward (the reward it is
  then scored on), on the first 4 noise slots of each prompt;
- static LoRA: the fine-tuning baseline (toyworld/baselines.py), with its own lr sweep (STATIC_LRS) on training
  prompts; the lr with the best ground truth there is the one evaluated on held-out prompts;
- HyperAlign S with its own lr sweep (HYPER_LRS besides toy.yaml's lr), on training prompts;
- HyperAlign S trained on the reward only (lambda = 0), and on the preference term only;
- HyperAlign I, P and S, each trained in its own mode.

Trained rows on held-out prompts pool --seeds training seeds (each prompt's images from every seed); the seeds
column gives each seed's own toy_truth difference. On training prompts (where settings are chosen) every row
has training seed 0.

Two prompt sets, each a seeded random sample: held-out prompts (colour-shape pairs the base model and the
predictor never saw) and training prompts. Columns: ground truth (``toy_truth``: share of the prompt's
attributes the image shows; ``toy_taste``: the hidden taste of its measured style; both read from pixels by
toyworld/truth.py, never trained on), each learned reward, the training reward (their weighted sum), diversity
(mean pairwise cosine distance of toy_clip image embeddings across a prompt's noises), seconds per image on this
machine and ‖ΔW‖/‖W‖; each with its difference from base paired by prompt ± the standard error over prompts. A
row whose training reward rises while a truth column falls (each by more than 2 standard errors) is flagged as
reward hacking, and the held-out rows are checked against issue 14's targets. The Markdown goes to --out, the
numbers next to it as JSON; trained runs and scored rows stay in --work, and a re-run reuses them.
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
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch

from hyperalign.atomic import write_json, write_text
from training import evaluate, keysteps, train

from . import ASSETS, assets_digest
from .table_report import hacking, markdown
from .table_runs import score_row, train_run, trained_file

CONFIG = "training/configs/toy.yaml"
BEST_OF = 20
BEST_OF_SLOTS = 4  # noise slots per prompt for Best-of-N (N samples each)
STATIC_LRS = (1e-4, 1e-3, 1e-2)
HYPER_LRS = (3e-5, 3e-4)  # the hypernet's sweep, besides toy.yaml's lr
SPLITS = {  # table heading -> where its prompts come from
    "held-out prompts (unseen colour-shape pairs)": "eval",
    "training prompts": "train",
}
HELD_OUT, TRAINING = SPLITS


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str  # the mode it trains and samples in
    overrides: tuple[str, ...] = ()
    static: bool = False

    @property
    def slug(self) -> str:
        return "".join(c if c.isascii() and c.isalnum() else "-" for c in self.name.lower()).strip("-")


STATIC = Variant("static LoRA", "I", static=True)
S = Variant("HyperAlign S", "S")
TRAINED = (
    STATIC,
    Variant("HyperAlign S, reward only (λ=0)", "S", ("objective.pref_weight=0.0", "objective.pref_share=None")),
    Variant("HyperAlign S, preference only", "S", ("rewards=[]",)),
    Variant("HyperAlign I", "I"),
    Variant("HyperAlign P", "P"),
    S,
)


@dataclass(frozen=True)
class Run:
    """One trained predictor (or static LoRA): a variant, a training seed and, in a sweep, its own lr."""

    variant: Variant
    seed: int = 0
    lr: float | None = None  # None: toy.yaml's lr

    @property
    def slug(self) -> str:
        return f"{self.variant.slug}-seed{self.seed}" + ("" if self.lr is None else f"-lr{self.lr:g}")

    def argv(self, common: list[str], keysteps_file: str) -> list[str]:
        argv = common + [f"run.name={self.slug!r}", f"run.seed={self.seed}", f"objective.mode={self.variant.mode!r}"]
        argv += list(self.variant.overrides) + ([] if self.lr is None else [f"optim.lr={self.lr!r}"])
        return argv + ([f"objective.keysteps_file={keysteps_file!r}"] if self.variant.mode == "P" else [])


# ------------------------------------------------------------------------------------------ the work


class Inline(Executor):
    """--jobs 1: every unit in this process, in order."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _pool(jobs: int) -> Executor:
    import multiprocessing

    if jobs <= 1:
        return Inline()
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)


class Table:
    """The plan of runs and rows, and where each lives in the work folder."""

    def __init__(self, args, common: list[str], work: str):
        self.common, self.work = common, work
        self.cfg, _ = train.parse(common)
        self.seeds = list(range(args.seeds))
        self.static_lrs, self.hyper_lrs, self.best_of = tuple(args.static_lrs), tuple(args.hyper_lrs), args.best_of
        self.keysteps_file = os.path.join(work, "keysteps.json")
        self.prompts = {split: prompt_set(self.cfg, source, args.prompts) for split, source in SPLITS.items()}
        self.seconds: dict[str, float] = {}

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.work, run.slug)

    def train(self, pool: Executor, runs: list[Run]) -> None:
        futures = {
            run: pool.submit(
                train_run, run.argv(self.common, self.keysteps_file), self.run_dir(run), run.variant.static
            )
            for run in runs
        }
        for run, future in futures.items():
            spent = future.result()
            if spent is not None:
                self.seconds[run.slug] = spent
                print(f"   {run.slug}: trained in {spent:.0f} s", flush=True)

    def cell_file(self, split: str, key: str) -> str:
        return os.path.join(self.work, "scores", SPLITS[split], key + ".json")

    def score(self, pool: Executor, cells: dict[tuple[str, str], dict]) -> None:
        reference = trained_file(self.run_dir(Run(S)), False)
        futures = [
            pool.submit(score_row, self.common, reference, row, self.prompts[split], self.cell_file(split, key))
            for (split, key), row in cells.items()
        ]
        for future in futures:
            future.result()

    def trained_cell(self, run: Run) -> tuple[str, dict]:
        row = {"kind": "trained", "path": self.run_dir(run), "static": run.variant.static, "mode": run.variant.mode}
        return run.slug, row


def build_table(args, common: list[str], work: str) -> tuple[Table, dict]:
    table = Table(args, common, work)
    pool = _pool(args.jobs)
    started = time.perf_counter()
    if not os.path.isfile(table.keysteps_file):
        _run_entry(
            keysteps.main, common + [f"objective.keysteps_file={table.keysteps_file!r}", "--num", "3", "--samples", "4"]
        )
    static_sweep = [Run(STATIC, 0, lr) for lr in table.static_lrs]
    hyper_sweep = [Run(S, 0, lr) for lr in table.hyper_lrs]
    main_runs = [Run(v, seed) for v in TRAINED if not v.static for seed in table.seeds]
    print("== training", flush=True)
    table.train(pool, static_sweep + hyper_sweep + main_runs)

    print("== scoring", flush=True)
    cells = {(HELD_OUT, "best-of"): {"kind": "best_of", "n": table.best_of, "slots": BEST_OF_SLOTS}}
    cells[(TRAINING, "best-of")] = {"kind": "best_of", "n": min(4, table.best_of), "slots": BEST_OF_SLOTS}
    for split in SPLITS:
        cells[(split, "base")] = {"kind": "base"}
    for run in static_sweep + hyper_sweep + [r for r in main_runs if r.seed == 0]:
        key, row = table.trained_cell(run)
        cells[(TRAINING, key)] = row
    cells.update({(HELD_OUT, key): row for key, row in map(table.trained_cell, main_runs)})
    table.score(pool, cells)

    picked = pick_lr(table, static_sweep)
    static_runs = [Run(STATIC, seed, picked) for seed in table.seeds]
    print(f"== static LoRA: lr {picked:g} picked on training prompts; its other seeds", flush=True)
    table.train(pool, static_runs)
    table.score(pool, {(HELD_OUT, k): row for k, row in map(table.trained_cell, static_runs)})
    if isinstance(pool, ProcessPoolExecutor):
        pool.shutdown()

    results, agreement = {split: {} for split in SPLITS}, {}
    for split in SPLITS:
        base = _cell(table, split, "base")["records"]
        results[split]["base"] = _aggregate([_cell(table, split, "base")], base)
        best_of = _cell(table, split, "best-of")
        for k, records in best_of["by_n"].items():
            results[split][best_of_name(int(k))] = _aggregate([{"records": records}], base)
        results[split][oracle_name(max(map(int, best_of["by_n"])))] = _aggregate([{"records": best_of["oracle"]}], base)
        agreement[split] = summarise_agreement(best_of["agreement"])
    train_rows = results[TRAINING]
    for run in static_sweep + hyper_sweep:
        train_rows[sweep_name(run)] = _aggregate([_cell(table, TRAINING, run.slug)], base_of(table, TRAINING))
    for v in TRAINED:
        if not v.static:
            train_rows[v.name] = _aggregate([_cell(table, TRAINING, Run(v).slug)], base_of(table, TRAINING))
    for v in TRAINED:
        runs = static_runs if v.static else [Run(v, seed) for seed in table.seeds]
        results[HELD_OUT][v.name] = _aggregate([_cell(table, HELD_OUT, r.slug) for r in runs], base_of(table, HELD_OUT))
    results[HELD_OUT][STATIC.name]["lr"] = picked
    table.seconds["this invocation (wall; reuses what the work folder holds)"] = time.perf_counter() - started
    return table, results, agreement


def _run_entry(entry, argv: list[str]) -> None:
    if entry(argv):
        raise SystemExit("HyperAlign: a step of the table failed; see the messages above.")


def _cell(table: Table, split: str, key: str) -> dict:
    import json

    with open(table.cell_file(split, key), encoding="utf-8") as handle:
        return json.load(handle)


def base_of(table: Table, split: str) -> list[dict]:
    return _cell(table, split, "base")["records"]


def sweep_name(run: Run) -> str:
    return f"{run.variant.name}, lr {run.lr:g}"


def best_of_name(n: int) -> str:
    return f"Best-of-{n} (selects by the training reward)"


def oracle_name(n: int) -> str:
    return f"Best-of-{n} by ground truth (the headroom, not a method)"


def summarise_agreement(per_prompt: list[dict]) -> dict:
    """reward -> mean ± SE over prompts of the share of same-prompt pairs it orders as the truth does."""
    out = {}
    for name in per_prompt[0]:
        shares = [p[name] for p in per_prompt if p[name] is not None]
        mean = statistics.fmean(shares) if shares else None
        se = statistics.stdev(shares) / len(shares) ** 0.5 if len(shares) > 1 else None
        out[name] = {"mean": mean, "se": se, "prompts": len(shares)}
    return out


def pick_lr(table: Table, sweep: list[Run]) -> float:
    """The static LoRA's lr: the best ground truth on training prompts (accuracy, then taste)."""
    base = base_of(table, TRAINING)

    def merit(run: Run) -> tuple[float, float]:
        delta = evaluate.paired(_cell(table, TRAINING, run.slug)["records"], base)
        return delta["toy_truth"]["mean"], delta["toy_taste"]["mean"]

    return max(sweep, key=merit).lr


# ------------------------------------------------------------------------------------------ the rows


def merge_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """One record per prompt from several training seeds' records: every image's scores, the mean diversity,
    seconds and calls."""
    merged = []
    for records in zip(*per_seed):
        names = records[0]["scores"]
        merged.append(
            {
                "scores": {n: [v for r in records for v in r["scores"][n]] for n in names},
                "diversity": statistics.fmean(r["diversity"] for r in records),
                "seconds": statistics.fmean(r["seconds"] for r in records),
                "calls": statistics.fmean(r["calls"] for r in records),
            }
        )
    return merged


def _aggregate(cells: list[dict], base: list[dict]) -> dict:
    records = merge_seeds([c["records"] for c in cells])
    names = list(records[0]["scores"])
    row = {
        "metrics": {
            n: {
                "mean": statistics.fmean(v for r in records for v in r["scores"][n]),
                "std": statistics.pstdev([v for r in records for v in r["scores"][n]]),
            }
            for n in names
        },
        "diversity": statistics.fmean(r["diversity"] for r in records),
        "seconds_per_image": statistics.fmean(r["seconds"] for r in records),
        "hypernet_calls_per_image": statistics.fmean(r["calls"] for r in records),
        "vs_base": evaluate.paired(records, base),
        "training_seeds": len(cells),
    }
    norms = [c["relative_delta_norm"] for c in cells if "relative_delta_norm" in c]
    if norms:
        row["relative_delta_norm"] = statistics.fmean(norms)
    if len(cells) > 1:
        row["truth_by_seed"] = [evaluate.paired(c["records"], base)["toy_truth"]["mean"] for c in cells]
    return row


def prompt_set(cfg, source: str, count: int) -> list[str]:
    """A seeded random sample of eval.prompts ("eval") or data.prompts ("train"): the files are sorted by attribute."""
    from training.data import read_prompts

    prompts = read_prompts(cfg.eval.prompts if source == "eval" else cfg.data.prompts)
    return random.Random(cfg.run.seed).sample(prompts, min(count, len(prompts)))


def protocol_of(cfg, args) -> dict:
    """What the table's numbers depend on, as recorded next to them (and pinned against toy.yaml by a test)."""
    objective = {k: v for k, v in asdict(cfg.objective).items() if k != "keysteps_file"}
    return {
        "prompts": args.prompts,
        "seeds": list(cfg.eval.seeds),
        "training_seeds": args.seeds,
        "noise_stride": evaluate.NOISE_STRIDE,
        "num_steps": cfg.sampling.num_steps,
        "guidance": cfg.sampling.guidance,
        "max_steps": cfg.optim.max_steps,
        "batch_size": cfg.optim.batch_size,
        "lr": cfg.optim.lr,
        "static_lrs": list(args.static_lrs),
        "hyper_lrs": list(args.hyper_lrs),
        "best_of": args.best_of,
        "best_of_slots": BEST_OF_SLOTS,
        "pref_weight": cfg.objective.pref_weight,
        "step_range": list(cfg.objective.step_range),
        "mode_objective": cfg.objective.mode,
        "objective": objective,
        "reward_weights": {spec.name: spec.weight for spec in cfg.rewards},
        "assets": assets_digest(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.jobs} process(es) of 1 thread",
    }


def made_with(cfg) -> dict:
    """What every unit kept in the work folder depends on: the resolved config (less where and how visibly runs
    are written) and the toy world's files, by hash."""
    config = asdict(cfg)
    config["run"] = {k: v for k, v in config["run"].items() if k not in ("output_dir", "name", "progress")}
    return json.loads(json.dumps({"config": config, "world": assets_digest()}))


def check_work(work: str, key: dict) -> None:
    """Refuse a work folder whose runs were made with another config or world: they would be reused as this one's."""
    path = os.path.join(work, "made_with.json")
    if not os.path.isfile(path):
        os.makedirs(work, exist_ok=True)
        write_json(path, key)
        return
    with open(path, encoding="utf-8") as handle:
        kept = json.load(handle)
    changed = [f"config.{k}" for k in key["config"] if kept["config"].get(k) != key["config"][k]]
    changed += ["the toy world's files"] if kept["world"] != key["world"] else []
    if changed:
        raise SystemExit(
            f"HyperAlign: the work folder {work} holds runs made with a different {', '.join(changed)}. "
            "HINT: pass --work with a new folder, or delete that one to start over."
        )


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toyworld.table", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/toy-results.md", help="Markdown table (JSON next to it)")
    p.add_argument("--work", default="outputs/table", help="folder for trained runs and scored rows (reused)")
    p.add_argument("--prompts", type=int, default=100, help="prompts per set, held-out and training (default 100)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds of each trained row on held-out prompts")
    p.add_argument("--best-of", type=int, default=BEST_OF)
    p.add_argument("--static-lrs", type=_floats, default=STATIC_LRS, help="comma-separated (default %(default)s)")
    p.add_argument("--hyper-lrs", type=_floats, default=HYPER_LRS, help="comma-separated; '' for none")
    p.add_argument("--jobs", type=int, default=1, help="processes of one torch thread each (default 1)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. optim.max_steps=50")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.best_of < 1 or args.jobs < 1 or not args.static_lrs:
        raise SystemExit("HyperAlign: --seeds, --best-of and --jobs must be at least 1, and --static-lrs not empty.")
    torch.set_num_threads(1)  # the toy models are too small to gain from threads (see toyworld/demo.py)
    work = os.path.abspath(args.work)
    common = ["--config", CONFIG, f"run.output_dir={work!r}", "run.save_every=100000", *args.overrides]
    if not os.path.isfile(os.path.join(train.parse(common)[0].model.path, "model_index.json")):
        raise SystemExit(
            f"HyperAlign: the toy world is not built in {ASSETS}. HINT: run python -m toyworld.factory.build."
        )
    check_work(work, made_with(train.parse(common)[0]))
    started = time.perf_counter()
    table, results, agreement = build_table(args, common, work)
    protocol = dict(protocol_of(table.cfg, args), total_minutes=(time.perf_counter() - started) / 60)
    command = "python -m toyworld.table " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, agreement, protocol, table.seconds, command.strip())
    numbers = {"protocol": protocol, "training_seconds": table.seconds, "results": results, "agreement": agreement}
    write_json(os.path.splitext(args.out)[0] + ".json", numbers)
    write_text(args.out, text)
    print("\n" + text)
    return 0


__all__ = ["hacking", "main", "prompt_set"]

if __name__ == "__main__":
    sys.exit(main())
