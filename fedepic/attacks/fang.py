"""Fang et al.'s full-knowledge local model poisoning attacks against Krum and the trimmed mean / median.

Paper: Minghong Fang, Xiaoyu Cao, Jinyuan Jia, Neil Zhenqiang Gong, "Local Model Poisoning Attacks to
Byzantine-Robust Federated Learning", USENIX Security 2020, arXiv:1911.11815,
https://www.usenix.org/conference/usenixsecurity20/presentation/fang

Both attacks push every coordinate against ``s``, "the changing direction of the global model parameters
when there are no attacks" (s_j = 1 if parameter j would increase, -1 if it would decrease). fedepic
works on updates at a server (update = local model - global model), where the global model w_Re is the
origin and the aggregate of the honest updates is the change, so ``s = sign(mean(honest))``: the
direction the honest updates move the model in (inferred: the paper computes the before-attack global
model with the rule itself; the mean gives the same sign wherever the honest updates agree, and is
what the authors' trimmed-mean code uses, ``direction = sign(sum(all_grads))``).

**Against Krum** (``fang_krum``; the paper's Section 3.3): the first attacker sends
``w'_1 = w_Re - lambda * s``, i.e. the update ``-lambda * s``, with lambda the largest value for which
Krum selects it. The search starts at the paper's upper bound (its Theorem 1)

    lambda_0 = 1 / ((m - 2c - 1) sqrt(d)) * min_{i benign} sum_{l in G(i, m - c - 2)} ||w_l - w_i||
               + 1 / sqrt(d) * max_{i benign} ||w_i - w_Re||,

m the vectors Krum sees, c the attackers, d the dimension, G(i, k) the k benign vectors nearest to w_i
(itself excluded), and halves lambda "until w'_1 is selected by Krum or lambda is smaller than a
threshold" (1e-5); the last lambda tried is used. The other attackers send copies of w'_1 (the paper:
"close to w'_1"; fedepic's server gives every malicious reply one vector).

**Against the trimmed mean and the median** (``fang_trimmed_mean``; Section 3.4, full knowledge):
with w_max,j / w_min,j the largest / smallest honest value of coordinate j and b = 2, coordinate j of
each crafted vector is drawn in ``[w_max,j, b * w_max,j]`` (``[w_max,j / b, w_max,j]`` when
w_max,j <= 0) where s_j = -1, and in ``[w_min,j / b, w_min,j]`` (``[b * w_min,j, w_min,j]`` when
w_min,j <= 0) where s_j = 1: beyond the honest extreme opposite to the model's direction. As in the
authors' code, the draw is ``w * r`` or ``w / r`` with ``r ~ U[1, b]`` per coordinate (``generator``);
a coordinate with s_j = 0 is 0.

Example (Krum; honest updates all point to +1, the crafted update points the other way)::

    >>> import torch
    >>> honest = torch.tensor([[1.0, 1.0], [1.2, 0.8], [0.9, 1.1], [1.1, 0.9]])
    >>> bool((fang_krum(honest, honest[0], None, f=1, n=None) < 0).all())
    True
    >>> fang_trimmed_mean(torch.tensor([[1.0, -1.0], [2.0, -3.0]]), torch.zeros(2), None, b=1.0)
    tensor([ 1., -1.])

Cost: Krum: O(m^2 d) per lambda tried (at most log2(lambda_0 / 1e-5) + 1 Krum runs); trimmed mean: O(n d).
Server FL only: the paper attacks Krum and the trimmed mean / median at a server, and neither it nor
a public code found defines the attacks for peers, so ``mode=decentralized`` refuses them
(``fedepic.config``, one line naming ``attack.model``). Deviations: every attacker sends the same draw:
the attack returns one crafted vector and the server puts it in every malicious reply
(``fedepic.server_rounds.inject_model_attack``), where the paper samples each crafted local model on its
own (inferred from "the crafted local models" being drawn in the interval per coordinate); the vectors
are updates at a server (w_Re = the origin); the direction s is that of the honest mean (above); the
attackers' own honest vectors are not in the
benign statistics (the paper's full knowledge includes them; fedepic's attack sees the benign rows);
when m - 2c - 1 <= 0 the first term of lambda_0 is dropped (the bound is undefined there), and when
lambda_0 = 0 the honest vectors are all 0 and so is the attack. Krum is Flower's (``strategies.krum``:
k = max(1, m - c - 2) neighbours, float64 distances, ties to the lower index, so an honest row wins a
tie).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedepic.attacks.model_attacks import finite_inputs, honest_rows

LAMBDA_THRESHOLD = 1e-5  # the paper's stopping threshold of the search over lambda


def model_direction(honest: Tensor) -> Tensor:
    """s: the sign of each coordinate of the honest mean (the model's direction without attack)."""
    return torch.sign(honest.mean(dim=0))


def krum_lambda_bound(honest: Tensor, attackers: int, total: int) -> float:
    """lambda_0 of Fang et al.'s Theorem 1 (module docstring), with w_Re at the origin."""
    d = honest.shape[1]
    wide = honest.double()
    distances = torch.cdist(wide, wide, compute_mode="donot_use_mm_for_euclid_dist")
    nearest = max(total - attackers - 2, 0)
    bound = float(wide.norm(dim=1).max()) / math.sqrt(d)
    denominator = total - 2 * attackers - 1
    if denominator > 0 and nearest > 0 and honest.shape[0] > 1:
        # each row's nearest others: the sorted row without its own 0 in front
        near = torch.sort(distances, dim=1).values[:, 1:nearest + 1].sum(dim=1)
        bound += float(near.min()) / (denominator * math.sqrt(d))
    return bound


def krum_picks_attacker(honest: Tensor, crafted: Tensor, attackers: int) -> bool:
    """Whether Flower's Krum (f = ``attackers``) over the honest rows and ``attackers`` copies of
    ``crafted`` selects a copy."""
    from strategies.krum import lowest_scores, multikrum_scores

    stack = torch.cat([honest, crafted.expand(attackers, -1)])
    return int(lowest_scores(multikrum_scores(stack, attackers), 1)[0]) >= honest.shape[0]


@finite_inputs
@honest_rows(1)
def fang_krum(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /, *, f: int,
              n: int | None) -> Tensor:
    """``-lambda * s``, lambda halved from lambda_0 until Krum selects it (module docstring); ``f``: the
    attackers c, ``n``: the vectors Krum sees (None: honest rows + f)."""
    attackers = max(int(f), 1)
    total = honest.shape[0] + attackers if n is None else int(n)
    direction = model_direction(honest)
    lam = krum_lambda_bound(honest, attackers, total)
    while lam > 0:
        if krum_picks_attacker(honest, -lam * direction, attackers) or lam / 2 < LAMBDA_THRESHOLD:
            break
        lam /= 2
    return -lam * direction


@finite_inputs
@honest_rows(1)
def fang_trimmed_mean(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /,
                      b: float = 2.0) -> Tensor:
    """Each coordinate beyond the honest extreme opposite to s, scaled by ``r ~ U[1, b]`` (module docstring)."""
    if b < 1:
        raise ValueError(f"fang_trimmed_mean: b must be >= 1, got {b!r}")
    direction = model_direction(honest)
    extreme = torch.where(direction > 0, honest.min(dim=0).values, honest.max(dim=0).values)
    r = 1 + (b - 1) * torch.rand(extreme.shape, generator=generator, dtype=extreme.dtype, device=extreme.device)
    same_sign = direction * extreme > 0  # the extreme lies on the model's side of 0: shrink it toward 0
    crafted = torch.where(same_sign, extreme / r, extreme * r)
    return torch.where(direction == 0, torch.zeros_like(crafted), crafted)
