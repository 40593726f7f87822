"""The one search interface: thresholds, decisions, results and the phase driver every search uses.

A search removes nodes, then edges among the surviving nodes, then nodes left dangling, and
re-scores the final circuit from scratch. What differs between searches (iterative pruning,
the target search) is only how one phase picks its removals; `run_phases` drives the rest.
Every scored removal is a `Decision`; a search given the decisions of an earlier, interrupted
session replays them (applies their outcome without scoring) and ends in the same circuit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import networkx as nx

from ..graphs.model_graph import edgeless_hooks, edgeless_message
from ..metrics import score_problem
from ..patching import Evaluator, Run
from .levels import EDGE_POSITIONS as EDGE_POSITIONS_PHASE, LEVEL_CHOICES as LEVELS, phases  # noqa: F401


class ResumeError(RuntimeError):
    """The decision log does not belong to this run (other settings or another model)."""


class TaskScoreError(ValueError):
    """The model fails the task, so faithfulness would mean nothing (see check_scores)."""


def check_scores(ev: Evaluator) -> None:
    """Refuse, before any search, a task on which faithfulness means nothing (metrics.score_problem): the
    message names the scores and the fixes."""
    why = score_problem(ev.metric, ev.full, ev.empty)
    if why is None:
        return
    meta = getattr(ev.task, "meta", {}) or {}
    answered = (f" The model answers {meta['n_correct']} of its {len(ev.task)} prompts correctly (top-1)."
                if "n_correct" in meta and "n_kept" not in meta else "")
    raise TaskScoreError(f"task {ev.task.name!r}: {why}.{answered} Check the answers (the answer is the token the "
                         "model should predict, the wrong answer its contrast), choose another --metric, or drop "
                         "the prompts the model fails (a built-in task keeps only answered prompts unless "
                         "--keep-all; another template may suit the model better)")


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

    def describe(self) -> str:
        """Plain text for reports: 'absolute 0.8, relative off (on faithfulness)'."""
        f = lambda v: "off" if v is None else f"{v:g}"
        return f"absolute {f(self.absolute)}, relative {f(self.relative)} (on {self.on})"

    def to_json(self) -> dict:
        return {"absolute": self.absolute, "relative": self.relative, "on": self.on}


@dataclass(frozen=True)
class Decision:
    """One scored removal: in `phase`, pass `pass_`, removing `candidate` (with `chunk` - 1 more after
    it in the search's order, when a chunk was tried at once) took the score from `before` to `score`;
    `removed` says whether the removal was kept. `target` names the target a target search worked for."""

    phase: str
    pass_: int | str
    candidate: str
    before: float
    score: float
    faithfulness: float
    removed: bool
    chunk: int | None = None
    target: float | None = None

    def key(self) -> tuple:
        """What a replayed decision must match: where it was made and what it tried."""
        return (self.phase, self.pass_, self.candidate, self.chunk, self.target)

    def to_json(self) -> dict:
        out = {"phase": self.phase, "pass": self.pass_, "candidate": self.candidate, "before": self.before,
               "score": self.score, "faithfulness": self.faithfulness, "removed": self.removed}
        if self.chunk is not None:
            out["chunk"] = self.chunk
        if self.target is not None:
            out["target"] = self.target
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Decision":
        """A decision from its JSON form; KeyError or TypeError for a line that is not one."""
        return cls(d["phase"], d["pass"], d["candidate"], d["before"], d["score"], d["faithfulness"],
                   bool(d["removed"]), d.get("chunk"), d.get("target"))


class Replay:
    """The decisions of an earlier session, handed out in order to the search that made them.

    A logged decision that is not what the search tries at that step raises ResumeError, unless
    `on_mismatch(position, logged, tried)` is given: it may raise, or return to drop that decision
    and all after it (a damaged log), so the search scores from there. `first` is the position of
    the first decision in the whole log (for messages).
    """

    def __init__(self, decisions: Iterable = (), on_mismatch: Callable | None = None, first: int = 0):
        self._items = [d if isinstance(d, Decision) else Decision.from_json(d) for d in decisions]
        self._next = 0
        self.on_mismatch, self.first = on_mismatch, first
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items) - self._next

    def take(self, phase: str, pass_, candidate: str, chunk: int | None = None,
             target: float | None = None) -> Decision | None:
        """The logged decision for this step, or None once the log is used up."""
        if self._next >= len(self._items):
            return None
        d = self._items[self._next]
        tried = (phase, pass_, candidate, chunk, target)
        if d.key() != tried:
            if self.on_mismatch is None:
                raise ResumeError(f"the decision log says {d.phase} pass {d.pass_} tried {d.candidate!r} where this "
                                  f"run tries {phase} pass {pass_} {candidate!r}: it was written with other settings; "
                                  "start a new run directory")
            self.on_mismatch(self.first + self._next, d, tried)
            self.dropped = len(self._items) - self._next
            del self._items[self._next:]
            return None
        self._next += 1
        return d


@dataclass
class PruneResult:
    """The pruned circuit as what it removes, with its cached run and the decisions made."""

    run: Run
    decisions: list = field(default_factory=list)
    passes: dict = field(default_factory=dict)        # phase -> passes run
    effects: dict = field(default_factory=dict)       # candidate -> faithfulness drop when last tried (measured)
    estimates: dict = field(default_factory=dict)     # candidate -> attribution estimate of that drop (never scored alone)
    dangling: list = field(default_factory=list)      # nodes removed for lack of a path
    final: float | None = None                        # the circuit re-scored from scratch
    skipped: int = 0                                  # tries answered by an earlier try on the same circuit
    speculation: dict = field(default_factory=dict)   # phase -> rows scored, batched blocks, rows wasted
    masks: dict = field(default_factory=dict)         # learned masks: phase -> what optimisation and repair did
    mask_logits: dict = field(default_factory=dict)   # learned masks: phase -> unit name -> final logit

    @property
    def ablated(self) -> frozenset:
        return self.run.nodes

    @property
    def removed_edges(self) -> frozenset:
        return self.run.edges


Phase = Callable[[str, PruneResult], None]


def check_feature_level(ev: Evaluator, steps) -> None:
    """Edges out of features exist for dictionaries that decompose a node (an SAE at mlp_out.L or attn_out.L, a
    transcoder): their features send where the node sent. One on the residual stream or an MLP's input would need
    the stream cut at its hook (not built), so with one an edge phase is refused, never run half."""
    flat = edgeless_hooks(s.writes for s in ev.index.sites)
    if flat and any(p in ("edges", EDGE_POSITIONS_PHASE) for p in steps):
        raise ValueError(edgeless_message(flat, ",".join(steps)))


def run_phases(ev: Evaluator, level: str, phase: Phase, dangling: Thresholds | None,
               start: Run | None = None) -> PruneResult:
    """Nodes, then nodes at single slots (positions), then edges among the surviving nodes, as the level
    says, each by `phase`; then the nodes left dangling (after an edge phase, by `dangling`); then a
    fresh re-score (result.final)."""
    steps = phases(level)
    check_feature_level(ev, steps)
    check_scores(ev)
    result = PruneResult(start if start is not None else ev.run())
    for p in steps:
        phase(p, result)
    if "edges" in steps and dangling is not None:
        remove_dangling(ev, result, dangling)
    result.final = ev.rescore(result.run)
    return result


def dangling_nodes(ev: Evaluator, run: Run, from_embed: bool = True) -> list[str]:
    """Surviving nodes with no path to the logits, or (while the embedding survives, unless from_embed
    is False) none from it (from `embed`, or from `tok` or `pos` in a split-embed graph)."""
    ix = ev.index
    g = nx.DiGraph()
    alive = ix.names(run.present_nodes().nonzero()[:, 0], "nodes") + ["logits"]
    g.add_nodes_from(alive)
    present = run.present_edges()
    g.add_edges_from(zip(ix.names(ix.edge_src[present], "nodes"), ix.names(ix.edge_dst_node[present], "nodes")))
    for site in ix.sites:  # a decomposed node reaches on through its features and error (they are its output)
        g.add_edges_from((p, f) for p in site.parents(ev.H) for f in site.nodes if p in g and f in g)
    to_logits = nx.ancestors(g, "logits")
    inputs = [n for n in ev.graph.embed_nodes if n in g]
    from_embed = set().union(*(nx.descendants(g, n) for n in inputs)) if inputs and from_embed else None
    kept = set(ix.names(ix.decomposed.nonzero()[:, 0], "nodes"))  # a decomposed node goes only with its features
    return [n for n in alive[:-1] if n not in kept and
            (n not in to_logits or (from_embed is not None and n not in inputs and n not in from_embed))]


def remove_dangling(ev: Evaluator, result: PruneResult, thresholds: Thresholds) -> None:
    """Ablate nodes left without a path to the logits (exact: nothing downstream reads them),
    then those without a path from the embedding if the thresholds accept it (they still write a
    constant that can matter)."""
    dangling = dangling_nodes(ev, result.run)
    if not dangling:
        return
    to_logits = set(dangling_nodes(ev, result.run, from_embed=False))
    rest = [n for n in dangling if n not in to_logits]
    if to_logits:
        result.run = ev.extend(result.run, nodes=sorted(to_logits, key=ev.index.node_id.get))
        result.dangling += [n for n in dangling if n in to_logits]
    if rest:
        cand = ev.extend(result.run, nodes=rest)
        if thresholds.accepts(ev, result.run.score, cand.score):
            result.run = cand
            result.dangling += rest
