"""One-command GPU check: HyperAlign's sampling overhead (fused and hooked) and a training step's peak memory.

    bash scripts/gpu_check.sh [OUT.md]                    # on one CUDA GPU, under 8 minutes
    python benchmarks/gpu_check.py --tiny --device cpu    # the same sections on tiny shapes (the CPU test)

Sections, each independent (an error or an exhausted budget in one leaves the others running), each with its
own time budget, the Markdown report rewritten after every round so partial results survive a hard stop:
- sd15: real SD1.5 UNet (random fp16 weights, built on the GPU), 512 px (latent 64), 20 steps euler, CFG 5,
  batch 1 and 4: plain, then S, P (keysteps 0, 0.3, 0.6) and I each hooked (HYPERALIGN_FUSE=never) and
  fused (always), interleaved rounds; the ratio to plain in the same round; and the cost model's measured
  merge and side-path costs with the path "auto" takes per mode.
- flux: FLUX.1 at real depth (19 double + 38 single blocks, random bf16 weights built on the GPU), 1024 px
  (4096 image tokens, 256 T5 tokens), 20 steps, guidance 3.5 without negative (FLUX.1-dev's use), batch 1.
- train_sd15, train_flux: peak GPU memory of one step of the trainer's reward objective
  (training.loop.reward_loss, then backward and an optimiser step) at real size with random weights.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.machinery
import os
import platform
import sys
import time
import traceback
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(REPO_ROOT))  # after ComfyUI's path: its nodes.py must win over this repo's nodes/

SECTIONS = ("sd15", "train_sd15", "train_flux", "flux")  # the longest last: it takes what time is left
MODES = {"S": "", "P": "0, 0.3, 0.6", "I": ""}
POLICIES = {"hooked": "never", "fused": "always"}
MB, GB = 2**20, 2**30
DEFAULT_OUT = REPO_ROOT / "outputs" / "gpu_check.md"
# seconds per section on an H200 within the 8-minute cap (start-up, about 30 s, comes first)
BUDGETS = {"sd15": 110, "flux": 200, "train_sd15": 40, "train_flux": 70}


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("HYPERALIGN_GPU_CHECK_OUT", str(DEFAULT_OUT)))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="tiny models (tests/nodes' and tests/training's): a CPU test")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    p.add_argument("--total-s", type=float, default=440, help="stop starting work after this many seconds in all")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-rounds", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=None, help="sampling batch sizes (default: per family)")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or the test host)")
    p.add_argument("--fail", default=None, help=argparse.SUPPRESS)  # tests: this section raises, the others run
    return p.parse_args(argv)


class Report:
    """The Markdown report: a header and one block per section, rewritten atomically after every update."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.header, self.blocks = Path(path), header, {}

    def update(self, section: str, lines: list[str]) -> None:
        self.blocks[section] = lines
        self.write()

    def write(self) -> None:
        from hyperalign.atomic import atomic_path

        text = "\n".join(self.header + [line for block in self.blocks.values() for line in ["", *block]]) + "\n"
        with atomic_path(self.path) as tmp, open(tmp, "w") as handle:
            handle.write(text)


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.used()


# ------------------------------------------------------------------------------------------ the host


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import-only stand-ins for host dependencies the check never calls (PyAV: ComfyUI's video types import it at
    module level). Attributes are placeholder classes; nothing here runs video code."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: type(attr, (), {}) if not attr.startswith("__") else None
        return module

    def exec_module(self, module):
        pass


def install_stand_ins() -> list[str]:
    missing = []
    for name in ("av",):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.meta_path.insert(0, _StandIn(set(missing)))
    return missing


def start(args, device: torch.device):
    import bench_models as models
    import overhead

    host = models.start_host(args.comfyui, device.type)
    overhead.install_ui_recorder()
    return host


# ------------------------------------------------------------------------------------- the worlds


