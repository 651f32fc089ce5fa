"""Measuring tools: interleaved timing rounds, peak-memory probes and a per-component breakdown.

Timing: wall clock (with a device sync on CUDA) and, on CPU, the process's CPU time as well, split into
user and system time. On a shared CPU the CPU time of a single-threaded process moves less than wall time
when other processes compete for the cores. Its system part is mostly page faults: oneDNN reorders every
conv weight into fresh memory on every call (about 1.8 GB of faults per SD1.5 step at latent 8, the same
count in every mode), and under contention that kernel time swings by tens of percent between runs, so the
user time is the steadiest measure of the work HyperAlign adds. Ratios are taken within one round.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    wall: float
    cpu: float  # user + system
    user: float


def timed(fn, device: torch.device) -> Timing:
    sync(device)
    wall, before = time.perf_counter(), os.times()
    fn()
    sync(device)
    after = os.times()
    user = after.user - before.user
    return Timing(time.perf_counter() - wall, user + after.system - before.system, user)


@dataclass
class Series:
    """All timings of one configuration, and those of the plain baseline taken in the same rounds."""

    times: list[Timing] = field(default_factory=list)
    plain: list[Timing] = field(default_factory=list)

    def median(self, metric: str) -> float:
        return statistics.median(getattr(t, metric) for t in self.times)

    def ratio(self, metric: str) -> float:
        """Median over rounds of (this config / plain of the same round)."""
        return statistics.median(getattr(t, metric) / getattr(p, metric) for t, p in zip(self.times, self.plain))

    def ratio_spread(self, metric: str) -> float:
        """Half the range of the per-round ratios: the noise on `ratio`."""
        ratios = [getattr(t, metric) / getattr(p, metric) for t, p in zip(self.times, self.plain)]
        return (max(ratios) - min(ratios)) / 2 if len(ratios) > 1 else float("nan")


def interleaved(configs: dict, run, rounds: int, device: torch.device, log=None) -> dict[str, Series]:
    """`rounds` rounds; each runs every config once, in an order rotated per round (no config always first)."""
    names = list(configs)
    series = {name: Series() for name in names}
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        round_times = {name: timed(lambda name=name: run(configs[name]), device) for name in order}
        for name in names:
            series[name].times.append(round_times[name])
            series[name].plain.append(round_times["plain"])
        if log:
            times = ", ".join(f"{n} {round_times[n].wall:.2f}s" for n in names)
            log(f"  round {index + 1}: {times}")
    return series


# ----------------------------------------------------------------------------------------- memory


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so the RSS before a probe is what is really in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler(threading.Thread):
    """Polls the resident set size every millisecond; `peak` is the highest value seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = _rss_bytes()
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, _rss_bytes())


def peak_extra_bytes(fn, device: torch.device) -> int:
    """Peak memory above what was in use when `fn` started: CUDA allocator peak, or sampled RSS on CPU."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _trim_heap()
    before = _rss_bytes()
    sampler = _RssSampler()
    sampler.start()
    try:
        fn()
    finally:
        peak = sampler.stop()
    return peak - before


# ------------------------------------------------------------------------------- where time goes


class Breakdown:
    """Accumulates seconds spent in named functions, patched for the duration of one instrumented run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def wrap(self, name: str, fn):
        def timed_call(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.count[name] = self.count.get(name, 0) + 1

        return timed_call

    @contextmanager
    def patched(self, owner, attribute: str, name: str):
        original = getattr(owner, attribute)
        setattr(owner, attribute, self.wrap(name, original))
        try:
            yield
        finally:
            setattr(owner, attribute, original)


class ModuleTimer:
    """Wall seconds spent inside groups of modules (forward pre-hook to forward hook), by group label."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._started: dict[int, float] = {}

    def _enter(self, module, args):
        sync(self.device)
        self._started[id(module)] = time.perf_counter()

    def _leave(self, label: str, module):
        sync(self.device)
        elapsed = time.perf_counter() - self._started.pop(id(module))
        self.seconds[label] = self.seconds.get(label, 0.0) + elapsed

    @contextmanager
    def timing(self, groups: dict):
        handles = []
        try:
            for label, modules in groups.items():
                for module in modules:
                    handles.append(module.register_forward_pre_hook(self._enter))
                    handles.append(
                        module.register_forward_hook(lambda m, args, out, label=label: self._leave(label, m))
                    )
            yield self
        finally:
            for handle in handles:
                handle.remove()
