"""Iterative pruning: try each node (or edge) in order, remove it if the circuit still passes.

A removal is kept when the circuit without the candidate keeps faithfulness >= A (absolute)
and loses at most R against the current circuit (relative); it takes effect at once. Passes
repeat until one removes nothing or max_passes. Every decision goes to a callback, and a
list of earlier decisions can be replayed: a resumed run applies the logged removals without
scoring them (one forward pass per pass of the log, not one per removal) and ends in the same
circuit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import networkx as nx
from tqdm.auto import tqdm

from ..graphs.model_graph import receiver_node, split_edge
from ..patching import Evaluator, Run
from .orders import check_order, pass_order

LEVELS = ("nodes", "edges", "both")


class ResumeError(RuntimeError):
    """The decision log does not belong to this run (other settings or another model)."""


@dataclass(frozen=True)
class Thresholds:
    """absolute: faithfulness the circuit keeps (A); relative: what one removal may cost (R).

    on="faithfulness" (default): both act on faithfulness, R as a drop in faithfulness.
    on="metric": both act on the raw metric (ACDC: KL may rise by at most R per removal).
    None switches a threshold off.
    """

    absolute: float | None = 0.8
    relative: float | None = None
    on: str = "faithfulness"

    def __post_init__(self):
        if self.on not in ("faithfulness", "metric"):
            raise ValueError(f"thresholds act on 'faithfulness' or 'metric', not {self.on!r}")
        if self.absolute is None and self.relative is None:
            raise ValueError("both thresholds are off, so every removal would pass: set --absolute or --relative")
        for name, v in (("absolute", self.absolute), ("relative", self.relative)):
            if v is None:
                continue
            if not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"{name} threshold {v!r} is not a number")
            if self.on == "faithfulness" and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} threshold {v} is outside [0, 1]: it is a fraction of the full "
                                 f"model's performance (e.g. --{name} {0.8 if name == 'absolute' else 0.02})")
            if name == "relative" and v < 0:
                raise ValueError(f"relative threshold {v} is negative: it is the most one removal may cost")

    def accepts(self, ev: Evaluator, current: float, new: float) -> bool:
        """Whether a removal taking the score from `current` to `new` passes both thresholds."""
        if self.on == "faithfulness":
            f_new, f_cur = ev.faithfulness(new), ev.faithfulness(current)
            if self.absolute is not None and not f_new >= self.absolute:
                return False
            return self.relative is None or f_cur - f_new <= self.relative
        sign = 1.0 if ev.metric.higher_is_better else -1.0
        if self.absolute is not None and not sign * (new - self.absolute) >= 0:
            return False
        return self.relative is None or sign * (current - new) <= self.relative

    def to_json(self) -> dict:
        return {"absolute": self.absolute, "relative": self.relative, "on": self.on}


@dataclass
class PruneResult:
    """The pruned circuit as what it removes, with its cached run and the decisions made."""

    run: Run
    decisions: list = field(default_factory=list)
    passes: dict = field(default_factory=dict)        # phase -> passes run
    effects: dict = field(default_factory=dict)       # candidate -> faithfulness drop when last tried
    dangling: list = field(default_factory=list)      # nodes removed for lack of a path

    @property
    def ablated(self) -> frozenset:
        return self.run.nodes

    @property
    def removed_edges(self) -> frozenset:
        return self.run.edges


def node_candidates(ev: Evaluator, run: Run) -> list[str]:
    """Nodes still in the circuit, in forward order."""
    return [n for n in ev.senders if n not in run.nodes]


def edge_candidates(ev: Evaluator, run: Run) -> list[str]:
    """Edges still in the circuit whose sender and receiver nodes both survive, in forward order."""
    out = []
    for e in ev.graph.edges:
        if e in run.edges:
            continue
        src, dst = split_edge(e)
        if src not in run.nodes and receiver_node(dst)[0] not in run.nodes:
            out.append(e)
    return out


def prune(ev: Evaluator, level: str, thresholds: Thresholds, order: str = "alternate",
          max_passes: int = 10, run: Run | None = None, replay: Iterable[dict] = (),
          on_decision: Callable[[dict], None] | None = None, ranking: list[str] | None = None,
          progress: bool = True, result: PruneResult | None = None) -> PruneResult:
    """Prune nodes or edges (level) from `run` (default: the full model) until a pass removes nothing."""
    if level not in ("nodes", "edges"):
        raise ValueError(f"prune level must be 'nodes' or 'edges', not {level!r}")
    check_order(order)
    if max_passes < 1:
        raise ValueError(f"max_passes must be at least 1, not {max_passes}")
    run = run if run is not None else ev.run()
    result = result or PruneResult(run)
    if order == "attribution" and ranking is None:
        from .attribution import attribute
        ranking = attribute(ev, run).ranking(level)  # of the circuit this phase starts from
    replay = iter(replay)
    candidates = node_candidates if level == "nodes" else edge_candidates
    key = "nodes" if level == "nodes" else "edges"
    for p in range(max_passes):
        seq = pass_order(order, candidates(ev, run), p, ranking)
        removed_any = False
        pending: list[str] = []  # replayed removals, applied in one forward pass before the next new decision
        bar = tqdm(seq, desc=f"{level} pass {p + 1}", unit="cand", disable=not progress, leave=False,
                   mininterval=0.5)
        for cand in bar:
            logged = next(replay, None)
            if logged is not None:
                if logged.get("candidate") != cand or logged.get("phase") != level or logged.get("pass") != p:
                    raise ResumeError(f"the decision log says {logged.get('phase')} pass {logged.get('pass')} tried "
                                      f"{logged.get('candidate')!r} where this run tries {level} pass {p} {cand!r}: "
                                      "it was written with other settings; start a new run directory")
                record = logged
                if record["removed"]:
                    pending.append(cand)
            else:
                if pending:
                    run, pending = ev.extend(run, **{key: pending}), []
                new = ev.extend(run, **{key: [cand]})
                ok = thresholds.accepts(ev, run.score, new.score)
                record = {"phase": level, "pass": p, "candidate": cand, "before": run.score,
                          "score": new.score, "faithfulness": ev.faithfulness(new.score), "removed": ok}
                if ok:
                    run = new
                if on_decision is not None:
                    on_decision(record)
            result.decisions.append(record)
            result.effects[cand] = ev.faithfulness(record["before"]) - ev.faithfulness(record["score"])
            removed_any |= bool(record["removed"])
            bar.set_postfix(kept=len(candidates(ev, run)) if level == "nodes" else None,
                            faith=f"{ev.faithfulness(run.score):.3f}", refresh=False)
        if pending:
            run = ev.extend(run, **{key: pending})
        result.passes[level] = p + 1
        if not removed_any:
            break
    result.run = run
    return result


def dangling_nodes(ev: Evaluator, run: Run, from_embed: bool = True) -> list[str]:
    """Surviving nodes with no path to the logits, or (while embed survives, unless from_embed
    is False) none from embed."""
    g = nx.DiGraph()
    alive = [n for n in ev.senders if n not in run.nodes] + ["logits"]
    g.add_nodes_from(alive)
    for e in edge_candidates(ev, run):
        src, dst = split_edge(e)
        g.add_edge(src, receiver_node(dst)[0])
    to_logits = nx.ancestors(g, "logits")
    from_embed = nx.descendants(g, "embed") if "embed" in g and from_embed else None
    return [n for n in alive[:-1]
            if n not in to_logits or (from_embed is not None and n != "embed" and n not in from_embed)]


def find_circuit(ev: Evaluator, level: str = "both", thresholds: Thresholds = Thresholds(),
                 order: str = "alternate", max_passes: int = 10, replay: Iterable[dict] = (),
                 on_decision: Callable[[dict], None] | None = None, ranking: dict | None = None,
                 progress: bool = True) -> PruneResult:
    """The default pipeline: nodes, then edges among surviving nodes, then dangling nodes."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; choose nodes, edges or both")
    replay = list(replay)
    ranking = ranking or {}
    result = PruneResult(ev.run())
    done = 0
    for phase in (("nodes", "edges") if level == "both" else (level,)):
        mine = [d for d in replay[done:] if d.get("phase") == phase]
        done += len(mine)
        prune(ev, phase, thresholds, order, max_passes, result.run, mine, on_decision,
              ranking.get(phase), progress, result)
    if level != "nodes":
        remove_dangling(ev, result, thresholds)
    return result


def remove_dangling(ev: Evaluator, result: PruneResult, thresholds: Thresholds) -> None:
    """Ablate nodes left without a path to the logits (exact: nothing downstream reads them),
    then those without a path from embed if the thresholds accept it (they still write a
    constant that can matter)."""
    dangling = dangling_nodes(ev, result.run)
    if not dangling:
        return
    to_logits = set(dangling_nodes(ev, result.run, from_embed=False))
    rest = [n for n in dangling if n not in to_logits]
    if to_logits:
        result.run = ev.extend(result.run, nodes=sorted(to_logits, key=ev.senders.index))
        result.dangling += [n for n in dangling if n in to_logits]
    if rest:
        cand = ev.extend(result.run, nodes=rest)
        if thresholds.accepts(ev, result.run.score, cand.score):
            result.run = cand
            result.dangling += rest
