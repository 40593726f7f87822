"""What the causal suffix (circuitsearch/evaluator/suffix.py) saves, phase by phase.

One search at level nodes,positions,edges per setting, run twice on the same model and task: with the
suffix path and with it off (every pass recomputes the whole prompt). Prints, per phase, the decisions,
forward-equivalents and seconds of each, and checks that both runs made the same decisions with the
same scores (to float32 rounding, 1e-6 of the score). A phase's cost runs from the previous phase's last
decision to its own last one (so the ranking and the first score of a phase count in it). CPU work: under
the lock.

Usage: python benchmarks/causal_suffix.py [--model induction-2l --task induction] [--order attribution]
       [--prompts 24] [--device cpu] [--repeat 1]
"""
from __future__ import annotations

import argparse
import time

from circuitsearch.algorithms.iterative import find_circuit
from circuitsearch.algorithms.search import Thresholds
from circuitsearch.config import PruneConfig, build, evaluator


def search(ev, level: str, order: str, absolute: float) -> tuple[list, dict, float]:
    """(decisions, phase -> (decisions, forward-equivalents, seconds), total seconds) of one search."""
    marks, log = [], []
    t0 = time.perf_counter()

    def note(d):
        log.append(d)
        marks.append((d.phase, ev.forward_equivalents, time.perf_counter() - t0))

    find_circuit(ev, level, Thresholds(absolute), order, progress=False, on_decision=note)
    total = time.perf_counter() - t0
    phases, last = {}, (0.0, 0.0)
    for i, (ph, fe, s) in enumerate(marks):
        if i + 1 == len(marks) or marks[i + 1][0] != ph:  # the phase's last decision
            n = sum(1 for m in marks if m[0] == ph)
            phases[ph] = (n, fe - last[0], s - last[1])
            last = (fe, s)
    return log, phases, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="induction-2l")
    ap.add_argument("--task", default="induction")
    ap.add_argument("--order", default="attribution")
    ap.add_argument("--level", default="nodes,positions,edges")
    ap.add_argument("--absolute", type=float, default=0.8)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1, help="pairs of searches, in alternating order (full, suffix, "
                    "suffix, full, ...); seconds are each phase's best")
    args = ap.parse_args()
    cfg = PruneConfig(model=args.model, task=args.task, n_prompts=args.prompts, device=args.device, level=args.level)
    model, task = build(cfg)[:2]
    runs = {"full": [], "suffix": []}
    fe = {}
    for i in range(2 * args.repeat):
        name = ("full", "suffix")[(i + i // 2) % 2]
        ev = evaluator(cfg, model, task, None)  # a fresh evaluator each time: nothing cached between searches
        ev.causal_suffix = name == "suffix"
        runs[name].append(search(ev, args.level, args.order, args.absolute))
        fe[name] = ev.forward_equivalents
    keys = {n: [[d.key() + (d.removed,) for d in r[0]] for r in rs] for n, rs in runs.items()}
    same = all(k == keys["full"][0] for ks in keys.values() for k in ks)
    la, lb = runs["full"][0][0], runs["suffix"][0][0]
    worst = max((abs(x.score - y.score) for x, y in zip(la, lb)), default=0.0)
    rel = max((abs(x.score - y.score) / max(1.0, abs(x.score)) for x, y in zip(la, lb)), default=0.0)
    best = lambda rs, ph: min(r[1][ph][2] for r in rs)
    pa = {ph: v[:2] + (best(runs["full"], ph),) for ph, v in runs["full"][0][1].items()}
    pb = {ph: v[:2] + (best(runs["suffix"], ph),) for ph, v in runs["suffix"][0][1].items()}
    ta, tb = (min(r[2] for r in runs[n]) for n in ("full", "suffix"))
    print(f"{args.model}, {args.task}, {len(task)} prompts x {task.seq_len} tokens, level {args.level}, order "
          f"{args.order}, {args.device}, {args.repeat} pair(s): same decisions {same} ({len(la)}), largest score "
          f"difference {worst:.1e} ({rel:.1e} of the score)")
    print("| phase | decisions | forward-equiv. full | suffix | ratio | seconds full | suffix | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for ph in pa:
        n, fa, sa = pa[ph]
        _, fb, sb = pb.get(ph, (0, 0.0, 0.0))
        print(f"| {ph} | {n} | {fa:.1f} | {fb:.1f} | {fb / fa if fa else 1:.2f} | {sa:.1f} | {sb:.1f} | "
              f"{sb / sa if sa else 1:.2f} |")
    fa, fb = fe["full"], fe["suffix"]
    print(f"| whole search | {len(la)} | {fa:.1f} | {fb:.1f} | {fb / fa:.2f} | {ta:.1f} | {tb:.1f} | {tb / ta:.2f} |")
    if not same or rel > 1e-5:  # float32 rounding of other GEMM shapes: ~1e-6 of the score (stacked passes' own)
        raise SystemExit("the suffix path changed the search: decisions or scores differ")


if __name__ == "__main__":
    main()
