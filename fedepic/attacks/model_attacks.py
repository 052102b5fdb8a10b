"""Model-poisoning attacks: pure functions that turn a malicious client's update into a bad one.

Every attack has the signature
``attack(honest: Tensor[m, D], own: Tensor[D], generator: torch.Generator | None, **params) -> Tensor[D]``
where ``honest`` are the round's benign updates and ``own`` is the attacker's honest update. ALIE,
IPM and min-max use ``honest`` as in their papers: the attacker is omniscient and sees the round's
benign updates (a colluding attacker without that knowledge would use its own colluders' updates).

Non-finite inputs (not in the papers, which assume finite updates): an honest row holding NaN or inf
is left out before the attack uses ``honest`` (one such row makes mu, sigma and min-max's budget NaN),
and a non-finite ``own`` is replaced by the mean of the finite honest rows (zeros when there is none).
If leaving rows out drops ``honest`` below what the attack needs (2 for ALIE and min-max with "std",
1 for IPM and min-max otherwise), the attacker sends its (finite) own update. ``run_model_attack``
returns the update with the count of vectors left out; ``apply_model_attack`` only the update.
"""

from __future__ import annotations

import math
import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import Tensor

from fedepic.extensions import MODEL_ATTACKS
from fedepic.vectors import all_finite, finite_rows


def _check(honest: Tensor, own: Tensor, need_honest: int = 0) -> None:
    if own.dim() != 1:
        raise ValueError(f"own must be a 1-D update vector, got shape {tuple(own.shape)}")
    if honest.dim() != 2 or honest.shape[1] != own.shape[0]:
        raise ValueError(f"honest must have shape [m, {own.shape[0]}], got {tuple(honest.shape)}")
    if honest.shape[0] < need_honest:
        raise ValueError(f"this attack needs at least {need_honest} honest updates, got {honest.shape[0]}")


def nonfinite_inputs(honest: Tensor, own: Tensor) -> tuple[Tensor, Tensor, int]:
    """(finite honest rows, own or its replacement, how many vectors were left out); see the module docstring."""
    keep = finite_rows(honest)  # exact, and cheap on the usual all-finite rows
    count = int((~keep).sum())
    finite = honest if count == 0 else honest[keep]  # no copy of the common all-finite case
    if not all_finite(own):
        count += 1
        own = finite.mean(dim=0) if finite.shape[0] else torch.zeros_like(own)
    return finite, own, count


def honest_rows(count: int | Callable[[dict[str, Any]], int]) -> Callable[[Callable], Callable]:
    """Declare, on an attack function, how many honest updates it needs: ``count``, or ``count(params)``
    where the need depends on its parameters. Put it under ``@finite_inputs``, which reads it (as do the
    engines, :func:`honest_rows_needed`); an attack without it needs none."""
    def declare(attack: Callable) -> Callable:
        attack.honest_rows = count if callable(count) else (lambda params: count)
        return attack

    return declare


def std_needs_two(params: dict[str, Any]) -> int:
    """Min-max's and min-sum's need: 2 honest rows for the "std" direction (a sample std), else 1."""
    return 2 if params.get("perturbation", "std") == "std" else 1


def rows_needed(attack: Callable, params: dict[str, Any]) -> int:
    """How many honest updates the attack function ``attack`` needs with ``params`` (:func:`honest_rows`)."""
    declared = getattr(attack, "honest_rows", None)
    return 0 if declared is None else int(declared(params))


def honest_rows_needed(name: str, params: dict[str, Any]) -> int:
    """How many honest updates model attack ``name`` (``fedepic.extensions.MODEL_ATTACKS``) needs with
    ``params``: what its function declares (:func:`honest_rows`), 0 for those that need none."""
    return rows_needed(MODEL_ATTACKS.get(name).load(), params)