class RealWorld:
    """Full-size models with random weights, built on the device (bench_models)."""

    def __init__(self, host, device):
        import bench_models as models

        self.host, self.device, self.models = host, device, models

    def sampling_spec(self, family: str) -> dict:
        if family == "sd15":
            return dict(dtype=torch.float16, latent=64, batches=[1, 4], cfg=5.0, tokens=77, scheduler="normal")
        return dict(dtype=torch.bfloat16, latent=128, batches=[1], cfg=1.0, tokens=256, scheduler="simple")

    def model_and_predictor(self, family: str, spec: dict):
        depth = (19, 38) if family == "flux" else (2, 1)
        model, arch = self.models.build_model(self.host, family, spec["dtype"], depth)
        name, _, _ = self.models.save_random_predictor(self.host, family, arch, f"gpu_check_{family}.safetensors")
        return model, name

    def inputs(self, family: str, batch: int, spec: dict):
        latent = self.models.empty_latent(family, batch, spec["latent"])
        positive = self.models.conditioning(family, batch, 1, spec["tokens"], self.device)
        negative = self.models.conditioning(family, 1, 2, spec["tokens"], self.device)
        return latent, positive, negative


class TinyWorld(RealWorld):
    """tests/nodes' tiny models and predictors (fp32): the same code paths, in seconds on a CPU."""

    def __init__(self, host, device):
        super().__init__(host, device)
        sys.path.insert(0, str(REPO_ROOT / "tests" / "nodes"))
        import comfy_testlib
        from testing_pack import tiny

        self.tiny, self.testlib = tiny, comfy_testlib

    def sampling_spec(self, family: str) -> dict:
        return dict(dtype=torch.float32, latent=8, batches=[1, 2], cfg=5.0 if family == "sd15" else 1.0, tokens=7,
                    scheduler="normal" if family == "sd15" else "simple")  # fmt: skip

    def model_and_predictor(self, family: str, spec: dict):
        import hyperalign

        name = f"gpu_check_tiny_{family}.safetensors"
        hyperalign.save_predictor(self.host.models_dir / name, self.testlib.build_predictor(self.tiny, family, 1))
        return self.tiny.build_model(family, seed=0), name

    def inputs(self, family: str, batch: int, spec: dict):
        latent = self.tiny.empty_latent(family, batch)["samples"]
        return latent, self.tiny.conditioning(family, batch, 1), self.tiny.conditioning(family, 1, 99)


# -------------------------------------------------------------------------------------- sampling


