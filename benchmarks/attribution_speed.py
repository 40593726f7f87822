"""EAP-IG's integration steps one pass each vs stacked in one pass (Evaluator.receiver_gradients with alphas).

On smollm2-135m and a built-in task (default digits, the demo's): the gradients of the full model's
circuit and of a pruned one (every third head ablated, so the masks are not all ones) at alphas
k/steps, k = 1..steps, summed, once by `steps` calls and once by one call over the rows stacked `steps`
times. Prints the median time of each over --reps, the ratio, the passes counted, and the largest
difference between the two sums (relative to the largest gradient entry).

    python benchmarks/attribution_speed.py [--task digits] [--steps 5] [--reps 3]
"""
import argparse
import statistics
import time

import torch

from circuitsearch.config import PruneConfig, build


def summed(ev, run, alphas, stacked: bool) -> list:
    if stacked:
        g = ev.receiver_gradients(run, alpha=alphas)
    else:
        gs = [ev.receiver_gradients(run, alpha=a) for a in alphas]
        g = {k: [sum(x[1:], x[0]) if x[0] is not None else None for x in zip(*(h[k] for h in gs))]
             for k in ("attn", "mlp")} | {"logits": sum((h["logits"] for h in gs[1:]), gs[0]["logits"])}
    return g["attn"] + [t for t in g["mlp"] if t is not None] + [g["logits"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="digits")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    _, task, ev = build(PruneConfig(model="smollm2-135m", task=args.task))
    alphas = [k / args.steps for k in range(1, args.steps + 1)]
    pruned = ev.run(nodes=[n for n in ev.senders if n.startswith("a")][::3])
    print(f"smollm2-135m, {args.task}: {len(ev.batch.tokens)} distinct rows of {task.seq_len} tokens, "
          f"{args.steps} EAP-IG steps, median of {args.reps}")
    print(f"{'circuit':<22} {'one pass a step':>16} {'stacked':>9} {'ratio':>6} {'passes counted':>15} {'max rel diff':>13}")
    for label, run in (("full model", ev.clean_run), ("every 3rd head ablated", pruned)):
        times, out = {}, {}
        for stacked in (False, True):
            summed(ev, run, alphas, stacked)  # warm-up
            fp, bp = ev.forward_passes, ev.backward_passes
            ts = []
            for _ in range(args.reps):
                t = time.perf_counter()
                out[stacked] = summed(ev, run, alphas, stacked)
                ts.append(time.perf_counter() - t)
            times[stacked] = statistics.median(ts)
            counted = ((ev.forward_passes - fp) // args.reps, (ev.backward_passes - bp) // args.reps)
        scale = max(float(a.abs().max()) for a in out[False])
        diff = max(float((a - b).abs().max()) for a, b in zip(out[False], out[True])) / scale
        print(f"{label:<22} {times[False]:>14.2f} s {times[True]:>7.2f} s {times[False] / times[True]:>5.2f}x "
              f"{f'{counted[0]} fwd, {counted[1]} bwd':>15} {diff:>13.1e}")


if __name__ == "__main__":
    main()
