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

Every circuit it returns has been scored by the evaluator and meets its target. Every scored
circuit is a Decision (a bisection step: "remove the first `chunk` of this round's order"; a
refinement chunk), so a killed target search replays its log and resumes mid-target: the
attributions are recomputed (they are deterministic), the logged verdicts are not re-scored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from tqdm.auto import tqdm

from ..graphs.index import FEATURE, HEAD, MLP
from ..patching import Evaluator, Run
from .attribution import attribute_for
from .iterative import edge_candidates
from .levels import level_of
from .search import Decision, PruneResult, Replay, Thresholds, check_scores, phases, run_phases
from .speculation import MAX_K

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
        run, ix = self.result.run, ev.index
        kept = [i for i in range(ix.S) if not bool(run.masks.ablated[i])]
        count = lambda kind: sum(ix.node_kind[i] == kind for i in kept)
        out = {"target": self.target, "faithfulness": self.faithfulness, "heads": count(HEAD), "mlps": count(MLP),
               "edges": len(edge_candidates(ev, run)), "bisect": self.bisect, "refined": self.refined,
               "forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
               "seconds": round(self.seconds, 2)}
        if ix.sites:  # a feature graph: its kept features and error nodes (they have no edges)
            out["features"] = count(FEATURE)
        return out


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
    """gain_order with names: `run`'s candidates at `level`, best to remove first, and the drops."""
    ids, drops = gain_order(ev, run, level, method, steps)
    names = level_of(ev, level).names
    return [names[i] for i in ids], drops


def _ids(ev: Evaluator, order: list, level: str) -> list[int]:
    """Names or index ids of one level as index ids (names are checked against the graph)."""
    return [level_of(ev, level).parse(x) for x in order]


def gain_order(ev: Evaluator, run: Run, level: str, method: str = "eap-ig", steps: int = 5) -> tuple[list[int], dict]:
    """`run`'s candidates at `level` (index ids), best to remove first by estimated gain: the signed
    score change their removal should bring, highest first (removals that should raise the score
    first). Also the estimates as faithfulness drops, by name. (The attribution *order* of
    iterative pruning ranks by |estimate| instead: orders.ByMagnitude.)"""
    est = attribute_for(ev, run, level, method, steps).estimates(level)
    names = level_of(ev, level).names
    present = [c for c in level_of(ev, level).present(run) if names[c] in est]
    sign = 1.0 if ev.metric.higher_is_better else -1.0
    gain = {c: sign * est[names[c]] for c in present}
    base = ev.faithfulness(run.score)
    drops = {names[c]: base - ev.faithfulness(run.score + est[names[c]]) for c in present}
    return sorted(present, key=lambda c: -gain[c]), drops  # stable: ties keep forward order


class _Scorer:
    """Scores a removal from `run` for the target search, or takes its verdict from the replayed log;
    logs every new decision. Replayed removals are applied lazily, in one forward pass."""

    def __init__(self, ev: Evaluator, level: str, target: float, replay: Replay, on_decision, result: PruneResult):
        self.ev, self.level, self.target, self.replay = ev, level, target, replay
        self.on_decision, self.result = on_decision, result
        self.table = level_of(ev, level)
        self.names = self.table.names

    def try_remove(self, run: Run, ids: list[int], pass_: str, first: int,
                   cand: Run | None = None) -> tuple[bool, Run | None, Decision]:
        """Whether removing `ids` from `run` keeps the target; the new run if scored (None if replayed).
        `cand`: that removal already scored (a speculative block's row), taken as it is."""
        ev = self.ev
        name = self.names[ids[first]]
        logged = self.replay.take(self.level, pass_, name, len(ids), self.target)
        if logged is not None:
            self.result.decisions.append(logged)
            return logged.removed, None, logged
        cand = cand if cand is not None else self.table.extend(ev, run, ids)
        ok = ev.faithfulness(cand.score) >= self.target
        d = Decision(self.level, pass_, name, run.score, cand.score, ev.faithfulness(cand.score), ok, len(ids),
                     self.target)
        self.result.decisions.append(d)
        if self.on_decision is not None:
            self.on_decision(d)
        return ok, cand, d


def bisect_remove(ev: Evaluator, run: Run, order: list[int], level: str, target: float,
                  scorer: _Scorer | None = None, round_: int = 0, pass_name: str | None = None) -> tuple[Run, dict]:
    """The circuit removing the longest prefix of `order` (index ids) that verifies >= target (its
    decisions logged as pass `pass_name`, default bisect:ROUND).

    Bisection assumes the score falls as the prefix grows; it need not, but every circuit
    returned is verified, and removing nothing (the current circuit) is the fallback.
    """
    scorer = scorer or _Scorer(ev, level, target, Replay(), None, PruneResult(run))
    order = _ids(ev, order, level)
    lo, hi, best, scored = 0, len(order), run, 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok, cand, _ = scorer.try_remove(run, order[:mid], pass_name or f"bisect:{round_}", mid - 1)
        scored += cand is not None
        if ok:
            lo, best = mid, cand
        else:
            hi = mid - 1
    if best is None:  # the longest passing prefix was replayed, not scored: apply it
        best = level_of(ev, level).extend(ev, run, order[:lo])
    return best, {"candidates": len(order), "removed": lo, "scores": scored}


