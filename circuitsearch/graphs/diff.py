"""Set algebra over circuits of one model: which circuits hold each node and edge, overlaps, Jaccard,
a terminal table, diff.json and an overlay diagram coloured by the subset of circuits holding each part.

Circuits over token positions with one slot list are also compared unit by unit (`a9.1@S1`,
`a4.4@S1->a9.1.k@S1`); any other mix is compared at node level (a node counts if kept at any slot),
and the Diff says so in `note`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

from .circuit import Circuit, edge_sort_key, group_units, node_sort_key, positions_field
from .model_graph import parse_node, split_edge_unit, split_unit
from .render import Look, plural, render_dot, to_dot

DIFF_SCHEMA = "circuitsearch.diff/1"
SINGLE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#7f7f7f"]  # one per circuit (cycled beyond 5)
PARTIAL_COLOURS = ["#9467bd", "#17becf", "#e377c2", "#bcbd22", "#d62728", "#393b79"]  # held by some, not all
SHARED_NODE, SHARED_EDGE = "#ffd21f", "#111111"  # shared by all: gold nodes with a heavy border, black edges
COUNT_LIMIT = 6  # more partial subsets than this present: colour them by how many circuits hold them

Subset = frozenset  # of circuit names
KINDS = ("nodes", "edges", "node_units", "edge_units")


def _jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    return len(a & b) / len(a | b) if a | b else 1.0


@dataclass
class Diff:
    """For every node and edge of any circuit, the frozenset of circuit names that contain it.

    level "units": the circuits share one slot list and are also compared by node unit and edge unit
    (unit_node_sets, unit_edge_sets; kinds "node_units" and "edge_units"). level "nodes": by node and
    edge only; `note` says why when any circuit has positions.
    """

    names: list[str]
    circuits: list[Circuit]
    node_sets: dict[str, Subset]
    edge_sets: dict[str, Subset]
    level: str = "nodes"
    note: str | None = None
    slots: list[str] = field(default_factory=list)
    unit_node_sets: dict[str, Subset] = field(default_factory=dict)
    unit_edge_sets: dict[str, Subset] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.circuits[0].model

    @property
    def graph(self) -> dict:
        return self.circuits[0].graph

    def _sets(self, kind: str) -> dict[str, Subset]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, not {kind!r}")
        if kind.endswith("_units") and self.level != "units":
            raise ValueError(f"this diff compares at node level, so it has no {kind}"
                             + (f": {self.note}" if self.note else " (no circuit has positions)"))
        return {"nodes": self.node_sets, "edges": self.edge_sets, "node_units": self.unit_node_sets,
                "edge_units": self.unit_edge_sets}[kind]

    def _check(self, names) -> set[str]:
        names = {names} if isinstance(names, str) else set(names)
        unknown = names - set(self.names)
        if unknown:
            raise KeyError(f"no circuit named {sorted(unknown)}; circuits are {self.names}")
        return names

    def members(self, name: str, kind: str = "nodes") -> set[str]:
        """The nodes (or edges) of one circuit."""
        return self.common([name], kind)

    def common(self, names, kind: str = "nodes") -> set[str]:
        """Intersection: held by every one of `names` (and maybe others)."""
        names = self._check(names)
        return {x for x, s in self._sets(kind).items() if names <= s}

    def either(self, names, kind: str = "nodes") -> set[str]:
        """Union: held by at least one of `names`."""
        names = self._check(names)
        return {x for x, s in self._sets(kind).items() if names & s}

    def only(self, names, kind: str = "nodes") -> set[str]:
        """Held by exactly the circuits `names`, no more, no fewer."""
        names = self._check(names)
        return {x for x, s in self._sets(kind).items() if s == names}

    def shared(self, kind: str = "nodes") -> set[str]:
        """Held by every circuit."""
        return self.common(self.names, kind)

    def unique(self, name: str, kind: str = "nodes") -> set[str]:
        """Held by this circuit and no other."""
        return self.only([name], kind)

    def subsets(self, all_: bool | None = None) -> list[Subset]:
        """Subsets of circuits, singles first, shared-by-all last; all 2^n−1 when n ≤ 4, else those present."""
        if all_ is None:
            all_ = len(self.names) <= 4
        if all_:
            found = [frozenset(c) for k in range(1, len(self.names) + 1)
                     for c in itertools.combinations(self.names, k)]
        else:
            found = list(set(self.node_sets.values()) | set(self.edge_sets.values())
                         | set(self.unit_node_sets.values()) | set(self.unit_edge_sets.values()))
        order = {n: i for i, n in enumerate(self.names)}
        return sorted(found, key=lambda s: (len(s), sorted(order[n] for n in s)))

    def counts(self, subset: Subset) -> dict[str, int]:
        """Heads, MLPs, other nodes (embed/logits) and edges held by exactly this subset."""
        nodes = self.only(subset, "nodes")
        kinds = [parse_node(n).kind for n in nodes]
        out = {"heads": kinds.count("head"), "mlps": kinds.count("mlp"),
               "io": kinds.count("embed") + kinds.count("logits"), "edges": len(self.only(subset, "edges"))}
        if self.level == "units":  # head and MLP units (embed and logits units left out, as in jaccard)
            out |= {"units": len(_inner_units(self.only(subset, "node_units"))),
                    "edge_units": len(self.only(subset, "edge_units"))}
        return out

    def jaccard(self, kind: str = "nodes") -> list[list[float]]:
        """Pairwise Jaccard matrix in `names` order; nodes means heads and MLPs (embed/logits are in nearly all),
        node_units their units."""
        sets = []
        for n in self.names:
            s = self.members(n, kind)
            if kind == "nodes":
                s = {x for x in s if parse_node(x).kind in ("head", "mlp")}
            elif kind == "node_units":
                s = _inner_units(s)
            sets.append(s)
        return [[_jaccard(a, b) for b in sets] for a in sets]

    def combined(self, which: str = "intersection", like: Circuit | None = None) -> Circuit:
        """The circuit of what every circuit holds (intersection) or any holds (union), unscored, with the
        method of `like` (default: the first circuit). At level "units" it is kept unit by unit, so it has
        positions; logits are added (at every slot) if the intersection lost them."""
        if which not in ("intersection", "union"):
            raise ValueError(f"which must be 'intersection' or 'union', not {which!r}")
        like = like or self.circuits[0]
        k = len(self.names)
        keep = (lambda s: len(s) == k) if which == "intersection" else (lambda s: True)
        node_level = all(c.node_level for c in self.circuits)
        method = {**like.method, "order": which}
        if self.level != "units":
            nodes = {n: None for n, s in self.node_sets.items() if keep(s)}
            nodes.setdefault("logits", None)
            edges = {} if node_level else {e: None for e, s in self.edge_sets.items() if keep(s)}
            return Circuit(like.model, like.graph, like.task, nodes, edges, method=method)
        where = group_units([u for u, s in self.unit_node_sets.items() if keep(s)], self.slots)
        where.setdefault("logits", list(self.slots))
        edge_where = {} if node_level else group_units(
            [u for u, s in self.unit_edge_sets.items() if keep(s)], self.slots)
        return Circuit(like.model, like.graph, like.task, {n: None for n in where}, {e: None for e in edge_where},
                       method=method, positions=positions_field(self.slots, where, edge_where))

    def label(self, subset: Subset) -> str:
        """'digits only', 'digits & words only', 'shared by all (3)'."""
        if len(subset) == len(self.names) and len(self.names) > 1:
            return f"shared by all {len(self.names)}"
        return " & ".join(n for n in self.names if n in subset) + " only"

    def _sorted(self, xs: set[str], kind: str) -> list[str]:
        """In forward order: the order of the kind's dict (built sorted by diff_circuits)."""
        return [x for x in self._sets(kind) if x in xs]

    def to_json(self) -> dict:
        """diff.json: circuits, exact-subset membership (with names), shared, unique, Jaccard matrices."""
        circuits = [{"name": n, "task": c.task, **{k: v for k, v in c.summary().items() if k not in ("model", "task")}}
                    for n, c in zip(self.names, self.circuits)]
        kinds = KINDS if self.level == "units" else KINDS[:2]
        subsets = []
        for s in self.subsets(all_=False):
            subsets.append({"circuits": [n for n in self.names if n in s], "label": self.label(s), **self.counts(s),
                            "node_names": self._sorted(self.only(s, "nodes"), "nodes"),
                            "edge_names": self._sorted(self.only(s, "edges"), "edges")})
            if self.level == "units":
                subsets[-1] |= {"node_unit_names": self._sorted(self.only(s, "node_units"), "node_units"),
                                "edge_unit_names": self._sorted(self.only(s, "edge_units"), "edge_units")}
        return {"schema": DIFF_SCHEMA, "model": self.model, "graph": self.graph, "names": self.names,
                "level": self.level, "note": self.note, **({"slots": self.slots} if self.level == "units" else {}),
                "circuits": circuits, "subsets": subsets,
                "shared": {k: self._sorted(self.shared(k), k) for k in kinds},
                "unique": {n: {k: self._sorted(self.unique(n, k), k) for k in kinds} for n in self.names},
                "jaccard": {"names": self.names, **{k: self.jaccard(k) for k in kinds}}}


