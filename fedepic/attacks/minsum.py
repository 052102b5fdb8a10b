"""Min-sum model poisoning, the sum-of-distances twin of min-max (``fedepic.attacks.model_attacks.minmax``).

Paper: Virat Shejwalkar, Amir Houmansadr, "Manipulating the Byzantine: Optimizing Model Poisoning
Attacks and Defenses for Federated Learning", NDSS 2021,
https://www.ndss-symposium.org/ndss-paper/manipulating-the-byzantine-optimizing-model-poisoning-attacks-and-defenses-for-federated-learning/

The malicious update is ``m = mu + gamma * p`` with mu the mean of the honest updates h_1..h_n and p
a perturbation direction (``-std``, ``-mu/||mu||`` or ``-sign(mu)``; the helper is shared with
min-max), and gamma the largest value with

    sum_j ||m - h_j||^2  <=  max_i sum_j ||h_i - h_j||^2

(the paper's min-sum: "the sum of squared distances of the malicious gradient from all the benign
gradients is upper bounded by the maximum sum of squared distances of any benign gradient from the
other benign gradients"). The paper finds gamma by a binary search over gamma; the problem has a closed
form, which we use. With e_j = h_j - mu (sum_j e_j = 0):

    sum_j ||mu + gamma p - h_j||^2 = n |p|^2 gamma^2 + sum_j |e_j|^2,
    sum_j ||h_i - h_j||^2          = n |e_i|^2 + sum_j |e_j|^2,

so the constraint reads ``|p|^2 gamma^2 <= max_i |e_i|^2``, i.e. ``gamma = max_i ||h_i - mu|| / ||p||``.

Example (p = -sign(mu) = (-1, 0), max_i ||h_i - mu|| = 1, so gamma = 1)::

    >>> import torch
    >>> minsum(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.zeros(2), None, perturbation="sign")
    tensor([1., 0.])

Cost: O(n D). Deviations: gamma is the exact optimum of the paper's problem instead of the result of its
binary search (which approaches it from below, to its tolerance); the sum runs over the honest
updates the attacker is given (at a server: the round's benign updates, omniscient as in the paper;
at a peer: the benign models its receivers aggregate); every attacker sends the same m, as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedepic.attacks.model_attacks import finite_inputs, perturbation_direction


@finite_inputs
def minsum(honest: Tensor, own: Tensor, generator: torch.Generator | None = None, /,
           perturbation: str = "std") -> Tensor:
    """``mu + gamma * p`` with ``gamma = max_i ||h_i - mu|| / ||p||`` (module docstring)."""
    mu, p = honest.mean(dim=0), perturbation_direction(honest, perturbation)
    p_norm = float(p.double().norm())
    if p_norm == 0.0:
        return mu  # identical honest updates (or mu = 0 for unit_vec / sign): no direction to move in
    radius = float((honest - mu).double().norm(dim=1).max())
    gamma = radius / p_norm
    return mu + gamma * p if math.isfinite(gamma) else mu