def gallop_remove(ev: Evaluator, run: Run, order: list[int], level: str, target: float,
                  patience: int | None = PATIENCE, result: PruneResult | None = None,
                  scorer: _Scorer | None = None, batch: int = MAX_K) -> tuple[Run, dict]:
    """One pass over `order` (index ids) removing chunks that keep the verified score >= target.

    A chunk that passes doubles the next chunk; one that fails halves it; a single candidate
    that fails is kept. Stops after `patience` candidates kept in a row (None: never).
    Decisions and measured effects go to `result`.

    Speculation: every try after a failure extends the same circuit, so the next tries along the
    failure path (halved chunks, then the following single candidates) are scored together in one
    extend_many, up to `batch` of them (a block doubles after a block without a removal and starts
    again at 1 after one); verdicts are taken in order up to the first removal, the rest dropped.
    The decisions are those of trying one at a time (batch 1).
    """
    if batch < 1:
        raise ValueError(f"the speculative batch holds at least 1 candidate, not {batch}")
    result = result if result is not None else PruneResult(run)
    scorer = scorer or _Scorer(ev, level, target, Replay(), None, result)
    names, table = scorer.names, scorer.table
    order = _ids(ev, order, level)
    i, size, streak, scored, removed, block, wasted = 0, 1, 0, 0, 0, 1, 0
    pending: list[int] = []  # replayed removals not applied yet
    going = lambda i, streak: i < len(order) and (patience is None or streak < patience)
    while going(i, streak):
        tries, cands = [(i, size, streak)], [None]
        if not len(scorer.replay):  # nothing left to replay: score the failure path ahead as one block
            if pending:
                run, pending = table.extend(ev, run, pending), []
            while len(tries) < block:
                j, sz, st = tries[-1]
                nxt = (j, sz // 2, st) if sz > 1 else (j + 1, 1, st + 1)
                if not going(nxt[0], nxt[2]):
                    break
                tries.append(nxt)
            cands = ev.extend_many(run, [table.variant(order[j:j + sz]) for j, sz, _ in tries])
        for n, ((j, sz, st), pre) in enumerate(zip(tries, cands)):
            chunk = order[j:j + sz]
            i, size, streak = j, sz, st
            ok, cand, d = scorer.try_remove(run, chunk, "refine", 0, pre)
            scored += cand is not None
            if len(chunk) == 1:
                result.effects[names[chunk[0]]] = ev.faithfulness(d.before) - ev.faithfulness(d.score)
            if ok:
                if cand is None:
                    pending += chunk
                else:
                    run = cand
                i, removed, streak, size = i + len(chunk), removed + len(chunk), 0, size * 2
                wasted += len(tries) - n - 1
                block = 1
                break
            elif size > 1:
                size //= 2
            else:
                i, streak = i + 1, streak + 1
        else:
            if cands[0] is not None:
                block = min(2 * block, batch)
    if pending:
        run = table.extend(ev, run, pending)
    info = {"candidates": len(order), "removed": removed, "scores": scored, "tried": i}
    return run, info | ({"wasted_rows": wasted} if batch > 1 else {})


def prune_to_targets(ev: Evaluator, targets: list[float], level: str = "both", method: str = "eap-ig",
                     steps: int = 5, refine: bool = True, progress: bool = True,
                     start: Run | None = None, patience: int | None = PATIENCE, max_rounds: int = MAX_ROUNDS,
                     on_target: Callable[[TargetStep], None] | None = None, replay=(),
                     on_decision: Callable[[Decision], None] | None = None, batch: int = MAX_K) -> list[TargetStep]:
    """Nested circuits for `targets` (highest first), each verified >= its target.

    replay: decisions of an interrupted session (see module docstring); on_decision gets every new one;
    batch: the most refinement tries scored together (gallop_remove; the same decisions for any).
    """
    phases(level)
    check_scores(ev)
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be at least 1, not {max_rounds}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be at least 1 (or None for a full pass), not {patience}")
    targets = parse_targets(targets)
    replay = replay if isinstance(replay, Replay) else Replay(replay)
    run = start if start is not None else ev.run()
    out = []
    for t in targets:
        if ev.faithfulness(run.score) < t:
            raise ValueError(f"the circuit to prune from scores faithfulness {ev.faithfulness(run.score):.3f}, "
                             f"below the target {t}: targets must be reachable (the full model scores 1.0)")
        fp, bp, t0 = ev.forward_passes, ev.backward_passes, time.perf_counter()
        step = TargetStep(t, PruneResult(run), ev.faithfulness(run.score))

        def phase(p: str, result: PruneResult, t=t, step=step) -> None:
            scorer = _Scorer(ev, p, t, replay, on_decision, result)
            run = result.run
            rounds = step.bisect[p] = []
            bar = tqdm(total=max_rounds + refine, desc=f"target {t} {p}", unit="round",
                       disable=not progress, leave=False)
            for r in range(max_rounds):
                order, drops = gain_order(ev, run, p, method, steps)
                result.estimates.update(drops)
                run, info = bisect_remove(ev, run, order, p, t, scorer, r)
                rounds.append(info)
                bar.update()
                bar.set_postfix(kept=len(order) - info["removed"], faith=f"{ev.faithfulness(run.score):.3f}")
                if info["removed"] < max(2, len(order) // 50):
                    break
            if refine:
                if rounds[-1]["removed"]:  # the circuit changed since it was last attributed
                    order, drops = gain_order(ev, run, p, method, steps)
                    result.estimates.update(drops)
                run, step.refined[p] = gallop_remove(ev, run, order, p, t, patience, result, scorer, batch)
                bar.update()
            bar.close()
            result.run = run

        result = run_phases(ev, level, phase, Thresholds(absolute=t), start=run)
        for c in result.effects:  # measured drops win over estimates
            result.estimates.pop(c, None)
        step.result, run = result, result.run
        step.faithfulness = ev.faithfulness(result.final)
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
