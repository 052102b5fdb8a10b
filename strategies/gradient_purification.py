"""Gradient Purification (GP): a peer rule that detects malicious neighbours across rounds and
removes their accumulated contribution from the node's model.

Paper: Bin Li, Xiaoye Miao, Yan Zhang, Jianwei Yin, "Gradient Purification: Defense Against Data
Poisoning Attack in Decentralized Federated Learning", Frontiers of Computer Science 2025,
DOI 10.1007/s11704-025-50240-3, arXiv:2501.04453.

Exact rules (node i, one call of ``aggregate`` per round):

1. **Aggregation as a delta.** Gossip is written ``x_i <- x_i + sum_j w_ij (x_j - x_i)`` over the
   neighbours kept this round, with the Metropolis–Hastings weights renormalised over self + kept
   (see ``strategies.gossip.renormalised_weights``). Neighbour j's contribution this round is
   ``c_ij = w_ij (x_j - x_i)`` and the recording variable accumulates it: ``r_ij += c_ij``.
2. **Per-round suspicion** (``detector="robust"``, default). Over the models M = {x_i} ∪ {x_j : j
   active} (active = not yet confirmed), take the coordinate-wise median ``med`` and distances
   ``d_k = ||x_k - med||``. Neighbour j's robust z-score is ``z_j = (d_j - median(d)) / s`` with
   ``s = max(1.4826 * MAD(d), min_scale * median(d))``; the MAD term is the usual robust standard
   deviation, and the ``min_scale`` floor stops a near-consensus (tiny MAD) from turning ordinary
   non-IID spread into large z-scores. A directional term adds
   ``cos_weight * threshold * max(0, -cos(x_j - x_i, med - x_i))``: a neighbour pulling the node away
   from where the robust centre lies gets penalised, and a fully opposite one with
   ``cos_weight = 1`` is suspicious on direction alone. j is *suspicious* this round when
   ``score_j > threshold``. The node's own model is trusted (it is benign), and it enters the median,
   so even a neighbourhood of two can outvote one outlier; with a single neighbour nothing can be
   told apart and nothing is flagged.
   ``detector="epic"`` instead uses ``fedepic.epic.select_medoids`` on the active neighbours'
   updates ``x_j - x_i`` (one label group): a dropped update is suspicious (score 1, else 0).
3. **Consistency across rounds.** j is *confirmed* malicious when it was suspicious in the last
   ``patience`` rounds in a row, or in at least ``votes`` of the last ``window`` rounds in which it
   was seen. One noisy round therefore never triggers purification.
4. **Purification.** In the round j is confirmed: ``x_i <- x_i - r_ij`` (exactly the recorded
   aggregated contribution is removed, all at once), ``r_ij`` is discarded, and j is excluded from all
   later aggregation (weights renormalised over the rest). Mixing weights are kept; there is no
   restart and no reset of the model.
5. **Suspicious but unconfirmed** neighbours are still aggregated, and recorded. This is the point of
   the method: the paper sets GP against defenses that "reject suspicious gradients per iteration"
   (``exclude`` in ``simulations/dfl_node.py`` is that baseline, with this same detector). GP instead
   keeps aggregating until the consistency rule (3) is met, and then removes everything the
   neighbour contributed at once (4), so what the node learnt on top of it stays in its weights.
6. **Blatant outliers** are the one exception to rule 5: a neighbour whose score exceeds
   ``reject_score`` (default 30, ten times the threshold) is left out of the round's aggregation even
   before it is confirmed; it still counts as suspicious towards confirmation. Aggregating such a
   model even once wrecks the node: the next round's local training runs on the broken model, and
   purification removes the recorded contribution but not that training. It can also capture the
   node. On ``configs/noniid.yaml`` with seed 2 and ``reject_score=100``, two benign nodes had two
   sign-flipping neighbours each and aggregated both in round 1. Their own models then moved so far
   towards the attackers that from round 2 on the attackers scored below 1.3 (46 before), and they
   were never confirmed: precision and recall 0.73, and 4.3 points lost.
   Measured robust scores of malicious neighbours in rounds 1-2 (seeds 0-2) are label flipping 4.5-18,
   IPM 17-31, sign flipping 33-59 and Gaussian N(0, 1) models 780-1,250; benign neighbours score at
   most 1.2 (seed 0). So 30 keeps label-flipping nodes, whose models also hold authentic knowledge,
   aggregated until confirmed, and keeps sign-flipped and Gaussian models out at once.
   ``reject_score=None`` follows rule 5 without exception.
7. **Optional clipping** (``clip_tau``, default off). The paper presents GP as a layer over an
   existing DFL aggregation; with ``clip_tau`` set, that aggregation is ClippedGossip (He,
   Karimireddy, Jaggi 2022, ``strategies/scclip.py``): ``c_ij = w_ij clip(x_j - x_i, clip_tau)``,
   and the records hold the clipped contributions, so purification still removes exactly what was
   added. Clipping bounds what neighbours the detector misses can do, e.g. at a node whose
   neighbourhood has a malicious majority (the median is then theirs). Measured in
   benchmarks/RESULTS.md (other topologies).

8. **Non-finite models** (NaN / inf; not in the paper, which assumes finite messages). Such a
   neighbour is scored ``inf`` and flagged suspicious (it counts towards confirmation), is never
   aggregated or recorded, and is left out of the median and distances of rule 2, which it would
   otherwise turn into NaN for everyone. A non-finite own model is replaced by the coordinate-wise
   median of the finite neighbours before anything else (``strategies/finite.py``). The report lists
   both in ``nonfinite`` (neighbour ids) and ``own_nonfinite``.

Why these thresholds: z > 3 is the usual 3-sigma outlier rule on a robust scale. ``min_scale = 0.5``:
with 0.25, benign neighbours of low-degree nodes (after the malicious neighbour is excluded, three
models or fewer remain) began to be confirmed from round 6 on ``configs/noniid.yaml`` (detection
precision 0.76 by round 8, and GP purified their honest contributions); with 0.5 precision stayed
1.0 in every round while every label-flipping, sign-flipping, IPM and Gaussian neighbour was still
confirmed by round 2. ``patience = 2`` (config default) is the shortest history that still ignores
a single noisy round, and the shorter it is, the less a malicious model is aggregated before
purification (a suspect aggregated for ``patience - 1`` rounds is subtracted again, but the local
training done on top of it is not undone).

Purification removes the recorded *aggregated contribution*, which is what the paper purifies. The
indirect effects (local training done on a model that already contained that contribution, and what
other nodes passed on) are not undone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from strategies.epic_peer import epic_keep_mask
from strategies.finite import finite_rows
from strategies.gossip import check_stack, renormalised_weights, resolve_weights
from strategies.median import coordinate_median
from strategies.scclip import clip_rows

DETECTORS = ("robust", "epic")
_MAD_TO_STD = 1.4826  # MAD of a normal sample times this estimates its standard deviation


@dataclass
class PurificationState:
    """Per-node GP state: recording variables, suspicion history and the confirmed set.

    ``records[j]`` is the accumulated aggregated contribution of neighbour j (shape of the model
    vector); ``history[j]`` the suspicion flags of j in the recent rounds it was seen, oldest first;
    ``confirmed`` the neighbours purified and excluded for good; ``rounds`` the calls so far.
    """

    records: dict[int, Tensor] = field(default_factory=dict)
    history: dict[int, list[bool]] = field(default_factory=dict)
    confirmed: set[int] = field(default_factory=set)
    rounds: int = 0

    def state_dict(self) -> dict:
        """Plain form for Flower ``Context.state``: ``records`` maps ``str(j)`` to tensors (an
        ArrayRecord), ``meta`` maps names to ints / lists of ints (a ConfigRecord)."""
        meta: dict[str, int | list[int]] = {
            "rounds": self.rounds,
            "confirmed": sorted(self.confirmed),
            "history_ids": sorted(self.history),
        }
        for j, flags in self.history.items():
            meta[f"history.{j}"] = [int(b) for b in flags]
        return {"records": {str(j): r for j, r in sorted(self.records.items())}, "meta": meta}

    @classmethod
    def from_state_dict(cls, sd: dict) -> "PurificationState":
        """Inverse of ``state_dict``."""
        meta = sd["meta"]
        history = {int(j): [bool(b) for b in meta.get(f"history.{j}", [])] for j in meta["history_ids"]}
        return cls(
            records={int(j): torch.as_tensor(r) for j, r in sd["records"].items()},
            history=history,
            confirmed={int(j) for j in meta["confirmed"]},
            rounds=int(meta["rounds"]),
        )


@dataclass
class PurificationReport:
    """What one ``aggregate`` call did (neighbour ids throughout)."""

    scores: dict[int, float]
    flagged: list[int]  # suspicious this round (still aggregated unless confirmed or blatant: rules 5-6)
    purified: list[int]  # confirmed this round: their record was subtracted
    confirmed: list[int]  # every neighbour confirmed so far
    kept: list[int]  # neighbours aggregated this round
    nonfinite: list[int] = field(default_factory=list)  # sent NaN / inf this round: flagged, not aggregated (rule 8)
    own_nonfinite: bool = False  # own model was NaN / inf and was replaced (rule 8)


class GradientPurification:
    """Gradient Purification (Li, Miao, Zhang, Yin, Front. Comput. Sci. 2025). See module docstring.

    Every parameter is required: the registry (``fedepic.extensions.PEER_RULES``) binds them to the
    ``defense.purification.*`` keys, whose schema holds the one set of defaults (given in brackets).

    Parameters
    ----------
    threshold : float
        Suspicion threshold on the robust score [3: a 3-sigma robust outlier].
    patience : int
        Consecutive suspicious rounds that confirm a neighbour [2].
    window, votes : int, int or None
        Alternatively, ``votes`` suspicious rounds among the last ``window`` seen [4, 3]; ``votes=None``
        disables this route.
    min_scale : float
        Floor of the z-score scale as a fraction of the median distance [0.5: a neighbour must be at
        least ``1 + threshold * min_scale`` = 2.5 times the median distance away].
    cos_weight : float
        Weight of the directional term [0.5; 0 disables it].
    detector : str
        "robust" (above) or "epic" (EPIC drop flags on the updates) [robust].
    epic_fraction, epic_threshold : float, int
        ``select_medoids`` arguments for ``detector="epic"`` [0.5, 1].
    reject_score : float or None
        Rule 6; a suspect scoring above it is not aggregated this round [30, ten times the threshold;
        None aggregates every unconfirmed suspect, however far].
    clip_tau : float or None
        Rule 7; clip each neighbour's difference ``x_j - x_i`` to this L2 radius before weighting
        (ClippedGossip) [None: plain gossip].
    """

    aggregate_suspects = True  # rule 5: a suspicious, unconfirmed neighbour is still aggregated (and recorded)

    def __init__(
        self,
        *,
        threshold: float,
        patience: int,
        window: int,
        votes: int | None,
        min_scale: float,
        cos_weight: float,
        detector: str,
        epic_fraction: float,
        epic_threshold: int,
        reject_score: float | None,
        clip_tau: float | None,
    ) -> None:
        if not threshold > 0:
            raise ValueError(f"gp: threshold must be > 0, got {threshold!r}")
        if int(patience) != patience or patience < 1:
            raise ValueError(f"gp: patience must be a positive integer, got {patience!r}")
        if int(window) != window or window < 1:
            raise ValueError(f"gp: window must be a positive integer, got {window!r}")
        if votes is not None and not 1 <= votes <= window:
            raise ValueError(f"gp: votes must be in [1, window={window}] or None, got {votes!r}")
        if min_scale < 0 or cos_weight < 0:
            raise ValueError("gp: min_scale and cos_weight must be >= 0")
        if reject_score is not None and not reject_score > threshold:
            raise ValueError(f"gp: reject_score must exceed threshold={threshold} or be None, got {reject_score!r}")
        if clip_tau is not None and not clip_tau > 0:
            raise ValueError(f"gp: clip_tau must be > 0 or None, got {clip_tau!r}")
        if detector not in DETECTORS:
            raise ValueError(f"gp: detector must be one of {DETECTORS}, got {detector!r}")
        self.threshold = float(threshold)
        self.patience = int(patience)
        self.window = int(window)
        self.votes = votes
        self.min_scale = float(min_scale)
        self.cos_weight = float(cos_weight)
        self.detector = detector
        self.epic_fraction = epic_fraction
        self.epic_threshold = epic_threshold
        self.reject_score = None if reject_score is None else float(reject_score)
        self.clip_tau = None if clip_tau is None else float(clip_tau)

    @staticmethod
    def new_state() -> PurificationState:
        """A fresh per-node state (no records, nothing confirmed)."""
        return PurificationState()

    # -- detection ---------------------------------------------------------------------------
    def robust_scores(self, own: Tensor, neighbours: Tensor) -> Tensor:
        """Suspicion score [m] of each neighbour (robust z-score of the distance to the median
        plus the directional penalty)."""
        models = torch.cat([own.unsqueeze(0), neighbours])
        centre = coordinate_median(models)
        dist = (models - centre).norm(dim=1)
        med_d = coordinate_median(dist.unsqueeze(1)).squeeze(0)
        mad = coordinate_median((dist - med_d).abs().unsqueeze(1)).squeeze(0)
        # The tiny relative floor only guards against dividing float rounding by zero.
        floor = 1e-7 * (1.0 + float(centre.norm()))
        scale = max(_MAD_TO_STD * float(mad), self.min_scale * float(med_d), floor)
        z = (dist[1:] - med_d) / scale
        toward = (centre - own).unsqueeze(0).expand_as(neighbours)
        cos = F.cosine_similarity(neighbours - own, toward, dim=1)
        return z + self.cos_weight * self.threshold * (-cos).clamp_min(0)

    def suspicion(self, own: Tensor, neighbours: Tensor) -> tuple[Tensor, Tensor]:
        """(scores [m], suspicious BoolTensor [m]) for this round."""
        if neighbours.shape[0] == 0:
            empty = torch.zeros(0, dtype=own.dtype, device=own.device)
            return empty, empty.bool()
        if self.detector == "epic":
            drop = ~epic_keep_mask(own, neighbours, self.epic_fraction, self.epic_threshold)
            return drop.to(own.dtype), drop
        scores = self.robust_scores(own, neighbours)
        return scores, scores > self.threshold

    def is_blatant(self, score: float) -> bool:
        """Rule 6: a score beyond ``reject_score`` is left out of this round even before confirmation."""
        return self.reject_score is not None and score > self.reject_score

    def is_confirmed(self, flags: list[bool]) -> bool:
        """The consistency rule over one neighbour's recent suspicion flags (oldest first)."""
        if len(flags) >= self.patience and all(flags[-self.patience :]):
            return True
        return self.votes is not None and sum(flags[-self.window :]) >= self.votes

    # -- purification and aggregation --------------------------------------------------------
    @staticmethod
    def purify(own: Tensor, state: PurificationState, j: int) -> Tensor:
        """Remove neighbour j's recorded contribution: return ``own - r_ij``, discard r_ij and
        mark j confirmed (excluded from now on)."""
        record = state.records.pop(j, None)
        state.confirmed.add(j)
        if record is None:
            return own.clone()
        return own - record.to(device=own.device, dtype=own.dtype)

    def aggregate(
        self,
        own: Tensor,
        neighbours: Tensor,
        neighbour_ids: list[int],
        weights: Tensor | None,
        state: PurificationState,
    ) -> tuple[Tensor, PurificationReport]:
        """One GP round for a node: detect, confirm, purify, aggregate, record. Mutates ``state``."""
        check_stack(own, neighbours)
        ids = [int(j) for j in neighbour_ids]
        if len(ids) != neighbours.shape[0] or len(set(ids)) != len(ids):
            raise ValueError("gp: neighbour_ids must be distinct and match the rows of neighbours")
        w = resolve_weights(weights, len(ids), own)
        finite = finite_rows(neighbours).tolist()
        own_nonfinite = not bool(torch.isfinite(own).all())
        if own_nonfinite and any(finite):
            own = coordinate_median(neighbours[torch.tensor(finite, device=neighbours.device)])

        active = [r for r, j in enumerate(ids) if j not in state.confirmed and finite[r]]
        scores, suspicious = self.suspicion(own, neighbours[active])
        broken = [r for r, j in enumerate(ids) if j not in state.confirmed and not finite[r]]
        scores = torch.cat([scores, torch.full((len(broken),), float("inf"), dtype=scores.dtype, device=scores.device)])
        suspicious = torch.cat([suspicious, torch.ones(len(broken), dtype=torch.bool, device=suspicious.device)])
        active = active + broken
        report_scores: dict[int, float] = {}
        flagged: list[int] = []
        purified: list[int] = []
        keep = torch.zeros(len(ids), dtype=torch.bool, device=own.device)
        history_len = max(self.patience, self.window)
        for pos, row in enumerate(active):
            j = ids[row]
            report_scores[j] = float(scores[pos])
            flag = bool(suspicious[pos])
            flags = (state.history.get(j, []) + [flag])[-history_len:]
            state.history[j] = flags
            if flag:
                flagged.append(j)
            if flag and self.is_confirmed(flags):
                purified.append(j)
            elif finite[row] and (not flag or (self.aggregate_suspects and not self.is_blatant(float(scores[pos])))):
                keep[row] = True

        base = own
        for j in purified:
            base = self.purify(base, state, j)

        kept_w = renormalised_weights(w, keep)[1:]
        kept_rows = keep.nonzero().flatten().tolist()
        diffs = neighbours[kept_rows] - base
        if self.clip_tau is not None:
            diffs = clip_rows(diffs, self.clip_tau)
        contributions = kept_w[kept_rows].unsqueeze(1) * diffs
        for row, c in zip(kept_rows, contributions):
            j = ids[row]
            state.records[j] = state.records[j] + c if j in state.records else c.clone()
        new_own = base + contributions.sum(dim=0) if kept_rows else base.clone()
        state.rounds += 1
        report = PurificationReport(
            scores=report_scores,
            flagged=flagged,
            purified=purified,
            confirmed=sorted(state.confirmed),
            kept=[ids[r] for r in kept_rows],
            nonfinite=[ids[r] for r, ok in enumerate(finite) if not ok],
            own_nonfinite=own_nonfinite,
        )
        return new_own, report
