"""HyperAlign's sampling overhead against plain sampling, on the real ComfyUI (see docs/performance.md).

    python benchmarks/overhead.py                                   # SD1.5 + FLUX-shaped, the defaults below
    python benchmarks/overhead.py --family sd15 --steps 20 --batch 1 4 --latent 16 --runs 3
    python benchmarks/overhead.py --family sdxl --steps 8 --batch 1 --latent 8 --runs 1   # the real SDXL UNet

In one process: plain sampling (comfy.sample.sample, euler) and the same model patched by the
HyperAlign Apply node in modes S, P (keysteps 0, 0.3, 0.6) and I, interleaved, after a warm-up.
Prints Markdown tables: seconds per image (median), the ratio to plain taken round by round,
hypernet calls, extra peak memory; then where the time goes (one instrumented run per mode), the
FLUX-shaped ratios carried to FLUX.1's real depth, and the hypernet's size for the real-size configs.
Runs on CUDA when present (--device). --fuse never keeps the forward-hook path everywhere; --fuse always merges
at batch 1 wherever a layer allows it (the default, auto, merges where the cost model says it pays).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(REPO_ROOT))  # after ComfyUI's path: its nodes.py must win over this repo's nodes/

import bench_measure as bm  # noqa: E402
import bench_models as models  # noqa: E402

from training.comfy_host import comfyui_path  # noqa: E402

MODES = {"S": "", "P": "0, 0.3, 0.6", "I": ""}
MB = 1024 * 1024
log = print


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", nargs="+", default=["sd15", "flux"], choices=["sd15", "sdxl", "flux"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--runs", type=int, default=3, help="timed rounds per configuration (after one warm-up)")
    p.add_argument("--latent", type=int, default=16, help="SD1.5 and SDXL latent side (16 = 128 px)")
    p.add_argument("--flux-latent", type=int, default=8, help="FLUX latent side (8 = 64 px = 16 image tokens)")
    p.add_argument("--flux-tokens", type=int, default=16, help="FLUX T5 tokens (ComfyUI pads real prompts to 256)")
    p.add_argument(
        "--flux-blocks", type=int, nargs=2, default=[2, 1], metavar=("DOUBLE", "SINGLE"), help="FLUX-shaped depth"
    )
    p.add_argument("--cfg", type=float, default=5.0, help="SD1.5 and SDXL CFG scale")
    p.add_argument("--flux-cfg", type=float, nargs="+", default=[3.5], help="FLUX CFG scales (1 = no negative)")
    p.add_argument("--flux-batch", type=int, nargs="+", default=None, help="FLUX batch sizes (default: --batch)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--memory-steps", type=int, default=4, help="steps of the one untimed run per config probing memory")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--breakdown-batch", type=int, nargs="+", default=[1], help="batch sizes of the instrumented runs")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="modes timed against plain")
    p.add_argument("--breakdown-modes", nargs="+", default=["S", "P", "I"], choices=list(MODES))
    p.add_argument(
        "--fuse", choices=["auto", "always", "never"], default=None, help="LoRA fusing policy (default: the nodes')"
    )
    p.add_argument("--no-fuse", action="store_true", help="= --fuse never: the forward-hook path everywhere")
    p.add_argument("--fuse-modes", nargs="+", default=None, choices=list(MODES), help="modes that fuse at batch 1")
    p.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or the test host)")
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    return p.parse_args(argv)


class FamilyBench:
    """One family's model, predictor and patched models, and the measurements on them."""

    def __init__(self, host, family: str, args, device: torch.device, dtype: torch.dtype):
        self.host, self.family, self.args, self.device = host, family, args, device
        started = time.perf_counter()
        self.model, arch = models.build_model(host, family, dtype, tuple(args.flux_blocks))
        name, self.params, self.file_bytes = models.save_random_predictor(
            host, family, arch, f"bench_{family}.safetensors"
        )
        self.loaded = host.node("HyperAlignLoader", predictor_name=name)[0]
        self.configs = {"plain": self.model}
        for mode, keysteps in ((m, MODES[m]) for m in args.modes):
            self.configs[mode] = host.node(
                "HyperAlignApply",
                model=self.model,
                predictor=self.loaded,
                mode=mode,
                strength=1.0,
                start_percent=0.0,
                end_percent=1.0,
                keysteps=keysteps,
            )[0]
        weights = sum(p.numel() for p in self.model.model.diffusion_model.parameters())
        log(f"{family}: model {weights / 1e6:.1f} M parameters, built in {time.perf_counter() - started:.0f} s")
        unet = family in models.UNETS
        self.latent = args.latent if unet else args.flux_latent
        self.tokens = 77 if unet else args.flux_tokens
        self.scheduler = "normal" if unet else "simple"

    def sampler(self, batch: int, cfg: float, steps: int):
        latent = models.empty_latent(self.family, batch, self.latent)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        positive = models.conditioning(self.family, batch, 1, self.tokens, self.device)
        negative = models.conditioning(self.family, 1, 2, self.tokens, self.device)
        sample = self.host.comfy.sample.sample

        def run(model):
            return sample(
                model, noise, steps, cfg, "euler", self.scheduler, positive, negative, latent, seed=0, disable_pbar=True
            )

        return run

    def time_all(self, batch: int, cfg: float) -> list[dict]:
        args = self.args
        log(
            f"{self.family} batch {batch} cfg {cfg}: warm-up, then {args.runs} interleaved rounds of {args.steps} steps"
        )
        warm = self.sampler(batch, cfg, 2)
        for model in self.configs.values():
            warm(model)
        sample = self.sampler(batch, cfg, args.steps)
        calls = {}

        def run(model):  # also counts the hypernet calls the nodes report to the UI
            UI.clear()
            sample(model)
            calls[id(model)] = sum(len(d["calls"]) for e, d in UI if e == "hyperalign.run")

        series = bm.interleaved(self.configs, run, args.runs, self.device, log)
        memory = {}
        if not args.no_memory:
            probe = self.sampler(batch, cfg, args.memory_steps)
            for name, model in self.configs.items():
                memory[name] = bm.peak_extra_bytes(lambda model=model: probe(model), self.device)
        rows = []
        for name, s in series.items():
            rows.append(
                dict(
                    family=self.family,
                    batch=batch,
                    cfg=cfg,
                    mode=name,
                    wall=s.median("wall") / batch,
                    cpu=s.median("cpu") / batch,
                    ratio_wall=s.ratio("wall"),
                    spread_wall=s.ratio_spread("wall"),
                    ratio_cpu=s.ratio("cpu"),
                    spread_cpu=s.ratio_spread("cpu"),
                    ratio_user=s.ratio("user"),
                    spread_user=s.ratio_spread("user"),
                    calls=calls[id(self.configs[name])],
                    extra_mb=(memory[name] - memory["plain"]) / MB if memory else float("nan"),
                )
            )
        return rows

    def breakdown(self, batch: int, cfg: float, modes: list[str]) -> list[dict]:
        """Instrumented runs: one plain (with the time inside each kind of block), then one per mode with
        the seconds per step in the encoder, the hypernet, the UI statistics, binding, merging and the
        LoRA side path."""
        run = self.sampler(batch, cfg, self.args.steps)
        plain, blocks = self._plain_with_blocks(run)
        return [self._instrumented(run, mode, plain, blocks, batch, cfg) for mode in modes]

    def _plain_with_blocks(self, run) -> tuple[float, dict]:
        diffusion_model = self.model.model.diffusion_model
        groups = {}
        if self.family == "flux":
            groups = {"double": list(diffusion_model.double_blocks), "single": list(diffusion_model.single_blocks)}
        timer = bm.ModuleTimer(self.device)
        with timer.timing(groups):
            plain = bm.timed(lambda: run(self.model), self.device).wall
        steps = self.args.steps
        per_block = {label: timer.seconds.get(label, 0.0) / steps / len(mods) for label, mods in groups.items()}
        return plain / steps, per_block

    def _instrumented(self, run, mode: str, plain_step: float, blocks: dict, batch: int, cfg: float) -> dict:
        pack = self.host
        encoders = pack.submodule("nodes.encoders")
        runtime = pack.submodule("hyperalign.runtime")
        lora = pack.submodule("hyperalign.lora")
        hypernet = self.loaded.predictor.hypernet
        b = bm.Breakdown(self.device)
        candidates = [
            (encoders, "perception_features", "encoder"),
            (runtime, "factor_stats", "factor_stats"),
            (lora.LoRAState, "bind", "bind"),
            (lora, "merge_weights", "merge W + s·up·down"),
            (lora, "lora_delta", "side path (lora_delta)"),
        ]
        patches = [c for c in candidates if hasattr(c[0], c[1])]
        hypernet.forward = b.wrap("hypernet", hypernet.forward)
        try:
            with _all(b.patched(*p) for p in patches):
                total = bm.timed(lambda: run(self.configs[mode]), self.device).wall
        finally:
            del hypernet.forward
        steps = self.args.steps
        parts = {name: seconds / steps for name, seconds in b.seconds.items()}
        return dict(
            family=self.family,
            batch=batch,
            cfg=cfg,
            mode=mode,
            plain_step=plain_step,
            total_step=total / steps,
            parts=parts,
            counts=dict(b.count),
            blocks=blocks,
            targets=len(self.loaded.predictor.targets),
        )


