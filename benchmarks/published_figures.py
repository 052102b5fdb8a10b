"""Derive the published figures of the experiments ``python -m fedepic.reproduce`` replays from the
authors' raw result files, as the authors' own plotting code reads them, and check them against
``fedepic/reproduce/published.json``.

Two experiments (fedepic issue 33):

``dumbbell_clippedgossip``: Lie He, Sai Praneeth Karimireddy, Martin Jaggi, "Byzantine-robust
decentralized learning via ClippedGossip" (arXiv:2202.01545, 2022), Fig. 4; repository
``epfml/byzantine-robust-decentralized-optimizer`` (commit 5387d600354a0fbf137c3e4346c4441b2f427407),
raw file ``outputs/dumbbell/exp/acc.csv`` (columns Iterations, Accuracy (%), Agg, NonIID, Group), written by
``dumbbell.py`` ``generate_analysis`` (lines 282-378). A cell's figure is the row of the last logged
evaluation: ``Iterations == 870`` (``it = (v["E"] - 1) * max_batch_size_per_epoch``, dumbbell.py:326,
with E = 30 epochs of 30 batches: the evaluation after the 900th step), ``Group == "global"`` (the
"Global Average Validation Accuracy" of the average of all honest models, dumbbell.py:224-239). One run
(seed 0, ``args.json``), so no seed spread. The figure the paper draws is another one, and is kept
beside it (``plotted``): ``dumbbell_plot.ipynb`` plots ``df[df['Group'] == 'clique 1']`` (notebook
line 27) with ``ax.set_xlim(0, 750)`` (lines 71, 81), taking the IID curves from this file
(``df2 = df2[~df2['NonIID']]``, line 24) and the non-IID ones from
``outputs/dumbbell_improvement/exp/acc.csv`` (``Bucketing == False`` and ``RandomEdge == False``,
line 85), whose MOZI is ``mozi0.99,0.5`` (dumbbell_improvement.py:344) instead of ``mozi1,0.5``. That
file's gossip, SCClip, RFA and TM non-IID runs repeat this file's command (the same ``args.json`` but
the identifier, seed 0), so they are kept as ``rerun``: how far two runs of one seed land apart.

``bucketing_mnist``: Sai Praneeth Karimireddy, Lie He, Martin Jaggi, "Byzantine-robust learning on
heterogeneous datasets via bucketing" (ICLR 2022), the MNIST grid of ``exp3.py``; repository
``epfml/byzantine-robust-noniid-optimizer`` (commit 0e27349ac99235251110d54dd102fda0091bf274), raw
file ``outputs/exp3/all/output/exp3.csv`` (columns Iterations, Accuracy (%), ATK, AGG, $\\beta$, seed,
s), written by exp3.py lines 68-96 (``"Iterations": v["E"] * MAX_BATCHES_PER_EPOCH``, line 77). The
figure is drawn by ``sns.relplot(..., kind="line")`` (exp3.py:99-114), whose line is at each x the mean
over the rows sharing x, hue and style, i.e. over the seeds (seaborn 0.11.1, requirements.txt, draws a
95% bootstrap band around it). A cell's figure is therefore the mean over its seeds of the rows with
``Iterations == 600`` (the last evaluation, E = 20), ``$\\beta$ == 0.9`` and ``s == 0`` (no bucketing);
its spread is the sample standard deviation (ddof = 1) and the min-max of those rows.

Usage (the CSVs are read from a checkout, or from the bare mirrors with ``git show``)::

    git -C MIRROR show HEAD:outputs/dumbbell/exp/acc.csv > /tmp/dumbbell.csv
    python benchmarks/published_figures.py --dumbbell /tmp/dumbbell.csv \\
        --dumbbell-improvement /tmp/dumbbell_improvement.csv --bucketing /tmp/exp3.csv \\
        [--check fedepic/reproduce/published.json | --write fedepic/reproduce/published.json]

``--check`` exits 1 when a recomputed figure differs from the stored one (or from the issue's quoted
figure, for the dumbbell); ``--write`` stores them. Reading CSV text needs only the standard library.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

DUMBBELL_FILE = "outputs/dumbbell/exp/acc.csv"
IMPROVEMENT_FILE = "outputs/dumbbell_improvement/exp/acc.csv"
BUCKETING_FILE = "outputs/exp3/all/output/exp3.csv"
DUMBBELL_LAST = 870  # (E - 1) * 30 at E = 30: the evaluation after step 900
FIG4_XLIM = 750  # dumbbell_plot.ipynb: ax.set_xlim(0, 750), the last iteration the figure shows
BUCKETING_LAST = 600  # E * 30 at E = 20
ACC = "Accuracy (%)"
BETA = "$\\beta$"

# the aggregators of the dumbbell cells: (fedepic's name, the CSV's Agg label, the authors' --agg)
DUMBBELL_AGGREGATORS = (("gossip", "Gossip", "gossip_avg"), ("scclip", "SCClip", "scp1"),
                        ("rfa", "GM", "rfa8"), ("trimmed_mean", "TM", "tm1"), ("mozi", "MOZI", "mozi1,0.5"))
BUCKETING_AGGREGATORS = (("krum", "KRUM"), ("cm", "CM"), ("rfa", "RFA"), ("cclip", "CClip"))
BUCKETING_ATTACKS = (("bit_flip", "BF"), ("label_flip", "LF"), ("mimic", "mimic"), ("ipm", "IPM"), ("alie", "ALIE"))
# the issue's quoted dumbbell figures (fedepic issue 33), in DUMBBELL_AGGREGATORS' order
ISSUE_QUOTED = {"iid": (96.4, 96.4, 95.7, 95.4, 96.0), "noniid": (93.6, 93.8, 88.6, 86.9, 86.2)}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The CSV's rows as dicts, each with its 1-based ``line`` in the file (the header is line 1)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [{**row, "line": i} for i, row in enumerate(csv.DictReader(handle), start=2)]


def _select(rows: Iterable[dict[str, Any]], **match: str) -> list[dict[str, Any]]:
    keys = {k.replace("__", " "): v for k, v in match.items()}
    return [r for r in rows if all(str(r[k]) == v for k, v in keys.items())]


def _one(rows: Sequence[dict[str, Any]], what: str) -> dict[str, Any]:
    if len(rows) != 1:
        raise ValueError(f"{what}: expected one row, found {len(rows)}")
    return rows[0]


def spread(values: Sequence[float]) -> dict[str, Optional[float]]:
    """Mean, sample std (ddof 1; None for one value), min and max of ``values``.

    >>> spread([1.0, 2.0, 3.0])
    {'mean': 2.0, 'std': 1.0, 'min': 1.0, 'max': 3.0}
    """
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def dumbbell_cells(acc: Sequence[dict[str, Any]],
                   improvement: Optional[Sequence[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """One cell per (split, aggregator): the global figure at Iterations 870, the cliques' beside it,
    and (with ``improvement``) what Fig. 4 plots and the non-IID rerun."""
    cells = []
    for split, noniid in (("iid", "False"), ("noniid", "True")):
        for name, label, flag in DUMBBELL_AGGREGATORS:
            where = dict(Agg=label, NonIID=noniid, Iterations=str(DUMBBELL_LAST))
            row = _one(_select(acc, Group="global", **where), f"dumbbell {split} {label}")
            groups = {g: float(_one(_select(acc, Group=g, **where), f"{g} {split} {label}")[ACC])
                      for g in ("clique 1", "clique 2")}
            cell = {"split": split, "aggregator": name, "authors_agg": flag,
                    "published": float(row[ACC]), "seeds": [0], "std": None, "min": None, "max": None,
                    "source": {"file": DUMBBELL_FILE, "line": row["line"], "column": ACC,
                               "rows": f"Agg={label}, NonIID={noniid}, Group=global, Iterations={DUMBBELL_LAST}"},
                    "groups": groups}
            if improvement is not None:
                cell.update(_fig4(acc, improvement, split, label))
            cells.append(cell)
    return cells


def _fig4(acc: Sequence[dict[str, Any]], improvement: Sequence[dict[str, Any]], split: str,
          label: str) -> dict[str, Any]:
    """What dumbbell_plot.ipynb draws for the cell (clique 1, at the figure's right edge, x = 750), and
    for a non-IID cell other than MOZI the rerun's global figure at 870."""
    if split == "iid":
        source, rows = DUMBBELL_FILE, _select(acc, Agg=label, NonIID="False")
    else:
        source, rows = IMPROVEMENT_FILE, _select(improvement, Agg=label, Bucketing="False", RandomEdge="False")
    edge = _one(_select(rows, Group="clique 1", Iterations=str(FIG4_XLIM)), f"fig4 {split} {label}")
    out: dict[str, Any] = {"plotted": {"value": float(edge[ACC]), "file": source, "line": edge["line"],
                                       "rows": f"Group=clique 1, Iterations={FIG4_XLIM}"}}
    if split == "noniid" and label != "MOZI":  # that file's MOZI is mozi0.99,0.5, another setting
        rerun = _one(_select(rows, Group="global", Iterations=str(DUMBBELL_LAST)), f"rerun {label}")
        out["rerun"] = {"value": float(rerun[ACC]), "file": IMPROVEMENT_FILE, "line": rerun["line"]}
    return out


def bucketing_cells(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (aggregator, attack): mean, std and min-max over the seeds at Iterations 600,
    momentum 0.9, no bucketing."""
    cells = []
    for name, agg in BUCKETING_AGGREGATORS:
        for attack, atk in BUCKETING_ATTACKS:
            chosen = sorted(_select(rows, AGG=agg, ATK=atk, s="0", Iterations=str(BUCKETING_LAST),
                                    **{"$\\beta$": "0.9"}), key=lambda r: int(r["seed"]))
            if not chosen:
                raise ValueError(f"bucketing: no row for {agg} {atk}")
            values = [float(r[ACC]) for r in chosen]
            stats = spread(values)
            cells.append({"aggregator": name, "attack": attack, "published": stats["mean"],
                          "seeds": [int(r["seed"]) for r in chosen], "per_seed": values,
                          "std": stats["std"], "min": stats["min"], "max": stats["max"],
                          "source": {"file": BUCKETING_FILE, "lines": [r["line"] for r in chosen], "column": ACC,
                                     "rows": f"AGG={agg}, ATK={atk}, $\\beta$=0.9, s=0, Iterations={BUCKETING_LAST}"}})
    return cells


def issue_disagreements(cells: Sequence[dict[str, Any]]) -> list[str]:
    """The dumbbell cells whose figure, rounded half-up to 0.1, is not the issue's quoted one."""
    names = [n for n, _, _ in DUMBBELL_AGGREGATORS]
    out = []
    for cell in cells:
        quoted = ISSUE_QUOTED[cell["split"]][names.index(cell["aggregator"])]
        if math.floor(cell["published"] * 10 + 0.5) / 10 != quoted:
            out.append(f"{cell['split']} {cell['aggregator']}: raw {cell['published']:.4f}, issue {quoted}")
    return out


def compare(stored: dict[str, Any], derived: dict[str, list[dict[str, Any]]], tol: float = 1e-9) -> list[str]:
    """Where the stored figures (published.json) differ from the derived ones."""
    problems = []
    for experiment, cells in derived.items():
        kept = stored["experiments"][experiment]["cells"]
        if len(kept) != len(cells):
            problems.append(f"{experiment}: {len(kept)} stored cells, {len(cells)} derived")
            continue
        for old, new in zip(kept, cells):
            for key in ("published", "std", "min", "max"):
                a, b = old.get(key), new.get(key)
                if (a is None) != (b is None) or (a is not None and abs(a - b) > tol):
                    problems.append(f"{experiment} {old.get('split', old.get('attack'))} {old['aggregator']} "
                                    f"{key}: stored {a}, derived {b}")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dumbbell", type=Path, required=True, help=DUMBBELL_FILE)
    parser.add_argument("--dumbbell-improvement", type=Path, required=True, help=IMPROVEMENT_FILE)
    parser.add_argument("--bucketing", type=Path, required=True, help=BUCKETING_FILE)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", type=Path, help="published.json to compare with (exit 1 on a difference)")
    action.add_argument("--write", type=Path, help="published.json whose cells to replace")
    args = parser.parse_args(argv)
    derived = {"dumbbell_clippedgossip": dumbbell_cells(read_rows(args.dumbbell), read_rows(args.dumbbell_improvement)),
               "bucketing_mnist": bucketing_cells(read_rows(args.bucketing))}
    for experiment, cells in derived.items():
        print(f"{experiment}:")
        for c in cells:
            what = f"{c.get('split', '')} {c['aggregator']} {c.get('attack', '')}".strip()
            extra = "" if c["std"] is None else f" std {c['std']:.2f} min {c['min']:.2f} max {c['max']:.2f}"
            print(f"  {what:24} {c['published']:7.2f}  seeds {c['seeds']}{extra}")
    problems = [f"issue's quote: {p}" for p in issue_disagreements(derived["dumbbell_clippedgossip"])]
    if args.write:
        stored = json.loads(args.write.read_text(encoding="utf-8"))
        for experiment, cells in derived.items():
            stored["experiments"][experiment]["cells"] = cells
        args.write.write_text(json.dumps(stored, indent=1) + "\n", encoding="utf-8")
    if args.check:
        problems += compare(json.loads(args.check.read_text(encoding="utf-8")), derived)
    for p in problems:
        print("DIFFERS:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
