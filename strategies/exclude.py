"""``exclude``: Gradient Purification's detector, rejecting suspicious neighbours, without purification.

Paper: Li, Miao, Zhang, Yin, "Gradient Purification: Defense Against Data Poisoning Attack in
Decentralized Federated Learning", Frontiers of Computer Science 2025 (arXiv 2501.04453). The paper
sets GP against the family of defenses that "reject suspicious gradients per iteration"; this rule is
that family, built on the same detector so that the comparison isolates the purification.
"""

from __future__ import annotations

from strategies.gradient_purification import GradientPurification


class ExcludeDetected(GradientPurification):
    """GP's detector and consistency rule, rejecting per round, without purification.

    A neighbour flagged this round is not aggregated this round; a confirmed one never again (its
    weight stays with the node). Nothing is subtracted, whatever ``target`` says, so no recording
    variable is kept. The parameters are GP's (``defense.purification.*``); see
    :class:`GradientPurification`. With ``oracle_round=1`` it is "exclude the malicious neighbours
    from the start" on the original graph and weights.

    Signature: the one rule signature of ``strategies/aggregate.py``, GP's ``__call__``: the senders in
    ``state["ids"]``, the suspicion history and confirmed set kept in ``state`` in plain form (the
    ``gp.*`` keys; the records group ``state["gp"]`` stays empty), the verdicts in ``Aggregate.info``
    (``strategies/gradient_purification.py``, "The signature"). Cost: GP's detector plus one mixing,
    O(k D) for k neighbours.
    """

    aggregate_suspects = False  # per-round rejection: a neighbour flagged this round is left out this round
    purifies = False
