"""Pruning to target performances: the smallest circuit whose verified faithfulness is >= each target.

Targets are taken from the highest down and nested: each circuit is pruned from the one
before, so a lower target gives a subset. For each target and each level (nodes, then
edges among the surviving nodes) the fast path is:

1. attribute the current circuit (EAP-IG) and order its candidates by estimated gain from
   removal: those whose removal should raise the score first, the most important last;
2. bisect on how many of that order to remove (equivalently, how many top candidates to
   keep): the largest prefix whose verified score (the evaluator, not the estimate) meets
   the target, about log2(n) forward passes. Re-attribute the smaller circuit and repeat
   while a round still removes something worth a round (at least 2 and 2 % of candidates);
3. refine: one iterative pass over the survivors in the order of a fresh attribution,
   removing galloping chunks (a chunk that passes doubles the next one, one that fails is
   halved; a single candidate that fails is kept). It stops after `patience` kept
   candidates in a row: the rest of the order is what attribution deems most important.

Every circuit it returns has been scored by the evaluator and meets its target.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from tqdm.auto import tqdm

from ..patching import Evaluator, Run
from .attribution import attribute
from .iterative import PruneResult, Thresholds, edge_candidates, node_candidates, remove_dangling

MAX_ROUNDS = 8
PATIENCE = 30


@dataclass
class TargetStep:
    """One target's circuit, how it was found and what it cost."""

    target: float
    result: PruneResult
    faithfulness: float
    bisect: dict = field(default_factory=dict)    # level -> [{"candidates", "removed", "scores"} per round]
    refined: dict = field(default_factory=dict)   # level -> {"candidates", "removed", "scores"}
    forward_passes: int = 0
    backward_passes: int = 0
    seconds: float = 0.0

    def summary(self, ev: Evaluator) -> dict:
        run = self.result.run
        kept = [n for n in ev.senders if n not in run.nodes]
        return {"target": self.target, "faithfulness": self.faithfulness,
                "heads": sum(n.startswith("a") for n in kept), "mlps": sum(n.startswith("m") for n in kept),
                "edges": len(edge_candidates(ev, run)), "bisect": self.bisect, "refined": self.refined,
                "forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
                "seconds": round(self.seconds, 2)}


