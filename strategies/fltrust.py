"""FLTrust, a server rule of the one signature (``strategies/aggregate.py``).

Paper: Xiaoyu Cao, Minghong Fang, Jia Liu, Neil Zhenqiang Gong, "FLTrust: Byzantine-robust Federated
Learning via Trust Bootstrapping", NDSS 2021, arXiv:2012.13995, https://arxiv.org/abs/2012.13995.

The server keeps a small clean root dataset and, each round, computes its own update g_0 from it as a
client would (the "server model update"). Each client update g_i gets the trust score
TS_i = ReLU(cos(g_i, g_0)), is rescaled to the length of g_0, and the aggregate is their trust-weighted
mean:

    TS_i = max(0, <g_i, g_0> / (||g_i|| ||g_0||)),    g = sum_i TS_i (||g_0|| / ||g_i||) g_i / sum_i TS_i.

Example (g_0 = [1, 0]; g_1 = [2, 0] (cos 1), g_2 = [1, 1] (cos 1/sqrt 2), g_3 = [-1, 0] (cos -1 -> trust 0);
rescaled to length 1: [1, 0] and [1, 1]/sqrt 2; g = ([1, 0] + [0.5, 0.5]) / 1.7071)::

    >>> import torch
    >>> stack = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    >>> out = FLTrust()(stack, None, None, {"server_update": torch.tensor([1.0, 0.0])})
    >>> out.kept.tolist(), out.vector, [round(t, 4) for t in out.info["trust"]]
    ([True, True, False], tensor([0.8787, 0.2929]), [1.0, 0.7071, 0.0])

Cost: O(n D) (the norms, the inner products and the weighted sum), O(D) extra memory.

The server update: ``state["server_update"]`` [D], which the round engine computes each round on the
root set and hands the rule for the call (``fedepic.root_set``, ``fedepic.server_rounds.play_round``).

Deviations and readings:
- ``kept`` marks the updates of positive trust; ``info["trust"]`` lists TS_i.
- A zero client update has no direction: its trust is 0 (inferred; the paper's cosine is undefined).
- When every trust is 0 (or g_0 is zero) there is nothing to average: the vector is None and the server
  keeps its model this round (inferred; FLPoison's port falls back to equal weights, the paper does not
  say).
- ``weights`` (example counts) are ignored: the paper's weights are the trust scores.
- Not translation-equivariant: it reads the updates' directions, as the round engine hands them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate


class FLTrust:
    """FLTrust (Cao, Fang, Liu, Gong, NDSS 2021) over the clients' updates, given the server's own update
    in ``state["server_update"]`` (module docstring). No parameters: the root set's size is the round
    engine's (``defense.fltrust.root_size``)."""

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        g0 = state.get("server_update")
        if g0 is None:
            raise ValueError("fltrust: needs the server's update in state['server_update'] (set by the round engine)")
        g0 = torch.as_tensor(g0).to(device=stack.device, dtype=torch.float64).reshape(-1)
        if g0.shape[0] != stack.shape[1]:
            raise ValueError(f"fltrust: server update has {g0.shape[0]} entries, the updates {stack.shape[1]}")
        rows = stack.double()
        norms = rows.norm(dim=1)
        g0_norm = g0.norm()
        safe = norms.clamp_min(torch.finfo(torch.float64).tiny)
        cosine = (rows @ g0) / (safe * g0_norm.clamp_min(torch.finfo(torch.float64).tiny))
        trust = torch.where(norms > 0, cosine.clamp_min(0.0), torch.zeros_like(cosine))
        kept = (trust > 0).cpu()
        info = {"trust": trust.cpu().tolist(), "server_update_norm": float(g0_norm)}
        if not bool(kept.any()):
            return Aggregate(None, kept, info=info)
        scaled = rows * (trust * g0_norm / safe)[:, None]
        return Aggregate((scaled.sum(dim=0) / trust.sum()).to(stack.dtype), kept, info=info)
