"""Measurement helpers for bench/run.py: interleaved side-by-side timing, training steps, peak memory,
parameters and FLOPs.

Machines running these benchmarks are noisy (shared CPUs), so every figure is a ratio of two things
timed alternately in one process: load that comes and goes slows both sides alike.
"""
from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], Any], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


def interleaved_ratio(
    fn_a: Callable[[], Any], fn_b: Callable[[], Any], repeats: int, warmup: int = 1, clock: str = "wall", label: str = ""
) -> dict[str, float]:
    """time(A)/time(B): ``warmup`` untimed calls of each, then A, B, A, B, ... ``repeats`` times.

    The ratio is the median of the per-pair ratios (each pair ran under nearly the same load);
    medians of the absolute times in seconds are returned for context. ``label``: print progress.
    """
    tick = CLOCKS[clock]
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(fn_a, tick))
        times_b.append(timed(fn_b, tick))
    result = {
        "ratio": statistics.median(a / b for a, b in zip(times_a, times_b)),
        "a_seconds": statistics.median(times_a),
        "b_seconds": statistics.median(times_b),
        "repeats": repeats,
    }
    if label:  # progress on stderr: a full run takes a while
        print(f"{label}: {result['ratio']:.3f} ({result['a_seconds']:.4f} s / {result['b_seconds']:.4f} s)", file=sys.stderr, flush=True)
    return result


LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def training_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn) -> Callable[[], None]:
    """One SGD training step (forward + backward + optimizer) on a fixed batch, as a closure."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), targets).backward()
        optimizer.step()

    return step


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_gflops(model: nn.Module, images: torch.Tensor) -> float:
    """Forward FLOPs in billions, as torch.utils.flop_counter counts them (a multiply-add = 2 FLOPs)."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images)
    return counter.get_total_flops() / 1e9


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux clear_refs 5), so building does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass  # then the peak may include building: an upper bound


def _peak_child(build: Callable[[], Callable[[], None]], steps: int, threads: int, queue: Any) -> None:
    torch.set_num_threads(threads)
    step = build()
    step()  # optimizer state and allocator pools exist from here on, as in training
    _reset_peak()
    baseline = _vm_kib("VmRSS")
    for _ in range(steps):
        step()
    queue.put((_vm_kib("VmHWM") - baseline) * 1024)


def peak_step_memory(build: Callable[[], Callable[[], None]], steps: int = 2, threads: int = 1) -> int:
    """Peak resident memory (bytes) that ``steps`` calls of ``build()``'s step add over the state
    after building and one warm-up step, measured in a fresh process so no allocator cache of earlier runs hides it.

    ``build`` must be a picklable module-level callable (or functools.partial of one).
    """
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_child, args=(build, steps, threads, queue))
    child.start()
    peak = queue.get()
    child.join()
    return peak
