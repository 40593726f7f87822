"""Circuit: the nodes and edges a search kept, with effect sizes, scores and full provenance.

A Circuit is plain data; `validate()` checks it against its model graph, `to_json()` gives the
canonical JSON form (schema circuitsearch.circuit/1, or /2 for a circuit over token positions) and
`to_networkx()` a MultiDiGraph.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache

import networkx as nx

from .. import __version__
from ..features.hooks import parse_feature
from .model_graph import (ModelGraph, check_slot_name, parse_node, receiver_node, split_edge, split_edge_unit,
                          split_unit)

SCHEMA = "circuitsearch.circuit/1"
SCHEMA_2 = "circuitsearch.circuit/2"  # /1 plus the optional `positions` field
SCHEMAS = (SCHEMA, SCHEMA_2)
POSITION_KEYS = ("slots", "nodes", "edges", "effects")
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
    """Forward order: embed (tok before pos), then per layer its heads by index, then its MLP, then logits; a
    dictionary's features (index order, the error last) where its hook point sits in its layer."""
    info = parse_node(name, n_layers)
    if info.kind == "feature":
        f = parse_feature(name)
        return (info.layer, _FEATURE_AT[f.site], f.index if f.index is not None else 1 << 40)
    return (info.layer, 1 if info.kind == "mlp" else 0,
            info.head if info.head is not None else 1 if name == "pos" else 0)


_FEATURE_AT = {"resid_pre": -1, "attn_out": 0.5, "resid_mid": 0.7, "mlp_in": 0.8, "mlp_out": 1.5, "transcoder": 1.5}


