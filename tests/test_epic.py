"""Tests for fedepic.epic: exact greedy medoids, gradient proxies, schedule and state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedepic import epic
from fedepic.epic import (
    EpicSchedule,
    EpicState,
    LastLayerProxy,
    class_budget,
    distance_codes,
    gradient_proxy,
    pairwise_distances,
    select_medoids,
)

CUDA = torch.cuda.is_available()
try:
    import numba  # noqa: F401

    BACKENDS = ["torch", "batched", "compiled"]
except ImportError:  # the core runs without numba; the torch backends are still tested
    BACKENDS = ["torch", "batched"]


# ------------------------------------------------------------------ references


def brute_force_greedy(codes: list[list[int]], k: int) -> list[int]:
    """Plain greedy for F(S) = sum_i max_{j in S} s(i, j), s = c0 - code, F(empty) = 0.

    Row j of ``codes`` is candidate j against every point i.  Strict '>' keeps the
    lowest index on ties.
    """
    n = len(codes)
    c0 = max(max(row) for row in codes)
    cover = [0] * n
    chosen: list[int] = []
    for _ in range(k):
        best_gain, best_j = -1, -1
        for j in range(n):
            if j in chosen:
                continue
            gain = sum(max(c0 - codes[j][i] - cover[i], 0) for i in range(n))
            if gain > best_gain:
                best_gain, best_j = gain, j
        chosen.append(best_j)
        cover = [max(cover[i], c0 - codes[best_j][i]) for i in range(n)]
    return chosen


def brute_force_assignment(codes: list[list[int]], medoids: list[int]) -> list[int]:
    """Nearest medoid per point, ties to the medoid chosen first; medoids join themselves."""
    out = [min(medoids, key=lambda m: (codes[m][i], medoids.index(m))) for i in range(len(codes))]
    for m in medoids:
        out[m] = m
    return out


def reference_selection(x: torch.Tensor, labels: torch.Tensor, fraction: float, threshold: int):
    n = len(labels)
    medoids, sizes, assignment, drop = [], [], [0] * n, [False] * n
    for c in sorted(set(labels.tolist())):
        idx = [i for i in range(n) if labels[i] == c]
        codes = distance_codes(x[idx]).tolist()
        local = brute_force_greedy(codes, class_budget(fraction, len(idx)))
        assign = brute_force_assignment(codes, local)
        for i, a in enumerate(assign):
            assignment[idx[i]] = idx[a]
        for m in local:
            size = assign.count(m)
            medoids.append(idx[m])
            sizes.append(size)
            drop[idx[m]] = size <= threshold
    return medoids, sizes, assignment, drop


def naive_torch_greedy(codes: torch.Tensor, k: int) -> list[int]:
    """Vectorised greedy without laziness: every step evaluates every candidate."""
    codes = codes.long()
    best = torch.full((len(codes),), int(codes.max()) + 1, dtype=torch.int64)
    taken = torch.zeros(len(codes), dtype=torch.bool)
    chosen = []
    for _ in range(k):
        gains = (best[None, :] - codes).clamp_(min=0).sum(1).masked_fill_(taken, -1)
        j = int(gains.argmax())
        chosen.append(j)
        taken[j] = True
        best = torch.minimum(best, codes[j])
    return chosen


def random_classes(seed: int, sizes: list[int], dim: int = 3, duplicates: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), dim, generator=gen)
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=gen)]  # classes interleaved
    for _ in range(duplicates):
        i, j = torch.randint(0, len(x), (2,), generator=gen).tolist()
        if labels[i] == labels[j]:
            x[j] = x[i]
    if duplicates:
        x = x.round(decimals=0)  # a coarse grid makes many exact distance ties
    return x, labels


# ----------------------------------------------------------- exact greedy agreement


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_matches_brute_force(seed: int, fraction: float, backend: str) -> None:
    x, labels = random_classes(seed, [1, 2, 5, 31, 17], duplicates=10)
    sel = select_medoids(x, labels, fraction, threshold=1, backend=backend)
    medoids, sizes, assignment, drop = reference_selection(x, labels, fraction, 1)
    assert sel.medoids.tolist() == medoids
    assert sel.sizes.tolist() == sizes
    assert sel.assignment.tolist() == assignment
    assert sel.drop.tolist() == drop


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_brute_force_all_identical_and_ties(backend: str) -> None:
    x = torch.tensor([[0.0, 0.0]] * 4 + [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    labels = torch.zeros(8, dtype=torch.long)
    for fraction in (0.2, 0.5, 1.0):
        sel = select_medoids(x, labels, fraction, backend=backend)
        assert sel.medoids.tolist() == reference_selection(x, labels, fraction, 1)[0]
    same = select_medoids(torch.ones(5, 3), torch.zeros(5, dtype=torch.long), 0.4, backend=backend)
    assert same.medoids.tolist() == [0, 1]
    assert same.sizes.tolist() == [4, 1]  # the duplicate medoid keeps only itself


def test_codes_keep_the_float64_greedy() -> None:
    """Quantising to codes does not change the greedy of plain float64 distances (no near ties)."""
    x, labels = random_classes(11, [45, 30], dim=4)
    sel = select_medoids(x, labels, 0.2)
    expected = []
    for c in (0, 1):
        idx = (labels == c).nonzero().flatten()
        dists = torch.cdist(x[idx].double(), x[idx].double()).tolist()
        expected += idx[brute_force_greedy(dists, class_budget(0.2, len(idx)))].tolist()
    assert sel.medoids.tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_lazy_matches_naive_at_scale(backend: str) -> None:
    gen = torch.Generator().manual_seed(5)
    centers = torch.randn(8, 6, generator=gen) * 3
    x = centers[torch.randint(0, 8, (500,), generator=gen)] + torch.randn(500, 6, generator=gen)
    sel = select_medoids(x, torch.zeros(500, dtype=torch.long), 0.12, backend=backend)
    assert sel.medoids.tolist() == naive_torch_greedy(distance_codes(x), 60)


@pytest.mark.skipif("compiled" not in BACKENDS, reason="needs numba")
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_overlapped_classes_match_torch(threads: int) -> None:
    """With 2 threads the compiled greedy of a class overlaps the next class's build."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(900, 5, generator=gen)
    labels = torch.randint(0, 5, (900,), generator=gen)
    labels[:4] = 5  # plus a tiny class
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compiled = select_medoids(x, labels, 0.15, backend="compiled")
    finally:
        torch.set_num_threads(before)
    reference = select_medoids(x, labels, 0.15, backend="torch")
    for field in ("medoids", "sizes", "drop", "assignment"):
        assert torch.equal(getattr(compiled, field), getattr(reference, field))
    # classes too big to store fall back to the torch greedy, with the same result
    mixed = select_medoids(x, labels, 0.15, backend="compiled", max_matrix_bytes=4 * 100**2)
    assert torch.equal(mixed.medoids, reference.medoids)


