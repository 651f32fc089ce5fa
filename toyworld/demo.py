"""The main job: train a HyperAlign predictor on the toy world, evaluate it, and use it in ComfyUI.

    ./scripts/demo.sh                      # sets up the environment, then runs this
    python -m toyworld.demo [--out outputs/demo] [--steps N] [--prompts 24] [--threads 1] [--skip-comfy]

No downloads, no GPU. Steps: (1) P-mode keysteps from base trajectories (training.keysteps);
(2) training (training.train, configs/toy.yaml) with a progress bar; (3) evaluation on a fixed
seeded sample of held-out prompts, base vs HyperAlign S / I / P, the same noises for every variant
(training.evaluate): ground truth (what the scene should look like, read from pixels) beside the
learned rewards, each as a difference from base ± its standard error over prompts, a verdict line per
mode, and one comparison grid PNG; (4) the predictor loaded through the nodes in the real ComfyUI on the
toy model, sampled by ComfyUI's KSampler, and the image ComfyUI made written next to a plain one.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np
import torch

from training import comfy_host

from . import truth
from .comfy_model import comfy_model_from_diffusers

CONFIG = "training/configs/toy.yaml"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def _check_assets(assets: str) -> None:
    needed = ["model/model_index.json", "prefs/pairs.jsonl", "prompts/train.txt", "prompts/heldout.txt"]
    missing = [n for n in needed if not os.path.isfile(os.path.join(assets, n))]
    if missing:
        raise FileNotFoundError(
            f"HyperAlign: the toy world's assets are missing ({missing}). HINT: run python -m toyworld.factory.build."
        )


def _run(entry, module: str, argv: list[str], what: str) -> None:
    print(f"\n== {what}: python -m {module} {' '.join(argv)}", flush=True)
    status = entry(argv)
    if status:
        raise SystemExit(f"HyperAlign: {what} failed (exit {status}); see the messages above.")


GRID_PROMPTS = 6  # prompts in the comparison grid (the first of the sample)


def _subset(prompts_file: str, count: int, out: str) -> str:
    """A fixed seeded sample (the prompt files are sorted by attribute, so a slice would be one corner)."""
    import random

    with open(prompts_file, encoding="utf-8") as handle:
        prompts = [line.strip() for line in handle if line.strip()]
    chosen = random.Random(0).sample(prompts, min(count, len(prompts)))
    path = os.path.join(out, "heldout_prompts.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(chosen) + "\n")
    return path


def _comparison_grid(eval_dir: str, out: str, variants: list[str]) -> str:
    """Per-prompt grids (rows: variants, columns: seeds) side by side, with a label strip on the left."""
    from PIL import Image, ImageDraw

    files = sorted(glob.glob(os.path.join(eval_dir, "images", "*.png")))[:GRID_PROMPTS]
    tiles = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    if not tiles:
        raise FileNotFoundError(f"HyperAlign: evaluation wrote no images under {eval_dir!r}.")
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    body = np.concatenate([np.concatenate([t, gap], axis=1) for t in tiles], axis=1)
    scale = 4  # toy images are 32 px: enlarge so a person can see them
    body = np.kron(body, np.ones((scale, scale, 1), np.uint8))
    label = Image.new("RGB", (60, body.shape[0]), "white")
    draw, row = ImageDraw.Draw(label), body.shape[0] // len(variants)
    for i, name in enumerate(variants):
        draw.text((6, i * row + row // 2 - 5), name, fill="black")
    grid = np.concatenate([np.asarray(label), body], axis=1)
    path = os.path.join(out, "comparison_grid.png")
    Image.fromarray(grid).save(path)
    return path


def _encode(model_path: str, prompts: list[str]) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder").eval()
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids).last_hidden_state


def _decode(model_path: str, latents: torch.Tensor) -> np.ndarray:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae").eval()
    with torch.no_grad():
        images = vae.decode(latents / vae.config.scaling_factor).sample
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return np.concatenate(list(images), axis=1)


def comfy_image(
    predictor: str, prompt: str, out: str, assets: str = ASSETS, seed: int = 0, steps: int = 10, cfg: float = 5.0
) -> str:
    """Plain vs HyperAlign (mode S) from ComfyUI's own KSampler on the toy model; returns the PNG path."""
    from diffusers import UNet2DConditionModel
    from PIL import Image

    comfy = comfy_host.import_comfy()
    comfy_nodes, folder_paths = comfy.nodes, comfy.folder_paths
    comfy_host.load_pack(comfy_nodes)
    folder_paths.add_model_folder_path("hyperalign", os.path.dirname(os.path.abspath(predictor)))
    model_path = os.path.join(assets, "model")
    model = comfy_model_from_diffusers(UNet2DConditionModel.from_pretrained(model_path, subfolder="unet"))
    embeddings = _encode(model_path, [prompt, ""])
    positive, negative = [[embeddings[:1], {}]], [[embeddings[1:], {}]]
    size = model.model.model_config.unet_config["in_channels"]
    latent = {"samples": torch.zeros(1, size, *_latent_hw(model_path))}
    loaded = comfy_host.run_node(comfy_nodes, "HyperAlignLoader", predictor_name=os.path.basename(predictor))[0]
    patched = comfy_host.run_node(
        comfy_nodes,
        "HyperAlignApply",
        model=model,
        predictor=loaded,
        mode="S",
        strength=1.0,
        start_percent=0.0,
        end_percent=1.0,
        keysteps="",
    )[0]
    sampler = comfy_nodes.KSampler()
    rows = []
    for m in (model, patched):
        (result,) = sampler.sample(m, seed, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0)
        rows.append(_decode(model_path, result["samples"]))
    image = np.kron(np.concatenate(rows, axis=1), np.ones((4, 4, 1), np.uint8))
    path = os.path.join(out, "comfyui_plain_vs_hyperalign.png")
    Image.fromarray(image).save(path)
    return path