class _all:
    """Enter several context managers (contextlib.ExitStack without the ceremony)."""

    def __init__(self, managers):
        self.managers = list(managers)

    def __enter__(self):
        for m in self.managers:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self.managers):
            m.__exit__(*exc)


class _Recorder(list):
    def send_sync(self, event, data, sid=None):
        self.append((event, data))


UI = _Recorder()


def install_ui_recorder() -> None:
    """A stand-in PromptServer: the nodes then send their per-step statistics as in a real ComfyUI."""
    sys.modules["server"] = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=UI))


# ----------------------------------------------------------------------------------------- report


def timing_table(rows: list[dict], cpu_metric: bool) -> str:
    head = "| model | batch | cfg | mode | s/image (wall) | ratio (wall) |"
    sep = "|---|---|---|---|---|---|"
    if cpu_metric:
        head += " s/image (CPU) | ratio (CPU) | ratio (user CPU) |"
        sep += "---|---|---|"
    head += " hypernet calls | extra peak MB |"
    sep += "---|---|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['family']} | {r['batch']} | {r['cfg']:g} | {r['mode']} | {r['wall']:.3f} | "
            f"{r['ratio_wall']:.3f} ± {r['spread_wall']:.3f} |"
        )
        if cpu_metric:
            line += f" {r['cpu']:.3f} | {r['ratio_cpu']:.3f} ± {r['spread_cpu']:.3f} |"
            line += f" {r['ratio_user']:.3f} ± {r['spread_user']:.3f} |"
        line += f" {r['calls']} | {r['extra_mb']:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def breakdown_table(info: dict) -> str:
    plain = info["plain_step"]
    lines = [
        f"{info['family']}, batch {info['batch']}, cfg {info['cfg']:g}, mode {info['mode']}, seconds per step "
        "(instrumented run: device syncs around each part, so the total is a little above the timed runs):",
        "",
        "| part | s/step | share of a plain step | calls |",
        "|---|---|---|---|",
        f"| plain step | {plain:.4f} | 100.0 % | |",
        f"| HyperAlign step | {info['total_step']:.4f} | {100 * info['total_step'] / plain:.1f} % | |",
    ]
    for name, seconds in info["parts"].items():
        lines.append(f"| {name} | {seconds:.4f} | {100 * seconds / plain:.1f} % | {info['counts'][name]} |")
    rest = info["total_step"] - plain - sum(info["parts"].values())
    lines.append(f"| rest (hooks, wrappers, scheduling, noise) | {rest:.4f} | {100 * rest / plain:.1f} % | |")
    return "\n".join(lines)


