"""The comparison table's units of work (toyworld/table.py): train one variant with one seed, or score one row
of the table (base, Best-of-N, or one trained run) on one prompt set.

Each unit runs in a fresh process when the table runs with --jobs > 1 (one torch thread each: two processes of
one thread use two cores without the spin-waits a two-thread torch suffers), writes its result atomically into
the work folder, and is skipped when that result is already there, so an interrupted table resumes where it
stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import torch

from hyperalign.atomic import atomic_path, write_json

STATIC_FILE = "static_lora.safetensors"
PREDICTOR_FILE = "predictor.safetensors"


def trained_file(run_dir: str, static: bool) -> str:
    return os.path.join(run_dir, STATIC_FILE if static else PREDICTOR_FILE)


def seconds_file(run_dir: str) -> str:
    return run_dir + ".seconds.json"


def train_run(argv: list[str], run_dir: str, static: bool) -> float | None:
    """Train one variant (argv: training.train's); its log goes to <run_dir>.log. Returns its training wall
    seconds, as measured when it trained (None for a run trained before times were kept)."""
    if os.path.isfile(trained_file(run_dir, static)):
        with contextlib.suppress(FileNotFoundError):
            with open(seconds_file(run_dir), encoding="utf-8") as handle:
                return json.load(handle)["seconds"]
        return None
    from training import train

    torch.set_num_threads(1)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    started = time.perf_counter()
    with open(run_dir + ".log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        with contextlib.redirect_stderr(log):
            failed = (train_static if static else train.main)(argv)
    if failed:
        raise RuntimeError(f"HyperAlign: training {run_dir} failed; see {run_dir}.log.")
    seconds = time.perf_counter() - started
    write_json(seconds_file(run_dir), {"seconds": seconds})
    return seconds


def train_static(argv: list[str]) -> int:
    """training.train with the hypernet swapped for a StaticLoRA before the first step."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from training import train
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
        state = {k: v.detach().contiguous().cpu() for k, v in static.state_dict().items()}
        with atomic_path(trained_file(cfg.run_dir, True), ".safetensors.tmp") as tmp:
            save_file(state, tmp, {"targets": json.dumps(static.ids)})
    finally:
        accelerator.end_training()
        tr.adapter.detach()
        close_logging()
    return 0


# ---------------------------------------------------------------------------------------- scoring


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

    def with_reward(self, record: dict) -> dict:
        scores = record["scores"]
        count = len(next(iter(scores.values())))
        scores["reward"] = [sum(w * scores[n][i] for n, w in self.weights.items()) for i in range(count)]
        return record


def _context(argv: list[str], reference: str) -> dict:
    """What every row's sampling shares: the model with the reference predictor's targets attached (every variant
    has the same targets, rank and alpha), the metrics, sampler and noises of the config."""
    from hyperalign.io import load_predictor
    from training import train
    from training.adapters import load_adapter
    from training.engine import make_accelerator

    torch.set_num_threads(1)
    cfg, _ = train.parse(argv)
    accelerator = make_accelerator(cfg)
    adapter = load_adapter(cfg.model, accelerator.device)
    predictor = load_predictor(reference)
    hcfg = predictor.meta.hypernet_config()
    adapter.attach(predictor.targets, hcfg.scale)
    scorer = Scorer(cfg, accelerator.device)
    return {
        "adapter": adapter,
        "hcfg": hcfg,
        "targets": predictor.targets,
        "seeds": list(cfg.eval.seeds),
        "guidance": cfg.sampling.guidance,
        "steps": adapter.sampling_steps(cfg.sampling.num_steps),
        "accelerator": accelerator,
        "metrics": scorer.metrics,
        "scorer": scorer,
        "save_images": False,
    }


def score_row(argv: list[str], reference: str, row: dict, prompts: list[str], out: str) -> None:
    """Score one row on `prompts` into the JSON file `out`. row["kind"]: "base"; "best_of" (n, slots); "trained"
    (path, static, mode)."""
    if os.path.isfile(out):
        return
    ctx = _context(argv, reference)
    try:
        if row["kind"] == "best_of":
            result = _best_of(ctx, prompts, row["n"], row["slots"])
        else:
            result = _sampled(ctx, row, prompts)
    finally:
        ctx["adapter"].detach()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    write_json(out, result)


def _sampled(ctx: dict, row: dict, prompts: list[str]) -> dict:
    from training import evaluate

    from .baselines import DeltaNormRecorder, target_weights

    mode, recorder = "base", None
    if row["kind"] == "trained":
        net, mode, keys = _load_trained(ctx, row)
        weights = target_weights(ctx["adapter"].denoiser, ctx["targets"])
        recorder = DeltaNormRecorder(net, weights, ctx["hcfg"].scale)  # how far each LoRA moves the model
        ctx.update(hypernet=recorder, keysteps=keys)
    else:
        ctx.update(hypernet=None, keysteps=(0.0,))
    ctx["variants"] = [mode]
    records = [ctx["scorer"].with_reward(evaluate.evaluate_prompt(ctx, p, i)[mode]) for i, p in enumerate(prompts)]
    result = {"records": records}
    if recorder is not None:
        result["relative_delta_norm"] = recorder.mean()
    return result


def _load_trained(ctx: dict, row: dict):
    from safetensors.torch import load_file

    from hyperalign.io import load_predictor

    from .baselines import StaticLoRA

    if row["static"]:
        static = StaticLoRA(ctx["targets"], ctx["hcfg"].rank)
        static.load_state_dict(load_file(trained_file(row["path"], True)))
        return static.to(ctx["adapter"].device).eval(), row["mode"], (0.0,)
    predictor = load_predictor(trained_file(row["path"], False))
    return predictor.hypernet.float().eval(), row["mode"], predictor.meta.keysteps


def _best_of(ctx: dict, prompts: list[str], n: int, slots: int) -> dict:
    """Best-of-k for every k in (4, n) from one set of n candidates per slot (the first `slots` noises of each
    prompt): candidate 0 of a slot is that slot's base sample, candidates 0..k-1 are Best-of-k's. Also, from the
    same candidates, Best-of-n by ground truth (the headroom: what the generator can draw for the prompt, not a
    method) and how often each reward orders two candidates of one prompt as the truth does (`agreement`)."""
    from training.evaluate import _embed, diversity, prompt_seeds
    from training.sampling import Trajectory, per_sample_noise

    from .baselines import best_of_n

    adapter, guidance, scorer = ctx["adapter"], ctx["guidance"], ctx["scorer"]
    counts = sorted({k for k in (4, n) if k <= n})
    out: dict[str, list[dict]] = {str(k): [] for k in counts}
    oracle, agreement = [], []
    for index, prompt in enumerate(prompts):
        seeds = prompt_seeds(ctx["seeds"][:slots], index)
        candidates = [seed + 1000 * j for j in range(n) for seed in seeds]  # candidate-major
        started = time.perf_counter()
        with torch.no_grad():
            cond = adapter.encode_prompts([prompt] * len(candidates), uncond=guidance != 1.0)
            x = per_sample_noise(adapter.latent_shape(1)[1:], candidates, adapter.device)
            latents, _ = Trajectory(adapter, None, ctx["hcfg"], cond, ctx["steps"], guidance).generate(x)
            images = adapter.decode(latents)
            terms = scorer(images, [prompt] * len(candidates))
        per_candidate = (time.perf_counter() - started) / len(candidates)

        def record(chosen: torch.Tensor, k: int) -> dict:
            embedding, _ = _embed(scorer.metrics, images[chosen])
            scores = {name: value[chosen].tolist() for name, value in terms.items()}
            return {"scores": scores, "seconds": per_candidate * k, "diversity": diversity(embedding), "calls": 0}

        for k in counts:
            out[str(k)].append(record(best_of_n(terms["reward"][: k * len(seeds)].cpu(), len(seeds)), k))
        oracle.append(record(best_of_n(terms["toy_truth"].cpu(), len(seeds)), n))
        agreement.append({name: pair_agreement(terms[name], terms["toy_truth"]) for name in rewards_of(scorer)})
    return {"by_n": out, "oracle": oracle, "agreement": agreement}


def rewards_of(scorer: Scorer) -> list[str]:
    return [*scorer.weights, "reward"]


def pair_agreement(scores: torch.Tensor, truth: torch.Tensor) -> float | None:
    """Share of the pairs of images (of one prompt) that the truth tells apart which `scores` order the same way
    (a tie in `scores` counts half); None when the truth ties every pair."""
    truth_order = torch.sign(truth[:, None] - truth[None, :])
    told_apart = truth_order > 0  # each pair once, the truly better image first
    if not bool(told_apart.any()):
        return None
    score_order = torch.sign(scores[:, None] - scores[None, :])[told_apart]
    return float((score_order > 0).float().mean() + 0.5 * (score_order == 0).float().mean())