@pytest.mark.parametrize("batch", [1, 3, 128])
def test_batched_greedy_with_small_batches_padding_and_splits(batch: int) -> None:
    """Tiny batches force the dense fallback often; unequal classes are padded; a small memory
    bound splits the classes into several stacks and leaves one class to the on-demand path."""
    x, labels = random_classes(21, [300, 7, 120, 1, 260], dim=4, duplicates=8)
    reference = select_medoids(x, labels, 0.2, backend="torch")
    groups = [(labels == c).nonzero().flatten() for c in range(5)]
    for max_bytes in (2**31, 4 * 2 * 260**2, 4 * 280**2):  # one stack; pairs; the 300-row class too big
        results = epic._run_batched(x, groups, 0.2, 64, max_bytes, 1, batch=batch)
        assert torch.equal(torch.cat([g[chosen] for g, (chosen, _) in zip(groups, results)]), reference.medoids)
        for g, (chosen, assign) in zip(groups, results):
            assign[chosen] = chosen
            assert torch.equal(g[assign], reference.assignment[g])
    assert epic._batches([5, 9, 2, 9], 4 * 2 * 9**2) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_backends_agree_on_last_layer_proxies(backend: str) -> None:
    gen = torch.Generator().manual_seed(13)
    proxy = LastLayerProxy(torch.randn(400, 5, generator=gen), torch.rand(400, 16, generator=gen))
    labels = torch.randint(0, 5, (400,), generator=gen)
    reference = select_medoids(proxy, labels, 0.2, backend="torch")
    other = select_medoids(proxy, labels, 0.2, backend=backend)
    assert torch.equal(other.medoids, reference.medoids) and torch.equal(other.assignment, reference.assignment)


