"""EPIC's whole overhead in training, measured against the undefended run in the same process.

Overhead = (T_epic - T_none) / T_none, where T_epic includes the proxy passes and selections and is
net of the time saved on dropped rows. Pipelines: 40 epochs (K=10, T=2, until 35: 13 selections) and
200 epochs (K=30, T=10, until 150). Prints one JSON line.

  python benchmarks/bench_epic_training.py --pipeline 40                        # GPU: ResNet-18, CIFAR-10
  python benchmarks/bench_epic_training.py --pipeline 40 --model cnn --rows 4000 # CPU-sized
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from fedepic.config import DataConfig, TrainConfig
from fedepic.data import load_dataset
from fedepic.epic import EpicSchedule, EpicState
from fedepic.models import build_classifier
from fedepic.train import fit, prepare_model, resolve_device

PIPELINES = {
    40: (EpicSchedule.pipeline_40, [15, 25, 35]),
    200: (EpicSchedule.pipeline_200, [100, 150]),
}


def load(args) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple, int]:
    if os.environ.get("FEDEPIC_DATA") and args.data == "cifar10-jpeg":
        cfg = DataConfig(name="imagefolder", train_per_class=args.rows // 10 if args.rows else None)
        data = load_dataset(cfg, seed=0)
        return data.train_x, data.train_y, data.mean, data.std, data.num_classes
    gen = torch.Generator().manual_seed(0)
    n = args.rows or 50000
    y = torch.arange(n) % 10
    x = (torch.rand(10, 3, 32, 32, generator=gen)[y] * 180 + torch.rand(n, 3, 32, 32, generator=gen) * 75).to(torch.uint8)
    return x, y, (0.5,) * 3, (0.25,) * 3, 10


def timed_run(args, x, y, mean, std, classes, device, schedule) -> tuple[float, dict]:
    torch.manual_seed(0)
    model = prepare_model(build_classifier(args.model, classes, 3, 32, mean, std), device, True)
    epochs = args.epochs or args.pipeline
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.1, milestones=PIPELINES[args.pipeline][1],
                      augment="crop_flip", device=str(device))
    keep = torch.ones(len(y), dtype=torch.bool)
    state = None
    if schedule is not None:
        state = EpicState(len(y), schedule, device=device)
        state.keep = keep
    stats = {"selections": 0, "selection_seconds": 0.0}

    def hook(epoch, net):
        if state is None:
            return None
        out = state.maybe_select(epoch, net, x_dev, y_dev)
        if out:
            stats["selections"] += 1
            stats["selection_seconds"] += out["selection_seconds"]
            stats["dropped_total"] = out["dropped_total"]
        return out

    x_dev, y_dev = x.to(device), y.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fit(model, x_dev, y_dev, cfg, seed=0, device=device, keep=keep, epoch_end=hook)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, stats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline", type=int, choices=sorted(PIPELINES), default=40)
    parser.add_argument("--epochs", type=int, default=None, help="truncate the run (schedule unchanged)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--data", default="cifar10-jpeg", choices=["cifar10-jpeg", "random"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    x, y, mean, std, classes = load(args)
    schedule = PIPELINES[args.pipeline][0](args.fraction)
    t_none, _ = timed_run(args, x, y, mean, std, classes, device, None)
    t_epic, stats = timed_run(args, x, y, mean, std, classes, device, schedule)
    print(json.dumps({
        "benchmark": "epic_training_overhead", "pipeline": args.pipeline, "epochs": args.epochs or args.pipeline,
        "model": args.model, "rows": len(y), "device": torch.cuda.get_device_name(0) if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads", "undefended_seconds": round(t_none, 2),
        "epic_seconds": round(t_epic, 2), "overhead_ratio": round((t_epic - t_none) / t_none, 4),
        "selections": stats["selections"], "selection_seconds": round(stats["selection_seconds"], 2),
        "dropped_total": stats.get("dropped_total", 0),
        "dropped_fraction": round(stats.get("dropped_total", 0) / len(y), 4),
        # the cost side alone (proxy passes + selections), before the savings on dropped rows
        "gross_overhead_ratio": round(stats["selection_seconds"] / t_none, 4),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "target": "<= 0.10 (40-epoch), <= 0.05 (200-epoch); paper: +0.47 / +0.41",
    }))


if __name__ == "__main__":
    main()