def finite_inputs(attack: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``attack`` on the finite inputs only (module docstring); shapes are checked on the raw inputs."""

    @functools.wraps(attack)
    def wrapped(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, **params: Any) -> Tensor:
        need = rows_needed(attack, params)
        _check(honest, own, need)
        finite, own, _ = nonfinite_inputs(honest, own)
        if finite.shape[0] < need:
            return own.clone()
        return attack(finite, own, generator, **params)

    return wrapped


def column_std(x: Tensor) -> Tensor:
    """Unbiased per-coordinate std of the rows of x [m, D] (m >= 2); same as ``x.std(dim=0)``,
    written out because torch's strided dim-0 reduction is several times slower on CPU."""
    return ((x - x.mean(dim=0)).square().sum(dim=0) / (x.shape[0] - 1)).sqrt()


@finite_inputs
def no_attack(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /) -> Tensor:
    """The honest update, unchanged (a baseline)."""
    return own.clone()


@finite_inputs
def sign_flip(
    honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, scale: float = 1.0
) -> Tensor:
    """Sign flipping: ``-scale * own`` (scale 1 is the classic attack); registered as ``sign_flip`` and,
    under the literature's name, as ``bit_flip`` (the same function, scale 1).

    Paper: the "bit-flipping" baseline of Sai Praneeth Karimireddy, Lie He, Martin Jaggi, "Learning from
    History for Byzantine Robust Optimization", ICML 2021, arXiv:2012.10333, and of Sai Praneeth
    Karimireddy, Lie He, Martin Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
    Bucketing", ICLR 2022, https://openreview.net/forum?id=jXKKDEi5vJt ("BF"); its decentralized form in
    Lie He, Sai Praneeth Karimireddy, Martin Jaggi, "Byzantine-robust decentralized learning via
    ClippedGossip", arXiv:2202.01545, 2022.

    The authors' code defines it as the negated own vector: in ``epfml/byzantine-robust-noniid-optimizer``
    (``codes/attacks/bitflipping.py``) the Byzantine worker's ``get_gradient`` returns
    ``-super().get_gradient()``, the negation of the gradient it computed honestly; in
    ``epfml/byzantine-robust-decentralized-optimizer`` (``codes/attacks.py``, ``BitFlippingWorker``)
    it sends ``-flattened_model``, its negated model. fedepic's ``sign_flip`` is that rule: at a server
    ``own`` is the attacker's update (model - global model, or its momentum under per_step), at a peer
    its trained model (``fedepic/peer_routing.py``), so bit flipping and sign flipping are one attack
    and ``bit_flip`` is an alias, not a second implementation. It differs from ByzFL's ``SignFlipping``,
    which sends ``-mean(honest)`` (omniscient: the negated mean of the honest vectors; Allen-Zhu et al.,
    ICLR 2021): fedepic's needs no honest vector and negates the attacker's own. Deviation: none for
    scale 1; ``scale`` (not in the papers, no config key) scales the negation.

    >>> sign_flip(torch.zeros(1, 2), torch.tensor([1.0, -2.0]))
    tensor([-1.,  2.])
    """
    _check(honest, own)
    return -scale * own


@finite_inputs
def gaussian(
    honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, *, sigma: float
) -> Tensor:
    """Gaussian noise update ``N(0, sigma^2 I)``, independent of the honest update.

    Paper: the Gaussian Byzantine workers of Peva Blanchard, El Mahdi El Mhamdi, Rachid Guerraoui,
    Julien Stainer, "Machine Learning with Adversaries", NeurIPS 2017.

    ``sigma`` is in update units (``attack.sigma``; 1 is far larger than a typical SGD update, i.e.
    the "random update" Byzantine baseline). Pass a seeded ``generator`` (on own's device) to reproduce.
    """
    _check(honest, own)
    if sigma < 0:
        raise ValueError(f"gaussian: sigma must be >= 0, got {sigma!r}")
    noise = torch.randn(own.shape, generator=generator, dtype=own.dtype, device=own.device)
    return sigma * noise


@finite_inputs
def scaling(
    honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, *, factor: float
) -> Tensor:
    """Boosting: ``factor * own``, model replacement style, where the boost cancels the averaging of
    the other updates (``factor``: ``attack.scale``).

    Paper: Eugene Bagdasaryan, Andreas Veit, Yiqing Hua, Deborah Estrin, Vitaly Shmatikov, "How To
    Backdoor Federated Learning", AISTATS 2020, arXiv:1807.00459.
    """
    _check(honest, own)
    return factor * own


def alie_z(n: int, f: int) -> float:
    """ALIE's z_max (Baruch et al., NeurIPS 2019): ``s = floor(n/2 + 1) - f``,
    ``z_max = Phi^{-1}((n - s) / n)`` for n workers of which f are corrupted."""
    if not 0 < f < n:
        raise ValueError(f"alie: needs 0 < f < n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0 < p < 1:
        raise ValueError(f"alie: (n - s)/n = {p:.3f} is outside (0, 1) for n={n}, f={f}")
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)))


