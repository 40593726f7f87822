"""A run's removal order as an edge ranking, from its graph, its removals and its circuit (no torch).

Faithfulness curves (curves.py) score the top k edges of this ranking; the page (graphs/page.py)
shows the same nested circuits from a run directory alone, so both read it from here.
"""
from __future__ import annotations

from typing import Iterable

from ..graphs.model_graph import ModelGraph, receiver_node, split_edge

WHOLE_PHASES = ("nodes", "edges")  # removals at single slots (positions, edge-positions) leave the edge in the graph


def removal_ranking(graph: ModelGraph, removals: Iterable[tuple[str, str]], circuit) -> list[str]:
    """The graph's edges, least important first: edges outside the circuit that no removal named, then
    edges of ablated nodes in the order the nodes went, edges in the order they were removed, and the
    circuit's edges by |effect|. `removals` are (phase, candidate) of the kept removals, in order."""
    by_node: dict[str, list[str]] = {}
    for e in graph.edges:
        src, dst = split_edge(e)
        by_node.setdefault(src, []).append(e)
        by_node.setdefault(receiver_node(dst)[0], []).append(e)
    removed: list[str] = []
    for phase, candidate in removals:
        if phase in WHOLE_PHASES:
            removed += by_node.get(candidate, []) if phase == "nodes" else [candidate]
    for n in circuit.method.get("dangling_removed") or []:
        removed += by_node.get(n, [])
    kept = circuit.effective_edges()
    removed = [e for e in dict.fromkeys(removed) if e not in kept]
    named = set(removed)
    rest = [e for e in graph.edges if e not in named and e not in kept]
    return rest + removed + sorted(kept, key=lambda e: abs(kept[e]) if kept[e] is not None else 0.0)