def parse_targets(text: str | list) -> list[float]:
    """'0.97,0.9,0.8' -> [0.97, 0.9, 0.8] (highest first), each in (0, 1]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for t in items:
        try:
            v = float(t)
        except ValueError:
            raise ValueError(f"target {t!r} is not a number: give fractions of the full model's "
                             "performance, e.g. --target 0.97,0.9,0.8") from None
        if not 0.0 < v <= 1.0:
            raise ValueError(f"target {v} is outside (0, 1]: it is a fraction of the full model's performance")
        out.append(v)
    if not out:
        raise ValueError("no targets given, e.g. --target 0.97,0.9,0.8")
    return sorted(set(out), reverse=True)


def removal_order(ev: Evaluator, run: Run, level: str, method: str = "eap-ig", steps: int = 5) -> tuple[list[str], dict]:
    """`run`'s candidates at `level`, best to remove first (estimated score gain from removal,
    highest first), and the estimates as faithfulness drops."""
    attr = attribute(ev, run, method, steps)
    est = attr.nodes if level == "nodes" else attr.edges
    present = node_candidates(ev, run) if level == "nodes" else edge_candidates(ev, run)
    gain = {c: est[c] if ev.metric.higher_is_better else -est[c] for c in present if c in est}
    base = ev.faithfulness(run.score)
    drops = {c: base - ev.faithfulness(run.score + est[c]) for c in gain}
    return sorted(gain, key=lambda c: -gain[c]), drops  # stable: ties keep forward order


def bisect_remove(ev: Evaluator, run: Run, order: list[str], level: str, target: float) -> tuple[Run, dict]:
    """The circuit removing the longest prefix of `order` that verifies >= target.

    Bisection assumes the score falls as the prefix grows; it need not, but every circuit
    returned is verified, and removing nothing (the current circuit) is the fallback.
    """
    lo, hi, best, scored = 0, len(order), run, 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        cand = ev.extend(run, **{level: order[:mid]})
        scored += 1
        if ev.faithfulness(cand.score) >= target:
            lo, best = mid, cand
        else:
            hi = mid - 1
    return best, {"candidates": len(order), "removed": lo, "scores": scored}


def gallop_remove(ev: Evaluator, run: Run, order: list[str], level: str, target: float,
                  patience: int | None = PATIENCE, result: PruneResult | None = None) -> tuple[Run, dict]:
    """One pass over `order` removing chunks that keep the verified score >= target.

    A chunk that passes doubles the next chunk; one that fails halves it; a single candidate
    that fails is kept. Stops after `patience` candidates kept in a row (None: never).
    Decisions and measured effects go to `result`.
    """
    i, size, streak, scored, removed = 0, 1, 0, 0, 0
    while i < len(order) and (patience is None or streak < patience):
        chunk = order[i:i + size]
        cand = ev.extend(run, **{level: chunk})
        scored += 1
        ok = ev.faithfulness(cand.score) >= target
        if result is not None and (ok or len(chunk) == 1):
            drop = ev.faithfulness(run.score) - ev.faithfulness(cand.score)
            for c in chunk:
                result.decisions.append({"phase": level, "pass": "refine", "candidate": c, "before": run.score,
                                         "score": cand.score, "faithfulness": ev.faithfulness(cand.score),
                                         "removed": ok, "chunk": len(chunk)})
                if len(chunk) == 1:
                    result.effects[c] = drop
        if ok:
            run, i, removed, streak, size = cand, i + len(chunk), removed + len(chunk), 0, size * 2
        elif size > 1:
            size //= 2
        else:
            i, streak = i + 1, streak + 1
    return run, {"candidates": len(order), "removed": removed, "scores": scored, "tried": i}


def prune_to_targets(ev: Evaluator, targets: list[float], level: str = "both", method: str = "eap-ig",
                     steps: int = 5, refine: bool = True, progress: bool = True,
                     start: Run | None = None, patience: int | None = PATIENCE, max_rounds: int = MAX_ROUNDS,
                     on_target: Callable[[TargetStep], None] | None = None) -> list[TargetStep]:
    """Nested circuits for `targets` (highest first), each verified >= its target."""
    if level not in ("nodes", "edges", "both"):
        raise ValueError(f"unknown level {level!r}; choose nodes, edges or both")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be at least 1, not {max_rounds}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be at least 1 (or None for a full pass), not {patience}")
    targets = parse_targets(targets)
    run = start if start is not None else ev.run()
    out = []
    for t in targets:
        if ev.faithfulness(run.score) < t:
            raise ValueError(f"the circuit to prune from scores faithfulness {ev.faithfulness(run.score):.3f}, "
                             f"below the target {t}: targets must be reachable (the full model scores 1.0)")
        fp, bp, t0 = ev.forward_passes, ev.backward_passes, time.perf_counter()
        result = PruneResult(run)
        step = TargetStep(t, result, ev.faithfulness(run.score))
        estimates: dict = {}
        for phase in (("nodes", "edges") if level == "both" else (level,)):
            rounds = step.bisect[phase] = []
            bar = tqdm(total=max_rounds + refine, desc=f"target {t} {phase}", unit="round",
                       disable=not progress, leave=False)
            for _ in range(max_rounds):
                order, drops = removal_order(ev, run, phase, method, steps)
                estimates.update(drops)
                run, info = bisect_remove(ev, run, order, phase, t)
                rounds.append(info)
                bar.update()
                bar.set_postfix(kept=len(order) - info["removed"], faith=f"{ev.faithfulness(run.score):.3f}")
                if info["removed"] < max(2, len(order) // 50):
                    break
            if refine:
                if rounds[-1]["removed"]:  # the circuit changed since it was last attributed
                    order, drops = removal_order(ev, run, phase, method, steps)
                    estimates.update(drops)
                run, step.refined[phase] = gallop_remove(ev, run, order, phase, t, patience, result)
                bar.update()
            bar.close()
            result.run = run
        if level != "nodes":
            remove_dangling(ev, result, Thresholds(absolute=t))
            run = result.run
        for c, d in estimates.items():  # kept candidates never scored alone: the attribution estimate
            result.effects.setdefault(c, d)
        final = ev.score(nodes=run.nodes, edges=run.edges)  # fresh, uncached verification
        step.faithfulness = ev.faithfulness(final)
        step.forward_passes = ev.forward_passes - fp
        step.backward_passes = ev.backward_passes - bp
        step.seconds = time.perf_counter() - t0
        out.append(step)
        if on_target is not None:
            on_target(step)
        if progress:
            s = step.summary(ev)
            tqdm.write(f"target {t}: {s['heads']} heads, {s['mlps']} MLPs, {s['edges']} edges, "
                       f"faithfulness {s['faithfulness']:.3f}, {s['forward_passes']} forward passes")
    return out
