"""What one search phase removes: nodes, nodes at single slots of positions, or edges.

Every search walks candidates as integer ids of one of three tables; this module gives each
phase its table once (names by id, where each id first changes the forward pass, the keyword
`Evaluator.extend` takes them by, and which ids a circuit still holds), so the searches need no
per-level branches. A level is a comma-separated list of phases in this order:
`nodes,positions,edges` (`both` is `nodes,edges`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

from ..patching import Evaluator, Run

PHASES = ("nodes", "positions", "edges")
LEVEL_CHOICES = ("nodes", "edges", "both", "positions", "nodes,positions", "nodes,positions,edges",
                 "positions,edges", "nodes,edges")
EDGE_POSITIONS = "edge-positions"  # the phase after edges in a level with positions: edges at single slots


def phases(level: str) -> tuple[str, ...]:
    """The phases a level runs, in order; ValueError naming the choices for anything else.

    With positions, the edges phase is followed by `edge-positions`: the edges that survive whole are
    then tried at each slot (trying every edge at every slot from the start would cost Q times the
    candidates, and most edges go whole)."""
    if level == "both":
        return ("nodes", "edges")
    parts = tuple(x.strip() for x in str(level).split(","))
    if not parts or any(p not in PHASES for p in parts) or \
            list(parts) != sorted(set(parts), key=PHASES.index):
        raise ValueError(f"unknown level {level!r}; choose nodes, edges, both, or phases out of "
                         "nodes,positions,edges in that order (e.g. nodes,positions,edges)")
    if "positions" in parts and "edges" in parts:
        parts += (EDGE_POSITIONS,)
    return parts


class _Table(Sequence):
    """A read-only table of n items computed on demand (edge units number edges × slots)."""

    def __init__(self, n: int, item: Callable[[int], object]):
        self._n, self._item = n, item

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._item(i % self._n)


class _Lookup:
    """Name -> id for units, parsed on demand (`in`, `[]` and `get`, like the dict the other levels use)."""

    def __init__(self, parse: Callable[[str], int]):
        self._parse = parse

    def get(self, name, default=None):
        try:
            return self._parse(name)
        except ValueError:
            return default

    def __contains__(self, name) -> bool:
        return self.get(name) is not None

    def __getitem__(self, name) -> int:
        i = self.get(name)
        if i is None:
            raise KeyError(name)
        return i


def candidate_ids(run: Run, phase: str, read=None) -> list[int]:
    """Ids of the nodes, units (nodes at slots), edges or edge units still in `run`'s circuit, in forward
    order (units: node by node, slot by slot); `read`: Evaluator.read_slots, for edge units. In a feature graph
    the nodes a dictionary decomposes are not candidates (their features and error are), and forward order
    places each feature at its hook point's stage."""
    ix = run.index
    if phase == "nodes":
        mask = run.present_nodes() & ~ix.decomposed[: ix.S]
    elif phase == "edges":
        mask = run.present_edges()
    elif phase == "positions":
        mask = (run.present_units() & ~ix.decomposed[: ix.S, None]).flatten()
    else:
        mask = run.present_edge_units(read).flatten()
    ids = mask.nonzero()[:, 0].tolist()
    if ix.sites and phase in ("nodes", "positions"):
        Q = 1 if phase == "nodes" else run.masks.at.shape[1]
        ids.sort(key=lambda u: ix.node_stage[u // Q])  # stable: ties keep id order
    return ids


@dataclass(frozen=True)
class Level:
    """One phase's candidate table: `names` and `stage` by id, `key` the extend() keyword, `parse` a name (or
    id) to its id with an error saying why for one the evaluator does not have."""

    name: str
    key: str
    names: list
    stage: list
    parse: Callable
    read: object = None  # edge-positions: the slots the metric reads (edges into logits elsewhere carry nothing)

    def present(self, run: Run) -> list[int]:
        """Ids still in `run`'s circuit, in forward order."""
        return candidate_ids(run, self.name, self.read)

    def extend(self, ev: Evaluator, run: Run, ids: list) -> Run:
        return ev.extend(run, **{self.key: ids})

    def variant(self, ids: list) -> tuple:
        """An extend_many variant removing `ids`."""
        return {"nodes": (ids, [], [], []), "edges": ([], ids, [], []), "positions": ([], [], ids, []),
                EDGE_POSITIONS: ([], [], [], ids)}[self.name]

    def lookup(self, ev: Evaluator) -> dict:
        """Name -> id, for names that may not be this level's (`in` says whether they are)."""
        if self.name == "nodes":
            return ev.index.node_id
        if self.name == "edges":
            return ev.index.edge_id
        return _Lookup(self.parse)


def level_of(ev: Evaluator, phase: str) -> Level:
    """The candidate table of `phase` for `ev` (built once per evaluator)."""
    cache = ev.__dict__.setdefault("_levels", {})
    if phase not in cache:
        ix = ev.index
        if phase == "nodes":
            cache[phase] = Level(phase, "nodes", ix.nodes, ix.node_stage, ix.node)
        elif phase == "edges":
            cache[phase] = Level(phase, "edges", ix.edges, ix.edge_stage, ix.edge)
        elif phase == "positions":
            Q = ev.Q
            cache[phase] = Level(phase, "at", ev.unit_names, [ix.node_stage[u // Q] for u in range(ev.S * Q)],
                                 ev.unit)
        elif phase == EDGE_POSITIONS:
            Q, n = ev.Q, ix.E * ev.Q
            cache[phase] = Level(phase, "edges_at", _Table(n, ev.edge_unit_name),
                                 _Table(n, lambda u: ix.edge_stage[u // Q]), ev.edge_unit, ev.read_slots)
        else:
            raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
    return cache[phase]