def _ratio_cell(times: list[float], plain: list[float]) -> str:
    ratios = [t / p for t, p in zip(times, plain)]
    median = sorted(ratios)[len(ratios) // 2]
    spread = f" ± {(max(ratios) - min(ratios)) / 2:.3f}" if len(ratios) > 1 else ""
    return f"{median:.3f}{spread}"


def sampling_section(host, world, family: str, args, device, budget: Budget, report: Report) -> None:
    import bench_measure as bm

    fuse = host.submodule("nodes.fuse")
    fusecost = host.submodule("hyperalign.fusecost")
    spec = world.sampling_spec(family)
    spec["batches"] = args.batches or spec["batches"]
    lines = [f"## Sampling overhead: {family} (section `{family}`)", ""]
    report.update(family, lines + ["(started, no results yet)"])
    started = time.perf_counter()
    model, name = world.model_and_predictor(family, spec)
    loaded = host.node("HyperAlignLoader", predictor_name=name)[0]
    patched = {
        mode: host.node(
            "HyperAlignApply", model=model, predictor=loaded, mode=mode, strength=1.0, start_percent=0.0,
            end_percent=1.0, keysteps=keysteps,
        )[0]
        for mode, keysteps in MODES.items()
    }  # fmt: skip
    configs = {"plain": (model, None)}
    for mode in MODES:
        for label, policy in POLICIES.items():
            configs[f"{mode} {label}"] = (patched[mode], policy)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    latent_px = spec["latent"] * 8
    lines += [
        f"{params / 1e9:.2f} B parameters, {str(spec['dtype']).removeprefix('torch.')}, {latent_px} px "
        f"(latent {spec['latent']}), {args.steps} steps euler, CFG {spec['cfg']:g}, {len(loaded.predictor.targets)} "
        f"targets; built in {time.perf_counter() - started:.0f} s",
        "",
    ]
    log(f"{family}: model built ({params / 1e9:.2f} B parameters) in {time.perf_counter() - started:.0f} s")
    sample = host.comfy.sample.sample

    def sampler(batch: int, steps: int):
        latent, positive, negative = world.inputs(family, batch, spec)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))

        def run(config: str):
            target, policy = configs[config]
            if policy is not None:
                fuse.FUSE = policy
            return sample(
                target, noise, steps, spec["cfg"], "euler", spec["scheduler"], positive, negative, latent, seed=0,
                disable_pbar=True,
            )  # fmt: skip

        return run

    costs_lines = []
    for position, batch in enumerate(spec["batches"]):
        if budget.left() <= 0:
            lines.append(f"batch {batch}: skipped, the section's time budget ({budget.seconds:.0f} s) is spent")
            break
        share = Budget(budget.left() / (len(spec["batches"]) - position))  # each batch size gets its turn
        warm = sampler(batch, 2)
        for config in configs:
            warm(config)
        fuse._COSTS.pop(model.model.diffusion_model, None)
        sample_auto(warm, configs, fuse)  # the cost model's own measurement, on this model and call shape
        costs = dict(fuse._COSTS.get(model.model.diffusion_model, {}))
        costs_lines += _costs_lines(fusecost, costs, batch, spec, args.steps) or [
            f"- Cost model, batch {batch}: not consulted (rows of several samples per call: hooks; 'fused' then "
            "means the same hooks)"
        ]
        run = sampler(batch, args.steps)
        times: dict[str, list] = {config: [] for config in configs}
        round_seconds = 0.0
        for index in range(args.max_rounds):
            if index and share.left() < round_seconds * 1.1:
                break
            order = list(configs)[index % len(configs) :] + list(configs)[: index % len(configs)]
            begun = time.perf_counter()
            for config in order:
                times[config].append(bm.timed(lambda config=config: run(config), device).wall)
            round_seconds = time.perf_counter() - begun
            log(f"{family} batch {batch} round {index + 1}: {round_seconds:.1f} s")
            lines_now = lines + _table(times, batch) + [""] + costs_lines
            report.update(family, lines_now)
        lines = lines + _table(times, batch) + [""]
    fuse.FUSE = "auto"
    report.update(family, lines + costs_lines)
    configs.clear()  # the models go with the section: ComfyUI lets go of them too
    host.comfy.mm.unload_all_models()
    host.comfy.mm.soft_empty_cache()


def sample_auto(warm, configs, fuse) -> None:
    """One short I-mode run under the auto policy: its first model call measures both paths' costs."""
    target, _ = configs["I hooked"]
    fuse.FUSE = "auto"
    configs["I auto"] = (target, "auto")
    try:
        warm("I auto")
    finally:
        del configs["I auto"]


def _costs_lines(fusecost, costs: dict, batch: int, spec: dict, steps: int) -> list[str]:
    lines = []
    for (device, shape, dtype), cost in costs.items():
        served = {
            mode: fusecost.steps_served(mode, [float(k) for k in keys.split(",")] if keys else [0.0], progress, 0)
            for mode, keys in MODES.items()
            for progress in [[i / steps for i in range(steps + 1)]]
        }  # P: the first segment (progress taken as linear here; ComfyUI's schedules bend it)
        picks = ", ".join(
            f"{mode} ({n} calls) {'fused' if fusecost.merge_pays(cost, n) else 'hooked'}" for mode, n in served.items()
        )
        lines.append(
            f"- Cost model, batch {batch} (call {list(shape)}): merge {cost.merge_seconds * 1e3:.2f} ms, side paths "
            f"{cost.side_seconds * 1e3:.3f} ms per call, break-even {cost.break_even():.1f} calls; auto picks: {picks}"
        )
    return lines


