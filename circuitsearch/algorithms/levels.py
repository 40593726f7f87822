"""What one search phase removes: nodes, nodes at single slots of positions, or edges.

Every search walks candidates as integer ids of one of three tables; this module gives each
phase its table once (names by id, where each id first changes the forward pass, the keyword
`Evaluator.extend` takes them by, and which ids a circuit still holds), so the searches need no
per-level branches. A level is a comma-separated list of phases in this order:
`nodes,positions,edges` (`both` is `nodes,edges`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..patching import Evaluator, Run

PHASES = ("nodes", "positions", "edges")
LEVEL_CHOICES = ("nodes", "edges", "both", "positions", "nodes,positions", "nodes,positions,edges",
                 "positions,edges", "nodes,edges")


def phases(level: str) -> tuple[str, ...]:
    """The phases a level runs, in order; ValueError naming the choices for anything else."""
    if level == "both":
        return ("nodes", "edges")
    parts = tuple(x.strip() for x in str(level).split(","))
    if not parts or any(p not in PHASES for p in parts) or \
            list(parts) != sorted(set(parts), key=PHASES.index):
        raise ValueError(f"unknown level {level!r}; choose nodes, edges, both, or phases out of "
                         "nodes,positions,edges in that order (e.g. nodes,positions,edges)")
    return parts


@dataclass(frozen=True)
class Level:
    """One phase's candidate table: `names` and `stage` by id, `key` the extend() keyword."""

    name: str
    key: str
    names: list
    stage: list

    def present(self, run: Run) -> list[int]:
        """Ids still in `run`'s circuit, in forward order (units: node by node, slot by slot)."""
        if self.name == "nodes":
            mask = run.present_nodes()
        elif self.name == "edges":
            mask = run.present_edges()
        else:
            mask = run.present_units().flatten()
        return mask.nonzero()[:, 0].tolist()

    def extend(self, ev: Evaluator, run: Run, ids: list) -> Run:
        return ev.extend(run, **{self.key: ids})

    def variant(self, ids: list) -> tuple:
        """An extend_many variant removing `ids`."""
        if self.name == "nodes":
            return (ids, [], [])
        return ([], ids, []) if self.name == "edges" else ([], [], ids)

    def lookup(self, ev: Evaluator) -> dict:
        """Name -> id."""
        if self.name == "nodes":
            return ev.index.node_id
        if self.name == "edges":
            return ev.index.edge_id
        return {n: i for i, n in enumerate(self.names)}


def level_of(ev: Evaluator, phase: str) -> Level:
    """The candidate table of `phase` for `ev` (built once per evaluator)."""
    cache = ev.__dict__.setdefault("_levels", {})
    if phase not in cache:
        ix = ev.index
        if phase == "nodes":
            cache[phase] = Level(phase, "nodes", ix.nodes, ix.node_stage)
        elif phase == "edges":
            cache[phase] = Level(phase, "edges", ix.edges, ix.edge_stage)
        elif phase == "positions":
            Q = ev.Q
            cache[phase] = Level(phase, "at", ev.unit_names, [ix.node_stage[u // Q] for u in range(ev.S * Q)])
        else:
            raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
    return cache[phase]
