"""Base model vs predictor (S, I, P): the paper's metrics, diversity across seeds and seconds per image.

    python -m training.evaluate --config training/configs/sd15.yaml --predictor runs/sd15-hps/predictor.safetensors \\
        eval.prompts=prompts/test.txt "eval.metrics=[{'name': 'hps', 'path': 'HPS_v2.1_compressed.pt'}, \\
        {'name': 'pickscore'}, {'name': 'imagereward', 'path': 'ImageReward.pt'}, {'name': 'clip'}, \\
        {'name': 'aesthetic', 'path': 'sac.pth'}]"

For every prompt of ``eval.prompts`` and every seed of ``eval.seeds`` it samples with the base model
and with the predictor in each of ``eval.modes`` (``sampling.num_steps`` steps, ``sampling.guidance``;
prompt i uses noise seeds ``seed + NOISE_STRIDE * i``: fresh noise for every image, the same noise
across variants, so a standard error over prompts includes the noise's variance), scores each image
with every metric (no gradients), reports each variant's difference from base paired by prompt with
its standard error over prompts, measures diversity as
the mean pairwise cosine distance between the seeds' image embeddings (the first metric with an
image encoder, else downsampled pixels) and times generation per image. Writes ``results.json``
(with the protocol: steps, guidance, resolution, seeds, prompt-set hash) and ``results.md`` into
``eval.out`` (default ``<run dir>/eval``). Prompts are split across processes when launched with
several.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .cli import cli, parse, print_check

logger = logging.getLogger("training")
NOISE_STRIDE = 100_003  # seed offset between prompts (a prime, so no two prompts share a seed)


def _extra(p) -> None:
    p.add_argument("--predictor", required=True, help="predictor .safetensors file")
    p.add_argument("--save-images", action="store_true", help="also write one PNG grid per prompt")


def diversity(embeddings: torch.Tensor) -> float:
    """Mean pairwise cosine distance (1 - cos) between the rows of (s, d); 0 for a single seed."""
    e = F.normalize(embeddings.float().flatten(1), dim=-1)
    pairs = list(itertools.combinations(range(e.shape[0]), 2))
    if not pairs:
        return 0.0
    return float(sum(1 - (e[i] * e[j]).sum() for i, j in pairs) / len(pairs))


def _embed(metrics, images: torch.Tensor) -> tuple[torch.Tensor, str]:
    for name, model in zip(metrics.names if metrics else [], metrics.models if metrics else []):
        if hasattr(model, "embed"):
            return model.embed(images), name
    return F.interpolate(images.float(), size=(64, 64), mode="area"), "pixels"


def _read_keysteps(path: str) -> tuple[float, ...]:
    from hyperalign.schedule import validate_keysteps

    with open(path, encoding="utf-8") as handle:
        return validate_keysteps(json.load(handle)["keysteps"])


def prompt_seeds(seeds: list[int], index: int) -> list[int]:
    """The noise seeds of prompt `index`: fresh per prompt, the same for every variant."""
    return [seed + NOISE_STRIDE * index for seed in seeds]


def evaluate_prompt(ctx, prompt: str, index: int = 0) -> dict:
    """Every variant's scores, diversity and seconds for prompt number `index`; images when asked."""
    from .sampling import Trajectory, per_sample_noise

    adapter, seeds, guidance = ctx["adapter"], prompt_seeds(ctx["seeds"], index), ctx["guidance"]
    cond = adapter.encode_prompts([prompt] * len(seeds), uncond=guidance != 1.0)
    x = per_sample_noise(adapter.latent_shape(1)[1:], seeds, adapter.device)
    out = {}
    for variant in ctx["variants"]:
        hypernet = None if variant == "base" else ctx["hypernet"]
        mode = "S" if variant == "base" else variant
        trajectory = Trajectory(adapter, hypernet, ctx["hcfg"], cond, ctx["steps"], guidance, mode, ctx["keysteps"])
        _sync()
        start = time.perf_counter()
        with torch.no_grad(), ctx["accelerator"].autocast():
            latents, _ = trajectory.generate(x)
            images = adapter.decode(latents)
        _sync()
        seconds = (time.perf_counter() - start) / len(seeds)
        with torch.no_grad():
            scores = {}
            if ctx["metrics"] is not None:
                _, terms = ctx["metrics"](images, [prompt] * len(seeds))
                scores = {name: value.tolist() for name, value in terms.items()}
            embedding, source = _embed(ctx["metrics"], images)
        out[variant] = {
            "scores": scores,
            "seconds": seconds,
            "diversity": diversity(embedding),
            "diversity_source": source,
            "calls": len(trajectory.run.calls),
        }
        if ctx["save_images"]:
            out[variant]["images"] = images.float().cpu()
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(records: list[dict], variants: list[str]) -> dict:
    results = {}
    for variant in variants:
        rows = [r[variant] for r in records]
        metrics = {}
        for name in rows[0]["scores"]:
            values = [v for r in rows for v in r["scores"][name]]
            metrics[name] = {
                "mean": statistics.fmean(values),
                "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            }
        results[variant] = {
            "metrics": metrics,
            "diversity": statistics.fmean(r["diversity"] for r in rows),
            "diversity_source": rows[0]["diversity_source"],
            "seconds_per_image": statistics.fmean(r["seconds"] for r in rows),
            "hypernet_calls_per_image": statistics.fmean(r["calls"] for r in rows),
            "prompts": len(rows),
        }
        if variant != "base" and "base" in variants:
            results[variant]["vs_base"] = paired(rows, [r["base"] for r in records])
    return results


def paired(rows: list[dict], base: list[dict]) -> dict:
    """Per metric: the mean over prompts of (variant - base), each prompt's scores averaged over its seeds,
    and its standard error over prompts. Prompts differ far more than a predictor moves them, so only the
    paired difference can carry a sign."""
    out = {}
    for name in rows[0]["scores"]:
        diffs = [statistics.fmean(r["scores"][name]) - statistics.fmean(b["scores"][name]) for r, b in zip(rows, base)]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        out[name] = {"mean": statistics.fmean(diffs), "se": se}
    return out


def _cell(row: dict, name: str) -> str:
    """The mean, and for a variant its paired difference from base ± standard error."""
    if "vs_base" not in row:
        return f"{row['metrics'][name]['mean']:.4f}"
    delta = row["vs_base"][name]
    return f"{row['metrics'][name]['mean']:.4f} ({delta['mean']:+.4f} ± {delta['se']:.4f})"


def markdown(results: dict) -> str:
    variants = list(results)
    names = list(results[variants[0]]["metrics"]) if variants else []
    header = "| variant | " + " | ".join(names + ["diversity", "s/image"]) + " |"
    lines = [header, "|" + "---|" * (len(names) + 3)]
    for variant in variants:
        r = results[variant]
        cells = [_cell(r, n) for n in names]
        cells += [f"{r['diversity']:.4f}", f"{r['seconds_per_image']:.3f}"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@cli
def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv, __doc__, "python -m training.evaluate", _extra)
    from hyperalign.atomic import write_json, write_text
    from hyperalign.io import load_predictor

    from .adapters import load_adapter
    from .config import check_files
    from .data import read_prompts
    from .engine import make_accelerator, setup_logging
    from .models import DTYPES
    from .paths import require_path
    from .rewards import RewardSet

    require_path(args.predictor, "--predictor", "predictor file", "pass a .safetensors exported by training", "file")
    check_files(cfg, purpose="eval")
    if args.check:
        return print_check(cfg, args)
    accelerator = make_accelerator(cfg)
    setup_logging(accelerator, cfg.run_dir)
    device = accelerator.device
    adapter = load_adapter(cfg.model, device)
    predictor = load_predictor(args.predictor, device)
    if predictor.meta.family != adapter.name:
        raise ValueError(
            f"HyperAlign: predictor {args.predictor!r} was trained for {predictor.meta.family!r} but "
            f"model.family is {adapter.name!r}. HINT: evaluate it with its own base model."
        )
    hcfg = predictor.meta.hypernet_config()
    adapter.attach(predictor.targets, hcfg.scale)
    prompts = read_prompts(cfg.eval.prompts)
    ctx = {
        "adapter": adapter,
        "hypernet": predictor.hypernet.float(),
        "hcfg": hcfg,
        "seeds": list(cfg.eval.seeds),
        "guidance": cfg.sampling.guidance,
        "steps": adapter.sampling_steps(cfg.sampling.num_steps),
        "keysteps": _read_or_meta_keysteps(cfg, predictor),
        "accelerator": accelerator,
        "metrics": RewardSet(cfg.eval.metrics, device, DTYPES[cfg.model.base_dtype]) if cfg.eval.metrics else None,
        "variants": (["base"] if cfg.eval.base else []) + list(cfg.eval.modes),
        "save_images": args.save_images,
    }
    out_dir = cfg.eval.out or os.path.join(cfg.run_dir, "eval")
    mine = []
    with accelerator.split_between_processes(list(enumerate(prompts))) as part:
        for index, prompt in part:
            record = evaluate_prompt(ctx, prompt, index)
            if args.save_images:
                _save_images(out_dir, index, record)
            mine.append((index, record))
    from accelerate.utils import gather_object

    records = [r for _, r in sorted(gather_object(mine), key=lambda item: item[0])]
    if accelerator.is_main_process:
        results = summarize(records, ctx["variants"])
        report = {
            "predictor": args.predictor,
            "protocol": {
                "base_model": cfg.model.path,
                "family": adapter.name,
                "num_steps": cfg.sampling.num_steps,
                "guidance": cfg.sampling.guidance,
                "resolution": cfg.model.resolution,
                "sampler": "flow-matching euler" if adapter.name == "flux" else "ddim (eta 0)",
                "seeds": list(cfg.eval.seeds),
                "noise": f"prompt i: seed + {NOISE_STRIDE} * i",
                "prompts": len(prompts),
                "prompt_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                "keysteps": list(ctx["keysteps"]),
                "device": str(device),
            },
            "results": results,
        }
        table = markdown(results)
        write_json(os.path.join(out_dir, "results.json"), report)
        write_text(os.path.join(out_dir, "results.md"), table)
        print(table)
    adapter.detach()
    return 0


def _read_or_meta_keysteps(cfg, predictor) -> tuple[float, ...]:
    """P mode uses the predictor's keysteps, else the config's (objective.keysteps or the keysteps file)."""
    if predictor.meta.mode == "P" or len(predictor.meta.keysteps) > 1:
        return tuple(predictor.meta.keysteps)
    if cfg.objective.keysteps is not None:
        return tuple(cfg.objective.keysteps)
    if os.path.isfile(cfg.keysteps_path):
        return _read_keysteps(cfg.keysteps_path)
    if "P" in cfg.eval.modes:
        logger.warning("no keysteps for mode P (none in the predictor, no %s): P equals I", cfg.keysteps_path)
    return (0.0,)


def _save_images(out_dir: str, index: int, record: dict) -> None:
    from PIL import Image

    from .grids import to_uint8_grid

    folder = os.path.join(out_dir, "images")
    os.makedirs(folder, exist_ok=True)
    grid = to_uint8_grid([record[v].pop("images") for v in record])
    Image.fromarray(grid).save(os.path.join(folder, f"prompt_{index:05d}.png"))


if __name__ == "__main__":
    sys.exit(main())