def _inner_units(units: set[str]) -> set[str]:
    """The head and MLP units among node units (embed and logits units left out)."""
    return {u for u in units if parse_node(split_unit(u)[0]).kind in ("head", "mlp")}


def _unit_sets(circuits: list[Circuit], names: list[str], slots: list[str], n_layers: int) -> list[dict]:
    """Node units and edge units -> the circuits holding them, each dict in forward order (by node or
    edge, then slot); sort keys are computed once per node or edge, not per unit."""
    order = {s: i for i, s in enumerate(slots)}
    out = []
    for kind, key in (("nodes", node_sort_key), ("edges", edge_sort_key)):
        held: dict[str, set] = {}
        keys: dict[str, tuple] = {}
        base: dict[str, tuple] = {}
        for c, n in zip(circuits, names):
            for x, where in c.slot_map(kind).items():
                if x not in base:
                    base[x] = key(x, n_layers)
                src, _, dst = x.partition("->")
                for s in where:
                    u = f"{x}@{s}" if kind == "nodes" else f"{src}@{s}->{dst}@{s}"
                    if u not in held:
                        held[u], keys[u] = set(), (base[x], order[s])
                    held[u].add(n)
        out.append({u: frozenset(held[u]) for u in sorted(held, key=keys.__getitem__)})
    return out


def _compare_level(circuits: list[Circuit], names: list[str]) -> tuple[str, str | None, list[str]]:
    """("units", note, slots) when every circuit has positions over one slot list; else ("nodes", why, [])."""
    with_pos = [n for n, c in zip(names, circuits) if c.positions]
    if not with_pos:
        return "nodes", None, []
    if len(with_pos) < len(circuits):
        without = [n for n, c in zip(names, circuits) if not c.positions]
        return "nodes", (f"compared at node level (a node or edge counts if kept at any slot): "
                         f"{', '.join(with_pos)} {'has' if len(with_pos) == 1 else 'have'} positions, "
                         f"{', '.join(without)} {'has' if len(without) == 1 else 'have'} none"), []
    slot_lists = {tuple(c.slots) for c in circuits}
    if len(slot_lists) > 1:
        detail = "; ".join(f"{n}: {' '.join(c.slots)}" for n, c in zip(names, circuits))
        return "nodes", (f"compared at node level (a node or edge counts if kept at any slot): the circuits "
                         f"have different slots ({detail})"), []
    slots = circuits[0].slots
    return "units", f"compared by unit over slots {' '.join(slots)}, and by node (kept at any slot)", slots


def _default_names(circuits: list[Circuit]) -> list[str]:
    tasks = [c.task for c in circuits]
    if len(set(tasks)) == len(tasks):
        return tasks
    return [chr(ord("A") + i) if i < 26 else f"c{i + 1}" for i in range(len(circuits))]