def plural(n: int, word: str) -> str:
    """'1 head', '3 heads'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def sizes_text(c: "Circuit") -> str:
    """'10 heads, 2 MLPs, 142 edges'; a feature circuit's features and errors too (and its edges when it was
    searched at edge level)."""
    parts = [plural(len(c.heads()), "head"), plural(len(c.mlps()), "MLP")]
    if c.graph.get("features"):
        feats = c.feature_nodes()
        errs = sum(n.endswith(".err") for n in feats)
        parts += [plural(len(feats) - errs, "feature"), plural(errs, "error node")]
        if c.node_level:  # the edges it would mean join only what has edges: say so rather than count them
            return ", ".join(parts)
    return ", ".join(parts + [plural(c.n_edges, "edge")])


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

    `edges` empty with method level "nodes" (or "positions", or "nodes,positions": no edge phase)
    means every edge between kept nodes (kept units, with positions).
    `positions` (empty: every node and edge at every position) is {"slots": [slot names in
    position order], "nodes": {node: [slots kept]}, "edges": {edge: [slots kept]},
    "effects": {unit name: effect}}; nodes and edges kept at every slot are absent from it.
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
    positions: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.positions, dict) and self.positions:  # absent parts are empty (compares equal)
            self.positions = {"nodes": {}, "edges": {}, "effects": {}, **self.positions}

    # ---- views -------------------------------------------------------------------------------
    @property
    def features(self) -> dict:
        """What each kept dictionary feature reads and writes (meta["features"]: name -> its reading)."""
        return self.meta.get("features", {}) if isinstance(self.meta, dict) else {}

    @property
    def model_graph(self) -> ModelGraph:
        return model_graph_of(self.graph)

    @property
    def n_layers(self) -> int:
        return int(self.graph["n_layers"])

    @property
    def node_level(self) -> bool:
        """True when the circuit lists nodes only and means every edge between them (its level had no
        edge phase: "nodes", "positions" or "nodes,positions")."""
        level = self.method.get("level")
        return not self.edges and isinstance(level, str) and set(level.split(",")) <= {"nodes", "positions"}

    # ---- positions ---------------------------------------------------------------------------
    @property
    def slots(self) -> list[str]:
        """The slot names in position order ([] for a circuit without positions)."""
        return list(self.positions.get("slots", [])) if self.positions else []

    def _edge_slots_allowed(self, edge: str) -> list[str]:
        """Slots where an edge can carry anything: its sender is kept there, and so is its receiver,
        unless the receiver input is a key or value (read at that position by later queries too)."""
        src, dst = split_edge(edge)
        node, inp = receiver_node(dst)
        return self._allowed(src, node, inp, {n: set(self.kept_slots(n)) for n in (src, node)})

    def _allowed(self, src: str, node: str, inp: str | None, node_slots: dict[str, set]) -> list[str]:
        kv = inp in ("k", "v") or (inp is None and node.startswith("a"))  # qkv=False: q, k and v at once
        sender, receiver = node_slots.get(src, ()), node_slots.get(node, ())
        return [s for s in self.positions["slots"] if s in sender and (kv or s in receiver)]

    def slot_map(self, kind: str = "nodes") -> dict[str, list[str]]:
        """Every kept node (or edge, as effective_edges) with the slots it is kept at, in position order."""
        if kind not in ("nodes", "edges"):
            raise ValueError(f"kind must be 'nodes' or 'edges', not {kind!r}")
        if not self.positions:
            raise ValueError("this circuit has no positions (every node is kept at every position)")
        if kind == "nodes" or not self.node_level:
            return {x: self.kept_slots(x) for x in (self.nodes if kind == "nodes" else self.edges)}
        node_slots = {n: set(self.kept_slots(n)) for n in self.nodes}
        out = {}
        for e, src, node, inp in self._edges_between_kept(self.model_graph):
            where = self._allowed(src, node, inp, node_slots)
            if where:
                out[e] = where
        return out

    def _edges_between_kept(self, graph: ModelGraph):
        """(edge, sender, receiver node, input) for every graph edge whose two nodes are kept, in graph order."""
        kept = set(self.nodes)
        for node in graph.nodes[1:]:  # same order as graph.edges, without walking all of them
            if node not in kept:
                continue
            senders = [s for s in graph.senders_into(node) if s in kept]
            for recv in graph.receivers_of(node):
                inp = recv[-1] if recv != node else None
                for s in senders:
                    yield f"{s}->{recv}", s, node, inp

    def kept_slots(self, name: str) -> list[str]:
        """The slots (in position order) where a node or edge is kept; [] when it is not in the circuit."""
        if not self.positions:
            raise ValueError("this circuit has no positions (every node is kept at every position); "
                             "use units(slots=...) to expand it over given slots")
        if "->" in name:
            if self.node_level:  # every graph edge between kept nodes, at the slots where it carries something
                src, dst = split_edge(name)
                if src not in self.nodes or receiver_node(dst)[0] not in self.nodes:
                    return []
                try:
                    self.model_graph.check_edge(name)
                except ValueError:
                    return []
                return self._edge_slots_allowed(name)
            if name not in self.edges:
                return []
            kept = self.positions.get("edges", {}).get(name)
        else:
            if name not in self.nodes:
                return []
            kept = self.positions.get("nodes", {}).get(name)
        return self.slots if kept is None else [s for s in self.slots if s in set(kept)]

    def units(self, kind: str = "nodes", slots: list[str] | None = None) -> set[str]:
        """Every kept node (or edge) at each slot it is kept at: {"a9.1@S1", ...} (edges:
        {"a4.4@S1->a9.1.k@S1", ...}). A circuit without positions keeps everything at every slot,
        so it is expanded over `slots` (required then); with positions, `slots` must be its own."""
        if kind not in ("nodes", "edges"):
            raise ValueError(f"kind must be 'nodes' or 'edges', not {kind!r}")
        if self.positions:
            if slots is not None and list(slots) != self.slots:
                raise ValueError(f"slots {list(slots)} are not this circuit's slots {self.slots}")
            where = self.slot_map(kind)
        elif slots is None:
            raise ValueError("this circuit has no positions: give slots=[...] to expand it over them (it keeps "
                             "every node at every slot)")
        else:
            slots = [check_slot_name(s) for s in slots]
            where = {x: slots for x in (self.nodes if kind == "nodes" else self.effective_edges())}
        if kind == "nodes":
            return {f"{n}@{s}" for n, sl in where.items() for s in sl}
        out = set()
        for e, sl in where.items():
            src, dst = e.split("->")
            out.update(f"{src}@{s}->{dst}@{s}" for s in sl)
        return out

    def _kind(self, kind: str) -> list[str]:
        names = [n for n in self.nodes if parse_node(n, self.n_layers).kind == kind]
        return sorted(names, key=lambda n: node_sort_key(n, self.n_layers))

    def heads(self) -> list[str]:
        """Kept attention heads in forward order (layer, then head index)."""
        return self._kind("head")

    def mlps(self) -> list[str]:
        """Kept MLPs in layer order."""
        return self._kind("mlp")

    def feature_nodes(self) -> list[str]:
        """Kept dictionary features and error nodes, in forward order."""
        return self._kind("feature")

    def sizes(self) -> str:
        return sizes_text(self)

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
        if self.positions:  # only edges that some slot carries (sender and receiver kept there)
            return {e: None for e in self.slot_map("edges")}
        return {e: None for e, *_ in self._edges_between_kept(graph)}

    def summary(self) -> dict:
        """Sizes and headline scores in one flat dict (for tables and logs)."""
        out = {"model": self.model, "task": self.task, "level": self.method.get("level"),
               "heads": len(self.heads()), "mlps": len(self.mlps()), "nodes": self.n_nodes,
               "edges": self.n_edges, "faithfulness": self.scores.get("faithfulness"),
               "normalized": self.scores.get("normalized")}
        if self.positions:
            out |= {"slots": len(self.slots), "units": len(self.units("nodes")),
                    "edge_units": len(self.units("edges"))}
        return out

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
        if not isinstance(self.positions, dict):
            raise ValueError(f"field 'positions' is not a dict (got {type(self.positions).__name__})")
        if self.positions:
            self._validate_positions()
        return self

    def _validate_positions(self) -> None:
        """Slots, the partly kept nodes and edges, edge units that carry something, and unit effects."""
        p = self.positions
        unknown = sorted(set(p) - set(POSITION_KEYS), key=str)
        if unknown:
            raise ValueError(f"positions: unknown key(s) {', '.join(map(repr, unknown))}; positions holds "
                             f"{', '.join(POSITION_KEYS)}")
        slots = p.get("slots")
        if not isinstance(slots, list) or not slots:
            raise ValueError(f"positions['slots'] must be a non-empty list of slot names, got {slots!r}")
        for s in slots:
            check_slot_name(s)
        dup = sorted({s for s in slots if slots.count(s) > 1})
        if dup:
            raise ValueError(f"positions['slots'] names slot(s) {', '.join(map(repr, dup))} more than once")
        for kind, kept in (("nodes", self.nodes), ("edges", self.edges)):
            part = p.get(kind, {})
            if not isinstance(part, dict):
                raise ValueError(f"positions[{kind!r}] must be a dict of {kind[:-1]} -> [slots], got "
                                 f"{type(part).__name__}")
            for name, where in part.items():
                what = f"positions[{kind!r}][{name!r}]"
                if name not in kept:
                    raise ValueError(f"{what}: {kind[:-1]} {name!r} is not in the circuit's {kind} (a "
                                     f"{kind[:-1]} kept at some slot is in both; one kept at none is in neither)")
                if not isinstance(where, list) or not where:
                    raise ValueError(f"{what} must be a non-empty list of slots (a {kind[:-1]} kept at no slot "
                                     f"is left out of the circuit), got {where!r}")
                for s in where:
                    if s not in slots:
                        raise ValueError(f"{what}: unknown slot {s!r}; the slots are {slots}")
                if len(set(where)) != len(where):
                    raise ValueError(f"{what} lists a slot twice: {where}")
                if len(where) == len(slots):
                    raise ValueError(f"{what} lists every slot: leave it out (absent means kept at every slot)")
        for e in self.edges:
            allowed = set(self._edge_slots_allowed(e))
            bad = [s for s in self.kept_slots(e) if s not in allowed]
            if bad:
                src, dst = split_edge(e)
                raise ValueError(f"edge {e!r} is kept at slot(s) {', '.join(map(repr, bad))}, where it carries "
                                 f"nothing: {src} (or {receiver_node(dst)[0]}, for a q, MLP or logits input) is "
                                 "not kept there")
        effects = p.get("effects", {})
        if not isinstance(effects, dict):
            raise ValueError(f"positions['effects'] must be a dict of unit name -> effect, got "
                             f"{type(effects).__name__}")
        for unit, eff in effects.items():
            _check_name("unit", unit)
            name, slot = split_edge_unit(unit) if "->" in unit else split_unit(unit)
            if slot not in slots:
                raise ValueError(f"positions['effects'][{unit!r}]: unknown slot {slot!r}; the slots are {slots}")
            if slot not in self.kept_slots(name):
                raise ValueError(f"positions['effects'] has {unit!r}, which the circuit does not keep "
                                 f"({name} is kept at {self.kept_slots(name) or 'no slot'})")
            _check_number(f"effect of unit {unit!r}", eff)

    def _positions_json(self) -> dict:
        """positions in canonical order: slot lists in position order, names in forward order. Anything
        invalid sorts last and is written as given, for validation to name (never a crash in sorting)."""
        L, slots = self.n_layers, self.slots
        p = {k: self.positions.get(k, {}) for k in ("nodes", "edges", "effects")}
        order = {s: i for i, s in enumerate(slots) if isinstance(s, str)}

        def robust(key):
            def k(x):
                try:
                    return (0, key(x))
                except (ValueError, KeyError, TypeError):
                    return (1,)
            return k

        def unit_key(u: str) -> tuple:
            name, s = split_edge_unit(u) if "->" in u else split_unit(u)
            return ("->" in u, edge_sort_key(name, L) if "->" in u else node_sort_key(name, L), order[s])

        where = robust(order.__getitem__)
        return {"slots": list(slots),
                "nodes": {n: sorted(p["nodes"][n], key=where) if isinstance(p["nodes"][n], list) else p["nodes"][n]
                          for n in sorted(p["nodes"], key=robust(lambda n: node_sort_key(n, L)))},
                "edges": {e: sorted(p["edges"][e], key=where) if isinstance(p["edges"][e], list) else p["edges"][e]
                          for e in sorted(p["edges"], key=robust(lambda e: edge_sort_key(e, L)))},
                "effects": {u: _num(p["effects"][u]) for u in sorted(p["effects"], key=robust(unit_key))}}

    # ---- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The canonical JSON form: schema first, nodes and edges in forward order, numbers as floats."""
        L = self.n_layers
        nodes = {n: _num(self.nodes[n]) for n in sorted(self.nodes, key=lambda n: node_sort_key(n, L))}
        edges = {e: _num(self.edges[e]) for e in sorted(self.edges, key=lambda e: edge_sort_key(e, L))}
        out = {"schema": SCHEMA_2 if self.positions else SCHEMA, "model": self.model, "task": self.task,
               "graph": dict(self.graph), "method": self.method,
               "scores": {k: _num(v) for k, v in self.scores.items()}, "nodes": nodes, "edges": edges}
        if self.positions:
            out["positions"] = self._positions_json()
        return out | {"stats": self.stats, "version": self.version, "meta": self.meta}

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
        if schema not in SCHEMAS:
            if isinstance(schema, str) and schema.startswith("circuitsearch.circuit/"):
                raise CircuitFormatError(f"{source} has schema {schema!r}; this version of circuitsearch "
                                         f"({__version__}) reads {SCHEMA!r} and {SCHEMA_2!r} only")
            raise CircuitFormatError(f"{source} is not a circuit: its schema is {schema!r}, not {SCHEMA!r}")
        missing = [k for k in FIELDS if k not in data]
        if missing:
            raise CircuitFormatError(f"{source}: required field(s) {', '.join(map(repr, missing))} missing "
                                     "(file incomplete or not written by circuitsearch)")
        unknown = sorted(set(data) - set(FIELDS) - {"schema"} - ({"positions"} if schema == SCHEMA_2 else set()))
        if unknown:
            hint = f" (positions need schema {SCHEMA_2!r})" if "positions" in unknown else ""
            raise CircuitFormatError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))} for schema "
                                     f"{schema}{hint}")
        positions = data.get("positions", {})
        if not isinstance(positions, dict):
            raise CircuitFormatError(f"{source}: field 'positions' is not a dict (got {type(positions).__name__})")
        circuit = cls(**{k: data[k] for k in FIELDS}, positions=copy.deepcopy(positions))
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
        With positions, the graph attributes `slots` (the slot list) and `unit_effects` hold them, and
        every node and edge has a `slots` attribute: the slots it is kept at.
        """
        L = self.n_layers
        g = nx.MultiDiGraph()
        g.graph.update(copy.deepcopy({"schema": SCHEMA_2 if self.positions else SCHEMA, "model": self.model,
                                      "task": self.task, "graph": self.graph,
                                      "scores": self.scores, "method": self.method, "stats": self.stats,
                                      "version": self.version, "meta": self.meta}))  # no shared dicts
        if self.positions:
            g.graph.update(slots=self.slots, unit_effects=dict(self.positions.get("effects", {})))
        for n, eff in self.nodes.items():
            info = parse_node(n, L)
            g.add_node(n, layer=info.layer, head=-1 if info.head is None else info.head, kind=info.kind,
                       effect=eff, **({"slots": self.kept_slots(n)} if self.positions else {}))
        for e, eff in self.edges.items():
            src, dst = split_edge(e)
            node, inp = receiver_node(dst)
            g.add_edge(src, node, key=inp or "", input=inp or "", effect=eff,
                       **({"slots": self.kept_slots(e)} if self.positions else {}))
        return g

    @classmethod
    def from_networkx(cls, g: nx.Graph, source: str = "<networkx graph>") -> "Circuit":
        """Rebuild (and validate) a Circuit from to_networkx()'s graph; names are authoritative."""
        return cls.from_json(_json_of_networkx(g, source), source)


