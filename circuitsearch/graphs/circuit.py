"""Circuit: the nodes and edges a search kept, with effect sizes, scores and full provenance.

A Circuit is plain data; `validate()` checks it against its model graph, `to_json()` gives the
canonical JSON form (schema circuitsearch.circuit/1) and `to_networkx()` a MultiDiGraph.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache

import networkx as nx

from .. import __version__
from .model_graph import ModelGraph, parse_node, receiver_node, split_edge

SCHEMA = "circuitsearch.circuit/1"
FIELDS = ("model", "graph", "task", "nodes", "edges", "scores", "method", "stats", "version", "meta")
_INPUT_ORDER = {"q": 0, "k": 1, "v": 2, None: 0}

Effect = float | None


class CircuitFormatError(ValueError):
    """Data that is not a valid circuit of this schema; nothing half-loaded is ever returned."""


@lru_cache(maxsize=16)
def _graph(key: str) -> ModelGraph:
    return ModelGraph.from_signature(json.loads(key))


def model_graph_of(signature: dict) -> ModelGraph:
    """The (cached) ModelGraph of a signature dict; refuses any dict ModelGraph.signature() would not give."""
    if not isinstance(signature, dict):
        raise ValueError(f"graph signature must be a dict, not {type(signature).__name__}")
    try:
        graph = _graph(json.dumps(signature, sort_keys=True))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"graph signature {signature} is not valid ({type(err).__name__}: {err})") from None
    made = graph.signature()
    for key in sorted(set(made) | set(signature)):  # exact types too: True == 1 and 4 == 4.0 in Python
        if key not in signature or key not in made or type(signature[key]) is not type(made[key]) \
                or signature[key] != made[key]:
            want = type(made[key]).__name__ if key in made else "absent"
            raise ValueError(f"graph signature {key!r} must be {want}, got {signature.get(key)!r}")
    if graph.n_layers < 1 or graph.n_heads < 1:
        raise ValueError(f"graph signature needs n_layers and n_heads >= 1, got {signature}")
    return graph


def node_sort_key(name: str, n_layers: int) -> tuple:
    """Forward order: embed (tok before pos), then per layer its heads by index, then its MLP, then logits."""
    info = parse_node(name, n_layers)
    return (info.layer, 1 if info.kind == "mlp" else 0,
            info.head if info.head is not None else 1 if name == "pos" else 0)


def edge_sort_key(edge: str, n_layers: int) -> tuple:
    """The order of ModelGraph.edges: by receiver node, then q/k/v, then sender."""
    src, dst = split_edge(edge)
    node, inp = receiver_node(dst)
    return (node_sort_key(node, n_layers), _INPUT_ORDER[inp], node_sort_key(src, n_layers))


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _num(x) -> Effect:
    """An effect or score as a JSON float (None stays None); numpy/torch scalars become floats."""
    if x is None:
        return None
    if isinstance(x, bool):
        raise ValueError(f"expected a number or None, got {x!r}")
    return float(x)


@dataclass
class Circuit:
    """Kept nodes and edges (name -> effect, the faithfulness lost when it was tried for removal).

    `edges` empty with method level "nodes" means every edge between kept nodes.
    """

    model: str
    graph: dict
    task: str
    nodes: dict[str, Effect]
    edges: dict[str, Effect] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    version: str = __version__
    meta: dict = field(default_factory=dict)

    # ---- views -------------------------------------------------------------------------------
    @property
    def model_graph(self) -> ModelGraph:
        return model_graph_of(self.graph)

    @property
    def n_layers(self) -> int:
        return int(self.graph["n_layers"])

    @property
    def node_level(self) -> bool:
        """True when the circuit lists nodes only and means every edge between them."""
        return not self.edges and self.method.get("level") == "nodes"

    def _kind(self, kind: str) -> list[str]:
        names = [n for n in self.nodes if parse_node(n, self.n_layers).kind == kind]
        return sorted(names, key=lambda n: node_sort_key(n, self.n_layers))

    def heads(self) -> list[str]:
        """Kept attention heads in forward order (layer, then head index)."""
        return self._kind("head")

    def mlps(self) -> list[str]:
        """Kept MLPs in layer order."""
        return self._kind("mlp")

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        """Number of edges the circuit means (for a node-level circuit: all edges among its nodes)."""
        return len(self.edges) if not self.node_level else len(self.effective_edges())

    def effective_edges(self, graph: ModelGraph | None = None) -> dict[str, Effect]:
        """The kept edges; for a node-level circuit, every graph edge whose two ends are kept."""
        if graph is not None and graph.signature() != self.graph:
            raise ValueError(f"graph {graph.signature()} is not this circuit's graph {self.graph}")
        if not self.node_level:
            return dict(self.edges)
        graph = graph or self.model_graph
        kept = set(self.nodes)
        out: dict[str, Effect] = {}
        for node in graph.nodes[1:]:  # same order as graph.edges, without walking all of them
            if node not in kept:
                continue
            senders = [s for s in graph.senders_into(node) if s in kept]
            for recv in graph.receivers_of(node):
                for s in senders:
                    out[f"{s}->{recv}"] = None
        return out

    def summary(self) -> dict:
        """Sizes and headline scores in one flat dict (for tables and logs)."""
        return {"model": self.model, "task": self.task, "level": self.method.get("level"),
                "heads": len(self.heads()), "mlps": len(self.mlps()), "nodes": self.n_nodes,
                "edges": self.n_edges, "faithfulness": self.scores.get("faithfulness"),
                "normalized": self.scores.get("normalized")}

    # ---- checking ----------------------------------------------------------------------------
    def validate(self) -> "Circuit":
        """Check names, types and that every edge joins two kept nodes; raise ValueError if not."""
        for name, typ in (("model", str), ("task", str), ("version", str), ("graph", dict), ("nodes", dict),
                          ("edges", dict), ("scores", dict), ("method", dict), ("stats", dict), ("meta", dict)):
            value = getattr(self, name)
            if not isinstance(value, typ):
                raise ValueError(f"field {name!r} is missing or not a {typ.__name__} (got {type(value).__name__})")
        graph = model_graph_of(self.graph)
        for n, eff in self.nodes.items():
            _check_name("node", n)
            graph.check_node(n)
            _check_number(f"effect of node {n!r}", eff)
        for e, eff in self.edges.items():
            _check_name("edge", e)
            graph.check_edge(e)
            src, dst = split_edge(e)
            node = receiver_node(dst)[0]
            for end in (src, node):
                if end not in self.nodes:
                    raise ValueError(f"edge {e!r} joins node {end!r}, which is not in the circuit")
            _check_number(f"effect of edge {e!r}", eff)
        for k, v in self.scores.items():
            _check_name("score", k)
            _check_number(f"score {k!r}", v)
        return self

    # ---- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The canonical JSON form: schema first, nodes and edges in forward order, numbers as floats."""
        L = self.n_layers
        nodes = {n: _num(self.nodes[n]) for n in sorted(self.nodes, key=lambda n: node_sort_key(n, L))}
        edges = {e: _num(self.edges[e]) for e in sorted(self.edges, key=lambda e: edge_sort_key(e, L))}
        return {"schema": SCHEMA, "model": self.model, "task": self.task, "graph": dict(self.graph),
                "method": self.method, "scores": {k: _num(v) for k, v in self.scores.items()},
                "nodes": nodes, "edges": edges, "stats": self.stats, "version": self.version,
                "meta": self.meta}

    def dumps(self) -> str:
        """JSON text of to_json() (UTF-8, one-space indent, trailing newline)."""
        try:
            return json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n"
        except (TypeError, ValueError) as err:
            raise ValueError(f"circuit cannot be written as JSON: {err} (method, stats and meta must hold "
                             "only JSON values)") from None

    @classmethod
    def from_json(cls, data, source: str = "<data>") -> "Circuit":
        """Build and validate a Circuit from its JSON form; CircuitFormatError names `source` and the problem."""
        if not isinstance(data, dict):
            raise CircuitFormatError(f"{source} is not a circuitsearch circuit (a JSON {type(data).__name__}, "
                                     "not an object)")
        schema = data.get("schema")
        if schema is None:
            raise CircuitFormatError(f"{source} is not a circuitsearch circuit (no 'schema' field; circuit files "
                                     f"start with \"schema\": \"{SCHEMA}\")")
        if schema != SCHEMA:
            if isinstance(schema, str) and schema.startswith("circuitsearch.circuit/"):
                raise CircuitFormatError(f"{source} has schema {schema!r}; this version of circuitsearch "
                                         f"({__version__}) reads {SCHEMA!r} only")
            raise CircuitFormatError(f"{source} is not a circuit: its schema is {schema!r}, not {SCHEMA!r}")
        missing = [k for k in FIELDS if k not in data]
        if missing:
            raise CircuitFormatError(f"{source}: required field(s) {', '.join(map(repr, missing))} missing "
                                     "(file incomplete or not written by circuitsearch)")
        unknown = sorted(set(data) - set(FIELDS) - {"schema"})
        if unknown:
            raise CircuitFormatError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))} for schema "
                                     f"{SCHEMA}")
        circuit = cls(**{k: data[k] for k in FIELDS})
        try:
            circuit.validate()
        except ValueError as err:
            raise CircuitFormatError(f"{source}: {err}") from None
        return circuit

    # ---- networkx ----------------------------------------------------------------------------
    def to_networkx(self) -> nx.MultiDiGraph:
        """Nodes carry layer/head/kind/effect; one edge per kept edge, keyed by its receiver input.

        Edges go from sender node to receiver node with attribute input "q"/"k"/"v" ("" for MLPs
        and logits); head is -1 for non-heads. Graph attributes hold everything else (dicts as dicts).
        """
        L = self.n_layers
        g = nx.MultiDiGraph()
        g.graph.update(copy.deepcopy({"schema": SCHEMA, "model": self.model, "task": self.task, "graph": self.graph,
                                      "scores": self.scores, "method": self.method, "stats": self.stats,
                                      "version": self.version, "meta": self.meta}))  # no shared dicts
        for n, eff in self.nodes.items():
            info = parse_node(n, L)
            g.add_node(n, layer=info.layer, head=-1 if info.head is None else info.head, kind=info.kind,
                       effect=eff)
        for e, eff in self.edges.items():
            src, dst = split_edge(e)
            node, inp = receiver_node(dst)
            g.add_edge(src, node, key=inp or "", input=inp or "", effect=eff)
        return g

    @classmethod
    def from_networkx(cls, g: nx.Graph, source: str = "<networkx graph>") -> "Circuit":
        """Rebuild (and validate) a Circuit from to_networkx()'s graph; names are authoritative."""
        missing = [k for k in FIELDS if k not in g.graph and k not in ("nodes", "edges")]
        if missing:
            raise CircuitFormatError(f"{source}: graph attribute(s) {', '.join(map(repr, missing))} missing; "
                                     "not a circuit made by Circuit.to_networkx")
        if g.graph.get("schema", SCHEMA) != SCHEMA:
            raise CircuitFormatError(f"{source} has schema {g.graph['schema']!r}; this version reads {SCHEMA!r}")
        nodes = {n: d.get("effect") for n, d in g.nodes(data=True)}
        edges: dict[str, Effect] = {}
        for src, dst, d in g.edges(data=True):
            inp = d.get("input", "")
            name = f"{src}->{dst}.{inp}" if inp else f"{src}->{dst}"
            if name in edges:
                raise CircuitFormatError(f"{source}: edge {name!r} appears twice")
            edges[name] = d.get("effect")
        data = {k: copy.deepcopy(g.graph[k]) for k in FIELDS if k not in ("nodes", "edges")}
        return cls.from_json(data | {"schema": SCHEMA, "nodes": nodes, "edges": edges}, source)


def _check_name(what: str, key) -> None:
    if not isinstance(key, str):
        raise ValueError(f"{what} name {key!r} is not a string")


def _check_number(what: str, value) -> None:
    if value is not None and not _is_number(value):
        raise ValueError(f"{what} must be a number or null, got {value!r}")