def test_backend_argument_is_checked() -> None:
    x, labels = torch.randn(10, 2), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="backend"):
        select_medoids(x, labels, 0.5, backend="numba")
    if CUDA:
        with pytest.raises(ValueError, match="CPU"):
            select_medoids(x.cuda(), labels.cuda(), 0.5, backend="compiled")


def test_on_demand_rows_match_stored_matrix() -> None:
    x, labels = random_classes(3, [40, 57, 9], dim=4, duplicates=6)
    stored = select_medoids(x, labels, 0.3)
    chunked = select_medoids(x, labels, 0.3, chunk_rows=7, max_matrix_bytes=0)
    assert torch.equal(stored.medoids, chunked.medoids)
    assert torch.equal(stored.assignment, chunked.assignment)
    big, labels = symmetric_integer_classes(8, [350, 20], dim=6)  # several build blocks
    stored = select_medoids(big, labels, 0.1)
    chunked = select_medoids(big, labels, 0.1, chunk_rows=64, max_matrix_bytes=0)
    assert torch.equal(stored.medoids, chunked.medoids) and torch.equal(stored.sizes, chunked.sizes)


def test_distance_codes_follow_the_formula() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(700, 5, generator=gen, dtype=torch.float64)  # > 1 cache block of rows
    before = x.clone()
    codes = distance_codes(x)
    assert torch.equal(x, before)  # float64 input is not modified
    center = x.amax(0) / 2 + x.amin(0) / 2  # the coordinate-wise midrange
    bound = 2 * (x - center).norm(dim=1).max().item()
    scale = math.sqrt(2.0 ** math.floor(2 * math.log2(2**23 / bound)))
    expected = torch.floor(torch.cdist(x, x) * scale)
    assert (codes.double() - expected).abs().max() <= 1
    assert (codes.diagonal() == 0).all() and (codes + torch.eye(700, dtype=torch.int32) > 0).all()
    assert torch.equal(codes.T, codes)  # exact arithmetic: symmetric to the bit


def exact_squared_distances(q: torch.Tensor) -> torch.Tensor:
    """||q_i - q_j||^2 of integer-valued rows in int64 (exact; no float sum anywhere)."""
    qi = q.long()
    return torch.stack([(qi - row).square().sum(1) for row in qi])


# The three forms of squared distances, forced on small data through the size limits:
# (_AUGMENTED_BYTES, _BLOCK_ELEMS) per path; a tiny column block gives many blocks.
PATHS = {"augmented": (2**28, 1 << 21), "gram": (10_000, 64), "on_demand": (1_000, 64)}