def diff_circuits(circuits: list[Circuit], names: list[str] | None = None) -> Diff:
    """Diff 2+ circuits of one model and graph; names default to their tasks (or A, B, C … if tasks repeat)."""
    circuits = list(circuits)
    if len(circuits) < 2:
        raise ValueError(f"a diff needs at least 2 circuits, got {len(circuits)}")
    names = list(names) if names is not None else _default_names(circuits)
    if len(names) != len(circuits) or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"need one distinct, non-empty name per circuit; got {names} for {len(circuits)} circuits")
    first, name0 = circuits[0], names[0]
    for c, n in zip(circuits[1:], names[1:]):
        if c.model != first.model:
            raise ValueError(f"cannot diff circuits of different models: {name0} is on {first.model!r}, "
                             f"{n} on {c.model!r}")
        if c.graph != first.graph:
            keys = sorted(k for k in set(c.graph) | set(first.graph) if c.graph.get(k) != first.graph.get(k))
            detail = ", ".join(f"{k}: {first.graph.get(k)!r} vs {c.graph.get(k)!r}" for k in keys)
            raise ValueError(f"cannot diff circuits over different graphs of {first.model!r}: {name0} and {n} "
                             f"differ in {detail}")
    node_sets: dict[str, set] = {}
    edge_sets: dict[str, set] = {}
    graph = first.model_graph
    for c, n in zip(circuits, names):
        for x in c.nodes:
            node_sets.setdefault(x, set()).add(n)
        for e in c.effective_edges(graph):
            edge_sets.setdefault(e, set()).add(n)
    L = graph.n_layers
    level, note, slots = _compare_level(circuits, names)
    unit_nodes, unit_edges = _unit_sets(circuits, names, slots, L) if level == "units" else ({}, {})
    return Diff(names, circuits,
                {x: frozenset(node_sets[x]) for x in sorted(node_sets, key=lambda x: node_sort_key(x, L))},
                {e: frozenset(edge_sets[e]) for e in sorted(edge_sets, key=lambda e: edge_sort_key(e, L))},
                level, note, slots, unit_nodes, unit_edges)


def format_table(diff: Diff) -> str:
    """Terminal text: the circuits, counts per exact subset (heads, MLPs, edges), Jaccard matrices."""
    w = max(len(diff.label(s)) for s in diff.subsets())
    g = diff.graph
    out = [f"{len(diff.names)} circuits on {diff.model} ({g['n_layers']} layers x {g['n_heads']} heads)"]
    if diff.note:
        out.append(f"  {diff.note}")
    nw = max(len(n) for n in diff.names)
    for n, c in zip(diff.names, diff.circuits):
        s = c.summary()
        faith = f"faithfulness {s['faithfulness']:.3f}" if isinstance(s["faithfulness"], (int, float)) else ""
        units = (f"{plural(len(_inner_units(c.units('nodes'))), 'head/MLP unit')}, "
                 f"{plural(s['edge_units'], 'edge unit')} over {plural(s['slots'], 'slot')}  " if c.positions else "")
        out.append(f"  {n:<{nw}}  {s['heads']:>4} heads {s['mlps']:>3} MLPs {s['edges']:>6} edges  "
                   f"{'node-level  ' if c.node_level else ''}{units}{faith}")
    units = diff.level == "units"
    out += ["", f"  {'held by exactly':<{w}}  {'heads':>6} {'MLPs':>5} {'edges':>7}"
                + (f" {'h/MLP units':>11} {'edge units':>10}" if units else "")]
    for s in diff.subsets():
        k = diff.counts(s)
        out.append(f"  {diff.label(s):<{w}}  {k['heads']:>6} {k['mlps']:>5} {k['edges']:>7}"
                   + (f" {k['units']:>11} {k['edge_units']:>10}" if units else ""))
    kinds = [("nodes", "Jaccard, heads and MLPs"), ("edges", "Jaccard, edges")]
    if units:
        kinds += [("node_units", "Jaccard, head and MLP units (node@slot)"), ("edge_units", "Jaccard, edge units")]
    for kind, title in kinds:
        m = diff.jaccard(kind)
        cw = max(nw, 5)
        out += ["", f"  {title}", "  " + " " * nw + "".join(f"  {n:>{cw}}" for n in diff.names)]
        out += ["  " + f"{n:<{nw}}" + "".join(f"  {x:>{cw}.2f}" for x in row) for n, row in zip(diff.names, m)]
    return "\n".join(out) + "\n"


def _lighten(c: str, t: float = 0.45) -> str:
    return "#" + "".join(f"{round(int(c[i:i + 2], 16) + t * (255 - int(c[i:i + 2], 16))):02x}" for i in (1, 3, 5))


