"""Learned masks: optimise a continuous keep-mask per unit, then verify, repair and polish it exactly.

For each phase of the level (nodes, positions, edges, edge-positions) the units still in the circuit
get a logit θ; the relaxed forward (circuitsearch.relaxed, the evaluator's own semantics) scores the
circuit with m = sigmoid(θ / temperature) and Adam minimises

    Σ m / n  +  μ · relu(A* − F(m))          (F: faithfulness, A* = A + margin)

while μ, a Lagrange multiplier, rises as long as F stays below A* (dual ascent on log μ): the sparsity
term shrinks the circuit, the constraint holds it at the threshold, and nobody guesses a sparsity
weight. Then the circuit is made exact: units with θ <= 0 are removed in one scored step; if that
misses A, the longest prefix of the mask order (least needed first) that holds A is found by
bisection (the units after it come back); then an ordinary iterative pass in mask order removes what
A and R still allow. Every scored step is a Decision, so the circuit written always verifies and a
killed run replays its log; the optimiser state is checkpointed (`store`) and resumes bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..patching import Evaluator, Run
from ..evaluator.relaxed import faithfulness_map, keep_tensors, relaxed_score
from .iterative import prune
from .levels import EDGE_POSITIONS, level_of
from .mask_settings import MASKS_REFUSED, MaskSettings
from .orders import Listed
from .search import Decision, PruneResult, Replay, Thresholds, check_scores, run_phases
from .speculation import MAX_K
from .target import _Scorer, bisect_remove


def relaxed_inputs(ev: Evaluator, phase: str, base: tuple, ids: torch.Tensor, m: torch.Tensor) -> tuple:
    """The keep masks (nodes [S, Q], edges [R, S], edges at slots [R, S, Q]) of the circuit `base` with the
    phase's units `ids` kept by m instead (differentiable in m)."""
    nodes, edges, at = base
    ix = ev.index
    if phase == "nodes":
        nodes = nodes.index_put((ids,), nodes[ids] * m[:, None])
    elif phase == "positions":
        nodes = nodes.flatten().index_put((ids,), m).view_as(nodes)
    elif phase == "edges":
        edges = edges.index_put((ix.edge_recv[ids], ix.edge_src[ids]), m)
    elif phase == EDGE_POSITIONS:
        Q = ev.Q
        e, q = ids // Q, ids % Q
        at = torch.ones(ix.R, ev.S, Q) if at is None else at
        at = at.index_put((ix.edge_recv[e], ix.edge_src[e], q), m)
    else:
        raise ValueError(f"unknown phase {phase!r}")
    return nodes, edges, at


def objective(ev: Evaluator, phase: str, base: tuple, ids: torch.Tensor, theta: torch.Tensor, log_mu: float,
              settings: MaskSettings, target: float, fmap: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, m, F): the Lagrangian at logits `theta`, the masks and the relaxed circuit's faithfulness."""
    m = torch.sigmoid(theta / settings.temperature)
    score = relaxed_score(ev, *relaxed_inputs(ev, phase, base, ids, m))
    F = fmap[0] + fmap[1] * score
    loss = m.sum() / len(m) + math.exp(log_mu) * torch.relu(target - F)
    return loss, m, F


@dataclass
class MaskState:
    """One phase's optimisation as checkpointed: the units, their logits, Adam's state, log μ, the steps done
    and a short history (one row per checkpoint: step, loss, expected kept units, relaxed faithfulness)."""

    phase: str
    ids: list
    theta: torch.Tensor
    adam: dict | None
    log_mu: float
    step: int
    history: list

    def to_dict(self) -> dict:
        return {"phase": self.phase, "ids": self.ids, "theta": self.theta.detach().clone(), "adam": self.adam,
                "log_mu": self.log_mu, "step": self.step, "history": self.history}

    @classmethod
    def from_dict(cls, d: dict) -> "MaskState":
        return cls(d["phase"], list(d["ids"]), d["theta"].clone(), d["adam"], float(d["log_mu"]), int(d["step"]),
                   list(d["history"]))


