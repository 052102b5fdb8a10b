"""Per-client gradients at one shared model: the grouped kernel, the vmap path, an eager loop, one backward.

    python benchmarks/grouped_gradients.py [--repeats 20] [--model cnn_mnist] [--clients 10] [--batch 25]

On ``--model`` built by ``fedepic.models.build_classifier`` for MNIST-sized images (1x28x28, 10
classes; random pixels and labels), ``--clients`` minibatches of ``--batch`` images, with
torch.set_num_threads(``--threads``), times ``--repeats`` calls of each of (taking turns call by call):

- vmap: ``fedepic.stacked.stacked_gradients`` at one shared point with the grouped kernel switched
  off (the ``torch.func.vmap`` path);
- grouped: ``stacked_gradients`` at one shared point (``fedepic.grouped_gradients``);
- eager_loop: one plain ``loss.backward()`` per client on the model itself, its gradient copied into
  its row of an [n, D] result;
- one_backward: one plain backward over all n*B images (no per-client split: the lower bound).

Prints one JSON line: the load averages before and after, the settings, the largest difference
between the grouped and the vmap gradients, and per method the best and the median seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fedepic.stacked as stacked  # noqa: E402
from fedepic.models import build_classifier  # noqa: E402


def timed(methods: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Best and median seconds of ``repeats`` calls of every method, the methods taking turns call by
    call (on a shared machine a change of load then falls on all of them alike), after one warm-up."""
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"best_s": min(s), "median_s": statistics.median(s)} for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", default="cnn_mnist")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()

    model = build_classifier(args.model, 10, 1, 28, [0.1307], [0.3081])
    n, batch = args.clients, args.batch
    xb = torch.randint(0, 256, (n, batch, 1, 28, 28), dtype=torch.uint8).float().div_(255)
    yb = torch.randint(0, 10, (n, batch))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def vmap_path() -> torch.Tensor:
        with mock.patch.object(stacked, "grouped_gradients", lambda *a: None):
            return stacked.stacked_gradients(model, flat, xb, yb)

    def grouped() -> torch.Tensor:
        return stacked.stacked_gradients(model, flat, xb, yb)

    params = list(model.parameters())

    def eager_loop() -> torch.Tensor:
        out = torch.empty(n, flat.numel())
        for k in range(n):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb[k]), yb[k]).backward()
            torch.cat([p.grad.reshape(-1) for p in params], out=out[k])
        return out

    images, labels = xb.reshape(n * batch, *xb.shape[2:]), yb.reshape(-1)

    def one_backward() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()

    difference = (grouped() - vmap_path()).abs().max().item()
    figures = timed({"vmap": vmap_path, "grouped": grouped, "eager_loop": eager_loop, "one_backward": one_backward},
                    args.repeats)
    print(json.dumps({
        "load_before": load_before, "load_after": os.getloadavg(), "model": args.model,
        "parameters": flat.numel(), "clients": n, "batch": batch, "threads": args.threads,
        "repeats": args.repeats, "torch": torch.__version__, "max_abs_difference": difference, **figures,
    }))


if __name__ == "__main__":
    main()
