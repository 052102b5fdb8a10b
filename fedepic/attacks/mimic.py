"""The mimic attack: every attacker sends a copy of one honest worker's vector, the worker chosen in a
warm-up phase to over-weight the direction in which the honest workers differ most.

Paper: Sai Praneeth Karimireddy, Lie He, Martin Jaggi, "Byzantine-Robust Learning on Heterogeneous
Datasets via Bucketing", ICLR 2022, https://openreview.net/forum?id=jXKKDEi5vJt (arXiv:2006.09365);
code ``epfml/byzantine-robust-noniid-optimizer`` (``codes/attacks/mimic.py``, ``MimicVariantAttacker``).

The rule of the authors' code, over rounds t = 0, 1, ... with h_1..h_m the round's honest vectors and
hbar_t their mean (mu and z are kept across rounds):

- t = 0: ``mu = hbar_0``; z0 ~ N(0, I) from a generator seeded 0;
  ``z = c / ||c||`` with ``c = sum_i <h_i - mu, z0> (h_i - mu)`` (one power-iteration step towards the
  top principal direction of the honest vectors);
- 0 < t < warmup: ``mu <- t/(1+t) mu + hbar_t/(1+t)``; ``c = sum_i <h_i - mu, z> (h_i - mu)``;
  ``z <- t/(1+t) z + c/||c|| / (1+t)``, then ``z <- z / ||z||``;
- t < warmup: the target is the honest worker with the largest ``<h_i, z>``, and its vector is sent;
- t >= warmup: the target is fixed, and the attackers send its vector of the round.

State (the smallest way found): the attack keeps ``{"t", "mu", "z", "target"}`` in a ``state`` dict its
caller owns and passes every round; the server keeps it in the member's ``Progress`` (checkpointed with
it) and passes the benign replies' client ids as ``ids``, so the target is a client, not a row.

Example (the honest vectors differ along the first axis; the largest projection is the last row)::

    >>> import torch
    >>> honest = torch.tensor([[-2.0, 0.0], [0.0, 0.1], [3.0, 0.0]])
    >>> state = {}
    >>> mimic(honest, torch.zeros(2), None, warmup=1, state=state, ids=[7, 8, 9]), state["target"]
    (tensor([3., 0.]), 9)
    >>> mimic(honest.flip(0), torch.zeros(2), None, warmup=1, state=state, ids=[9, 8, 7])  # t >= warmup: client 9
    tensor([3., 0.])

Cost: O(m D) per round, two D-vectors of state. Deviations: z0 is drawn in the honest vectors' dtype
(``torch.randn(..., dtype=honest.dtype)``), so float32 and float64 inputs start from different z0 (torch's
draws depend on the dtype); the authors' code draws it in torch's default dtype, float32
(``torch.randn(len(curr_avg), generator=g, device=curr_avg.device)``, ``codes/attacks/mimic.py``), which
fedepic's float32 updates match; the sign of z is that of the power step
from the seeded z0 (as in the code: argmax of <h_i, z>, the code's default ``argmax=True``); honest rows
holding NaN / inf are left out (a finite own is not needed: the attack never sends it unless no honest
row is finite); after the warm-up, a target not among the round's honest vectors (not sampled, or
non-finite) is replaced for that round by the row of largest <h_i, z> (the authors' simulator always has
every worker); without ``state`` every round is round 0: the target is chosen afresh from that
round's vectors, with no memory. At peers the decentralized engine keeps the memory per attacker (per
attacker and receiver under ``attack.per_neighbour``) across rounds and in its checkpoints
(``fedepic.peer_rounds.run_peer_member``, ``MemberStart.attack``), and the router passes the node ids of
the honest models, crafted against the union of the receivers' honest models
(``fedepic/peer_routing.py``); the target is a node, chosen once after the warm-up.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fedepic.attacks.model_attacks import honest_rows, nonfinite_inputs
from fedepic.vectors import finite_rows


def spread_step(honest: Tensor, mu: Tensor, z: Tensor) -> Tensor:
    """``c / ||c||`` with ``c = sum_i <h_i - mu, z> (h_i - mu)`` (z itself when c = 0)."""
    centred = honest - mu
    c = (centred @ z) @ centred
    norm = c.norm()
    return c / norm if float(norm) > 0 else z


def updated_direction(honest: Tensor, state: dict, t: int) -> None:
    """The warm-up's update of ``state["mu"]`` and ``state["z"]`` at round t (module docstring)."""
    mean = honest.mean(dim=0)
    if t == 0:
        z0 = torch.randn(honest.shape[1], generator=torch.Generator().manual_seed(0), dtype=honest.dtype)
        state["mu"] = mean
        state["z"] = spread_step(honest, mean, z0.to(honest.device))
        return
    mu = t / (1 + t) * state["mu"].to(honest) + mean / (1 + t)
    z = t / (1 + t) * state["z"].to(honest) + spread_step(honest, mu, state["z"].to(honest)) / (1 + t)
    state["mu"], state["z"] = mu, z / z.norm().clamp_min(torch.finfo(z.dtype).tiny)


@honest_rows(1)
def mimic(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, *, warmup: int,
          state: Optional[dict] = None, ids: Optional[Sequence[int]] = None) -> Tensor:
    """The vector of the honest worker mimicked this round (module docstring); ``state`` is updated in place."""
    if honest.dim() != 2 or own.dim() != 1 or honest.shape[1] != own.shape[0]:
        raise ValueError(f"mimic: honest [m, D] and own [D] expected, got {tuple(honest.shape)}, {tuple(own.shape)}")
    ids = list(range(honest.shape[0])) if ids is None else [int(i) for i in ids]
    if len(ids) != honest.shape[0]:
        raise ValueError(f"mimic: {len(ids)} ids for {honest.shape[0]} honest rows")
    keep = finite_rows(honest)
    ids = [i for i, ok in zip(ids, keep.tolist()) if ok]
    finite, own, _ = nonfinite_inputs(honest, own)
    if finite.shape[0] == 0:
        return own.clone()
    state = {} if state is None else state
    t = int(state.get("t", 0))
    if t < warmup or t == 0:
        updated_direction(finite, state, t)
    if t < warmup or state.get("target") not in ids:
        row = int(torch.argmax(finite @ state["z"].to(finite)))
        if t < warmup:
            state["target"] = ids[row]
    else:
        row = ids.index(state["target"])
    state["t"] = t + 1
    return finite[row].clone()
