"""MOZI / UBAR, a peer rule of the one signature (``strategies/aggregate.py``): a distance stage, then a
performance (loss) stage on the node's own minibatch.

Papers: Shangwei Guo, Tianwei Zhang, Xiaofei Xie, Lei Ma, Tao Xiang, Yang Liu, "Towards Byzantine-resilient
Learning in Decentralized Systems", arXiv:2002.08569, 2020 (MOZI), https://arxiv.org/abs/2002.08569; and
Shangwei Guo, Tianwei Zhang, Han Yu, Xiaofei Xie, Lei Ma, Tao Xiang, Yang Liu, "Byzantine-resilient
Decentralized Stochastic Gradient Descent", IEEE Transactions on Circuits and Systems for Video Technology
(TCSVT) 2021 (UBAR; link not verified here). (Author lists as remembered; the issue's brief
names "Guo, Zhang, Wang, Hu, Chen, Zhang".)

Read as ClippedGossip's code implements it (He, Karimireddy, Jaggi, ``epfml/byzantine-robust-decentralized-
optimizer``, ``codes/aggregator.py``, class ``Mozi``), which the issue names as the reference::

    data, target = self._sample_training_data()   # the next minibatch of the node's own data loader
    grad = self._compute_gradient(data, target)
    # Step 1: compute distance
    dist2i = sorted(((i, ||x_i - v||) for i, v in enumerate(neighbor_inputs)), key=distance)
    ns = dist2i[: int(self.rho * len(neighbor_inputs))]          # stage 1: the closest rho share
    neighbor_losses = [self._compute_scores(data, target, i) for i in neighbor_inputs]
    i_loss = self._compute_scores(data, target, local_inputs)
    for j, v in ns:
        if i_loss >= neighbor_losses[j]:                         # stage 2: loss on own batch <= own loss
            nr.append(j)
    if len(nr) == 0:
        nr = [dist2i[0][0]]                                      # fallback: the closest neighbour
    avg_nr = sum(neighbor_inputs[j] for j in nr) / len(nr)
    output = self.alpha * local_inputs + (1 - self.alpha) * avg_nr - self.lr * grad

(``_compute_scores`` loads a model vector into the worker's model and returns
``w.loss_func(w.model(data), target).item()`` under ``torch.no_grad()``; ``_sample_training_data``
draws the next batch of ``worker.data_loader``, the node's own training loader, and the one batch serves
the gradient and every score.) So, with l_i(v) the loss of model v on node i's minibatch B_i:

    N_s = the floor(rho m) neighbours closest to x_i (Euclidean),
    N_r = {j in N_s : l_i(x_j) <= l_i(x_i)}, or {the closest} if N_r is empty,
    x_i <- alpha x_i + (1 - alpha) mean_{j in N_r} x_j.

The loss: ``state["loss"]``, a callable mapping flat models [k, D] to their losses [k] on B_i, which
both peer engines put in the rule's state for the call (``fedepic.peer_node.own_batch_loss`` and
``rule_context``; the registry flags the rule ``needs_loss``). B_i is one minibatch of
``train.batch_size`` of the node's own rows drawn with the seed (seed, round, node)
(``peer_node.dsgt_batch``): under dsgd the very batch of the node's gradient this round; under
``defense.mozi.own_step`` MOZI's own second batch B'_i, as in the code, where one batch serves MOZI's
gradient and its scores (below). Called without ``state["loss"]`` the rule runs stage 1 only
(N_r = N_s, or the closest), and says so in ``info["stage"]`` (1).

Example (own [0]; neighbours 0.1, -0.3, 5; rho = 0.7 keeps floor(2.1) = 2, the two closest; with the
loss l(v) = |v - 0.2|, own's loss 0.2, neighbour 0.1 (loss 0.1) stays and -0.3 (loss 0.5) goes)::

    >>> import torch
    >>> stack = torch.tensor([[0.0], [0.1], [-0.3], [5.0]])
    >>> out = Mozi(0.7, 0.5)(stack, 0, None, {})
    >>> out.kept.tolist(), out.vector, out.info["stage"]
    ([True, True, True, False], tensor([-0.0500]), 1)
    >>> out = Mozi(0.7, 0.5)(stack, 0, None, {"loss": lambda rows: (rows[:, 0] - 0.2).abs()})
    >>> out.kept.tolist(), out.vector, out.info["stage"]
    ([True, True, False, False], tensor([0.0500]), 2)

MOZI's own gradient step (``defense.mozi.own_step: true``, dsgd only; ``fedepic.algorithms.dsgd.own_step``).
The code above ends in ``- self.lr * grad``, and ClippedGossip runs MOZI under ``DummyDecentralizedTrainer``
(``dumbbell.py:164-165``), whose ``_update_local_model`` takes no step ("``# g = worker.get_gradient()`` /
``# worker.set_gradient(g)`` / ``# worker.apply_gradient()``", ``codes/simulator.py:587-589``) but still
runs the trainer's ``compute_gradient`` ("``self.optimizer.zero_grad()`` ... ``loss.backward()``",
``codes/worker.py:74-77``; "compute_gradient as usual so that data loader works as usual",
``codes/simulator.py:577``). MOZI's ``_compute_gradient`` then back-propagates its own batch without
zeroing (``codes/aggregator.py:406-412``) and reads ``p.grad`` itself (``_get_updates``, ``:365-372``),
not the worker's momentum buffer, so (inferred from torch's accumulation of ``.grad``; the class's own
note: "we should count each mozi step as 2 iterations", ``:377``)::

    grad = g_i(x_i; B_i) + g_i(x_i; B'_i)      B_i: the trainer's minibatch, B'_i: MOZI's (its scores' too)
    x_i <- alpha x_i + (1 - alpha) mean_{j in N_r} x_j - lr grad       (lr = args.lr, constant, ``:555``)

with every x at the start of the round (no node stepped before sending). fedepic runs it as dsgd whose
every node sends x_i, takes m_i <- g_i(B_i) + g_i(B'_i) (no momentum) and steps after this rule,
x_i <- R_i - eta m_i, which is the line above (dsgd's node step, ``fedepic/algorithms/dsgd.py``, on
both engines); B'_i is a second minibatch drawn with the seed (seed, round, node, 1) and the loss stage
scores on it (``dsgd.step_batches``, ``peer_node.own_batch_loss``). The rule itself is the same with or
without the key. Deviations of the own step: ``train.client_momentum``,
``attack.momentum`` and ``decentralized.order`` do not act on such a member (the authors' other members
keep theirs); malicious nodes gossip (as under every fedepic rule) and step the same way, without
momentum (inferred: under the dummy trainer no worker steps on its own); eta follows ``train.milestones``
(the code's lr is fixed: "TODO: node that ideally the lr should be taken from the lr_scheduler", ``:383``;
constant in ClippedGossip's runs); ``train.weight_decay`` enters g (``p.grad`` holds no L2 term; 0 in the
authors' runs); the two minibatches are drawn with replacement from all the node's rows (the code's
come from two iterators over its loader).

Cost: O(m D) for the distances and the mean, O(m log m) for the sort, and the loss of own and of the
floor(rho m) stage-1 neighbours on one minibatch (the code scores every neighbour; only N_s's scores
are used); O(D) extra memory.

Deviations:
- ``- lr * grad``, the code's local step, is not part of the rule: fedepic's D-PSGD trains before it
  aggregates, and dsgd steps after it (``fedepic/algorithms/dsgd.py``); ``defense.mozi.own_step`` makes
  that step the code's (above).
- The losses are computed in eval mode (the code forwards the worker's model in the mode it is in;
  the same for models without dropout or BatchNorm), with the plain cross-entropy (no L2 term).
- Under dsgt the rule gets no loss (the tracker rows are no model): stage 1 only.
- ``weights`` are ignored (the code averages N_r equally and weighs own by alpha). Ties of distance go
  to the lower row (a stable sort). Non-finite neighbours are left out first
  (``strategies.aggregate.aggregate``), and m counts the finite ones. With a pre-aggregation step the
  loss scores the transformed rows.
- Defaults (``defense.mozi``): rho 0.4, alpha 0.5, ClippedGossip's runs (``aggmozi0.4,0.5``); own_step
  false (the dumbbell replay sets it, with rho 1: ``mozi1,0.5``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from strategies.aggregate import Aggregate, self_first
from strategies.gossip import own_only, split_own


class Mozi:
    """MOZI / UBAR at one node: the distance stage, the loss stage when ``state["loss"]`` is given, and
    the mixing (module docstring).

    Parameters
    ----------
    rho : float
        The share of neighbours stage 1 keeps, the closest ones (``defense.mozi.rho``).
    alpha : float
        The weight of the node's own model (``defense.mozi.alpha``).

    ``info``: ``selected`` (the rows of N_r, closest first), ``stage`` (2 with the loss stage, else 1).
    """

    def __init__(self, rho: float, alpha: float) -> None:
        if not 0 <= rho <= 1:
            raise ValueError(f"mozi: rho must lie in [0, 1], got {rho!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"mozi: alpha must lie in [0, 1], got {alpha!r}")
        self.rho, self.alpha = float(rho), float(alpha)

    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        own, neighbours, _ = split_own(stack, own_index, weights)
        m = neighbours.shape[0]
        if m == 0:
            return own_only(stack, own_index)
        order = torch.sort((neighbours.double() - own.double()).norm(dim=1).cpu(), stable=True).indices
        chosen = order[:int(self.rho * m)]  # N_s
        loss = state.get("loss")
        if loss is not None and len(chosen):
            scores = torch.as_tensor(loss(torch.cat([own.unsqueeze(0), neighbours[chosen.to(neighbours.device)]])))
            chosen = chosen[(scores[1:] <= scores[0]).cpu()]  # N_r: no worse than own on own batch
        if not len(chosen):
            chosen = order[:1]  # the closest
        rows = self_first(stack.shape[0], own_index)[1:][chosen]
        kept = torch.zeros(stack.shape[0], dtype=torch.bool)
        kept[own_index] = True
        kept[rows] = True
        mixed = self.alpha * own + (1 - self.alpha) * neighbours[chosen.to(neighbours.device)].mean(dim=0)
        return Aggregate(mixed, kept, info={"selected": rows.tolist(), "stage": 1 if loss is None else 2})
