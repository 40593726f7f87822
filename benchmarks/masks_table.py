"""The learned-mask study's table: per task, the masks circuit beside the default-search study's attribution
order and target search (same model, task, A = 0.8, both levels).

    python benchmarks/masks_table.py runs/masks-study [benchmarks/sweeps/default-search]

Reads each sweep's sweep.json and the masks cells' circuit.json (what repair and polish did, backward
passes) and prints a markdown table.
"""
import json
import sys
from pathlib import Path


def cells(sweep: Path) -> dict:
    d = json.loads((sweep / "sweep.json").read_text())
    return {(c["settings"].get("task"), c["settings"].get("order")): c for c in d["cells"]}


def size(c, seconds=True) -> str:
    return f"{c['heads']}/{c['mlps']}/**{c['edges']}**" + (f", {c['seconds']:.0f} s" if seconds else "")


def main(argv):
    masks = Path(argv[0])
    base = Path(argv[1] if len(argv) > 1 else "benchmarks/sweeps/default-search")
    m, b = cells(masks), cells(base)
    print("| task | attribution order | target search | learned masks | masks: faithfulness, fwd / bwd passes, "
          "fwd-equivalents, s | masks: removed, put back, polished (nodes; edges) |")
    print("|---|---|---|---|---|---|")
    total = {"attribution": 0, "target": 0, "masks": 0}
    for (task, order), c in m.items():
        if order != "masks" or c.get("status") == "failed":
            continue
        circuit = json.loads((masks / c["circuit"]).read_text())
        st, ph = circuit["stats"], circuit["method"]["masks"]["phases"]
        steps = "; ".join(f"{p['discretised_removed']}, {p['repaired']}, {p['polish_removed']}" for p in ph.values())
        att, tgt = b.get((task, "attribution")), b.get((task, "target"))
        for k, cell in (("attribution", att), ("target", tgt), ("masks", c)):
            total[k] += cell["edges"] if cell else 0
        print(f"| {task} | {size(att) if att else '-'} | {size(tgt) if tgt else '-'} | {size(c, False)} | "
              f"{c['faithfulness']:.3f}, {st['forward_passes']} / {st['backward_passes']}, "
              f"{st['forward_equivalents']:.0f}, {st['seconds']:.0f} | {steps} |")
    print(f"\nedges summed over the tasks: attribution {total['attribution']}, target {total['target']}, "
          f"masks {total['masks']}")


if __name__ == "__main__":
    main(sys.argv[1:])
