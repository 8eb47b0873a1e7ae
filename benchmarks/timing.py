"""Wall time per call of a function, with a warm-up call and CUDA synchronisation (benchmarks' helper)."""
from __future__ import annotations

import time

import torch


def seconds_per_call(fn, repeats: int, device: torch.device) -> float:
    """Mean wall seconds of ``fn()`` over ``repeats`` calls after one untimed warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats
