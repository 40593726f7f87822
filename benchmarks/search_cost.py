"""Search cost: iterative pruning (alternate order) versus attribution + bisection + refinement.

Default: smollm2-135m, digits, 24 prompts, mean ablation, logit difference, both levels, one
target/threshold of 0.8, one model load and one task for both searches (each gets its own
evaluator, so the counts are separate). Prints one row per search: nodes, edges, verified
faithfulness, forward passes, backward passes, full-forward equivalents, seconds; then the
ratios the issue sets as targets (fast path: at most 1/5 of the forward passes, a circuit at
most 20 % larger).

    python benchmarks/search_cost.py [--task digits[,number-words,months]] [--target 0.8] [--level both]

Several tasks give a row pair per task (one model load).
"""
import argparse
import time

from circuitsearch.algorithms.iterative import Thresholds, edge_candidates, find_circuit
from circuitsearch.algorithms.target import PATIENCE, prune_to_targets
from circuitsearch.catalogue import load_model
from circuitsearch.config import PruneConfig, build, evaluator


def row(name, ev, run, seconds, fp, fe, bp):
    kept = [n for n in ev.senders if n not in run.nodes]
    f = ev.faithfulness(ev.rescore(run))  # fresh verification, not counted
    return {"search": name, "heads": sum(n.startswith("a") for n in kept), "mlps": sum(n.startswith("m") for n in kept),
            "nodes": len(kept), "edges": len(edge_candidates(ev, run)), "faithfulness": f,
            "forward": fp, "backward": bp, "fe": fe, "seconds": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="digits", help="a task, or several separated by commas")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--level", default="both", choices=("nodes", "edges", "both"))
    ap.add_argument("--order", default="alternate")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--patience", type=int, default=PATIENCE, help="refinement stops after this many kept in a row")
    args = ap.parse_args()
    model = load_model(args.model)
    tables = [compare(model, name, args) for name in args.task.split(",")]
    print("\n\n".join(tables))


def compare(model, name, args) -> str:
    """Both searches on one task; the table and ratios as markdown."""
    config = PruneConfig(model=args.model, task=name, n_prompts=args.prompts)
    _, task, ev = build(config, model)
    rows = []

    fp0, fe0, t = ev.forward_passes, ev.forward_equivalents, time.perf_counter()
    res = find_circuit(ev, args.level, Thresholds(absolute=args.target), args.order, progress=True)
    rows.append(row(f"iterative ({args.order})", ev, res.run, time.perf_counter() - t,
                    ev.forward_passes - fp0, ev.forward_equivalents - fe0, ev.backward_passes))

    ev = evaluator(config, model, task)
    fp0, fe0, t = ev.forward_passes, ev.forward_equivalents, time.perf_counter()
    (step,) = prune_to_targets(ev, [args.target], args.level, "eap-ig", args.steps, progress=True,
                               patience=args.patience)
    rows.append(row("attribution + bisection + refinement", ev, step.result.run, time.perf_counter() - t,
                    ev.forward_passes - fp0, ev.forward_equivalents - fe0, ev.backward_passes))

    lines = [f"{args.model}, {name}, {len(task)} prompts ({ev.batch.tokens.shape[0]} distinct), mean ablation, "
             f"level {args.level}, target {args.target}", "",
             "| search | heads | MLPs | edges | verified faithfulness | forward passes | backward passes | "
             "full-forward equivalents | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['search']} | {r['heads']} | {r['mlps']} | {r['edges']} | {r['faithfulness']:.3f} | "
                     f"{r['forward']} | {r['backward']} | {r['fe']:.1f} | {r['seconds']:.1f} |")
    it, fast = rows
    size = "edges" if args.level != "nodes" else "nodes"
    lines += ["", f"forward passes, fast / iterative: {fast['forward'] / it['forward']:.3f} (target <= 0.2); "
              f"with each backward pass counted as two forward passes: "
              f"{(fast['forward'] + 2 * fast['backward']) / it['forward']:.3f}",
              f"circuit size ({size}), fast / iterative: {fast[size] / max(it[size], 1):.3f} (target <= 1.2); "
              f"nodes: {fast['nodes'] / max(it['nodes'], 1):.3f}"]
    table = "\n".join(lines)
    print("\n" + table, flush=True)
    return table

if __name__ == "__main__":
    main()
