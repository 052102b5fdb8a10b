"""``exclude``: Gradient Purification's detector, rejecting suspicious neighbours, without purification.

Paper: Li, Miao, Zhang, Yin, "Gradient Purification: Defense Against Data Poisoning Attack in
Decentralized Federated Learning", Frontiers of Computer Science 2025 (arXiv 2501.04453). The paper
sets GP against the family of defenses that "reject suspicious gradients per iteration"; this rule is
that family, built on the same detector so that the comparison isolates the purification.
"""

from __future__ import annotations

from torch import Tensor

from strategies.gradient_purification import GradientPurification, PurificationReport, PurificationState


class ExcludeDetected(GradientPurification):
    """GP's detector and consistency rule, rejecting per round, without purification.

    A neighbour flagged this round is not aggregated this round; a confirmed one never again. Nothing
    is subtracted, so no recording variable is kept (they are cleared after every call). The
    parameters are GP's (``defense.purification.*``); see :class:`GradientPurification`.
    """

    aggregate_suspects = False  # per-round rejection: a neighbour flagged this round is left out this round

    @staticmethod
    def purify(own: Tensor, state: PurificationState, j: int) -> Tensor:
        state.records.pop(j, None)
        state.confirmed.add(j)
        return own.clone()

    def aggregate(self, own: Tensor, neighbours: Tensor, ids: list[int], weights: Tensor | None,
                  state: PurificationState) -> tuple[Tensor, PurificationReport]:
        new, report = super().aggregate(own, neighbours, ids, weights, state)
        state.records.clear()  # nothing is ever purified, so nothing needs recording
        return new, report
