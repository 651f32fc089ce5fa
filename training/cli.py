"""The command line the trainer's tools share: ``--config <preset.yaml>`` plus dotted overrides, ``--check``.

Each tool (``training.train``, ``training.evaluate``, ``training.keysteps``, ``training.cache_latents``) parses with
:func:`parse` and adds its own options; ``--resume`` only where a tool resumes (train). ``--check`` means the same in
every tool: validate the config and every file the tool would read, print the resolved config and the tool's
options as JSON, and exit before any model loads.
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import load_config


def parser(description: str, prog: str, resume: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML preset, e.g. training/configs/sd15.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides key.sub=value (Python literals)")
    if resume:
        p.add_argument("--resume", help="'latest' or a checkpoint folder (same as run.resume=...)")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the config and the files this tool reads, print them as JSON, and exit (no model loads)",
    )
    return p


def parse(argv: list[str] | None, description: str, prog: str, extra=None, resume: bool = False):
    """Config + the parsed arguments. `--key.sub=value` is accepted as an override too.

    Options and overrides may come in any order (`--config a.yaml x=1 --predictor p.safetensors y=2`).
    """
    p = parser(description, prog, resume)
    if extra:
        extra(p)
    args, unknown = p.parse_known_intermixed_args(argv)
    stray = [u for u in unknown if not (u.startswith("--") and "=" in u)]
    if stray:
        p.error(f"unrecognised arguments: {' '.join(stray)}")
    overrides = list(args.overrides) + [u[2:] for u in unknown]
    if getattr(args, "resume", None):
        overrides.append(f"run.resume={args.resume!r}")
    return load_config(args.config, overrides), args


def print_check(cfg, args) -> int:
    """What `--check` prints once the tool has validated its inputs: the config and the tool's own options."""
    shared = {"config", "overrides", "resume", "check"}
    options = {key: value for key, value in sorted(vars(args).items()) if key not in shared}
    print(json.dumps({"config": cfg.to_dict(), "options": options}, indent=2))
    return 0


def cli(entry):
    """Run `entry(argv)`; a HyperAlign error (bad config, missing file) prints as one message, exit status 2."""

    def run(argv: list[str] | None = None) -> int:
        try:
            return entry(argv)
        except (ValueError, FileNotFoundError, ImportError) as err:
            if not str(err).startswith("HyperAlign:"):
                raise
            print(err, file=sys.stderr)
            return 2

    run.__doc__ = entry.__doc__
    return run
