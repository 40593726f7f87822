"""Circuit: the nodes and edges a search kept, with effect sizes, scores and full provenance."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import networkx as nx

from .. import __version__
from .model_graph import ModelGraph, parse_node, receiver_node, split_edge


def _sort_key(graph: dict):
    L = int(graph.get("n_layers", 10**6))

    def key(name: str):
        info = parse_node(name, L)
        return (info.layer, 1 if info.kind == "mlp" else 0, info.head if info.head is not None else 0)
    return key


@dataclass
class Circuit:
    """Kept nodes and edges (name -> effect, the faithfulness lost when it was tried for removal).

    `edges` empty with method level "nodes" means every edge between kept nodes.
    """

    model: str
    graph: dict
    task: str
    nodes: dict
    edges: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    version: str = __version__
    meta: dict = field(default_factory=dict)

    @property
    def model_graph(self) -> ModelGraph:
        return ModelGraph.from_signature(self.graph)

    def heads(self) -> list[str]:
        return sorted((n for n in self.nodes if parse_node(n).kind == "head"), key=_sort_key(self.graph))

    def mlps(self) -> list[str]:
        return sorted((n for n in self.nodes if parse_node(n).kind == "mlp"), key=_sort_key(self.graph))

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return len(self.effective_edges())

    def effective_edges(self) -> dict:
        """The kept edges; for a node-level circuit, every graph edge between kept nodes."""
        if self.edges or self.method.get("level") != "nodes":
            return dict(self.edges)
        out = {}
        for e in self.model_graph.edges:
            src, dst = split_edge(e)
            if src in self.nodes and receiver_node(dst)[0] in self.nodes:
                out[e] = None
        return out

    def summary(self) -> dict:
        return {"model": self.model, "task": self.task, "heads": len(self.heads()), "mlps": len(self.mlps()),
                "nodes": self.n_nodes, "edges": self.n_edges, **{k: self.scores.get(k) for k in
                                                                   ("faithfulness", "normalized")}}

    def to_networkx(self) -> nx.MultiDiGraph:
        """Nodes with layer/head/kind/effect; one edge per kept edge, keyed by its receiver input."""
        g = nx.MultiDiGraph()
        L = int(self.graph["n_layers"])
        for n, eff in self.nodes.items():
            info = parse_node(n, L)
            g.add_node(n, layer=info.layer, head=-1 if info.head is None else info.head, kind=info.kind,
                       effect=eff)
        for e, eff in self.edges.items():
            src, dst = split_edge(e)
            node, inp = receiver_node(dst)
            g.add_edge(src, node, key=inp or "", input=inp or "", effect=eff)
        g.graph.update({"model": self.model, "task": self.task, "graph": self.graph, "scores": self.scores,
                        "method": self.method, "stats": self.stats, "version": self.version, "meta": self.meta})
        return g

    @classmethod
    def from_networkx(cls, g: nx.MultiDiGraph) -> "Circuit":
        nodes = {n: d.get("effect") for n, d in g.nodes(data=True)}
        edges = {}
        for src, dst, d in g.edges(data=True):
            name = f"{src}->{dst}.{d['input']}" if d.get("input") else f"{src}->{dst}"
            edges[name] = d.get("effect")
        a = g.graph
        return cls(a["model"], a["graph"], a["task"], nodes, edges, a.get("scores", {}), a.get("method", {}),
                   a.get("stats", {}), a.get("version", __version__), a.get("meta", {}))

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "graph": self.graph, "task": self.task,
                "method": self.method, "scores": self.scores, "nodes": self.nodes, "edges": self.edges,
                "stats": self.stats, "version": self.version, "meta": self.meta}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


SCHEMA = "circuitsearch.circuit/1"
