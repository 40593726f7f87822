"""Iterative pruning: try each node (or edge) in order, remove it if the circuit still passes.

A removal is kept when the circuit without the candidate keeps faithfulness >= A (absolute)
and loses at most R against the current circuit (relative); it takes effect at once. Passes
repeat until one removes nothing or max_passes. Every decision goes to a callback, and the
decisions of an earlier session can be replayed: a resumed run applies the logged removals
without scoring them (one forward pass per pass of the log, not one per removal) and ends in
the same circuit.
"""
from __future__ import annotations

from typing import Callable, Iterable

from tqdm.auto import tqdm

from ..patching import Evaluator, Run
from .levels import EDGE_POSITIONS, candidate_ids, level_of  # noqa: F401  (candidate_ids: part of this API)
from .orders import ByMagnitude, Order, default_order, parse_order
from .speculation import MAX_K, Speculation
from .search import (LEVELS, Decision, PruneResult, Replay, ResumeError, Thresholds, check_scores,  # noqa: F401
                     check_feature_level, dangling_nodes, phases, remove_dangling, run_phases)


def node_candidates(ev: Evaluator, run: Run) -> list[str]:
    """Nodes still in the circuit that a search may remove, in forward order."""
    return ev.index.names(candidate_ids(run, "nodes"), "nodes")


def edge_candidates(ev: Evaluator, run: Run) -> list[str]:
    """Edges still in the circuit whose sender and receiver nodes both survive, in forward order."""
    return ev.index.names(run.present_edges().nonzero()[:, 0], "edges")


