"""Pruning to target performances: the smallest circuit whose verified faithfulness is >= each target.

Targets are taken from the highest down and nested: each circuit is pruned from the one
before, so a lower target gives a subset. For each target and each level (nodes, then
edges among the surviving nodes) the fast path is:

1. attribute the current circuit (EAP-IG) and rank its candidates, most important first;
2. bisect on k, the number of top candidates kept, for the smallest k whose verified score
   (the evaluator, not the estimate) meets the target: about log2(n) forward passes;
3. refine: one iterative pruning pass over the survivors, least important first, with the
   target as the absolute threshold.

Every circuit it returns has been scored by the evaluator and meets its target.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from tqdm.auto import tqdm

from ..patching import Evaluator, Run
from .attribution import attribute
from .iterative import PruneResult, Thresholds, edge_candidates, node_candidates, prune, remove_dangling


@dataclass
class TargetStep:
    """One target's circuit, how it was found and what it cost."""

    target: float
    result: PruneResult
    faithfulness: float
    bisect: dict = field(default_factory=dict)    # level -> {"candidates", "kept", "scores"}
    refined: dict = field(default_factory=dict)   # level -> candidates removed by refinement
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


def bisect_keep(ev: Evaluator, run: Run, ranked: list[str], level: str, target: float) -> tuple[Run, dict]:
    """The circuit keeping the fewest top-ranked candidates (others removed) that verifies >= target.

    `ranked` is most important first. Assumes faithfulness grows with k only for the search;
    the result is always verified, and keeping everything (the current circuit) is the fallback.
    """
    key = "nodes" if level == "nodes" else "edges"
    lo, hi = 0, len(ranked)
    best = run
    tried = {}
    while lo < hi:
        mid = (lo + hi) // 2
        cand = ev.extend(run, **{key: ranked[mid:]})
        f = ev.faithfulness(cand.score)
        tried[mid] = f
        if f >= target:
            hi, best = mid, cand
        else:
            lo = mid + 1
    return best, {"candidates": len(ranked), "kept": hi, "scores": len(tried)}


def prune_to_targets(ev: Evaluator, targets: list[float], level: str = "both", method: str = "eap-ig",
                     steps: int = 5, refine: bool = True, progress: bool = True,
                     start: Run | None = None,
                     on_target: Callable[[TargetStep], None] | None = None) -> list[TargetStep]:
    """Nested circuits for `targets` (highest first), each verified >= its target."""
    if level not in ("nodes", "edges", "both"):
        raise ValueError(f"unknown level {level!r}; choose nodes, edges or both")
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
        for phase in (("nodes", "edges") if level == "both" else (level,)):
            cands = node_candidates(ev, run) if phase == "nodes" else edge_candidates(ev, run)
            attr = attribute(ev, run, method, steps)
            present = set(cands)
            ranking = [c for c in attr.ranking(phase) if c in present]  # least important first
            run, step.bisect[phase] = bisect_keep(ev, run, ranking[::-1], phase, t)
            if refine:
                before = len(run.nodes) + len(run.edges)
                r = prune(ev, phase, Thresholds(absolute=t), "attribution", max_passes=1, run=run,
                          ranking=ranking, progress=progress, result=result)
                run = r.run
                step.refined[phase] = len(run.nodes) + len(run.edges) - before
            result.run = run
        if level != "nodes":
            remove_dangling(ev, result, Thresholds(absolute=t))
            run = result.run
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
