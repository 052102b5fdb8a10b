"""The machine's compute ceiling, for the speed targets: how fast a workload could run at best here.

A speed target is a ratio against something measured in the same run (Ray, ByzFL). Whether it can
hold at all depends on how much of the reference's time is compute that no engine can skip: a
workload of F FLOPs takes at least F / peak seconds, so no implementation can be more than
``reference_seconds / (F / peak)`` times faster than the reference. This module measures ``peak`` as
the best dense float32 matrix product (``torch.mm`` of two 2048 x 2048 matrices, the kernel that
runs fastest on a CPU; convolutions and small matrices run slower) with torch's threads, and counts
a model's FLOPs with torch's own ``FlopCounterMode`` (matrix products and convolutions, forward and
backward), so the figures are measured, not taken from a datasheet.

    python benchmarks/ceiling.py        # one JSON line: the peak and the FLOPs of the benchmarks' models
"""

from __future__ import annotations

import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

GEMM_SIDE = 2048  # 17 GFLOP per product: long enough to time, small enough to repeat
GEMM_REPEATS = 7  # the best of these: the others lost time to the rest of the machine


def gemm_peak_gflops(side: int = GEMM_SIDE, repeats: int = GEMM_REPEATS) -> float:
    """Best float32 ``torch.mm`` throughput of this process (GFLOP/s), with torch's current threads."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(side, side, generator=generator)
    b = torch.randn(side, side, generator=generator)
    a @ b  # warm-up: the thread pool and the allocator
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * side ** 3 / best / 1e9


def model_flops(model: torch.nn.Module, images: torch.Tensor, backward: bool) -> int:
    """FLOPs of one forward pass (and the backward pass too with ``backward``) of ``model`` on the
    float images ``images`` [B, C, H, W] with a cross-entropy loss, as torch counts them."""
    labels = torch.zeros(images.shape[0], dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        if backward:
            torch.nn.functional.cross_entropy(model(images), labels).backward()
        else:
            with torch.no_grad():
                model(images)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def ceiling(total_gflop: float, peak: float, reference_seconds: float | None = None) -> dict:
    """The least seconds ``total_gflop`` can take at ``peak`` GFLOP/s, and, given the reference's
    measured seconds, the largest speed-up over it that any implementation could reach here."""
    least = total_gflop / peak
    out = {"gflop": round(total_gflop, 1), "seconds_at_peak": round(least, 1)}
    if reference_seconds is not None:
        out["max_possible_speedup"] = round(reference_seconds / least, 2)
    return out


def main() -> None:
    from fedepic.models import build_classifier

    peak = gemm_peak_gflops()
    per_image = {}
    for name in ("mlp", "cnn", "cnn_mnist"):
        model = build_classifier(name, 10, 1, 28, [0.5], [0.5])
        images = torch.rand(64, 1, 28, 28)
        per_image[name] = {"train_mflop": round(model_flops(model, images, True) / 64 / 1e6, 3),
                           "eval_mflop": round(model_flops(model, images, False) / 64 / 1e6, 3)}
    print(json.dumps({"benchmark": "ceiling", "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "gemm_peak_gflops": round(peak, 1), "per_image_28x28": per_image,
                      "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