def prune(ev: Evaluator, level: str, thresholds: Thresholds, order: str | Order | None = None,
          max_passes: int = 10, run: Run | None = None, replay: Iterable = (),
          on_decision: Callable[[Decision], None] | None = None, ranking: list[str] | None = None,
          progress: bool = True, result: PruneResult | None = None, batch: int = MAX_K) -> PruneResult:
    """Prune nodes, nodes at slots (positions) or edges (level) from `run` (default: the full model) until
    a pass removes nothing.

    order: None is the command line's default (orders.default_order: attribution, or alternate for accuracy).
    ranking: for the attribution order, names least important first (default: attribute `run`).
    batch: the most candidates scored together by speculation (1: one at a time); the decisions
    are the same for every value.
    A candidate whose last try was on the very circuit it would be tried on now (nothing removed
    since) gets that try's decision again without a forward pass (counted in result.skipped).
    """
    if level not in ("nodes", "positions", "edges", EDGE_POSITIONS):
        raise ValueError(f"prune level must be 'nodes', 'positions', 'edges' or '{EDGE_POSITIONS}', not {level!r}")
    order = parse_order(order if order is not None else default_order(ev.metric.name))
    if ranking is not None and isinstance(order, ByMagnitude):
        order = ByMagnitude(order.name, order.method, order.steps, tuple(ranking))
    if max_passes < 1:
        raise ValueError(f"max_passes must be at least 1, not {max_passes}")
    check_feature_level(ev, (level,))
    check_scores(ev)
    run = run if run is not None else ev.run()
    result = result or PruneResult(run)
    replay = replay if isinstance(replay, Replay) else Replay(replay)
    table = level_of(ev, level)
    names, key = table.names, table.key
    order = order.prepare(ev, run, level)
    spec = Speculation(batch)
    stage = table.stage  # where each candidate enters the pass
    top = 3 * ev.L + 2  # stages run from -1 (embed) to 3L (logits)
    version = 0          # how many removals the circuit has seen in this phase
    last: dict = {}      # candidate -> (version, decision) of its last try
    for p in range(max_passes):
        cands = table.present(run)
        seq = order.sequence(cands, p)
        removed_any = False
        pending: list[int] = []  # replayed removals, applied in one forward pass before the next new decision
        bar = tqdm(total=len(seq), desc=f"{level} pass {p + 1}", unit="cand", disable=not progress, leave=False,
                   mininterval=0.5)
        kept = len(cands)
        i = 0

        def settle(cand: int, decision: Decision) -> None:
            nonlocal version, removed_any, kept
            if decision.removed:
                version += 1
            last[cand] = (version, decision)
            result.decisions.append(decision)
            result.effects[names[cand]] = ev.faithfulness(decision.before) - ev.faithfulness(decision.score)
            removed_any |= decision.removed
            kept -= decision.removed
            bar.update()
            bar.set_postfix(kept=kept, faith=f"{ev.faithfulness(run.score):.3f}", refresh=False)

        while i < len(seq):
            cand = seq[i]
            if len(replay):
                logged = replay.take(level, p, names[cand])
                if logged is not None:
                    if logged.removed:
                        pending.append(cand)
                    settle(cand, logged)
                    i += 1
                    continue
            if pending:
                run, pending = ev.extend(run, **{key: pending}), []
            seen = last.get(cand)
            if seen is not None and seen[0] == version:  # tried on this very circuit: same score, same verdict
                d = seen[1]
                decision = Decision(level, p, names[cand], d.before, d.score, d.faithfulness, d.removed)
                result.skipped += 1
                if on_decision is not None:
                    on_decision(decision)
                settle(cand, decision)
                i += 1
                continue
            ahead = seq[i: i + spec.max_k]
            block = ahead[: spec.size([(top - 1 - stage[c]) / top for c in ahead])]
            block = block[: next((j for j, c in enumerate(block) if j and last.get(c, (None,))[0] == version),
                                 len(block))]  # a candidate that can be skipped ends the block
            guesses, variants, assumed = [], [], []
            for c in block:
                g = spec.guess(c)
                guesses.append(g)
                variants.append(table.variant(assumed + [c]))
                if g:
                    assumed = assumed + [c]
            spec.rows += len(block)
            spec.blocks += 1
            for j, (c, g, new) in enumerate(zip(block, guesses, ev.extend_many(run, variants))):
                ok = thresholds.accepts(ev, run.score, new.score)
                decision = Decision(level, p, names[c], run.score, new.score, ev.faithfulness(new.score), ok)
                if ok:
                    run = new
                if on_decision is not None:
                    on_decision(decision)
                settle(c, decision)
                spec.observe(c, g, ok)
                i += 1
                if g != ok:
                    spec.wasted += len(block) - j - 1
                    break
        bar.close()
        if pending:
            run = ev.extend(run, **{key: pending})
        result.passes[level] = p + 1
        if not removed_any:
            break
    result.run = run
    result.speculation[level] = spec.stats()
    return result


def find_circuit(ev: Evaluator, level: str = "both", thresholds: Thresholds = Thresholds(),
                 order: str | Order | None = None, max_passes: int = 10, replay: Iterable = (),
                 on_decision: Callable[[Decision], None] | None = None, ranking: dict | None = None,
                 progress: bool = True, attribution: str = "eap-ig", steps: int = 5, batch: int = MAX_K) -> PruneResult:
    """The default pipeline: nodes, then edges among surviving nodes, then dangling nodes, then a
    fresh re-score (result.final).

    attribution, steps: the estimate the attribution order ranks by (eap or eap-ig, integration steps).
    ranking: {"nodes": [...], "edges": [...]} names least important first, instead of attributing.
    batch: the most candidates scored together by speculation (1: one at a time; same decisions).
    """
    order = parse_order(order if order is not None else default_order(ev.metric.name), attribution, steps)
    phases(level)
    if max_passes < 1:
        raise ValueError(f"max_passes must be at least 1, not {max_passes}")
    replay = replay if isinstance(replay, Replay) else Replay(replay)
    ranking = ranking or {}

    def phase(p: str, result: PruneResult) -> None:
        prune(ev, p, thresholds, order, max_passes, result.run, replay, on_decision, ranking.get(p), progress, result, batch)

    return run_phases(ev, level, phase, thresholds)
