"""The position-level table of issue #15 from a finished sweep directory (benchmarks/sweeps/positions.toml).

For each cell: heads, MLPs, node units (a node kept at a slot counts once per slot; a node-level circuit
keeps every node at every slot), edges, edge units where the level has edge-positions, faithfulness,
forward passes and seconds of search. Usage: python benchmarks/positions_table.py SWEEP_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from circuitsearch.graphs.export import load_circuit


def units(c, slots: int | None) -> tuple:
    """(node units, edge units or None): kept (node, slot) pairs, logits left out; edge units only when
    the circuit was pruned at edge level per slot."""
    nodes = [n for n in c.nodes if n != "logits"]
    if not c.positions:
        return (len(nodes) * slots if slots else None), None
    where = c.positions["nodes"]
    q = len(c.positions["slots"])
    n_units = sum(len(where.get(n, range(q))) for n in nodes)
    if "edge-positions" not in c.method.get("passes", {}):
        return n_units, None
    ew = c.positions["edges"]
    return n_units, sum(len(ew.get(e, range(q))) for e in c.edges)


def main(out: str) -> None:
    out = Path(out)
    rows = json.loads((out / "sweep.json").read_text())["cells"]
    slots_of: dict = {}
    table = []
    for r in rows:
        if not r.get("circuit"):
            table.append((r["settings"]["task"], r["settings"].get("level", "both"), r["status"]))
            continue
        c = load_circuit(out / r["circuit"])
        if c.positions:
            slots_of[c.task] = len(c.positions["slots"])
        table.append((r, c))
    print("| task | level | heads | MLPs | node units | edges | edge units | faithfulness | forward passes "
          "| forward equiv. | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for item in table:
        if len(item) == 3:
            print(f"| {item[0]} | {item[1]} | {item[2]} | | | | | | | | |")
            continue
        r, c = item
        nu, eu = units(c, slots_of.get(c.task))
        s = c.summary()
        print(f"| {c.task} | {c.method['level']} | {s['heads']} | {s['mlps']} | {nu if nu is not None else '-'} | "
              f"{c.n_edges} | {eu if eu is not None else '-'} | {s['faithfulness']:.3f} | "
              f"{r['forward_passes']} | {r['forward_equivalents']:.0f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
