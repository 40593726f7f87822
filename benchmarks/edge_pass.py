"""Edge-phase cost: an edge pass, bulk extends and single-edge extends on SmolLM2.

On smollm2-135m, digits, 24 prompts, mean ablation, A = 0.8: prune nodes (alternate, as the
demo does), then time (1) one reverse pass over the surviving edges, each candidate scored by
extending the current circuit; (2) one extend removing every surviving edge but the last 200;
(3) one extend removing half of all edges from the full model; (4) 200 single-edge extends on
that dense circuit (every sender live, as in an edges-only prune). Prints seconds, forward
passes, forward-equivalents and how often a node or edge name was parsed (names should be
parsed once, where they enter, not in the hot path).
Runs on any version of the package with the same public API, so before/after tables compare:

    python benchmarks/edge_pass.py [--prompts 24] [--edges N]   (N: stop the pass after N candidates)
"""
import argparse
import sys
import time

import torch

from circuitsearch.algorithms.iterative import Thresholds, edge_candidates, prune
from circuitsearch.graphs import model_graph
from circuitsearch import load_model
from circuitsearch.patching import Evaluator
from circuitsearch.tasks import get_task

CALLS = {"parse_node": 0}


def count_parses():
    """Wrap model_graph.parse_node wherever a loaded circuitsearch module imported it."""
    real = model_graph.parse_node

    def counted(*a, **k):
        CALLS["parse_node"] += 1
        return real(*a, **k)

    for name, mod in list(sys.modules.items()):
        if name.startswith("circuitsearch") and getattr(mod, "parse_node", None) is real:
            mod.parse_node = counted


def measure(ev, label, fn):
    fp, fe, pc = ev.forward_passes, ev.forward_equivalents, CALLS["parse_node"]
    t = time.perf_counter()
    out = fn()
    return out, {"what": label, "seconds": time.perf_counter() - t, "forward_passes": ev.forward_passes - fp,
                 "forward_equivalents": ev.forward_equivalents - fe, "parse_node": CALLS["parse_node"] - pc}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--edges", type=int, default=None, help="stop the edge pass after this many candidates")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    task = get_task("digits", model.tokenizer, n=args.prompts, seed=0, model=model)
    ev = Evaluator(model, task, "mean")
    count_parses()
    rows = []
    res, row = measure(ev, "node phase (alternate, to convergence)",
                       lambda: prune(ev, "nodes", Thresholds(0.8), "alternate", progress=False))
    rows.append(row)
    node_run = res.run
    cands = edge_candidates(ev, node_run)
    if args.edges:
        path = "/tmp/_edge_pass_order.txt"
        with open(path, "w") as f:
            f.write("\n".join(cands[::-1][: args.edges]))
        order = f"file:{path}"
    else:
        order = "reverse"
    edge_res, row = measure(ev, f"edge pass (reverse, {args.edges or len(cands)} of {len(cands)} candidates)",
                            lambda: prune(ev, "edges", Thresholds(0.8), order, max_passes=1, run=node_run,
                                          progress=False))
    rows.append(row)
    removed = sum(1 for d in edge_res.decisions if (d["removed"] if isinstance(d, dict) else d.removed))
    bulk = cands[:-200]
    _, row = measure(ev, f"bulk extend ({len(bulk)} edges at once)", lambda: ev.extend(node_run, edges=bulk))
    rows.append(row)
    # dense case: every sender live (an edges-only prune), half of all edges removed; single-edge extends
    g = torch.Generator().manual_seed(0)
    half = torch.randperm(len(ev.graph.edges), generator=g)[: len(ev.graph.edges) // 2].tolist()
    dense, row = measure(ev, f"bulk extend ({len(half)} edges, from the full model)",
                         lambda: ev.run(edges=[ev.graph.edges[i] for i in half]))
    rows.append(row)
    gone = set(half)
    singles = [ev.graph.edges[i] for i in torch.randperm(len(ev.graph.edges), generator=g).tolist()
               if i not in gone][:200]
    _, row = measure(ev, "200 single-edge extends, all senders live, 50 % removed",
                     lambda: [ev.extend(dense, edges=[e]) for e in singles])
    rows.append(row)
    print(f"\nsmollm2-135m, digits, {len(task)} prompts: node circuit keeps {len(cands)} edges; "
          f"the edge pass removed {removed}, faithfulness {ev.faithfulness(edge_res.run.score):.4f}")
    print(f"\n| {'what':<55} | seconds | forward passes | forward-equivalents | parse_node calls |")
    print(f"|{'-' * 57}|---------|----------------|---------------------|------------------|")
    for r in rows:
        print(f"| {r['what']:<55} | {r['seconds']:7.2f} | {r['forward_passes']:14d} | "
              f"{r['forward_equivalents']:19.1f} | {r['parse_node']:16d} |")


if __name__ == "__main__":
    main()