REAL_FLUX_BLOCKS = (19, 38)  # FLUX.1 double and single blocks
REAL_FLUX_TARGETS = 266  # the real FLUX.1 attn preset (scripts/model_sizes.py)


def flux_extrapolation(rows: list[dict], infos: list[dict], args) -> str:
    """The FLUX-shaped ratios carried to FLUX.1's real depth, from this run's own numbers.

    A plain step at real depth adds the measured seconds of the missing double and single blocks (instrumented
    plain run). A mode's extra seconds per step at real depth are the encoder's (fixed: the same embedders and
    double blocks at any depth) plus the other instrumented parts (hypernet, statistics, binding, merging,
    side paths), which grow with the number of targets; the unattributed rest is left out (it is mostly noise).
    """
    double, single = args.flux_blocks
    lines = [
        f"FLUX-shaped measured at {double} double + {single} single blocks, carried to FLUX.1's "
        f"{REAL_FLUX_BLOCKS[0]} + {REAL_FLUX_BLOCKS[1]} blocks ({REAL_FLUX_TARGETS} targets):",
        "",
        "| batch | cfg | mode | plain s/step measured | plain s/step real depth | extra s/step measured "
        "| encoder s/step | other parts s/step | extra s/step real depth | ratio measured | ratio real depth |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(i["batch"], i["cfg"], i["mode"]): i for i in infos if i["family"] == "flux"}
    for row in rows:
        info = by_key.get((row["batch"], row["cfg"], row["mode"]))
        if row["family"] != "flux" or info is None:
            continue
        plain = row["wall"] / row["ratio_wall"] * row["batch"] / args.steps
        blocks = info["blocks"]
        real_plain = (
            plain
            + (REAL_FLUX_BLOCKS[0] - double) * blocks["double"]
            + (REAL_FLUX_BLOCKS[1] - single) * blocks["single"]
        )
        extra = (row["ratio_wall"] - 1.0) * plain
        encoder = info["parts"].get("encoder", 0.0)
        others = sum(seconds for name, seconds in info["parts"].items() if name != "encoder")
        real_extra = encoder + others * REAL_FLUX_TARGETS / info["targets"]
        real_ratio = 1 + real_extra / real_plain
        lines.append(
            f"| {row['batch']} | {row['cfg']:g} | {row['mode']} | {plain:.3f} | {real_plain:.3f} | {extra:.4f} | "
            f"{encoder:.4f} | {others:.4f} | {real_extra:.4f} | {row['ratio_wall']:.3f} | {real_ratio:.3f} |"
        )
    return "\n".join(lines)


def sizes_table(benches: list[FamilyBench], args) -> str:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import model_sizes

    lines = [
        "| predictor | targets | parameters | file fp32 MB | file bf16 MB |",
        "|---|---|---|---|---|",
    ]
    for family in ("sd15", "sdxl", "flux"):
        row = model_sizes.measure(family, None, models.hypernet_config(family).rank, "attn")
        lines.append(
            f"| {family} real size (scripts/model_sizes.py) | {row.targets} | {row.params / 1e6:.2f} M | "
            f"{row.file_fp32_mb:.1f} | {row.file_bf16_mb:.1f} |"
        )
    for bench in benches:
        double, single = args.flux_blocks
        shape = {"sd15": "real SD1.5", "sdxl": "real SDXL"}.get(bench.family, f"FLUX-shaped {double}+{single} blocks")
        lines.append(
            f"| benchmark {bench.family} ({shape}), as saved | {len(bench.loaded.predictor.targets)} | "
            f"{bench.params / 1e6:.2f} M | {bench.file_bytes / MB:.1f} | |"
        )
    return "\n".join(lines)


def cost_lines(fuse, family: str, model) -> list[str]:
    """What the auto policy measured on this model (nodes/fuse.py), per call shape: its merge and side-path costs."""
    lines = []
    for (device, shape, _dtype), cost in fuse._COSTS.get(model.model.diffusion_model, {}).items():
        lines.append(
            f"Cost model, {family} on {device}, call {list(shape)}: merge {cost.merge_seconds * 1e3:.1f} ms, side "
            f"paths {cost.side_seconds * 1e3:.2f} ms per call: merging pays after {cost.break_even():.1f} calls"
        )
    return lines


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        what = f"{cpu} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{what}; torch {torch.__version__}; python {platform.python_version()}"


def code_version() -> str:
    """The commit measured, marked dirty when the code the benchmark runs differs from it."""
    import subprocess

    def git(*command):
        return subprocess.run(["git", *command], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "nodes", "hyperalign", "benchmarks")
    return commit + (" (with uncommitted changes)" if dirty else "")


def fusing_state(host, args) -> str:
    fuse = host.submodule("nodes.fuse")
    policy = fuse.policy()
    if policy == "never":
        return "off (--fuse never)"
    where = "where the cost model says it pays (auto)" if policy == "auto" else "always"
    return f"{where}, at batch 1 in modes {', '.join(fuse.FUSE_MODES)}"


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(want)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    started = time.perf_counter()
    host = models.start_host(args.comfyui, want)
    install_ui_recorder()
    fuse = host.submodule("nodes.fuse")
    if args.no_fuse:
        args.fuse = "never"
    if args.fuse is not None:
        fuse.FUSE = args.fuse
    if args.fuse_modes is not None:
        fuse.FUSE_MODES = tuple(args.fuse_modes)
    rows, infos, benches, costs = [], [], [], []
    for family in args.family:
        bench = FamilyBench(host, family, args, device, dtype)
        benches.append(bench)
        batches = args.flux_batch if (family == "flux" and args.flux_batch) else args.batch
        cfgs = [args.cfg] if family in models.UNETS else args.flux_cfg
        for batch in batches:
            for cfg in cfgs:
                rows += bench.time_all(batch, cfg)
        if not args.no_breakdown:
            for batch in args.breakdown_batch:
                infos += bench.breakdown(batch, cfgs[-1], [m for m in args.breakdown_modes if m in args.modes])
        costs += cost_lines(fuse, family, bench.model)
        bench.model = bench.configs = None  # free the model before the next family
        gc.collect()
    extrapolation = [flux_extrapolation(rows, infos, args), ""] if "flux" in args.family and infos else []
    report = [
        f"Machine: {machine(device)}; ComfyUI at {comfyui_path(args.comfyui)}",
        f"Code: {code_version()}",
        f"Command: python benchmarks/overhead.py {' '.join(sys.argv[1:])}",
        f"Steps {args.steps}, euler; SD1.5/SDXL latent {args.latent}x{args.latent}; FLUX-shaped "
        f"{args.flux_blocks[0]} double + {args.flux_blocks[1]} single blocks, "
        f"latent {args.flux_latent}x{args.flux_latent}, "
        f"{args.flux_tokens} T5 tokens; {args.dtype}; fusing {fusing_state(host, args)}; "
        f"total wall time {time.perf_counter() - started:.0f} s",
        "",
        timing_table(rows, device.type == "cpu"),
        "",
        *[breakdown_table(info) + "\n" for info in infos],
        *extrapolation,
        *costs,
        "",
        sizes_table(benches, args),
    ]
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: ComfyUI's ModelPatcher.__del__ fails noisily once modules are gone
