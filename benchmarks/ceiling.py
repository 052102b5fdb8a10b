"""The machine's compute ceiling, for the speed targets: how fast a workload could run at best here.

A speed target is a ratio against something measured in the same run (Ray, ByzFL). Whether it can
hold at all depends on how much of the reference's time is compute that no engine can skip: a
workload of F FLOPs takes at least F / peak seconds, so no implementation can be more than
``reference_seconds / (F / peak)`` times faster than the reference. This module measures ``peak`` as
the best dense float32 matrix product (``torch.mm`` of two 2048 x 2048 matrices, the kernel that
runs fastest on a CPU; convolutions and small matrices run slower) with torch's threads, and counts
a model's FLOPs with torch's own ``FlopCounterMode`` (matrix products and convolutions, forward and
backward), so the figures are measured, not taken from a datasheet.

The GEMM peak is a bound no code reaches with small convolutions and 25-row minibatches. A tighter
one, :func:`kernel_floor`, times the work itself with eager torch kernels: one round of per-client
minibatch gradients at a shared model (the faster of a loop over clients and torch.func.vmap) and one
evaluation pass (batches of 1,000 test images), each the best of several repeats, so
``steps * round + evaluations * pass`` estimates the least time an eager-torch implementation of the
scenario needs here, every overhead left out (a measured estimate on 1 x 28 x 28 images, not a proof:
another evaluation batch or a compiled kernel could go somewhat below it).

    python benchmarks/ceiling.py        # one JSON line: the peak, the FLOPs of the benchmarks' models,
                                        # and the kernel floor of ByzFL's scenario (cnn_mnist)
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


def _best_seconds(step, repeats: int) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    return best


def kernel_floor(model: torch.nn.Module, clients: int, batch: int, steps: int, evaluations: int, test_images: int,
                 repeats: int = 5, eval_batch: int = 1000) -> dict:
    """The least seconds eager torch kernels need for ``steps`` rounds of ``clients`` minibatch gradients
    of ``batch`` images at one shared model plus ``evaluations`` passes over ``test_images`` (module
    docstring): the best of ``repeats`` timings of one round (loop and vmap) and of one pass, times the
    counts."""
    from torch.func import functional_call, grad, vmap

    images = torch.rand(clients, batch, 1, 28, 28)
    labels = torch.randint(0, 10, (clients, batch), generator=torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loop() -> None:
        for k in range(clients):
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(images[k]), labels[k]).backward()

    def loss(p, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    per_client = vmap(grad(loss), in_dims=(None, 0, 0))
    test = torch.rand(eval_batch, 1, 28, 28)

    def evaluate() -> None:
        with torch.no_grad():
            model(test)

    def one_backward() -> None:  # the whole round's images as one batch: no per-client gradients at all
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images.flatten(0, 1)), labels.flatten()).backward()

    rounds = {"loop": _best_seconds(loop, repeats), "vmap": _best_seconds(lambda: per_client(params, images, labels),
                                                                          repeats)}
    # fedepic's batched per-client kernel (fedepic/grouped_gradients.py), reported beside the eager floor:
    # where it is faster, it is the tighter floor of an implementation that needs per-client gradients
    from fedepic.grouped_gradients import grouped_gradients

    flat = torch.cat([v.reshape(-1) for v in params.values()])
    if grouped_gradients(model, flat, images, labels) is not None:
        rounds["grouped"] = _best_seconds(lambda: grouped_gradients(model, flat, images, labels), repeats)
    lower = _best_seconds(one_backward, repeats)
    model.zero_grad(set_to_none=True)
    one_pass = _best_seconds(evaluate, repeats) * test_images / eval_batch
    best = min(rounds.values())
    return {"round_seconds": {k: round(v, 6) for k, v in rounds.items()}, "eval_pass_seconds": round(one_pass, 6),
            "seconds": round(steps * best + evaluations * one_pass, 1),
            # one backward over all clients' images: below any implementation that keeps the gradients apart
            "one_backward_round_seconds": round(lower, 6)}


def local_epochs_floor(model: torch.nn.Module, node_rows: list[int], batch: int, epochs: int, lr: float,
                       momentum: float, weight_decay: float, nesterov: bool,
                       image_shape: tuple[int, ...] = (1, 28, 28), classes: int = 10, repeats: int = 3) -> dict:
    """The least seconds eager torch kernels need for one decentralized round's local training: every
    node of ``node_rows`` (its row count) runs ``epochs`` epochs of minibatch SGD (torch.optim.SGD, fused,
    with the momentum and weight decay given) on its own model and random images of ``image_shape``,
    laid out two ways:

    - ``loop``: one node after the other (a node's parameters stay in cache);
    - ``stacked``: the nodes with the same row count as one stack of parameters, each step one
      ``torch.func.vmap`` gradient and one SGD step over the stack (SGD is elementwise, so this is
      each node's own SGD).

    No data loading, shuffling, EPIC, augmentation or metric: the best of ``repeats`` timings of the
    kernels alone, for each layout."""
    import copy

    from torch.func import functional_call, grad, vmap

    generator = torch.Generator().manual_seed(0)
    data = [(torch.rand(n, *image_shape, generator=generator), torch.randint(0, classes, (n,), generator=generator))
            for n in node_rows]

    def sgd(params) -> torch.optim.SGD:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0, fused=True)  # the fastest update

    models = [copy.deepcopy(model) for _ in node_rows]
    optimizers = [sgd(m.parameters()) for m in models]

    def loop() -> None:
        for node, optimizer, (images, labels) in zip(models, optimizers, data):
            for _ in range(epochs):
                for start in range(0, len(labels), batch):
                    optimizer.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(node(images[start:start + batch]),
                                                      labels[start:start + batch]).backward()
                    optimizer.step()

    def loss(params, x, y):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    per_node = vmap(grad(loss))
    groups = []  # (stacked parameters, their optimizer, stacked images, stacked labels) per row count
    for n in sorted(set(node_rows)):
        members = [i for i, rows in enumerate(node_rows) if rows == n]
        stack = {k: torch.stack([v.detach()] * len(members)).requires_grad_() for k, v in model.named_parameters()}
        groups.append((stack, sgd(list(stack.values())), torch.stack([data[i][0] for i in members]),
                       torch.stack([data[i][1] for i in members])))

    def stacked() -> None:
        for stack, optimizer, images, labels in groups:
            for _ in range(epochs):
                for start in range(0, labels.shape[1], batch):
                    grads = per_node({k: v.detach() for k, v in stack.items()}, images[:, start:start + batch],
                                     labels[:, start:start + batch])
                    for k, v in stack.items():
                        v.grad = grads[k]
                    optimizer.step()

    return {"loop": _best_seconds(loop, repeats), "stacked": _best_seconds(stacked, repeats)}


def evaluation_floor(model: torch.nn.Module, nodes: int, test_images: int,
                     image_shape: tuple[int, ...] = (1, 28, 28), repeats: int = 3) -> float:
    """The least seconds of one evaluation of ``nodes`` models on ``test_images`` images of ``image_shape``
    (one forward pass each in one batch, no metric): the best of ``repeats`` timings, times ``nodes``."""
    test = torch.rand(test_images, *image_shape)

    def one_pass() -> None:
        with torch.no_grad():
            model(test)

    return nodes * _best_seconds(one_pass, repeats)


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
    # ByzFL's scenario (benchmarks/byzfl_compare.py): 10 honest clients, batch 25, 800 steps, 17 evaluations
    byzfl = kernel_floor(build_classifier("cnn_mnist", 10, 1, 28, [0.1307], [0.3081]), 10, 25, 800, 17, 10_000)
    print(json.dumps({"benchmark": "ceiling", "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "gemm_peak_gflops": round(peak, 1), "per_image_28x28": per_image,
                      "byzfl_scenario_kernel_floor": byzfl, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
