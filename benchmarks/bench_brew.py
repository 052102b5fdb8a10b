"""Time one Witches' Brew poison set (ResNet-18, CIFAR-sized images) and print one JSON line.

The paper's setting is 500 poisons (1% of CIFAR-10), R=8 restarts of M=250 steps; on an H100 that
should take a few minutes. On a CPU run a slice of it, e.g.
    python benchmarks/bench_brew.py --restarts 1 --steps 2 --poisons 16
and read `projected_full_seconds`, a linear extrapolation to the requested full setting.
Images come from $FEDEPIC_DATA/cifar10-jpeg when present (only the needed files are decoded),
otherwise uniform random pixels; the model is freshly initialised, which does not change the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from fedepic.attacks.gradient_matching import BrewConfig, brew_poisons
from fedepic.models import build_classifier

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--poisons", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-restarts", type=int, default=8, help="setting the projection extrapolates to")
    parser.add_argument("--full-steps", type=int, default=250)
    parser.add_argument("--full-poisons", type=int, default=500)
    return parser.parse_args()


def _decode(files: list[Path]) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    return torch.stack([decode_image(read_file(str(f)), mode=ImageReadMode.RGB) for f in files])


def load_images(poisons: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """uint8 poison-class images [P,3,32,32] and one target image [1,3,32,32] of another class."""
    root = Path(os.environ.get("FEDEPIC_DATA", "")) / "cifar10-jpeg"
    if os.environ.get("FEDEPIC_DATA") and (root / "train").is_dir():
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        train_files = sorted((root / "train" / classes[1]).iterdir())[:poisons]
        target_file = sorted((root / "test" / classes[0]).iterdir())[seed]
        if len(train_files) == poisons:
            return _decode(train_files), _decode([target_file]), "cifar10-jpeg"
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (poisons + 1, 3, 32, 32), generator=gen, dtype=torch.uint8)
    return images[:poisons], images[poisons:], "random"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_classifier(args.model, 10, 3, 32, CIFAR_MEAN, CIFAR_STD).to(device)
    train_x, target_u8, source = load_images(args.poisons, args.seed)
    train_y = torch.ones(args.poisons, dtype=torch.long)
    cfg = BrewConfig(restarts=args.restarts, steps=args.steps, batch_size=args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    poisons = brew_poisons(model, train_x, train_y, torch.arange(args.poisons), target_u8.float() / 255,
                           adversarial_class=1, cfg=cfg, seed=args.seed, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per_step = seconds / (args.restarts * args.steps)
    scale = args.full_restarts * args.full_steps * (args.full_poisons / args.poisons)
    print(json.dumps({
        "bench": "brew", "model": args.model, "data": source, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "poisons": args.poisons, "restarts": args.restarts, "steps": args.steps, "batch_size": args.batch_size,
        "seconds": round(seconds, 3), "seconds_per_step": round(per_step, 4),
        "projected_full_seconds": round(per_step * scale, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        "loss": round(poisons.loss, 4), "alignment": round(poisons.alignment, 4),
    }))


if __name__ == "__main__":
    main()