def _json_of_networkx(g: nx.Graph, source: str) -> dict:
    """circuit.json's data from Circuit.to_networkx()'s graph (a CircuitFormatError naming what is wrong)."""
    missing = [k for k in FIELDS if k not in g.graph and k not in ("nodes", "edges")]
    if missing:
        raise CircuitFormatError(f"{source}: graph attribute(s) {', '.join(map(repr, missing))} missing; "
                                 "not a circuit made by Circuit.to_networkx")
    schema = g.graph.get("schema", SCHEMA)
    if schema not in SCHEMAS:
        raise CircuitFormatError(f"{source} has schema {g.graph['schema']!r}; this version reads {SCHEMA!r} "
                                 f"and {SCHEMA_2!r}")
    slots = g.graph.get("slots")
    if slots is not None and not isinstance(slots, list):
        raise CircuitFormatError(f"{source}: graph attribute 'slots' must be a list, got {slots!r}")
    part: dict[str, dict] = {"nodes": {}, "edges": {}}

    def kept(what: str, name: str, d: dict) -> None:
        if slots is None:
            return
        where = d.get("slots")
        if not isinstance(where, list):
            raise CircuitFormatError(f"{source}: {what} {name!r} has no 'slots' list (got {where!r}); in a "
                                     "circuit with positions every node and edge has one")
        if sorted(where) != sorted(slots):
            part[what + "s"][name] = list(where)

    nodes = {}
    for n, d in g.nodes(data=True):
        nodes[n] = d.get("effect")
        kept("node", n, d)
    edges: dict[str, Effect] = {}
    for src, dst, d in g.edges(data=True):
        inp = d.get("input", "")
        name = f"{src}->{dst}.{inp}" if inp else f"{src}->{dst}"
        if name in edges:
            raise CircuitFormatError(f"{source}: edge {name!r} appears twice")
        edges[name] = d.get("effect")
        kept("edge", name, d)
    data = {k: copy.deepcopy(g.graph[k]) for k in FIELDS if k not in ("nodes", "edges")}
    data |= {"schema": schema, "nodes": nodes, "edges": edges}
    if slots is not None:
        data |= {"schema": SCHEMA_2, "positions": {"slots": list(slots), **part,
                                                   "effects": copy.deepcopy(g.graph.get("unit_effects", {}))}}
    return data