@finite_inputs
@honest_rows(2)
def alie(
    honest: Tensor,
    own: Tensor,
    generator: torch.Generator | None = None,
    /,
    *,
    f: int,
    n: int | None,
    z: float | None,
) -> Tensor:
    """A Little Is Enough (Moran Baruch, Gilad Baruch, Yoav Goldberg, "A Little Is Enough: Circumventing
    Defenses For Distributed Learning", NeurIPS 2019, arXiv:1902.06156): ``mu - z_max * sigma``
    per coordinate, with mu / sigma the mean / sample std (unbiased) of the honest updates.

    ``z_max`` follows the paper (``alie_z(n, f)``), with n = total clients (None: ``m + f``)
    and f = malicious clients. ByzFL fixes z = 1.5; pass ``z`` (``attack.alie_z``) to override.
    """
    _check(honest, own, need_honest=2)
    if z is None:
        z = alie_z(honest.shape[0] + f if n is None else n, f)
    return honest.mean(dim=0) - z * column_std(honest)


@finite_inputs
@honest_rows(1)
def ipm(
    honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, *, epsilon: float
) -> Tensor:
    """Inner product manipulation (Cong Xie, Oluwasanmi Koyejo, Indranil Gupta, "Fall of Empires:
    Breaking Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2019, arXiv:1903.03936):
    ``-epsilon * mean(honest)``. A small epsilon (``attack.ipm_eps``, 0.1 by default) keeps the update close to the honest
    ones so robust rules accept it, while its inner product with the true gradient is negative."""
    _check(honest, own, need_honest=1)
    return -epsilon * honest.mean(dim=0)


def perturbation_direction(honest: Tensor, kind: str) -> Tensor:
    """Min-max's and min-sum's direction p (Shejwalkar & Houmansadr, NDSS 2021): ``-std`` (unbiased),
    ``-mu/||mu||`` ("unit_vec") or ``-sign(mu)`` of the honest rows."""
    mu = honest.mean(dim=0)
    if kind == "std":
        return -column_std(honest)
    if kind == "unit_vec":
        return -mu / mu.norm().clamp_min(torch.finfo(mu.dtype).tiny)
    if kind == "sign":
        return -torch.sign(mu)
    raise ValueError(f"perturbation must be 'std', 'unit_vec' or 'sign', got {kind!r}")