@pytest.mark.parametrize("path", list(PATHS))
def test_squared_distances_are_exact_integers(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sum the selector takes is an exact integer sum, so no BLAS order can change it."""
    monkeypatch.setattr(epic, "_AUGMENTED_BYTES", PATHS[path][0])
    monkeypatch.setattr(epic, "_BLOCK_ELEMS", PATHS[path][1])
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(30, 50, generator=gen) * torch.logspace(-3, 2, 50)  # float32, uneven columns
    group = epic._Group(x)
    assert group.heavy == (path != "augmented")
    fixed = epic._fit_fixed_point(x, epic._PLAIN_NORM_BITS, centre=True)
    q = fixed(x)
    assert torch.equal(q, q.round()) and q.norm(dim=1).max() <= 2**25
    assert q.norm(dim=1).max() > 2**24  # the scale uses the range it is given
    assert torch.equal(group._scaled_sq(slice(0, 30)) / group.scale2, exact_squared_distances(q).double())
    for rows in (torch.tensor([3]), torch.tensor([29, 0, 7])):  # other shapes, same values
        assert torch.equal(group._scaled_sq(rows), group._scaled_sq(slice(0, 30))[rows])


def test_proxy_factors_are_exact_integers() -> None:
    gen = torch.Generator().manual_seed(32)
    proxy = LastLayerProxy(torch.randn(40, 5, generator=gen), torch.rand(40, 33, generator=gen))
    group = epic._Group(proxy)
    for factor in (group._proxy.g, group._proxy.h):
        assert torch.equal(factor, factor.round())
        assert 2**25 < factor.norm(dim=1).max() <= 2**26
        gram = factor.long() @ factor.long().T  # int64: exact
        assert torch.equal((factor @ factor.T).long(), gram)
    full = group._scaled_sq(slice(0, 40))
    assert torch.equal(full, full.T)
    assert torch.equal(group._scaled_sq(torch.tensor([5, 1])), full[[5, 1]])


@pytest.mark.parametrize("path", list(PATHS))
def test_codes_do_not_depend_on_row_order(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permuting the rows permutes the codes exactly: no result depends on where a row sits."""
    monkeypatch.setattr(epic, "_AUGMENTED_BYTES", PATHS[path][0])
    monkeypatch.setattr(epic, "_BLOCK_ELEMS", PATHS[path][1])
    gen = torch.Generator().manual_seed(33)
    x = torch.randn(30, 50, generator=gen)
    perm = torch.randperm(30, generator=gen)
    codes = distance_codes(x)
    assert torch.equal(distance_codes(x[perm]), codes[perm][:, perm])
    proxy = LastLayerProxy(torch.randn(30, 4, generator=gen), torch.rand(30, 9, generator=gen))
    assert torch.equal(distance_codes(proxy[perm]), distance_codes(proxy)[perm][:, perm])


@pytest.mark.parametrize("path", list(PATHS))
def test_stored_and_on_demand_selection_agree_on_float_features(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-integer float32 features with exact duplicates (tied rows): every path, every backend,
    the stored matrix and rows recomputed on demand give the same medoids and assignment."""
    monkeypatch.setattr(epic, "_AUGMENTED_BYTES", PATHS[path][0])
    monkeypatch.setattr(epic, "_BLOCK_ELEMS", PATHS[path][1])
    gen = torch.Generator().manual_seed(34)
    x = torch.randn(150, 50, generator=gen) / 3
    x[75:] = x[:75]  # every row has an exact twin: tied gains and tied assignments
    labels = torch.randint(0, 3, (150,), generator=gen)
    labels[75:] = labels[:75]
    reference = select_medoids(x, labels, 0.2, backend="torch")
    for kwargs in [{"backend": b} for b in BACKENDS] + [{"chunk_rows": 7, "max_matrix_bytes": 0}]:
        other = select_medoids(x, labels, 0.2, **kwargs)
        assert torch.equal(other.medoids, reference.medoids), kwargs
        assert torch.equal(other.assignment, reference.assignment), kwargs
    medoids = set(reference.medoids.tolist())
    # twins tie in every gain: the lower index is taken first, and a medoid's twin joins it
    assert all(j - 75 in medoids for j in medoids if j >= 75)
    assert all(int(reference.assignment[j + 75]) == j for j in medoids if j < 75 and j + 75 not in medoids)


def test_tiny_and_huge_magnitudes_give_the_same_codes() -> None:
    """Fixed point scales by any power of two exactly: 2**-1000 or 2**1000 times the data, same codes."""
    gen = torch.Generator().manual_seed(35)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    codes = distance_codes(x)
    for factor in (2.0**-1000, 2.0**1000):  # exact scalings of the data
        assert torch.equal(distance_codes(x * factor), codes), factor
    subnormal = distance_codes(x * 2.0**-1040)  # the data itself loses bits: codes within a unit
    assert (subnormal - codes).abs().max() <= 1


def test_lowest_argmax_breaks_ties_to_the_lowest_index() -> None:
    from fedepic.batched_greedy import lowest_argmax

    values = torch.tensor([[1, 5, 5, 2], [7, 7, 7, 7], [0, 1, 2, 3]])
    assert lowest_argmax(values, 1).tolist() == [1, 0, 3]
    assert lowest_argmax(values, 0).tolist() == [1, 1, 1, 1]
    assert lowest_argmax(torch.tensor([[2, 9], [9, 2], [9, 9]]), 0).tolist() == [1, 0]
    assert int(lowest_argmax(torch.tensor([3.0, 9.0, 9.0]))) == 1


def test_result_fields_and_budgets() -> None:
    x, labels = random_classes(4, [30, 1, 12])
    sel = select_medoids(x, labels, 0.1)
    assert [int(labels[m]) for m in sel.medoids] == [0] * 3 + [1] + [2] * 2
    assert int(sel.sizes.sum()) == len(x)
    assert torch.equal(torch.bincount(sel.assignment, minlength=len(x))[sel.medoids], sel.sizes)
    assert sel.drop.dtype == torch.bool and sel.drop.sum() == (sel.sizes <= 1).sum()
    assert sel.drop[sel.medoids[1 + 2]]  # the single-row class is an isolated medoid
    assert class_budget(0.1, 30) == 3 and class_budget(0.1, 1) == 1 and class_budget(0.3, 10) == 3
    assert class_budget(1.0, 7) == 7 and class_budget(0.01, 50) == 1


def test_planted_outliers_are_dropped() -> None:
    gen = torch.Generator().manual_seed(0)
    xs, labels, outliers = [], [], []
    for c in range(3):
        start = sum(len(t) for t in xs)
        far = torch.eye(8)[:3] * 40 + torch.randn(3, 8, generator=gen)
        xs.append(torch.cat([torch.randn(200, 8, generator=gen) + 5 * c, far + 5 * c]))
        labels.append(torch.full((203,), c))
        outliers += list(range(start + 200, start + 203))
    sel = select_medoids(torch.cat(xs), torch.cat(labels), 0.1)
    assert sel.drop[outliers].all()
    assert int(sel.drop.sum()) <= len(outliers) + 6  # few clean rows go with them


def test_deterministic_and_stochastic_option() -> None:
    x, labels = random_classes(6, [80, 50])
    a, b = select_medoids(x, labels, 0.2), select_medoids(x, labels, 0.2)
    assert torch.equal(a.medoids, b.medoids) and torch.equal(a.drop, b.drop)
    s1 = select_medoids(x, labels, 0.2, method="stochastic", seed=3)
    s2 = select_medoids(x, labels, 0.2, method="stochastic", seed=3)
    assert torch.equal(s1.medoids, s2.medoids)
    assert len(s1.medoids) == len(a.medoids) and len(set(s1.medoids.tolist())) == len(s1.medoids)


def symmetric_integer_classes(seed: int, halves: list[int], dim: int = 10):
    """Classes of points +-h with small integer h: each class mean is exactly 0, so
    every float64 step is exact and the codes cannot depend on the BLAS or device."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randint(-9, 10, (m, dim), generator=gen).double() for m in halves]
    x = torch.cat([torch.cat([h, -h]) for h in xs] + [torch.ones(1, dim)])  # + a 1-row class
    labels = torch.cat([torch.full((2 * m,), c) for c, m in enumerate(halves)] + [torch.tensor([len(halves)])])
    return x, labels


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cpu_and_cuda_agree() -> None:
    x, labels = symmetric_integer_classes(7, [300, 120, 1])
    cpu = select_medoids(x, labels, 0.1)
    gpu = select_medoids(x.cuda(), labels.cuda(), 0.1)
    assert torch.equal(cpu.medoids, gpu.medoids) and torch.equal(cpu.assignment, gpu.assignment)
    assert torch.equal(cpu.sizes, gpu.sizes) and torch.equal(cpu.drop, gpu.drop)
    assert gpu.medoids.device.type == "cpu"
    proxy = LastLayerProxy(torch.randn(50, 3), torch.rand(50, 8))
    cpu_p, gpu_p = select_medoids(proxy, labels[:50] % 2, 0.2), select_medoids(proxy.to("cuda"), labels[:50] % 2, 0.2)
    assert len(cpu_p.medoids) == len(gpu_p.medoids)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraction": 0.0},
        {"fraction": 1.5},
        {"fraction": float("nan")},
        {"threshold": -1},
        {"method": "greedy"},
        {"labels": torch.zeros(3, dtype=torch.long)},
        {"labels": torch.zeros(10)},
        {"features": torch.zeros(10)},
        {"features": torch.zeros(0, 2), "labels": torch.zeros(0, dtype=torch.long)},
        {"features": torch.full((10, 2), float("nan"))},
        {"chunk_rows": 0},
    ],
)
def test_bad_arguments_raise(kwargs: dict) -> None:
    args = {"features": torch.randn(10, 2), "labels": torch.zeros(10, dtype=torch.long), "fraction": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError):
        select_medoids(**args)