def subset_colours(diff: Diff) -> dict[Subset, str]:
    """A colour per subset present: one per circuit, distinct ones for partial overlaps, black for all."""
    single = {n: SINGLE_COLOURS[i % len(SINGLE_COLOURS)] for i, n in enumerate(diff.names)}
    present = diff.subsets(all_=False)
    partial = [s for s in present if 1 < len(s) < len(diff.names)]
    by_count = len(partial) > COUNT_LIMIT
    out = {}
    for s in present:
        if len(s) == len(diff.names):
            out[s] = SHARED_EDGE
        elif len(s) == 1:
            out[s] = single[next(iter(s))]
        elif by_count:  # grey, darker the more circuits hold it
            out[s] = _lighten("#555555", 0.8 * (1 - (len(s) - 1) / (len(diff.names) - 1)))
        else:
            out[s] = PARTIAL_COLOURS[partial.index(s) % len(PARTIAL_COLOURS)]
    return out


def overlay_dot(diff: Diff) -> str:
    """One diagram of the union: every node and edge coloured by the subset of circuits that hold it."""
    colours = subset_colours(diff)
    full = len(diff.names)
    draw_edges = not any(c.node_level for c in diff.circuits)
    units = diff.level == "units"
    union = union_circuit(diff)
    look = Look(title=f"overlay of {len(diff.names)} circuits on {diff.model}: {', '.join(diff.names)}",
                sizes_prefix="all circuits together: ")
    notes = [] if units or not diff.note else [diff.note]
    if not draw_edges:
        notes.append("edges not drawn: " + ", ".join(n for n, c in zip(diff.names, diff.circuits) if c.node_level)
                     + " is node-level (all edges between its nodes)")
    look.note = "; ".join(notes) or None
    node_sets, edge_sets = (diff.unit_node_sets, diff.unit_edge_sets) if units else (diff.node_sets, diff.edge_sets)
    for n, s in node_sets.items():
        look.node_fill[n] = SHARED_NODE if len(s) == full else _lighten(colours[s])
        look.node_pen[n] = 2.5 if len(s) == full else 1.0
    if draw_edges:
        for e, s in edge_sets.items():
            look.edge_colour[e] = colours[s]
            look.edge_width[e] = 2.6 if len(s) == full else 0.9 + 0.5 * (len(s) - 1)
    by_count = len([s for s in colours if 1 < len(s) < full]) > COUNT_LIMIT
    legend, seen = [], set()
    for s in diff.subsets(all_=False):
        k = diff.counts(s)
        if by_count and 1 < len(s) < full:
            if len(s) in seen:
                continue
            seen.add(len(s))
            group = [t for t in colours if len(t) == len(s)]
            k = {key: sum(diff.counts(t)[key] for t in group) for key in k}
            text = f"in {len(s)} of {full}"
        else:
            text = diff.label(s) + (" (gold nodes, black edges)" if len(s) == full else "")
        fill = SHARED_NODE if len(s) == full else colours[s]
        words = ((("units", "head/MLP unit"), ("edge_units", "edge unit")) if units else
                 (("heads", "head"), ("mlps", "MLP"), ("edges", "edge")))
        legend.append((fill, f"{text}: " + ", ".join(plural(k[key], w) for key, w in words)))
    look.legend = legend
    return to_dot(union, look)


def union_circuit(diff: Diff) -> Circuit:
    """What the overlay draws: every node and edge of any circuit (unit by unit at level "units"), unscored;
    no edges when a circuit is node-level (its edges are all those between its nodes)."""
    draw_edges = not any(c.node_level for c in diff.circuits)
    return Circuit(diff.model, diff.graph, " vs ".join(diff.names), {n: None for n in diff.node_sets},
                   {e: None for e in diff.edge_sets} if draw_edges else {},
                   positions=_union_positions(diff, draw_edges) if diff.level == "units" else {})


def _union_positions(diff: Diff, edges: bool) -> dict:
    """The positions of the union of unit-level circuits: each node and edge at every slot some circuit keeps."""
    where: dict[str, dict[str, set]] = {"nodes": {}, "edges": {}}
    for u in diff.unit_node_sets:
        n, s = split_unit(u)
        where["nodes"].setdefault(n, set()).add(s)
    for u in diff.unit_edge_sets if edges else ():
        e, s = split_edge_unit(u)
        where["edges"].setdefault(e, set()).add(s)
    return {"slots": list(diff.slots), "effects": {},
            **{k: {x: [s for s in diff.slots if s in ss] for x, ss in v.items() if len(ss) < len(diff.slots)}
               for k, v in where.items()}}


def render_overlay(diff: Diff, path: str | Path) -> Path:
    """The overlay diagram as .svg, .png or .pdf, with its .dot beside it."""
    return render_dot(overlay_dot(diff), path)
