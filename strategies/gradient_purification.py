"""Gradient Purification (GP): a peer rule that keeps one recording variable per neighbour, detects
malicious neighbours across rounds and, once one is confirmed, removes everything it contributed to
the node's gradient state (or, as an option, its model) at once.

Paper: Bin Li, Xiaoye Miao, Yan Zhang, Jianwei Yin, "Gradient Purification: Defense Against Data
Poisoning Attack in Decentralized Federated Learning", Frontiers of Computer Science 2025,
DOI 10.1007/s11704-025-50240-3, arXiv:2501.04453.

What the paper says (its abstracts are all we could read; the quotes are from them):
- Q1 "It aims to separately mitigate the harm in gradients and retain benefits embedded in model weights."
- Q2 "a recording variable is designed to track historically aggregated gradients from one of its
  neighbors. It allows benign clients to precisely detect malicious neighbors and mitigate all
  aggregated malicious gradients at once."
- Q3 "Upon mitigation, benign clients optimize model weights using purified gradients. This
  optimization not only retains previously beneficial components from malicious clients but also
  exploits canonical contributions from benign clients."
- Q4 (v1) GP "integrates seamlessly with existing DFL aggregation"; "Upon mitigation, GPD optimizes
  model weights via aggregating gradients solely from benign clients".

What that becomes here, rule by rule (node i, one call per round). "[Q]" marks a rule read off a
quote, "[inferred]" one we had to choose, since the paper's body was not available:

1. **The gradient state** [inferred from Q2-Q4 and from the same group's LPPA, arXiv 2501.04409, which
   works in gradient-tracking DFL]. Under ``decentralized.algorithm=dsgt`` nodes exchange a model x_j
   and a gradient tracker y_j (``fedepic/peer_node.py``), and the tracker is the gradient that
   moves the weights. GP acts on the trackers (``target="gradient"``, what ``auto`` picks there).
2. **Mixing as deltas, and the records** [Q2; the delta form is inferred]. The aggregation is
   ``v_i <- v_i + sum_j w_ij (v_j - v_i)`` over the neighbours kept this round (v = y for the gradient
   state, x for the weights); neighbour j's contribution is ``c_ij = w_ij (v_j - v_i)`` and its
   recording variable accumulates it: ``r_ij += c_ij``. A neighbour left out contributes nothing:
   its weight w_ij stays on the node itself [inferred]. Under DSGT the tracker telescopes to
   ``y_i = g_i(x_i) + sum_j r_ij`` exactly, so the records are what i's tracker took in over each
   edge. Limits: r_ij is the net flow over the edge (i, j), so it also holds benign mass that reached
   j from elsewhere and i's own mass coming back; and mixing stays doubly stochastic only while drops
   are symmetric (both ends of an edge drop it): a benign neighbour confirmed by mistake, or a blatant
   suspect left out for a round (rule 6), is dropped by one end only, and mass then leaks over that
   edge. With the real detector's measured precision (docs/results/defenses.md) this happens.
3. **Detection** [Q2 says the records make detection possible; the scores are inferred]. Robust
   z-score of each neighbour's vector against the coordinate-wise median of {own} ∪ {active
   neighbours} (``detector="robust"``): the trackers under DSGT, the models under D-PSGD.
   ``d_k = ||v_k - med||``, ``z_j = (d_j - median(d)) / s`` with ``s = max(1.4826 MAD(d),
   min_scale median(d))``, plus ``cos_weight * threshold * max(0, -cos(v_j - v_i, med - v_i))``;
   j is suspicious this round when the score exceeds ``threshold``. ``detector="records"`` scores the
   records instead [Q2: the records let nodes "precisely detect malicious neighbors"; the score is
   inferred]: the same robust z-score over each neighbour's record per unit weight and round,
   ``r_ij / (w_ij k_j)``, the mean of what j's vector differed from the node's, against 0 (the node
   itself); it needs records of the screened family (``target="gradient"`` under DSGT,
   ``"weights"`` under D-PSGD). ``detector="epic"`` uses
   ``fedepic.epic.select_medoids`` on the neighbours' updates (a dropped update is suspicious).
   Oracle detection (``oracle_round=T``) replaces all of this: nothing is flagged before round T,
   and in round T every malicious neighbour is confirmed, which separates purification from
   detection in experiments.
4. **Consistency across rounds** [inferred]. j is confirmed when it was suspicious in the last
   ``patience`` rounds in a row, or in ``votes`` of the last ``window`` rounds it was seen.
5. **Purification** [Q2 "mitigate all aggregated malicious gradients at once"; Q1/Q3 keep the
   weights]. In the round j is confirmed, j is not mixed, and after this round's mixing
   ``v_i <- v_i - r_ij``; r_ij is discarded and j never mixed again. Because it happens after the
   mixing, the vector the node sends next is the purified one, and every neighbour that mixed v_i
   before saw exactly what v_i was: with ``target="gradient"`` the benign trackers' sum is then
   exactly the sum of the benign gradients (the network's sum holds none of j's mass; tests check
   it on a linear toy). Each node's own tracker is not cleaned of what arrived through other
   benign nodes: mixing spreads the correction from then on. The weights x_i are never changed by purification under ``target="gradient"``:
   they keep what the malicious neighbour taught them (Q3), and from then on move by the purified
   trackers. ``target="weights"`` subtracts the records of the models instead (exact unlearning of
   every contribution, authentic ones included; the rule of the first fedepic release, now purified
   before the next send); ``target="none"`` only drops j from then on.
6. **Suspicious but unconfirmed** neighbours are still aggregated and recorded [Q2/Q4: the paper sets
   GP against rejecting "suspicious gradients per iteration", ``strategies/exclude.py``], except a
   **blatant** one, scoring above ``reject_score`` (default 30, ten times the threshold), which is
   left out of the round even before confirmation [inferred; not in the paper]: aggregating a
   Gaussian or sign-flipped model even once wrecks a node (measured in docs/results/defenses.md).
7. **Optional clipping** (``clip_tau``) [Q4 "integrates with existing DFL aggregation"]: the mixing
   is ClippedGossip (He, Karimireddy, Jaggi 2022), ``c_ij = w_ij clip(v_j - v_i, clip_tau)``, and the
   records hold the clipped contributions.
8. **Non-finite vectors** [not in the paper]: GP runs through ``strategies.aggregate.aggregate``
   like every peer rule, whose policy leaves such a neighbour out (its weight spread over own and the
   finite neighbours in proportion) and replaces a non-finite own vector by the coordinate-wise
   median of the finite neighbours. GP learns whom it left out (``state["rows"]``, below) and counts
   it as evidence: the neighbour is scored ``inf`` and flagged (so a neighbour that keeps sending NaN
   is confirmed, and purified), never mixed or recorded.

Why these thresholds: z > 3 is the 3-sigma rule on a robust scale. ``min_scale = 0.5``: with 0.25,
benign neighbours of low-degree nodes began to be confirmed from round 6 on ``configs/noniid.yaml``;
with 0.5 precision stayed 1.0 while every label-flipping, sign-flipping, IPM and Gaussian neighbour
was confirmed by round 2. ``patience = 2`` is the shortest history that ignores one noisy round.
Measured scores of malicious models in rounds 1-2 (noniid.yaml, seeds 0-2): label flipping 4.5-18,
IPM 17-31, sign flipping 33-59, Gaussian 780-1,250; benign ones at most 1.2: hence ``reject_score`` 30.

Purification removes the recorded aggregated contribution. Under D-PSGD with ``target="weights"``
the local training done on a model that held it is not undone; under DSGT nothing but the tracker
is touched.

**The signature.** GP and ``exclude`` are peer rules of the one signature of ``strategies/aggregate.py``,
``rule(stack, own_index, weights, state) -> Aggregate``, and the node's engine calls them as it calls
every peer rule (``fedepic.peer_node.peer_aggregate``). What the call needs beyond the rows comes in
``state``, put there by the engine for the call only: ``state["ids"]``, the sender of each row (own's
entry is not read); ``state["round"]``, the round (the oracle's clock; without it, the calls so far
+ 1); under gradient tracking ``state["tracking"]``; and ``state["rows"]``, which
``strategies.aggregate.aggregate`` sets: the caller's row of each row the rule was given, so that GP
knows which neighbours the non-finite policy left out (rule 8). The ``Aggregate`` reports the mixed
vector, ``kept`` (own and the neighbours mixed this round) and, in ``info``, the detector's verdicts
by id: ``scores``, ``flagged``, ``purified`` (confirmed this round) and ``confirmed`` (so far).

**The rule's state.** The per-neighbour memory (records, suspicion history, confirmed set, the count of
calls and of recorded rounds, :class:`PurificationState`) persists in ``state`` in plain form, the
form a checkpoint stores (``PurificationState.to_rule_state``): the records as the group
``state["gp"]`` ({str(j): Tensor}) and the rest as config values ``state["gp.present"]``,
``state["gp.rounds"]``, ``state["gp.confirmed"]``, ``state["gp.history.<j>"]``, ... The rule reads it
at the start of a call and writes it back at the end, so the node keeps and checkpoints it as the
state of any rule (``fedepic.peer_node.NodeState.rule_state``), and checkpoints written before this
signature load unchanged.

**Gradient tracking: two calls a round.** Under ``decentralized.algorithm=dsgt`` the engine calls every
peer rule twice a round on the node's flat vectors: first on the trackers
(``state["tracking"] = "trackers"``), then on the models (``"models"``), each through the non-finite
policy. GP screens in the first call (rules 3-6 on the trackers), mixes the trackers (recorded and
purified under ``target="gradient"``), confirms, and leaves the second call the kept neighbours
(``state["gp.verdict"]``) and, under ``target="weights"``, the retired records (``state["gp.purge"]``);
the second call mixes the models over those neighbours whose model is finite (recorded under
``target="weights"``) and subtracts the retired records. Both keys live only between the two calls.

What changed with the signature (the numbers of every test are the same): (a) a neighbour left out for
NaN / inf now has its weight spread over own and the finite neighbours in proportion, the policy
of every peer rule, where GP kept it on the node; and weights given are divided by their sum even
when every row is finite, as for every peer rule: a float32 sum that is not exactly 1 moves the
mixing by float rounding. The graphs of the shipped configs sum to exactly 1 at every node (their GP
and exclude runs gave the same numbers, bit for bit, before and after); on a 10-node small world
(k 4, p 0.3) where two nodes' sums are 1 within float32 rounding, gp's and exclude's training losses
moved in the 8th digit over 6 rounds, the accuracies not at all. Without
weights GP mixes with uniform weights over own and the finite rows. (b) When nothing is finite (own and every
neighbour NaN / inf) the policy returns own unchanged and GP does not run: no flags are recorded and
the round is not counted. (c) Under dsgt the node's report (``AggregationReport.nonfinite``) lists a
neighbour whose model or tracker is non-finite, as for the other rules; before, only the trackers
counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from strategies.aggregate import ROWS, Aggregate, aggregate as apply_policy
from strategies.epic_peer import epic_keep_mask
from strategies.gossip import check_stack, resolve_weights, split_own
from strategies.median import coordinate_median
from strategies.scclip import clip_rows

DETECTORS = ("robust", "records", "epic")
STATE = "gp"  # GP's keys in the rule's state, and so in a node's checkpoint (module docstring)
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
    mixed: dict[int, int] = field(default_factory=dict)  # rounds each neighbour's contribution was recorded

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
        meta["mixed_ids"] = sorted(self.mixed)
        meta["mixed_counts"] = [self.mixed[j] for j in sorted(self.mixed)]
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
            mixed={int(j): int(c) for j, c in zip(meta.get("mixed_ids", []), meta.get("mixed_counts", []))},
        )

    def to_rule_state(self) -> dict[str, Any]:
        """This state as it lives in the rule's ``state`` (module docstring, "The rule's state"): the
        records as the group ``state["gp"]`` ({str(j): Tensor}), ``state["gp.present"]``, and
        ``state_dict``'s meta as ``state["gp.<name>"]``.

        >>> sorted(PurificationState(records={3: torch.ones(2)}, history={3: [True]}, rounds=1).to_rule_state())
        ['gp', 'gp.confirmed', 'gp.history.3', 'gp.history_ids', 'gp.mixed_counts', 'gp.mixed_ids', 'gp.present', 'gp.rounds']
        """
        plain = self.state_dict()
        return {STATE: plain["records"], f"{STATE}.present": True,
                **{f"{STATE}.{name}": value for name, value in plain["meta"].items()}}

    @classmethod
    def from_rule_state(cls, state: Mapping[str, Any]) -> "PurificationState":
        """The state ``to_rule_state`` put in ``state``, or a fresh one where it holds none."""
        if not state.get(f"{STATE}.present"):
            return cls()
        prefix = f"{STATE}."
        meta = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return cls.from_state_dict({"records": dict(state.get(STATE, {})), "meta": meta})

    def store(self, state: dict) -> None:
        """Write this state into the rule's ``state`` (``to_rule_state``; history only grows, so every
        earlier key is overwritten)."""
        state.update(self.to_rule_state())

    def load_rule_state(self, state: Mapping[str, Any]) -> None:
        """Replace this state's contents with what the rule's ``state`` holds (``from_rule_state``)."""
        self.__dict__.update(PurificationState.from_rule_state(state).__dict__)


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


TARGETS = ("weights", "gradient", "none")
TRACKING = ("trackers", "models")  # state["tracking"] under gradient tracking: the two calls of a round, in order
VERDICT = f"{STATE}.verdict"  # dsgt: the neighbours the trackers' call kept, for the models' call (ids)
PURGE = f"{STATE}.purge"  # dsgt, target weights: the records the models' call subtracts ({str(j): Tensor})


@dataclass
class Neighbourhood:
    """One call's inputs at a node, by neighbour: ``ids`` every neighbour the caller named (its order),
    ``finite`` whether each sent a finite vector (the policy gave the rule its row), ``vectors`` [k, D]
    the finite ones' vectors in that order, ``weights`` [k + 1] the mixing weights of own (first) and
    of those rows, ``rows`` the row of the stack of each of those vectors."""

    own: Tensor
    ids: list[int]
    finite: list[bool]
    vectors: Tensor
    weights: Tensor
    rows: list[int]

    def at(self, positions: list[int]) -> list[int]:
        """The indices into ``vectors`` of the finite neighbours at ``positions`` (into ``ids``)."""
        index = {p: k for k, p in enumerate(p for p, ok in enumerate(self.finite) if ok)}
        return [index[p] for p in positions]


@dataclass
class Screening:
    """One round's detector verdicts at a node (positions index the neighbourhood's ``ids``)."""

    scores: dict[int, float]
    flagged: list[int]
    confirm: list[int]  # confirmed this round: purified after the mixing, never mixed again
    keep: list[int]  # positions mixed this round (finite ones), ascending
    nonfinite: list[int]


class GradientPurification:
    """Gradient Purification (Li, Miao, Zhang, Yin, Front. Comput. Sci. 2025). See module docstring.

    A peer rule of the one signature (``strategies/aggregate.py``), called through
    ``strategies.aggregate.aggregate`` like every peer rule: ``rule(stack, own_index, weights, state)``
    reads the sender of each row from ``state["ids"]``, the round from ``state["round"]`` (the oracle's
    T_d; without it, the calls so far + 1) and, under gradient tracking, which call of the round this is
    from ``state["tracking"]``; its per-neighbour memory lives in ``state`` in plain form (module
    docstring, "The rule's state"). The methods ``aggregate`` and ``aggregate_tracking`` run one round
    for a caller that holds a :class:`PurificationState` (the tests) through the same call.

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
        Floor of the z-score scale as a fraction of the median distance [0.5].
    cos_weight : float
        Weight of the directional term [0.5; 0 disables it].
    detector : str
        "robust", "records" (the robust score of the records per unit weight and round) or "epic"
        (EPIC drop flags on the updates) [robust].
    epic_fraction, epic_threshold : float, int
        ``select_medoids`` arguments for ``detector="epic"`` [0.5, 1].
    reject_score : float or None
        Rule 6; a suspect scoring above it is not aggregated this round [30; None: never].
    clip_tau : float or None
        Rule 7; ClippedGossip radius [None: plain gossip].
    target : str
        What purification subtracts the records from: "gradient" (DSGT trackers), "weights" (models)
        or "none" (drop only) [auto: gradient under dsgt, weights under dpsgd; resolved by the node].
    oracle_round : int or None
        Oracle detection: confirm exactly ``known_malicious`` in this round [None: the detector].
    known_malicious : sequence of int
        The malicious node ids, read only by the oracle.

    Example (node 0 with neighbours 1-4, every weight 0.2; neighbour 4 sends a model far away and,
    ``patience=1``, is confirmed at once: not mixed, its weight stays with the node, nothing recorded
    yet to subtract)::

        >>> import dataclasses
        >>> from fedepic.config import PurificationConfig
        >>> from strategies.aggregate import aggregate
        >>> keys = {k: v for k, v in dataclasses.asdict(PurificationConfig()).items() if k != "oracle_at"}
        >>> gp = GradientPurification(**{**keys, "patience": 1, "target": "weights"}, oracle_round=None,
        ...                           known_malicious=())
        >>> stack = torch.tensor([[0.0], [1.0], [-1.0], [0.5], [40.0]])
        >>> state = {"ids": [0, 1, 2, 3, 4], "round": 1}
        >>> out = aggregate(gp, stack, 0, torch.full((5,), 0.2), state)
        >>> out.vector, out.kept.tolist(), out.info["purified"], state["gp.confirmed"]
        (tensor([0.1000]), [True, True, True, True, False], [4], [4])

    Cost per call: the detector (``robust``: two coordinate medians over k + 1 rows and O(k D) for
    the distances and directions) plus O(k D) for the mixing and the records, k the neighbours; the
    plain state is read and written back each call (O(k) Python objects, the records by reference).
    """

    aggregate_suspects = True  # rule 6: a suspicious, unconfirmed neighbour is still aggregated (and recorded)
    purifies = True  # exclude (a subclass) drops confirmed neighbours without subtracting anything

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
        target: str,
        oracle_round: int | None,
        known_malicious: Sequence[int],
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
        if target not in TARGETS:
            raise ValueError(f"gp: target must be one of {TARGETS}, got {target!r}")
        if oracle_round is not None and oracle_round < 1:
            raise ValueError(f"gp: oracle_round must be >= 1 or None, got {oracle_round!r}")
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
        self.target = target if self.purifies else "none"
        self.oracle_round = oracle_round
        self.known_malicious = frozenset(int(m) for m in known_malicious)

    @staticmethod
    def new_state() -> PurificationState:
        """A fresh per-node state (no records, nothing confirmed)."""
        return PurificationState()

    # -- the one signature -----------------------------------------------------------------------
    def __call__(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict) -> Aggregate:
        """One round at a node (or, under gradient tracking, one of its two calls): screen, mix, record,
        purify; the memory read from and written back to ``state`` (class docstring)."""
        tracking = state.get("tracking")
        if tracking is not None and tracking not in TRACKING:
            raise ValueError(f"gp: state['tracking'] must be one of {TRACKING} or absent, got {tracking!r}")
        if tracking is None and self.target == "gradient":
            raise ValueError("gp: target='gradient' needs gradient state (decentralized.algorithm=dsgt)")
        hood = self.neighbourhood(stack, own_index, weights, state)
        memory = PurificationState.from_rule_state(state)
        if tracking == "models":
            keep, info = self.tracked_keep(hood, state), {}
            vector = self.mix_tracked_models(hood, keep, memory, state)
        else:
            screening = self.screen(hood, memory, state.get("round"))
            recorded = self.target == ("gradient" if tracking else "weights")  # the family screened and mixed here
            vector = self.mix(hood, screening.keep, memory, recorded=recorded)
            if tracking == "trackers":
                vector = self.finish_trackers(vector, hood, screening, memory, state)
            else:
                vector = self.finish(vector, screening, memory, subtract=self.target == "weights")
            keep, info = screening.keep, self.detection(screening, memory)
        memory.store(state)
        return Aggregate(vector, self.kept_rows(stack.shape[0], own_index, hood, keep), info=info)

    def neighbourhood(self, stack: Tensor, own_index: Optional[int], weights: Optional[Tensor], state: dict
                      ) -> Neighbourhood:
        """The call's rows by neighbour: ``state["ids"]`` names every row of the caller's stack (own's
        entry is not read), ``state["rows"]`` (set by ``strategies.aggregate.aggregate``) the caller's
        row of each row given here; a neighbour whose row is missing sent NaN / inf."""
        own, vectors, w = split_own(stack, own_index, weights)
        names = state.get("ids")
        if names is None:
            raise ValueError("gp: needs the sender of each row in state['ids'] (the node's engine sets it)")
        rows = list(state.get(ROWS, range(stack.shape[0])))
        if len(rows) != stack.shape[0] or not all(0 <= q < len(names) for q in rows):
            raise ValueError(f"gp: state['ids'] must name every row of the stack, got {len(names)} ids")
        own_row = rows[own_index]
        given = set(rows)
        positions = [q for q in range(len(names)) if q != own_row]
        ids = [int(names[q]) for q in positions]
        if len(set(ids)) != len(ids):
            raise ValueError("gp: the neighbour ids in state['ids'] must be distinct")
        others = [r for r in range(stack.shape[0]) if r != own_index]
        return Neighbourhood(own, ids, [q in given for q in positions], vectors,
                             resolve_weights(w, vectors.shape[0], own), others)

    def kept_rows(self, n: int, own_index: int, hood: Neighbourhood, keep: list[int]) -> Tensor:
        """``Aggregate.kept`` [n]: own and the rows of the neighbours at ``keep``."""
        kept = torch.zeros(n, dtype=torch.bool)
        kept[own_index] = True
        for k in hood.at(keep):
            kept[hood.rows[k]] = True
        return kept

    @staticmethod
    def detection(screening: Screening, memory: PurificationState) -> dict[str, Any]:
        """``Aggregate.info``: the round's scores, flagged, purified (confirmed now) and every confirmed
        neighbour so far, by id."""
        return {"scores": screening.scores, "flagged": screening.flagged, "purified": list(screening.confirm),
                "confirmed": sorted(memory.confirmed)}

    # -- detection ---------------------------------------------------------------------------
    def robust_scores(self, own: Tensor, neighbours: Tensor) -> Tensor:
        """Suspicion score [m] of each neighbour (robust z-score of the distance to the median
        plus the directional penalty)."""
        models = torch.cat([own.unsqueeze(0), neighbours])
        centre = coordinate_median(models)
        delta = models.sub_(centre)  # models is this function's own copy: v_k - med, in place
        dist = delta.norm(dim=1)
        med_d = coordinate_median(dist.unsqueeze(1)).squeeze(0)
        mad = coordinate_median((dist - med_d).abs().unsqueeze(1)).squeeze(0)
        # The tiny relative floor only guards against dividing float rounding by zero.
        floor = 1e-7 * (1.0 + float(centre.norm()))
        scale = max(_MAD_TO_STD * float(mad), self.min_scale * float(med_d), floor)
        z = (dist[1:] - med_d) / scale
        # cos(v_j - v_i, med - v_i) from delta (v_j - v_i = delta_j - delta_i, med - v_i = -delta_i): dot
        # products instead of a second [m, D] difference (the same value up to float rounding)
        toward = -delta[0]
        dots = delta[1:] @ toward
        dot = dots + toward @ toward
        norm_d = (dist[1:].square() + 2 * dots + toward @ toward).clamp_min(0).sqrt()
        cos = dot / (norm_d * toward.norm()).clamp_min(1e-8)
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

    def record_suspicion(self, hood: Neighbourhood, active: list[int], memory: PurificationState
                         ) -> tuple[Tensor, Tensor]:
        """``detector="records"``: the robust score of each neighbour's record per unit weight and round,
        ``r_ij / (w_ij k_j)`` (k_j: the rounds j was recorded), the mean of what j's vector differed from
        the node's over its history, against 0 (the node itself). A neighbour without a record yet is
        scored on this round's difference ``v_j - v_i``. Averaging over the history is the consistency
        across iterations: a benign neighbour's differences average out, a poisoning one's persist.
        ``active``: the positions scored (finite, unconfirmed)."""
        own = hood.own
        if not active:
            empty = torch.zeros(0, dtype=own.dtype, device=own.device)
            return empty, empty.bool()
        w = hood.weights[1:]
        rows = []
        for p, k in zip(active, hood.at(active)):
            j, count = hood.ids[p], memory.mixed.get(hood.ids[p], 0)
            if j in memory.records and count > 0 and float(w[k]) > 0:
                rows.append(memory.records[j].to(own) / (float(w[k]) * count))
            else:
                rows.append(hood.vectors[k] - own)
        scores = self.robust_scores(torch.zeros_like(own), torch.stack(rows))
        return scores, scores > self.threshold

    def is_blatant(self, score: float) -> bool:
        """Rule 6: a score beyond ``reject_score`` is left out of this round even before confirmation."""
        return self.reject_score is not None and score > self.reject_score

    def is_confirmed(self, flags: list[bool]) -> bool:
        """The consistency rule over one neighbour's recent suspicion flags (oldest first)."""
        if len(flags) >= self.patience and all(flags[-self.patience :]):
            return True
        return self.votes is not None and sum(flags[-self.window :]) >= self.votes

    # -- screening, mixing, purification --------------------------------------------------------
    def screen(self, hood: Neighbourhood, memory: PurificationState, round_: int | None = None) -> Screening:
        """Rules 3, 4, 6 and 8 for this round: scores, flags, confirmations and the neighbours to mix.
        Updates the suspicion history (not the records, nor ``confirmed``: see ``finish``). ``round_``
        (1-based) is the round the oracle compares with T_d; without it, the calls so far + 1."""
        ids, finite = hood.ids, hood.finite
        screening = Screening({}, [], [], [], [j for j, ok in zip(ids, finite) if not ok])
        if self.oracle_round is not None:
            return self._oracle(screening, hood, memory, memory.rounds + 1 if round_ is None else int(round_))
        active = [p for p, j in enumerate(ids) if j not in memory.confirmed and finite[p]]
        if self.detector == "records":
            scores, suspicious = self.record_suspicion(hood, active, memory)
        else:
            scores, suspicious = self.suspicion(hood.own, hood.vectors[hood.at(active)])
        broken = [p for p, j in enumerate(ids) if j not in memory.confirmed and not finite[p]]
        scores = torch.cat([scores, torch.full((len(broken),), float("inf"), dtype=scores.dtype, device=scores.device)])
        suspicious = torch.cat([suspicious, torch.ones(len(broken), dtype=torch.bool, device=suspicious.device)])
        history_len = max(self.patience, self.window)
        for pos, p in enumerate(active + broken):
            j, flag, score = ids[p], bool(suspicious[pos]), float(scores[pos])
            screening.scores[j] = score
            flags = (memory.history.get(j, []) + [flag])[-history_len:]
            memory.history[j] = flags
            if flag:
                screening.flagged.append(j)
            if flag and self.is_confirmed(flags):
                screening.confirm.append(j)
            elif finite[p] and (not flag or (self.aggregate_suspects and not self.is_blatant(score))):
                screening.keep.append(p)
        screening.keep.sort()
        return screening

    def _oracle(self, screening: Screening, hood: Neighbourhood, memory: PurificationState, round_: int
                ) -> Screening:
        """Oracle detection: the malicious neighbours are confirmed in round ``oracle_round`` (or at the
        node's first aggregation after it, had it none that round), and every other finite neighbour
        is mixed (nothing is flagged before)."""
        due = round_ >= self.oracle_round
        for p, j in enumerate(hood.ids):
            if j in memory.confirmed:
                continue
            if due and j in self.known_malicious:
                screening.confirm.append(j)
            elif hood.finite[p]:
                screening.keep.append(p)
        return screening

    def mix(self, hood: Neighbourhood, keep: list[int], memory: PurificationState, recorded: bool) -> Tensor:
        """``own + sum_{j kept} w_ij clip(v_j - own)`` (rules 2, 7) over the neighbours at ``keep``; a
        dropped neighbour's weight stays with the node. With ``recorded`` each contribution is added to
        ``memory.records`` (and counted in ``memory.mixed``)."""
        own = hood.own
        if not keep:
            return own.clone()
        rows = hood.at(keep)
        diffs = hood.vectors[rows] - own
        if self.clip_tau is not None:
            diffs = clip_rows(diffs, self.clip_tau)
        contributions = diffs.mul_(hood.weights[1:][rows].unsqueeze(1))  # diffs is ours: weighted in place
        if recorded:
            for p, c in zip(keep, contributions):
                j = hood.ids[p]
                if j in memory.records:
                    memory.records[j].add_(c)  # the record is the state's own tensor (a clone when it began)
                else:
                    memory.records[j] = c.clone()
                memory.mixed[j] = memory.mixed.get(j, 0) + 1
        return own + contributions.sum(dim=0)

    @staticmethod
    def purify(vector: Tensor, state: PurificationState, j: int) -> Tensor:
        """Rule 5: ``vector - r_ij``; r_ij is discarded and j marked confirmed (never mixed again)."""
        record = GradientPurification.retire(state, j)
        if record is None:
            return vector
        return vector - record.to(device=vector.device, dtype=vector.dtype)

    @staticmethod
    def retire(memory: PurificationState, j: int) -> Optional[Tensor]:
        """Mark j confirmed (never mixed again) and drop its record and count; returns the record."""
        record = memory.records.pop(j, None)
        memory.mixed.pop(j, None)
        memory.confirmed.add(j)
        return record

    def finish(self, vector: Tensor, screening: Screening, memory: PurificationState, subtract: bool) -> Tensor:
        """After the round's mixing: purify (``subtract``) or just drop the confirmed neighbours."""
        for j in screening.confirm:
            if subtract:
                vector = self.purify(vector, memory, j)
            else:
                self.retire(memory, j)
        memory.rounds += 1
        return vector

    # -- gradient tracking: two calls a round ----------------------------------------------------
    def finish_trackers(self, mixed: Tensor, hood: Neighbourhood, screening: Screening, memory: PurificationState,
                        state: dict) -> Tensor:
        """The trackers' call of a DSGT round ends the round's bookkeeping (confirmations, the round
        count) and leaves the models' call the kept neighbours (``VERDICT``) and, under
        ``target="weights"``, the records to subtract from the models (``PURGE``, in confirmation order)."""
        state[VERDICT] = [hood.ids[p] for p in screening.keep]
        if self.target != "weights":
            return self.finish(mixed, screening, memory, subtract=self.target == "gradient")
        purge: dict[str, Tensor] = {}
        for j in screening.confirm:
            record = self.retire(memory, j)
            if record is not None:
                purge[str(j)] = record
        state[PURGE] = purge
        memory.rounds += 1
        return mixed

    def tracked_keep(self, hood: Neighbourhood, state: dict) -> list[int]:
        """The positions the models' call mixes: the neighbours the trackers' call kept whose model
        is finite (``VERDICT``; none when the trackers' call did not run this round)."""
        kept = set(state.get(VERDICT, ()))
        return [p for p, j in enumerate(hood.ids) if j in kept and hood.finite[p]]

    def mix_tracked_models(self, hood: Neighbourhood, keep: list[int], memory: PurificationState, state: dict
                           ) -> Tensor:
        """The models' call of a DSGT round: mix the models over ``keep`` (``tracked_keep``; recorded under
        ``target="weights"``), then subtract the records the trackers' call retired; both left by that
        call are removed from ``state``."""
        mixed = self.mix(hood, keep, memory, recorded=self.target == "weights")
        state.pop(VERDICT, None)
        for record in state.pop(PURGE, {}).values():
            mixed = mixed - record.to(device=mixed.device, dtype=mixed.dtype)
        return mixed

    # -- a caller that holds a PurificationState --------------------------------------------------
    def aggregate(self, own: Tensor, neighbours: Tensor, neighbour_ids: list[int], weights: Tensor | None,
                  state: PurificationState, round_: int | None = None) -> tuple[Tensor, PurificationReport]:
        """One round of model gossip (D-PSGD) through the one signature: screen on the models, mix
        them (recorded under ``target="weights"``), then purify. Mutates ``state``. ``round_``: see
        ``screen``."""
        ids = self._checked_ids(own, neighbours, neighbour_ids)
        call = self._call_state(ids, state, round_)
        out = apply_policy(self, torch.cat([own.unsqueeze(0), neighbours]), 0, weights, call)
        state.load_rule_state(call)
        return out.vector, self.report(out, ids)

    def aggregate_tracking(self, own_x: Tensor, own_y: Tensor, x: Tensor, y: Tensor, neighbour_ids: list[int],
                           weights: Tensor | None, state: PurificationState, round_: int | None = None
                           ) -> tuple[Tensor, Tensor, PurificationReport]:
        """One round of gradient tracking (DSGT) through the one signature, as the node's engine calls
        it: the trackers ``y`` first (screen, mix, record and purify the ``target`` family), then the
        models ``x`` over the same kept neighbours. Returns the mixed (x, y), before DSGT's own step
        (``fedepic.peer_node``). Mutates ``state``."""
        ids = self._checked_ids(own_y, y, neighbour_ids)
        check_stack(own_x, x)
        call = self._call_state(ids, state, round_)
        call["tracking"] = "trackers"
        out_y = apply_policy(self, torch.cat([own_y.unsqueeze(0), y]), 0, weights, call)
        call["tracking"] = "models"
        out_x = apply_policy(self, torch.cat([own_x.unsqueeze(0), x]), 0, weights, call)
        state.load_rule_state(call)
        return out_x.vector, out_y.vector, self.report(out_y, ids)

    @staticmethod
    def _checked_ids(own: Tensor, neighbours: Tensor, neighbour_ids: list[int]) -> list[int]:
        check_stack(own, neighbours)
        ids = [int(j) for j in neighbour_ids]
        if len(ids) != neighbours.shape[0] or len(set(ids)) != len(ids):
            raise ValueError("gp: neighbour_ids must be distinct and match the rows of neighbours")
        return ids

    @staticmethod
    def _call_state(ids: list[int], state: PurificationState, round_: int | None) -> dict:
        """The one signature's ``state`` for one call: ``state`` in plain form and the call's inputs."""
        call = {**state.to_rule_state(), "ids": [None, *ids]}
        if round_ is not None:
            call["round"] = int(round_)
        return call

    @staticmethod
    def report(out: Aggregate, ids: list[int]) -> PurificationReport:
        """``out`` (own at row 0, the neighbours ``ids`` after it) as a :class:`PurificationReport`."""
        kept, bad = out.kept[1:].tolist(), out.nonfinite[1:].tolist()
        info = out.info
        return PurificationReport(
            scores=info["scores"], flagged=info["flagged"], purified=info["purified"], confirmed=info["confirmed"],
            kept=[j for j, k in zip(ids, kept) if k], nonfinite=[j for j, b in zip(ids, bad) if b],
            own_nonfinite=bool(out.nonfinite[0]))