# ---------------------------------------------------------------- gradient proxies


class TinyNet(nn.Module):
    """features(x) -> [B, D]; classifier: nn.Linear; forward = classifier(features(x))."""

    def __init__(self, in_dim: int = 6, hidden: int = 5, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, hidden), nn.Tanh(), nn.Dropout(0.5))
        self.classifier = nn.Linear(hidden, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_logits_proxy_is_softmax_minus_onehot_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = TinyNet().train()
    x, y = torch.rand(9, 6), torch.randint(0, 4, (9,))
    proxy = gradient_proxy(model, x, y, "logits", batch_size=4)
    assert model.training
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), 1) - nn.functional.one_hot(y, 4)
    torch.testing.assert_close(proxy, expected)
    model.eval()
    gradient_proxy(model, x, y)
    assert not model.training


def test_logits_proxy_is_the_true_logit_gradient_and_uint8_input() -> None:
    torch.manual_seed(1)
    model = TinyNet().eval()
    x8, y = torch.randint(0, 256, (5, 6), dtype=torch.uint8), torch.randint(0, 4, (5,))
    logits = model(x8.float() / 255).detach().requires_grad_(True)
    nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    torch.testing.assert_close(gradient_proxy(model, x8, y), logits.grad)


def test_last_layer_proxy_distances_match_materialised_gradients() -> None:
    torch.manual_seed(2)
    model = TinyNet().eval()
    x, y = torch.rand(7, 6), torch.randint(0, 4, (7,))
    proxy = gradient_proxy(model, x, y, "last_layer", batch_size=3)
    assert isinstance(proxy, LastLayerProxy) and proxy.g.shape == (7, 4) and proxy.h.shape == (7, 5)
    grads = []
    for i in range(7):  # the true weight gradient of each example's loss
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(model.classifier.weight.grad.flatten().clone())
    explicit = torch.stack(grads)
    torch.testing.assert_close(proxy.materialize(), explicit)
    torch.testing.assert_close(pairwise_distances(proxy, proxy), pairwise_distances(explicit, explicit))
    sub = proxy[torch.tensor([1, 4, 6])]
    torch.testing.assert_close(pairwise_distances(sub, proxy), pairwise_distances(explicit[[1, 4, 6]], explicit))
    sel = select_medoids(proxy, y, 0.5)
    assert len(sel.medoids) == sum(class_budget(0.5, int((y == c).sum())) for c in y.unique())


