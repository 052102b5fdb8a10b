"""benchmarks/ceiling.py: the FLOP counts behind the speed targets' ceilings, checked by hand."""

from __future__ import annotations

import pytest
import torch

from benchmarks.ceiling import ceiling, gemm_peak_gflops, model_flops
from fedepic.models import build_classifier


def test_mlp_flops_are_its_matrix_products():
    """Forward: 2 multiply-adds per weight and image. Backward: the weights' gradients (2 per weight)
    plus the inputs' gradients of every layer but the first (the images need none)."""
    model = build_classifier("mlp", 10, 1, 28, [0.5], [0.5])
    weights = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    images = torch.rand(8, 1, 28, 28)
    assert model_flops(model, images, backward=False) == 2 * sum(weights) * 8
    assert model_flops(model, images, backward=True) == (2 * sum(weights) + 2 * sum(weights) + 2 * sum(weights[1:])) * 8
    assert all(p.grad is None for p in model.parameters())  # the count leaves no gradient behind


def test_ceiling_is_work_over_peak():
    assert ceiling(300.0, 150.0, 10.0) == {"gflop": 300.0, "seconds_at_peak": 2.0, "max_possible_speedup": 5.0}
    assert "max_possible_speedup" not in ceiling(300.0, 150.0)


def test_gemm_peak_is_a_positive_rate():
    assert gemm_peak_gflops(side=128, repeats=2) > 0


def test_kernel_floor_is_the_best_round_times_the_steps_plus_the_evaluations():
    from benchmarks.ceiling import kernel_floor

    model = build_classifier("mlp", 10, 1, 28, [0.5], [0.5])
    floor = kernel_floor(model, clients=2, batch=4, steps=3, evaluations=2, test_images=20, repeats=2, eval_batch=10)
    best = min(floor["round_seconds"].values())
    assert set(floor["round_seconds"]) == {"loop", "vmap"} and best > 0 and floor["eval_pass_seconds"] > 0
    assert floor["seconds"] == pytest.approx(3 * best + 2 * floor["eval_pass_seconds"], abs=0.11)
    assert all(p.grad is None for p in model.parameters())
