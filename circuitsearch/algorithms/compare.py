"""Several removal orders side by side: how often each node and edge is kept, Jaccard between
orders, the circuits kept by every order (intersection) and by any (union) with verified scores,
and which nodes depend on the order.

Built on graphs.diff (one set algebra for circuits) and Evaluator.score_circuit (one scorer).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..graphs.circuit import Circuit
from ..graphs.diff import Diff, diff_circuits
from ..graphs.model_graph import parse_node
from ..graphs.render import Look, _blend, plural, render_dot, to_dot

SCHEMA = "circuitsearch.comparison/1"
SHADE_LIGHT, SHADE_DARK = "#f4f4f4", "#2b6cb0"  # kept by one order ... kept by all


def order_dirname(order: str) -> str:
    """A directory name for an order: random:1 -> random-1, file:x/y.txt -> file-y."""
    if order.startswith("file:"):
        from pathlib import Path
        return "file-" + Path(order.split(":", 1)[1]).stem
    return order.replace(":", "-")


@dataclass
class Comparison:
    """The circuits of several orders (same task, thresholds and evaluator) and what they share."""

    orders: list[str]
    circuits: list[Circuit]
    diff: Diff
    intersection: Circuit
    union: Circuit

    def kept_by(self, kind: str = "nodes") -> dict[str, int]:
        """How many orders kept each node (heads and MLPs) or edge of the union, in forward order."""
        sets = self.diff.node_sets if kind == "nodes" else self.diff.edge_sets
        return {x: len(s) for x, s in sets.items()
                if kind != "nodes" or parse_node(x).kind in ("head", "mlp")}

    def order_dependent(self, kind: str = "nodes") -> dict[str, list[str]]:
        """Kept by some orders but not all: name -> the orders that kept it."""
        sets = self.diff.node_sets if kind == "nodes" else self.diff.edge_sets
        k = len(self.orders)
        return {x: [o for o in self.orders if o in s] for x, s in sets.items()
                if len(s) < k and (kind != "nodes" or parse_node(x).kind in ("head", "mlp"))}

    def to_json(self) -> dict:
        def brief(c: Circuit) -> dict:
            cost = run_cost(c)
            return {**{k: v for k, v in c.summary().items() if k not in ("model", "task")},
                    "forward_passes": cost.get("forward_passes"), "seconds": cost.get("seconds")}

        return {"schema": SCHEMA, "model": self.diff.model, "task": self.circuits[0].task,
                "method": {k: v for k, v in self.circuits[0].method.items() if k not in ("order", "passes",
                                                                                       "dangling_removed")},
                "orders": self.orders,
                "per_order": {o: brief(c) for o, c in zip(self.orders, self.circuits)},
                "kept_by": {"nodes": self.kept_by("nodes"), "edges": self.kept_by("edges")},
                "jaccard": {"orders": self.orders, "nodes": self.diff.jaccard("nodes"),
                            "edges": self.diff.jaccard("edges"),
                            **({"node_units": self.diff.jaccard("node_units"),
                                "edge_units": self.diff.jaccard("edge_units")} if self.diff.level == "units" else {})},
                "intersection": {**brief(self.intersection), "nodes": list(self.intersection.nodes),
                                 "scores": self.intersection.scores},
                "union": {**brief(self.union), "nodes": list(self.union.nodes), "scores": self.union.scores},
                "order_dependent": {"nodes": self.order_dependent("nodes"),
                                    "edges": len(self.order_dependent("edges"))}}


def _combined(ev, diff: Diff, which: str, like: Circuit) -> Circuit:
    """The intersection or union circuit (unit by unit for circuits over the same slots), scored fresh by
    the evaluator."""
    c = diff.combined(which, like)
    if not c.positions and all(x.node_level for x in diff.circuits):
        c.method["level"] = "nodes"
    c.scores = ev.score_circuit(c)
    return c


def compare_circuits(ev, circuits: list[Circuit], orders: list[str]) -> Comparison:
    """Compare circuits found by `orders` on the evaluator's task; verify intersection and union."""
    if len(circuits) < 2:
        raise ValueError(f"comparing orders needs at least two circuits, got {len(circuits)}")
    d = diff_circuits(circuits, orders)
    return Comparison(list(orders), list(circuits), d, _combined(ev, d, "intersection", circuits[0]),
                      _combined(ev, d, "union", circuits[0]))