def _latent_hw(model_path: str) -> tuple[int, int]:
    import json

    with open(os.path.join(model_path, "unet", "config.json"), encoding="utf-8") as handle:
        size = json.load(handle)["sample_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m toyworld.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's optim.max_steps)")
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts to evaluate (default 24)")
    p.add_argument("--assets", default=ASSETS, help="toy world folder (default: the shipped one)")
    p.add_argument("--skip-comfy", action="store_true", help="do not run the ComfyUI part")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see below)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    assets = os.path.abspath(args.assets)
    if assets == ASSETS and not os.path.isfile(os.path.join(ASSETS, "model", "model_index.json")):
        # the toy world's weights are not shipped yet: build them (deterministic, CPU; slow on 2 cores)
        from .factory import build

        print("== the toy world is not built yet: python -m toyworld.factory.build (this takes a long time on a CPU)")
        if build.main([]):
            raise SystemExit("HyperAlign: building the toy world failed; see the messages above.")
    _check_assets(assets)
    # The toy models are far too small to gain from intra-op threads, and torch's threads spin-wait on
    # each other: with any other busy process on a 2-core machine, two threads made a training step
    # 90x slower (45 s instead of 0.5 s). One thread is the fast and the safe choice here.
    torch.set_num_threads(max(args.threads, 1))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    from training import evaluate, keysteps, train

    common = ["--config", CONFIG, f"run.output_dir={out!r}", "run.name='toy'"]
    if assets != ASSETS:  # a rebuilt world elsewhere: point every path of the config at it
        common += [
            f"model.path={os.path.join(assets, 'model')!r}",
            f"data.path={os.path.join(assets, 'prefs', 'pairs.jsonl')!r}",
            f"data.prompts={os.path.join(assets, 'prompts', 'train.txt')!r}",
        ]
        for i, name in enumerate(("toy_clip", "toy_aesthetic")):  # the order of rewards in toy.yaml
            reward_file = os.path.join(assets, "rewards", name + ".safetensors")
            # eval.metrics lists the two ground-truth columns first (toy.yaml)
            common += [f"rewards.{i}.path={reward_file!r}", f"eval.metrics.{i + 2}.path={reward_file!r}"]
    if args.steps is not None:
        common.append(f"optim.max_steps={args.steps}")
    run_dir = os.path.join(out, "toy")
    _run(keysteps.main, "training.keysteps", common + ["--num", "3", "--samples", "4"], "keysteps")
    _run(train.main, "training.train", common, "training")
    predictor = os.path.join(run_dir, "predictor.safetensors")
    eval_dir = os.path.join(out, "eval")
    subset = _subset(os.path.join(assets, "prompts", "heldout.txt"), args.prompts, out)
    eval_args = common + [
        f"eval.prompts={subset!r}",
        f"eval.out={eval_dir!r}",
        "--predictor",
        predictor,
        "--save-images",
    ]
    _run(evaluate.main, "training.evaluate", eval_args, "evaluation")
    grid = _comparison_grid(eval_dir, out, ["base", "S", "I", "P"])
    outputs = {
        "predictor": predictor,
        "metrics table": os.path.join(eval_dir, "results.md"),
        "metrics json": os.path.join(eval_dir, "results.json"),
        "comparison grid": grid,
    }
    if not args.skip_comfy:
        with open(subset, encoding="utf-8") as handle:
            prompt = handle.readline().strip()
        print(f"\n== ComfyUI: HyperAlignLoader + HyperAlignApply + KSampler on the toy model, prompt {prompt!r}")
        outputs["ComfyUI image (plain | HyperAlign S)"] = comfy_image(predictor, prompt, out, assets)
    print(f"\nHyperAlign demo finished in {time.perf_counter() - start:.0f} s. Outputs:")
    for name, path in outputs.items():
        print(f"  {name:38s} {path}")
    with open(os.path.join(eval_dir, "results.md"), encoding="utf-8") as handle:
        print("\n" + handle.read())
    print(verdicts(os.path.join(eval_dir, "results.json")))
    return 0


def verdicts(results_json: str) -> str:
    """One line per mode: ground truth and the learned rewards, each as its paired difference from base."""
    import json

    with open(results_json, encoding="utf-8") as handle:
        results = json.load(handle)["results"]
    lines = ["Against base, paired by prompt (mean ± standard error):"]
    for mode, row in results.items():
        if "vs_base" not in row:
            continue
        delta = row["vs_base"]
        parts = [f"{n} {delta[n]['mean']:+.3f} ± {delta[n]['se']:.3f}" for n in delta]
        hacked = truth.reward_hacking(delta, [n for n in delta if n not in truth.TRUTH_COLUMNS])
        flag = "  <- REWARD HACKING: a learned reward rises while ground truth falls" if hacked else ""
        lines.append(f"  HyperAlign {mode}: " + ", ".join(parts) + flag)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
