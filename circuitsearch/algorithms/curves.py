"""Faithfulness curves: keep the top k % of edges of a ranking, everything else removed, and score.

As the MIB benchmark (Mueller et al. 2025) defines them: f(k) = (m(C_k) − m(∅)) / (m(M) − m(∅))
(our `normalized` score) at k = 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100 % of the model's edges
(⌊k·N⌋ edges), CPR = area under f and CMD = area under |1 − f|, both by the trapezoid rule over
k as a fraction (so both lie in [0, 0.999] when 0 ≤ f ≤ 1). Higher CPR and lower CMD are better.
Unlike MIB we do not prune kept edges that lie on no input-to-logits path: they are scored as kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

PERCENTAGES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
SCHEMA = "circuitsearch.curves/1"


@dataclass
class Curve:
    """Faithfulness at each percentage of edges kept, with the areas CPR and CMD."""

    name: str
    percentages: list[float]
    kept: list[int]
    faithfulness: list[float]  # MIB's f: normalized (circuit − empty) / (full − empty)
    ratio: list[float] = field(default_factory=list)  # our faithfulness: circuit / full
    n_edges: int = 0
    forward_passes: int = 0

    @property
    def cpr(self) -> float:
        return area(self.percentages, self.faithfulness)

    @property
    def cmd(self) -> float:
        return area(self.percentages, [abs(1 - f) for f in self.faithfulness])

    def to_json(self) -> dict:
        return {"name": self.name, "percentages": self.percentages, "kept": self.kept, "n_edges": self.n_edges,
                "faithfulness": self.faithfulness, "ratio": self.ratio, "cpr": self.cpr, "cmd": self.cmd,
                "forward_passes": self.forward_passes}


def area(percentages, values) -> float:
    """Trapezoid area of values over percentages taken as fractions (MIB: linear scale)."""
    xs = [p / 100 for p in percentages]
    return sum((xs[i + 1] - xs[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(xs) - 1))


def circuit_of_top(ev, keep: set[str]) -> tuple[list[str], list[str]]:
    """(ablated nodes, removed edges) for the circuit made of exactly the edges in `keep`.

    A sender with no kept out-edge is ablated (the same as removing all its out-edges, and cheaper).
    """
    nodes, edges = _top_masks(ev, ev.index.edge_ids(keep))
    return ev.index.names(nodes, "nodes"), ev.index.names(edges, "edges")


def _top_masks(ev, keep_ids) -> tuple:
    """circuit_of_top as index ids: (ablated sender ids, removed edge ids)."""
    ix = ev.index
    keep = torch.zeros(ix.E, dtype=torch.bool)
    keep[torch.as_tensor(keep_ids, dtype=torch.long)] = True
    live = torch.zeros(ix.N, dtype=torch.bool)
    live[ix.edge_src[keep]] = True
    return (~live[: ix.S]).nonzero()[:, 0], (~keep & live[ix.edge_src]).nonzero()[:, 0]


def faithfulness_curve(ev, ranking: list[str], name: str = "ranking",
                       percentages=PERCENTAGES) -> Curve:
    """Score the top ⌊p·N⌋ edges of `ranking` (least important first, as Attribution.ranking gives)
    for every p; edges the ranking omits count as least important."""
    edges = list(ev.graph.edges)
    known = set(edges)
    bad = [e for e in ranking if e not in known]
    if bad:
        raise ValueError(f"the ranking names {len(bad)} edges this model's graph does not have, e.g. {bad[0]!r}")
    listed = set(ranking)
    order = [e for e in edges if e not in listed] + list(ranking)  # least important first
    best_first = order[::-1]
    n = len(edges)
    fp0 = ev.forward_passes
    kept, f, ratio = [], [], []
    best_ids = ev.index.edge_ids(best_first)
    for p in percentages:
        k = int(p / 100 * n)
        nodes, removed = _top_masks(ev, best_ids[:k])
        s = ev.score(nodes=nodes, edges=removed)
        kept.append(k)
        f.append(ev.normalized(s))
        ratio.append(ev.faithfulness(s))
    return Curve(name, list(percentages), kept, f, ratio, n, ev.forward_passes - fp0)


def removal_ranking(ev, decisions: list, circuit) -> list[str]:
    """A run's edges, least important first (ranking.removal_ranking, from the decisions it kept)."""
    from .ranking import removal_ranking as ranking

    return ranking(ev.graph, [(d.phase, d.candidate) for d in decisions if d.removed], circuit)


def curves_json(curves: list[Curve]) -> dict:
    return {"schema": SCHEMA, "definition": "MIB: f = (circuit - empty) / (full - empty); CPR = area under f, "
            "CMD = area under |1 - f|, trapezoids over the fraction of edges kept",
            "curves": [c.to_json() for c in curves]}


def plot_curves(curves: list[Curve], path: str | Path, title: str = "") -> Path:
    """PNG of faithfulness against % of edges kept (log x axis), one line per curve with CPR/CMD."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for c in curves:
        ax.plot(c.percentages, c.faithfulness, marker="o", ms=3.5,
                label=f"{c.name}: CPR {c.cpr:.3f}, CMD {c.cmd:.3f}")
    ax.axhline(1.0, color="#888888", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xticks(list(PERCENTAGES), [f"{p:g}" for p in PERCENTAGES])
    ax.set_xlabel("edges kept (%)")
    ax.set_ylabel("faithfulness (normalized, MIB)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