def run_cost(c: Circuit) -> dict:
    """Forward passes and seconds that found `c`: over all sessions when its run was resumed."""
    return c.stats.get("all_sessions") or c.stats


def format_comparison(cmp: Comparison) -> str:
    """Terminal text: one row per order, Jaccard between orders, intersection/union, order-dependent nodes."""
    ow = max(12, *(len(o) for o in cmp.orders))
    out = [f"{len(cmp.orders)} orders, {cmp.circuits[0].task} on {cmp.diff.model}", "",
           f"  {'order':<{ow}} {'heads':>5} {'MLPs':>4} {'edges':>6} {'faithfulness':>12} {'fwd passes':>10} "
           f"{'seconds':>8}"]
    for name, c in [*zip(cmp.orders, cmp.circuits), ("intersection", cmp.intersection), ("union", cmp.union)]:
        if name == "intersection":
            out.append("")
        s = c.summary()
        cost = run_cost(c)
        seconds = cost.get("seconds", "")
        out.append(f"  {name:<{ow}} {s['heads']:>5} {s['mlps']:>4} {s['edges']:>6} {s['faithfulness']:>12.3f} "
                   f"{str(cost.get('forward_passes', '')):>10} "
                   f"{str(round(seconds, 1) if isinstance(seconds, float) else seconds):>8}")
    cw = max(6, *(len(o) for o in cmp.orders))
    kinds = [("nodes", "heads and MLPs")]
    if cmp.diff.level == "units":  # circuits over the same slots: where, not only which, nodes are kept
        kinds.append(("node_units", "nodes at positions (node@slot units)"))
    for kind, what in kinds:
        m = cmp.diff.jaccard(kind)
        out += ["", f"  Jaccard between orders, {what}", "  " + " " * ow + "".join(f" {o:>{cw}}" for o in cmp.orders)]
        out += [f"  {o:<{ow}}" + "".join(f" {x:>{cw}.2f}" for x in row) for o, row in zip(cmp.orders, m)]
    dep = cmp.order_dependent("nodes")
    k = len(cmp.orders)
    out += ["", f"  order-dependent heads and MLPs ({len(dep)}; kept by every order: "
                f"{sum(1 for v in cmp.kept_by('nodes').values() if v == k)}):"]
    for n, kept in sorted(dep.items(), key=lambda x: -len(x[1])):
        out.append(f"    {n:<7} kept by {len(kept)}/{k}: {', '.join(kept)}")
    return "\n".join(out) + "\n"


def comparison_dot(cmp: Comparison) -> str:
    """The union circuit, nodes (and edges) shaded by how many orders kept them."""
    k = len(cmp.orders)
    union = cmp.union
    look = Look(title=f"{union.task} on {union.model}: {k} removal orders ({', '.join(cmp.orders)})",
                sizes_prefix="union: ",
                note=f"intersection faithfulness {cmp.intersection.scores['faithfulness']:.3f}, "
                     f"union {union.scores['faithfulness']:.3f}; darker = kept by more orders")
    for n, s in cmp.diff.node_sets.items():
        look.node_fill[n] = _blend(SHADE_LIGHT, SHADE_DARK, (len(s) - 1) / max(k - 1, 1) * 0.85 + 0.15)
        look.node_pen[n] = 2.5 if len(s) == k else 1.0
    if union.edges:
        for e, s in cmp.diff.edge_sets.items():
            look.edge_colour[e] = _blend("#dddddd", "#111111", (len(s) - 1) / max(k - 1, 1))
            look.edge_width[e] = 0.5 + 2.0 * len(s) / k
    counts = {}
    for n, s in cmp.diff.node_sets.items():
        if parse_node(n).kind in ("head", "mlp"):
            counts[len(s)] = counts.get(len(s), 0) + 1
    look.legend = [(_blend(SHADE_LIGHT, SHADE_DARK, (j - 1) / max(k - 1, 1) * 0.85 + 0.15),
                    f"kept by {j} of {k}: {plural(counts[j], 'node')}") for j in sorted(counts, reverse=True)]
    return to_dot(union, look)


def render_comparison(cmp: Comparison, path) -> object:
    """The shaded union diagram as .svg, .png or .pdf, with its .dot beside it."""
    return render_dot(comparison_dot(cmp), path)
