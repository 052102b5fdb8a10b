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
    # the mlp is one fedepic's batched per-client kernel supports: it is timed beside the eager ones
    assert set(floor["round_seconds"]) == {"loop", "vmap", "grouped"} and best > 0 and floor["eval_pass_seconds"] > 0
    assert 0 < floor["one_backward_round_seconds"]
    assert floor["seconds"] == pytest.approx(3 * best + 2 * floor["eval_pass_seconds"], abs=0.11)
    assert all(p.grad is None for p in model.parameters())


def test_local_epochs_and_evaluation_floors_time_every_layout_on_the_given_images():
    from benchmarks.ceiling import evaluation_floor, local_epochs_floor

    model = build_classifier("cnn", 10, 3, 32, [0.5] * 3, [0.5] * 3)  # not 28 x 28: the shape is the data's
    floor = local_epochs_floor(model, [9, 9, 5], batch=4, epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-4,
                               nesterov=True, image_shape=(3, 32, 32), classes=10, repeats=1)
    assert set(floor) == {"loop", "stacked"} and all(v > 0 for v in floor.values())
    assert evaluation_floor(model, nodes=3, test_images=8, image_shape=(3, 32, 32), repeats=1) > 0
    assert all(p.grad is None for p in model.parameters())  # the model itself is never trained


def test_engine_speed_floor_counts_each_member_and_only_dpsgd_runs(tmp_path):
    from benchmarks.engine_speed import kernel_floor, load_workload
    from fedepic.config import load_config, to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(load_config("dfl_smoke.yaml", ["strategies=[gossip,upper]"])))
    floor = kernel_floor(load_workload(tmp_path))
    assert set(floor["round_train_seconds"]) == {"all nodes, 1 epochs, batch 32", "benign nodes, 1 epochs, batch 32"}
    rounds = {k: min(v.values()) for k, v in floor["round_train_seconds"].items()}
    want = 2 * sum(rounds.values()) + 2 * 2 * floor["evaluation_seconds"]  # 2 members x 2 rounds, each evaluated
    assert floor["seconds"] == pytest.approx(want, abs=0.06)
    (tmp_path / "config.yaml").write_text(to_yaml(load_config("dfl_smoke.yaml", ["decentralized.algorithm=dsgd"])))
    assert kernel_floor(load_workload(tmp_path)) is None
