"""What a wider stacked pass buys on this machine: time per circuit row against the number K of circuits
stacked in one forward pass (the lever behind speculation and behind running compare-orders' orders in
lockstep, which stacks every order's block into one pass).

On smollm2-135m, digits (its 24 prompts run as their distinct rows): K circuits each removing one head of
layer 2 (every later stage recomputed) and K circuits each removing one edge into a layer-2 head, scored
with Evaluator.extend_many from the full model's cached run. Best of --reps passes for each K. The last
columns model lockstep: `orders` orders each with a block of K rows, run as one pass of orders*K rows
against `orders` passes of K rows (from the same table).

    python benchmarks/stack_width.py [--widths 1,2,4,8,16,32,64] [--reps 3] [--orders 6]
"""
import argparse
import time

import torch

from circuitsearch.config import PruneConfig, build


def best(ev, base, variants, reps: int) -> float:
    """Fastest of `reps` extend_many calls over `variants` (after one warm-up), in seconds."""
    ev.extend_many(base, variants)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        ev.extend_many(base, variants)
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="1,2,4,8,16,32,64")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--orders", type=int, default=6)
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    torch.manual_seed(0)
    model, task, ev = build(PruneConfig(model="smollm2-135m", task="digits"))
    base = ev.run()
    heads = [s for s in ev.senders if s.startswith("a2.")]
    edges = [e for e in ev.index.edges if ".".join(e.split("->")[1].split(".")[:2]).startswith("a2.")]
    kinds = {"node (a2.*)": lambda i: ([heads[i % len(heads)]], ()),
             "edge (-> a2.*)": lambda i: ((), [edges[i % len(edges)]])}
    rows = len(ev.batch.tokens)
    print(f"smollm2-135m, digits: {len(task)} prompts as {rows} distinct rows x {task.seq_len} tokens; "
          f"torch threads {torch.get_num_threads()}; best of {args.reps}")
    print(f"{'circuits':16s} {'K':>4s} {'pass ms':>9s} {'ms/circuit':>10s} {'vs K=1':>7s} "
          f"{'lockstep ' + str(args.orders) + 'xK':>14s}")
    for name, make in kinds.items():
        t = {K: best(ev, base, [make(i) for i in range(K)], args.reps) for K in widths}
        t.update({K * args.orders: best(ev, base, [make(i) for i in range(K * args.orders)], args.reps)
                  for K in widths if K * args.orders not in t and K * args.orders <= max(widths)})
        for K in widths:
            wide = t.get(K * args.orders)
            lock = f"{args.orders * t[K] / wide:13.2f}x" if wide else f"{'-':>14s}"
            print(f"{name:16s} {K:4d} {t[K] * 1e3:9.1f} {t[K] / K * 1e3:10.1f} {t[1] / (t[K] / K):6.2f}x {lock}")
    print("vs K=1: rows per second against one circuit per pass; lockstep: one pass of orders*K rows against "
          "orders passes of K rows (>1: lockstep faster)")
    print(f"forward passes counted: {ev.forward_passes} ({ev.batched_passes} batched)")


if __name__ == "__main__":
    main()
