"""One-off, run at commit ccebbfc (it calls the old `rule.apply(own, neighbours, weights)`, gone since): the
peer rules on fixed seeded neighbourhoods, inputs and outputs saved to tests/data/peer_rules_before.pt."""
import math, torch
from strategies.gossip import Gossip
from strategies.median import CoordinateMedian
from strategies.trimmed_mean import TrimmedMean
from strategies.krum import KrumSelect
from strategies.scclip import SelfCenteredClipping
from strategies.epic_peer import EpicPeer
from strategies.preaggregation import PreAggregated, NearestNeighborMixing, StaticClip

RULES = {
    "gossip": lambda: Gossip(), "median": lambda: CoordinateMedian(),
    **{f"trimmed_mean:{b}": (lambda b=b: TrimmedMean(b)) for b in (0, 1, 2, 3)},
    **{f"krum:{f}:{k}": (lambda f=f, k=k: KrumSelect(f, k)) for f in (0, 1, 2) for k in (1, 2, 3)},
    "scclip:tau:0.5": lambda: SelfCenteredClipping(0.5), "scclip:delta:0.25": lambda: SelfCenteredClipping(None, 0.25),
    "epic:0.3:1": lambda: EpicPeer(0.3, 1), "epic:0.5:2": lambda: EpicPeer(0.5, 2),
    "pre:median:nnm1": lambda: PreAggregated(CoordinateMedian(), [NearestNeighborMixing(1)]),
    "pre:gossip:clip1": lambda: PreAggregated(Gossip(), [StaticClip(1.0)]),
    "pre:krum:1:1:nnm1+clip2": lambda: PreAggregated(KrumSelect(1, 1), [NearestNeighborMixing(1), StaticClip(2.0)]),
    "pre:scclip:tau:0.5:nnm2": lambda: PreAggregated(SelfCenteredClipping(0.5), [NearestNeighborMixing(2)]),
}

def neighbourhoods():
    out = []
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        for m in (0, 1, 2, 3, 5, 8):
            d = 7 if seed % 2 == 0 else 19
            own = torch.randn(d, generator=g)
            neigh = own + 0.5 * torch.randn(m, d, generator=g)
            if m >= 3:
                neigh[m - 1] += 20.0 * torch.randn(d, generator=g)  # one planted outlier
            w = torch.rand(m + 1, generator=g) + 0.1
            w = w / w.sum()
            out.append((f"s{seed}m{m}", own, neigh, w))
            if m >= 2:  # non-finite variants
                bad = neigh.clone(); bad[0, 1] = math.nan; bad[m // 2, 0] = math.inf if m // 2 else math.nan
                out.append((f"s{seed}m{m}-nanrows", own, bad, w))
                nown = own.clone(); nown[2] = math.nan
                out.append((f"s{seed}m{m}-nanown", nown, neigh, w))
                out.append((f"s{seed}m{m}-nanown-nanrow", nown, bad, w))
            if m >= 1:
                allbad = neigh.clone(); allbad[:, 0] = -math.inf
                out.append((f"s{seed}m{m}-allbad", own, allbad, w))
                nown = own.clone(); nown[0] = math.nan
                out.append((f"s{seed}m{m}-allbad-nanown", nown, allbad, w))
    return out

hoods, cases, outs = [], [], []
for h, (name, own, neigh, w) in enumerate(neighbourhoods()):
    hoods.append({"name": name, "own": own, "neighbours": neigh, "weights": w})
    for key, make in RULES.items():
        for weighted in (False, True):
            vec, rep = make().apply(own.clone(), neigh.clone(), w.clone() if weighted else None)
            cases.append((h, key, weighted, list(rep.rows), rep.own))
            outs.append(vec)
torch.save({"commit": "ccebbfc", "hoods": hoods, "cases": cases, "outs": torch.cat(outs)},
           "tests/data/peer_rules_before.pt")
print(len(cases))