def optimise(ev: Evaluator, run: Run, phase: str, settings: MaskSettings, absolute: float, store=None,
             progress: bool = True) -> MaskState | None:
    """The optimised mask logits of `run`'s units in `phase` (None: no units). `store` (runs.store.MaskFile
    or anything with load(phase) and save(phase, dict)) resumes a saved state and checkpoints every
    settings.checkpoint_every steps."""
    table = level_of(ev, phase)
    ids = table.present(run)
    if not ids:
        return None
    saved = store.load(phase) if store is not None else None
    state = MaskState.from_dict(saved) if saved is not None and list(saved["ids"]) == ids else \
        MaskState(phase, ids, torch.full((len(ids),), float(settings.init)), None, math.log(settings.mu0), 0, [])
    if state.step >= settings.steps:
        return state
    ids_t = torch.tensor(ids, dtype=torch.long)
    base = keep_tensors(ev, run)
    fmap = faithfulness_map(ev)
    target = absolute + settings.margin
    theta = state.theta.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=settings.lr, betas=(0.9, 0.9))
    if state.adam is not None:
        opt.load_state_dict(state.adam)
    bar = tqdm(total=settings.steps, initial=state.step, desc=f"masks {phase}", unit="step", disable=not progress,
               leave=False, mininterval=0.5)
    log_mu = state.log_mu
    for step in range(state.step, settings.steps):
        with torch.enable_grad():
            loss, m, F = objective(ev, phase, base, ids_t, theta, log_mu, settings, target, fmap)
            opt.zero_grad()
            loss.backward()
        ev.count_relaxed()
        opt.step()
        f = float(F.detach())
        log_mu = min(max(log_mu + settings.dual_lr * (target - f), 0.0), 9.0)
        kept = float(m.detach().sum())
        bar.update()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", kept=f"{kept:.1f}", faith=f"{f:.3f}", refresh=False)
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == settings.steps:
            state = MaskState(phase, ids, theta.detach().clone(), opt.state_dict(), log_mu, done,
                              state.history + [{"step": done, "loss": float(loss.detach()), "kept": kept,
                                                "faithfulness": f, "mu": math.exp(log_mu)}])
            if store is not None:
                store.save(phase, state.to_dict())
    bar.close()
    return state


def mask_order(state: MaskState) -> list[int]:
    """The phase's unit ids, least needed first (lowest logit; ties in forward order)."""
    theta = state.theta.tolist()
    return [state.ids[i] for i in sorted(range(len(theta)), key=lambda i: theta[i])]


def check_masks(ev: Evaluator, thresholds: Thresholds) -> None:
    """Refuse what learned masks cannot do, naming the fix."""
    if getattr(ev, "path", "fast") == "hooked":
        raise ValueError(MASKS_REFUSED)
    if not ev.metric.gradient:
        raise ValueError(f"learned masks optimise through gradients, and the {ev.metric.name} metric has none: "
                         "use logit_diff, prob, kl, l2 or logprob, or iterative pruning")
    if thresholds.absolute is None or thresholds.on != "faithfulness":
        raise ValueError("learned masks aim at the absolute threshold on faithfulness: give --absolute (e.g. 0.8), "
                         "with thresholds on faithfulness")


def find_circuit_masks(ev: Evaluator, level: str = "both", thresholds: Thresholds = Thresholds(),
                       settings: MaskSettings = MaskSettings(), max_passes: int = 10, replay: Iterable = (),
                       on_decision: Callable[[Decision], None] | None = None, store=None, progress: bool = True,
                       batch: int = MAX_K) -> PruneResult:
    """The learned-mask search over `level`'s phases (module docstring); result.masks says per phase what the
    optimisation reached and what verification did, result.mask_logits holds the logits by unit name."""
    check_masks(ev, thresholds)
    check_scores(ev)
    replay = replay if isinstance(replay, Replay) else Replay(replay)
    A = thresholds.absolute
    masks: dict = {}
    logits: dict = {}

    def phase(p: str, result: PruneResult) -> None:
        run = result.run
        state = optimise(ev, run, p, settings, A, store, progress)
        if state is None:
            return
        table = level_of(ev, p)
        order = mask_order(state)
        cut = order[: int((state.theta <= 0).sum())]  # the units the masks drop (logit <= 0), in mask order
        scorer = _Scorer(ev, p, A, replay, on_decision, result)
        repaired = 0
        if cut:
            ok, cand, _ = scorer.try_remove(run, cut, "masks", 0)
            if ok:
                run = cand if cand is not None else table.extend(ev, run, cut)
            else:
                run, info = bisect_remove(ev, run, cut[:-1], p, A, scorer, pass_name="repair")
                repaired = len(cut) - info["removed"]
        discretised = ev.faithfulness(run.score)
        result.run = run
        prune(ev, p, thresholds, Listed("masks", tuple(order), rest=True), max_passes, run, replay, on_decision,
              None, progress, result, batch)
        last = state.history[-1] if state.history else {}
        masks[p] = {"units": len(order), "steps": state.step, "expected_kept": last.get("kept"),
                    "relaxed_faithfulness": last.get("faithfulness"), "mu": last.get("mu"),
                    "discretised_removed": len(cut), "repaired": repaired,
                    "faithfulness_after_repair": discretised,
                    "polish_removed": len(table.present(run)) - len(table.present(result.run))}
        names = table.names
        logits[p] = {names[i]: round(float(t), 4) for i, t in zip(state.ids, state.theta.tolist())}

    result = run_phases(ev, level, phase, thresholds)
    result.masks, result.mask_logits = masks, logits
    return result