def group_units(units, slots: list[str]) -> dict[str, list[str]]:
    """Node units or edge units -> {node or edge: [slots, in position order]}:
    {"a9.1@end", "a9.1@S1"} -> {"a9.1": ["S1", "end"]}; a unit at a slot not in `slots` is an error."""
    order = {s: i for i, s in enumerate(slots)}
    out: dict[str, list[str]] = {}
    for u in units:
        name, slot = split_edge_unit(u) if "->" in u else split_unit(u)
        if slot not in order:
            raise ValueError(f"unit {u!r} is at slot {slot!r}, which is not one of the slots {list(slots)}")
        out.setdefault(name, []).append(slot)
    return {k: sorted(set(v), key=order.__getitem__) for k, v in out.items()}


def positions_field(slots: list[str], nodes: dict[str, list[str]], edges: dict[str, list[str]] | None = None,
                    effects: dict[str, Effect] | None = None) -> dict:
    """Circuit.positions from where each kept node (and edge) is kept: only those kept at some but not all
    slots are listed (e.g. positions_field(slots, group_units(kept_units, slots)))."""
    def partly(where: dict[str, list[str]]) -> dict[str, list[str]]:
        return {k: list(v) for k, v in where.items() if set(v) != set(slots)}

    return {"slots": list(slots), "nodes": partly(nodes), "edges": partly(edges or {}),
            "effects": dict(effects or {})}


def _check_name(what: str, key) -> None:
    if not isinstance(key, str):
        raise ValueError(f"{what} name {key!r} is not a string")


def _check_number(what: str, value) -> None:
    if value is not None and not _is_number(value):
        raise ValueError(f"{what} must be a number or null, got {value!r}")
