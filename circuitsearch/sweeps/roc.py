"""Circuits against a known one: true/false positive rates per cell, ROC curves over a threshold
sweep, and their area.

A truth file is a circuit.json, or plain JSON {"nodes": [...], "edges": [...]} in the same names.
Positives are the truth's heads and MLPs (embed and logits are in every circuit, so they are not
counted) and its edges; negatives are every other head, MLP and edge of the model's graph. Each
ROC curve joins the cells that differ only in threshold or target, ordered by false positive rate,
with (0, 0) and (1, 1) added; AUC is the trapezoid area under it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..graphs.circuit import Circuit, model_graph_of
from ..graphs.model_graph import parse_node

SWEPT = ("absolute", "relative", "target")  # the settings a ROC curve runs along


@dataclass
class Truth:
    nodes: set
    edges: set
    source: str


def load_truth(path: str | Path) -> Truth:
    """The known circuit of a truth file; ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--truth {path}: no such file (give a circuit.json or {{\"nodes\": [...], "
                         "\"edges\": [...]}})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--truth {path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), (list, dict)):
        raise ValueError(f"--truth {path} must hold \"nodes\" (a list of names such as \"a0.1\") and "
                         "optionally \"edges\" (\"a0.1->a1.2.v\")")
    nodes = {n for n in data["nodes"] if parse_node(n).kind in ("head", "mlp")}
    edges = set(data.get("edges") or [])
    return Truth(nodes, edges, str(path))


def _kept(circuit: Circuit) -> tuple[set, set]:
    return set(circuit.heads()) | set(circuit.mlps()), set(circuit.effective_edges())


def rates(truth: Truth, circuit: Circuit) -> dict:
    """TPR and FPR of one circuit's nodes (heads and MLPs) and edges against the truth."""
    graph = model_graph_of(circuit.graph)
    all_nodes = {n for n in graph.nodes if parse_node(n).kind in ("head", "mlp")}
    all_edges = set(graph.edges)
    unknown = (truth.nodes - all_nodes) | (truth.edges - all_edges)
    if unknown:
        raise ValueError(f"--truth {truth.source} names {sorted(unknown)[:5]}, which the graph of "
                         f"{circuit.model} does not have")
    nodes, edges = _kept(circuit)
    out = {}
    for kind, kept, pos, universe in (("nodes", nodes, truth.nodes, all_nodes), ("edges", edges, truth.edges, all_edges)):
        if not pos:
            continue
        neg = universe - pos
        out[kind] = {"tpr": len(kept & pos) / len(pos), "fpr": len(kept - pos) / len(neg) if neg else 0.0,
                     "tp": len(kept & pos), "fp": len(kept - pos), "positives": len(pos), "negatives": len(neg)}
    return out


def auc(points: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Trapezoid area under (fpr, tpr) points with (0, 0) and (1, 1) added; and the curve walked."""
    curve = sorted({(0.0, 0.0), (1.0, 1.0), *points})
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(curve, curve[1:]))
    return area, curve


@dataclass
class RocCurve:
    series: str                 # the settings the cells share (everything but the threshold)
    kind: str                   # nodes | edges
    cells: list = field(default_factory=list)
    points: list = field(default_factory=list)
    auc: float = 0.0

    def to_json(self) -> dict:
        return {"series": self.series, "kind": self.kind, "cells": self.cells,
                "points": [list(p) for p in self.points], "auc": self.auc}


def series_of(settings: dict, varying: list[str]) -> str:
    """The settings that set a cell's curve apart: those that vary across the sweep, but not the threshold."""
    return ",".join(f"{k}={settings.get(k)}" for k in varying if k not in SWEPT) or "all cells"


def roc_curves(truth: Truth, cells: list[tuple[str, dict, Circuit]]) -> tuple[dict, list[RocCurve]]:
    """Per cell (name -> rates), and one ROC curve per series and kind over the cells of that series."""
    per_cell, groups = {}, {}
    keys = list(dict.fromkeys(k for _, s, _ in cells for k in s))
    varying = [k for k in keys if len({json.dumps(s.get(k)) for _, s, _ in cells}) > 1]
    for name, settings, circuit in cells:
        r = rates(truth, circuit)
        per_cell[name] = r
        groups.setdefault(series_of(settings, varying), []).append((name, r))
    curves = []
    for series, members in groups.items():
        for kind in ("nodes", "edges"):
            pts = [(m[1][kind]["fpr"], m[1][kind]["tpr"]) for m in members if kind in m[1]]
            if not pts:
                continue
            area, curve = auc(pts)
            curves.append(RocCurve(series, kind, [m[0] for m in members if kind in m[1]], curve, round(area, 6)))
    return per_cell, curves


def ranking_curve(truth: Truth, ranking: list[str], kind: str, circuit_graph) -> RocCurve | None:
    """The ROC of one ranking (most important first): the top k for every k, as a threshold on the score
    would cut it; None where the truth has no positives of this kind."""
    universe = ({n for n in circuit_graph.nodes if parse_node(n).kind in ("head", "mlp")} if kind == "nodes"
                else set(circuit_graph.edges))
    pos = truth.nodes if kind == "nodes" else truth.edges
    if not pos:
        return None
    neg = len(universe - pos)
    tp = fp = 0
    points = []
    for name in [r for r in ranking if r in universe]:
        tp, fp = tp + (name in pos), fp + (name not in pos)
        points.append((fp / neg if neg else 0.0, tp / len(pos)))
    area, curve = auc(points)
    return RocCurve("", kind, [], curve, round(area, 6))


def plot_roc(curves: list[RocCurve], path: str | Path) -> Path:
    """ROC curves (nodes solid, edges dashed), AUC in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for c in curves:
        xs, ys = zip(*c.points)
        style = ("-" if c.kind == "nodes" else "--") + (("o" if c.kind == "nodes" else "s") if c.cells else "")
        ax.plot(xs, ys, style, markersize=4, label=f"{c.kind}: {c.series[:60]} (AUC {c.auc:.3f})")  # a ranking: no markers
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("ROC against the known circuit ((0,0) and (1,1) added)")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