@finite_inputs
@honest_rows(std_needs_two)
def minmax(
    honest: Tensor,
    own: Tensor,
    generator: torch.Generator | None = None,
    /,
    perturbation: str = "std",
) -> Tensor:
    """Min-max attack (Virat Shejwalkar, Amir Houmansadr, "Manipulating the Byzantine: Optimizing Model
    Poisoning Attacks and Defenses for Federated Learning", NDSS 2021): ``mu + gamma * p``.

    p is ``-std`` (default), ``-mu/||mu||`` ("unit_vec") or ``-sign(mu)``; gamma is the largest value
    with ``max_i ||m - h_i|| <= B = max_{i,j} ||h_i - h_j||``. The paper finds gamma by binary
    search; we solve the same problem exactly. With ``e_i = h_i - mu``,
    ``||mu + gamma p - h_i||^2 = |p|^2 gamma^2 - 2 <e_i, p> gamma + |e_i|^2``, so constraint i holds
    up to the larger root ``(b_i + sqrt(b_i^2 - |p|^2 (|e_i|^2 - B^2))) / |p|^2`` (b_i = <e_i, p>),
    which is real and >= 0 because ``|e_i| <= B`` (mu lies in the hull). gamma is the smallest root.
    """
    _check(honest, own, need_honest=2 if perturbation == "std" else 1)
    mu, p = honest.mean(dim=0), perturbation_direction(honest, perturbation)
    p_sq = float(p.double().square().sum())
    if p_sq == 0.0:
        return mu  # identical honest updates: no room to move
    m = honest.shape[0]
    pairs = (float(torch.dist(honest[i], honest[j])) for i in range(m) for j in range(i + 1, m))
    budget_sq = max(pairs, default=0.0) ** 2
    gamma = math.inf
    for h in honest:
        e = (h - mu).double()  # float64 scalars: the root formula subtracts close quantities
        b, e_sq = float(e @ p.double()), float(e @ e)
        disc = max(b * b - p_sq * (e_sq - budget_sq), 0.0)
        gamma = min(gamma, (b + math.sqrt(disc)) / p_sq)
    return mu + gamma * p


@dataclass(frozen=True)
class AttackOutcome:
    """A model attack's update and the number of input vectors (honest rows, own) left out as NaN / inf."""

    update: Tensor
    nonfinite: int


def run_model_attack(
    name: str,
    honest: Tensor,
    own: Tensor,
    generator: torch.Generator | None = None,
    **params: Any,
) -> AttackOutcome:
    """Apply the model attack ``name`` (``fedepic.extensions.MODEL_ATTACKS``; its parameters from
    ``model_attack_arguments``), reporting the non-finite inputs; ValueError for an unknown name or
    parameter."""
    attack = MODEL_ATTACKS.get(name).load()
    try:
        update = attack(honest, own, generator, **params)
    except TypeError as err:
        raise ValueError(f"model attack {name!r}: bad parameters {sorted(params)}: {err}") from None
    return AttackOutcome(update, nonfinite_inputs(honest, own)[2])


def apply_model_attack(
    name: str,
    honest: Tensor,
    own: Tensor,
    generator: torch.Generator | None = None,
    **params: Any,
) -> Tensor:
    """The update of ``run_model_attack`` (NaN / inf inputs left out, uncounted)."""
    return run_model_attack(name, honest, own, generator, **params).update


def model_attack_arguments(attack: Any, *, n: int | None = None, f: int | None = None,
                           **runtime: Any) -> dict[str, Any]:
    """The keyword arguments of the configured model attack (``attack``: the config's ``attack``
    section, or a whole config): its config keys, plus ``n`` (vectors the aggregation sees) and ``f``
    (malicious among them) for the attacks that take them (ALIE), and any other ``runtime`` value the
    attack's signature names (``aggregator``: the defense, for the optimized attacks). The one builder
    every mode uses."""
    section = getattr(attack, "attack", attack)
    return MODEL_ATTACKS.arguments(section.model, SimpleNamespace(attack=section), {"n": n, "f": f, **runtime})


def needs_honest(name: str) -> bool:
    """True for the omniscient attacks built from the round's honest updates (applied by the server or router)."""
    return MODEL_ATTACKS.has(name, "needs_honest")


def acts_where_trained(name: str) -> bool:
    """True for the attacks a malicious client applies to its own update where it trains: neither
    ``inactive`` (no attack) nor ``needs_honest``."""
    return not MODEL_ATTACKS.has(name, "inactive") and not needs_honest(name)
