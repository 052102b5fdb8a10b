"""Benchmark of fedepic.epic.select_medoids against the naive greedy, CIFAR-10 sized.

Data: 10 classes x 5000 rows of 10-dim features (a Gaussian mixture per class plus a
few far outliers), fraction 0.1, so 500 medoids per class.  The fast path is timed
on all classes; the naive greedy (same code matrix and integer gains, vectorised,
but every step evaluates every candidate: O(k n^2)) is timed on ``--naive-classes``
classes in the same run and scaled to all classes.  Prints one JSON line, with the
process CPU time and the 1-minute load average beside the wall times (on a shared
machine, wall time depends on what else runs).

    .venv/bin/python benchmarks/bench_epic.py [--device cuda] [--naive-classes 1] [--backend auto]

The default backend is the compiled (numba) greedy on the CPU when numba is installed, and the
batched greedy (all classes in whole-tensor steps) on a GPU;
the torch backend is timed in the same run for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from fedepic import epic


def make_data(classes: int, rows: int, dim: int, outliers: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: 10 Gaussian blobs of clean rows and ``outliers`` far-away rows at the end."""
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        centers = 3 * torch.randn(10, dim, generator=gen)
        clean = centers[torch.randint(0, 10, (rows - outliers,), generator=gen)]
        clean = clean + torch.randn(rows - outliers, dim, generator=gen)
        far = 30 * torch.nn.functional.normalize(torch.randn(outliers, dim, generator=gen), dim=1)
        xs.append(torch.cat([clean, far]))
        ys.append(torch.full((rows,), c))
    return torch.cat(xs), torch.cat(ys)


def naive_greedy(features: torch.Tensor, k: int) -> list[int]:
    """Same codes and exact integer gains as the fast path, but no laziness."""
    greedy = epic._Greedy(epic._Codes(epic._Group(features), 4096, 2**31))
    for _ in range(k):
        greedy.add(int(greedy.all_gains().argmax()))
    return greedy.chosen


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--outliers", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--naive-classes", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--backend", default="auto", choices=["auto", "compiled", "torch", "batched"])
    parser.add_argument("--torch-repeats", type=int, default=1, help="timed runs of the torch backend, for the ratio")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    x, y = make_data(args.classes, args.rows, args.dim, args.outliers, args.seed)
    x, y = x.to(device), y.to(device)
    epic.select_medoids(x[:500], y[:500], args.fraction)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    times, cpu_times = [], []
    for _ in range(args.repeats):
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        sel = epic.select_medoids(x, y, args.fraction, backend=args.backend)
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)

    torch_times, torch_identical = [], True  # the pure-torch backend in the same run
    for _ in range(args.torch_repeats if args.backend != "torch" else 0):
        sync(device)
        start = time.perf_counter()
        other = epic.select_medoids(x, y, args.fraction, backend="torch")
        sync(device)
        torch_times.append(time.perf_counter() - start)
        torch_identical &= torch.equal(other.medoids, sel.medoids) and torch.equal(other.assignment, sel.assignment)

    k = epic.class_budget(args.fraction, args.rows)
    naive_time, identical = 0.0, True
    for c in range(args.naive_classes):
        rows = (y == c).nonzero().flatten()
        sync(device)
        start = time.perf_counter()
        with epic._single_thread(device):  # the same threading as the fast path
            chosen = naive_greedy(x[rows], k)
        sync(device)
        naive_time += time.perf_counter() - start
        identical &= rows.cpu()[torch.tensor(chosen)].tolist() == sel.medoids[c * k : (c + 1) * k].tolist()
    naive_total = naive_time / args.naive_classes * args.classes if args.naive_classes else None

    outlier_rows = torch.cat(
        [torch.arange(args.rows - args.outliers, args.rows) + c * args.rows for c in range(args.classes)]
    )
    fast = min(times)
    report = {
        "bench": "epic.select_medoids",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "classes": args.classes,
        "rows_per_class": args.rows,
        "dim": args.dim,
        "fraction": args.fraction,
        "medoids_per_class": k,
        "backend": args.backend,
        "backend_used": epic._resolve_backend(args.backend, device)[0],
        "fast_seconds": round(fast, 4),
        "fast_seconds_all_repeats": [round(t, 4) for t in times],
        "fast_process_cpu_seconds": round(min(cpu_times), 4),
        "torch_backend_seconds": round(min(torch_times), 4) if torch_times else None,
        "torch_backend_over_fast": round(min(torch_times) / fast, 2) if torch_times else None,
        "torch_backend_identical": torch_identical if torch_times else None,
        "naive_seconds": round(naive_total, 3) if naive_total else None,
        "naive_timed_classes": args.naive_classes,
        "naive_note": f"naive timed on {args.naive_classes} class(es), scaled by {args.classes}",
        "speedup": round(naive_total / fast, 1) if naive_total else None,
        "identical_to_naive": identical if naive_total else None,
        "dropped": int(sel.drop.sum()),
        "outliers_dropped": f"{int(sel.drop[outlier_rows].sum())}/{len(outlier_rows)}",
        "code_matrix_mb_per_class": round(4 * args.rows**2 / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