def _table(times: dict, batch: int) -> list[str]:
    plain = times["plain"]
    if not plain:
        return [f"batch {batch}: no complete round"]
    rounds = len(plain)
    lines = [
        f"batch {batch}, {rounds} round(s), wall s/image (median) and ratio to plain in the same round (± half range)"
        + (" (several samples per call: 'fused' runs the hooks too):" if batch > 1 else ":"),
        "",
        "| mode | hooked s/image | hooked ratio | fused s/image | fused ratio |",
        "|---|---|---|---|---|",
        f"| plain | {sorted(plain)[rounds // 2] / batch:.3f} | 1 | | |",
    ]
    for mode in MODES:
        cells = []
        for label in POLICIES:
            series = times[f"{mode} {label}"][:rounds]
            cells.append(f"{sorted(series)[len(series) // 2] / batch:.3f} | {_ratio_cell(series, plain)}")
        lines.append(f"| {mode} | {' | '.join(cells)} |")
    return lines


# -------------------------------------------------------------------------------------- training


def training_section(family: str, args, device, budget: Budget, report: Report) -> None:
    import train_memory

    section = f"train_{family}"
    report.update(section, [f"## Training step peak memory: {family} (section `{section}`)", "", "(started)"])
    lines = train_memory.measure(family, device, tiny=args.tiny, log=log)
    report.update(section, [f"## Training step peak memory: {family} (section `{section}`)", "", *lines])


# ------------------------------------------------------------------------------------------ main


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = f"{props.name}, {props.total_memory / GB:.0f} GiB"
    else:
        what = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch threads"
    return f"{what}; torch {torch.__version__}; python {platform.python_version()}"


def main(argv=None) -> int:
    args = parse_args(argv)
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(want)
    total = Budget(args.total_s)
    stand_ins = install_stand_ins()
    header = [
        "# HyperAlign GPU check" + (" (tiny shapes: a test of the script, not a measurement)" if args.tiny else ""),
        "",
        f"Machine: {machine(device)}",
        f"Command: python benchmarks/gpu_check.py {' '.join(sys.argv[1:] if argv is None else argv)}",
        f"Started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
        + (f"; import-only stand-ins for {', '.join(stand_ins)}" if stand_ins else ""),
    ]
    report = Report(Path(args.out), header)
    report.write()
    log(f"writing {args.out}; device {device}; sections {' '.join(args.sections)}")
    host = None
    failures = 0
    for section in args.sections:
        budget = Budget(min(BUDGETS[section] * args.budget_scale, total.left() - 10))
        if budget.seconds < 20:
            log(f"section {section} skipped: {total.left():.0f} s left of --total-s {args.total_s:.0f}")
            report.update(section, [f"## {section}: skipped, {total.left():.0f} s left of {args.total_s:.0f} s"])
            continue
        log(f"section {section} (budget {budget.seconds:.0f} s)")
        try:
            if section == args.fail:
                raise RuntimeError(f"section {section} failed on request (--fail)")
            if section in ("sd15", "flux"):
                if host is None:
                    host = start(args, device)
                world = (TinyWorld if args.tiny else RealWorld)(host, device)
                sampling_section(host, world, section, args, device, budget, report)
            else:
                training_section(section.removeprefix("train_"), args, device, budget, report)
            log(f"section {section} done in {budget.used():.0f} s")
        except Exception as err:  # one section's failure must not cost the others
            failures += 1
            log(f"section {section} FAILED: {type(err).__name__}: {err}")
            detail = traceback.format_exc().strip().splitlines()[-6:]
            report.update(section, [f"## {section}: failed", "", "```", *detail, "```"])
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report.header.append(f"Finished in {total.used():.0f} s; {failures} section(s) failed")
    report.write()
    log(f"done in {total.used():.0f} s: {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown: ComfyUI's ModelPatcher.__del__ fails noisily once modules are gone