def test_pairwise_distances_plain_and_wide() -> None:
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    torch.testing.assert_close(pairwise_distances(a, b), torch.cdist(a.double(), b.double()))
    wide = torch.randn(3, 20000)  # several float64 feature blocks
    expected = torch.cdist(wide.double(), wide.double())  # ~200 apart; the expansion cancels near 0
    torch.testing.assert_close(pairwise_distances(wide, wide), expected, atol=1e-4, rtol=1e-9)
    with pytest.raises(ValueError):
        pairwise_distances(a, torch.randn(2, 4))


# ------------------------------------------------------------ schedule and state


def test_schedule_pipelines() -> None:
    s40 = EpicSchedule.pipeline_40(0.1)
    assert s40.selection_epochs(40) == list(range(10, 35, 2)) and len(s40.selection_epochs(40)) == 13
    s200 = EpicSchedule.pipeline_200(0.2)
    assert s200.selection_epochs(200) == list(range(30, 151, 10)) and s200.fraction == 0.2
    plain = EpicSchedule(warmup=3, interval=1)
    assert not plain.is_selection_epoch(2) and plain.is_selection_epoch(3) and plain.is_selection_epoch(99)
    for bad in ({"fraction": 0}, {"interval": 0}, {"warmup": -1}, {"proxy": "full"}, {"threshold": -2}):
        with pytest.raises(ValueError):
            EpicSchedule(**bad)
    with pytest.raises(ValueError):
        plain.is_selection_epoch(-1)


