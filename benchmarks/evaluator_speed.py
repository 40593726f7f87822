"""Evaluator vs naive hooked forward: 60 candidate node ablations as a reverse pruning pass meets them.

On smollm2-135m, digits, 24 prompts: every 5th node of the graph in reverse order (from m29 down
to embed), each scored alone against the full model, once with a plain TransformerLens hooked
forward (ablation source computed once, full vocabulary logits) and once with the evaluator
(extending the cached clean run). Prints both times, the ratio, forward-equivalents and the
largest score difference. Target: evaluator >= 2.5x faster, same scores to 1e-4.

    python benchmarks/evaluator_speed.py [--prompts 24] [--candidates 60]
"""
import argparse
import time

import torch

from circuitsearch.config import PruneConfig, build
from circuitsearch.reference import ablation_source, hooked_score


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--candidates", type=int, default=60)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, task, ev = build(PruneConfig(model="smollm2-135m", task="digits", n_prompts=args.prompts))
    order = ev.senders[::-1]
    step = max(1, len(order) // args.candidates)
    cands = order[::step][: args.candidates]
    base = ev.run()
    hooked_score(model, task, "mean", nodes=[cands[0]])  # warm-up both paths
    ev.extend(base, nodes=[cands[0]])

    fe0, fp0 = ev.forward_equivalents, ev.forward_passes
    t = time.perf_counter()
    fast = [ev.extend(base, nodes=[c]).score for c in cands]
    t_fast = time.perf_counter() - t
    fe, fp = ev.forward_equivalents - fe0, ev.forward_passes - fp0

    source = ablation_source(model, task, "mean")  # computed once, as a notebook would
    t = time.perf_counter()
    naive = [hooked_score(model, task, "mean", nodes=[c], source=source) for c in cands]
    t_naive = time.perf_counter() - t

    err = max(abs(a - b) for a, b in zip(fast, naive))
    print(f"smollm2-135m, digits, {len(task)} prompts x {task.seq_len} tokens, {len(cands)} candidates "
          f"(every {step}th node in reverse order, {cands[0]} .. {cands[-1]})")
    print(f"{'path':38s} {'seconds':>8s} {'per cand':>9s} {'fwd passes':>10s} {'fwd-equiv':>9s}")
    print(f"{'naive hooked forward (source cached)':38s} {t_naive:8.2f} {t_naive / len(cands):9.3f} "
          f"{len(cands):10d} {len(cands):9.1f}")
    print(f"{'evaluator':38s} {t_fast:8.2f} {t_fast / len(cands):9.3f} {fp:10d} {fe:9.1f}")
    print(f"speed-up: {t_naive / t_fast:.2f}x; largest score difference {err:.2e}")
    ok = t_naive / t_fast >= 2.5 and err < 1e-4
    print("target (>= 2.5x, scores equal to 1e-4):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
