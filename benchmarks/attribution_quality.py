"""Attribution (EAP, EAP-IG) against exact patching: rank correlation with single-node ablation
effects (every node) and single-edge removal effects (a random sample of edges).

Default: smollm2-135m, digits, 24 prompts, mean ablation. Prints one row per method: Spearman
and Pearson correlations for nodes and edges, the attribution's forward+backward passes and
seconds, and the exact patching's forward passes and seconds.

    python benchmarks/attribution_quality.py [--task digits] [--edges 300] [--steps 5]
"""
import argparse
import random
import time

from scipy.stats import pearsonr, spearmanr

from circuitsearch.algorithms.attribution import attribute
from circuitsearch.config import PruneConfig, build


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--ablation", default="mean")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--edges", type=int, default=300)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    model, task, ev = build(PruneConfig(model=args.model, task=args.task, n_prompts=args.prompts,
                                        ablation=args.ablation))

    fp, t = ev.forward_passes, time.perf_counter()
    exact_nodes = {n: ev.score(nodes=[n]) - ev.full for n in ev.senders}
    sample = random.Random(0).sample(ev.graph.edges, args.edges)
    exact_edges = {e: ev.score(edges=[e]) - ev.full for e in sample}
    exact_cost = (ev.forward_passes - fp, time.perf_counter() - t)

    print(f"{args.model}, {args.task}, {len(task)} prompts, {args.ablation} ablation: "
          f"{len(ev.senders)} nodes, {len(ev.graph.edges)} edges ({args.edges} sampled)")
    print(f"exact patching: {exact_cost[0]} forward passes, {exact_cost[1]:.1f} s\n")
    print("| method | nodes Spearman | nodes Pearson | edges Spearman | edges Pearson | fwd+bwd passes | seconds |")
    print("|---|---|---|---|---|---|---|")
    for method, steps in (("eap", 1), ("eap-ig", args.steps)):
        bp, t = ev.backward_passes, time.perf_counter()
        a = attribute(ev, method=method, steps=steps)
        sec = time.perf_counter() - t
        xn = [a.nodes[n] for n in ev.senders]
        yn = [exact_nodes[n] for n in ev.senders]
        xe = [a.edges[e] for e in sample]
        ye = [exact_edges[e] for e in sample]
        print(f"| {method}{f' ({steps} steps)' if method == 'eap-ig' else ''} | {spearmanr(xn, yn)[0]:.3f} | "
              f"{pearsonr(xn, yn)[0]:.3f} | {spearmanr(xe, ye)[0]:.3f} | {pearsonr(xe, ye)[0]:.3f} | "
              f"{ev.backward_passes - bp} | {sec:.1f} |")


if __name__ == "__main__":
    main()