class PlantedNet(nn.Module):
    """Identity features and logits = 10 * features: the proxy is softmax(10 x) - onehot."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(dim, dim)
        with torch.no_grad():
            self.classifier.weight.copy_(10 * torch.eye(dim))
            self.classifier.bias.zero_()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


def planted_data(seed: int = 0):
    """4 classes x 60 clean rows near their one-hot corner; 3 mislabelled poisons in class 0."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(4).repeat_interleave(60)
    x = torch.eye(4)[y] + 0.05 * torch.randn(240, 4, generator=gen)
    poison = torch.zeros(243, dtype=torch.bool)
    poison[240:] = True
    x = torch.cat([x, torch.eye(4)[1:] + 0.05 * torch.randn(3, 4, generator=gen)])
    return x, torch.cat([y, torch.zeros(3, dtype=torch.long)]), poison


def test_epic_state_drops_accumulate_and_stats() -> None:
    x, y, poison = planted_data()
    state = EpicState(len(x), EpicSchedule(fraction=0.1, warmup=1, interval=1))
    model = PlantedNet(4)
    assert state.maybe_select(0, model, x, y, poison) is None
    first = state.maybe_select(1, model, x, y, poison)
    assert first["epoch"] == 1 and first["poisons_dropped"] == 3 and first["poison_recall"] == 1.0
    dropped = ~state.keep
    assert first["dropped_total"] == first["dropped_now"] == int(dropped.sum())
    assert first["clean_dropped"] == int((dropped & ~poison).sum())
    assert math.isclose(first["clean_drop_rate"], first["clean_dropped"] / 240)
    assert first["selected_rows"] == 7 + 3 * 6 and first["selection_seconds"] >= 0
    before = state.keep.clone()
    second = state.select(model, x, y, poison)
    assert not (state.keep & ~before).any()  # drops never come back
    assert second["dropped_total"] == first["dropped_total"] + second["dropped_now"]
    assert second["poisons_dropped"] == 3 and "poison_recall" not in state.select(model, x, y)

    clone = EpicState(len(x))
    shared = clone.keep  # a training loop may hold the mask: loading updates it in place
    clone.load_state_dict(state.state_dict())
    assert torch.equal(shared, state.keep) and clone.selections == state.selections == 3
    clone.load_state_dict({"keep": state.keep.numpy(), "selections": 3})
    assert torch.equal(shared, state.keep)
    assert all(isinstance(v, bool) for v in state.state_dict()["keep"])
    with pytest.raises(ValueError):
        clone.load_state_dict({"keep": [True] * 5})
    with pytest.raises(ValueError):
        state.select(model, x[:10], y[:10])
    state.keep[:] = False
    assert state.select(model, x, y)["dropped_now"] == 0  # nothing left to select from


@pytest.mark.parametrize("proxy", ["logits", "last_layer"])
def test_epic_state_skips_a_diverged_model(proxy: str) -> None:
    """NaN weights (a node that aggregated a poisoned model) drop nothing instead of failing."""
    x, y, poison = planted_data(2)
    state = EpicState(len(x), EpicSchedule(fraction=0.1, proxy=proxy))
    model = PlantedNet(4)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    stats = state.select(model, x, y, poison)
    assert stats["skipped_nonfinite"] == 1 and stats["dropped_now"] == 0 and state.keep.all()
    assert stats["selection"] == 1 and stats["poisons_dropped"] == 0
    healthy = state.select(PlantedNet(4), x, y, poison)
    assert healthy["skipped_nonfinite"] == 0 and healthy["poisons_dropped"] == 3


def test_epic_state_last_layer_proxy() -> None:
    x, y, poison = planted_data(1)
    state = EpicState(len(x), EpicSchedule(fraction=0.1, proxy="last_layer"))
    stats = state.select(PlantedNet(4), x, y, poison)
    assert stats["poisons_dropped"] == 3 and stats["kept"] == len(x) - stats["dropped_total"]
