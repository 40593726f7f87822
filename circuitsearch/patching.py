"""The evaluator: scores any circuit (ablated nodes, removed edges) on a task, fast.

It drives the forward engine layer by layer, so a change at layer l recomputes only layers
l..L-1 from the cached residual stream of the circuit it extends, every head can take its own
q, k and v input (path patching), and logit difference reads just two unembedding columns.
`circuitsearch.reference` checks it against a plain TransformerLens hooked forward.

This module is the facade; the rooms are in circuitsearch/evaluator: state (masks, runs, batches),
layout (ids by layer, stage costs), sources (ablation values), stacked (the stacked forward pass),
edge_sums (what removed edges take from receivers), readout_scores (logits to score) and relaxed (the
differentiable forward behind learned masks and attribution gradients).

A circuit is two masks over the graph index: ablated nodes and removed edges (the latter
dense, receiver × sender). Names are turned into indices once, where they enter.

Semantics (design.md): an ablated node's output is replaced by its ablation value (mean over
the corrupted prompts of the same template and length per position, the aligned corrupted
prompt, or zero). A removed edge
s->r makes receiver r read `resid - (live_s - ablated_s)`: the sender's ablated output in
place of its live output in the current (pruned) run.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .engine import Engine, Weights
from .evaluator.edge_sums import REFRESH, sender_diff
from .evaluator.layout import Layout
from .evaluator.readout_scores import finish
from .evaluator.relaxed import keep_tensors, relaxed_score
from .evaluator.sources import ablation_source, ordinary
from .evaluator.splices import make_splices
from .evaluator.stacked import StackedForward
from .evaluator.suffix import CausalSuffix
from .evaluator.state import (Batch, Masks, Run, Source, check_context, check_token_ids, distinct_rows, ids_of,
                               read_slots)
from .features.sites import feature_sites
from .graphs.index import index_of
from .graphs.model_graph import ModelGraph, edge_unit_name, split_edge_unit, split_unit, unit_name
from .metrics import Metric, faithfulness, get_metric, normalized
from .models import Model
from .readout import make_readout
from .tasks.base import Task
from .tasks.slots import Slots, task_slots

ABLATIONS = ("mean", "resample", "zero")
__all__ = ["ABLATIONS", "REFRESH", "Batch", "Evaluator", "Masks", "Run", "Source", "check_context",
           "check_token_ids", "distinct_rows", "read_slots"]


class Evaluator:
    """Scores circuits of `model` on `task`; every algorithm talks to the model through this.

    score(nodes, edges) ablates the given nodes and removes the given edges (names or graph
    index ids). For search, run(...) returns a cached Run and extend(run, nodes=..., edges=...)
    scores a circuit that removes a little more, recomputing only from the earliest layer the
    change touches.

    split_embed=True scores circuits of the graph whose embedding is two senders, `tok` (the token
    embedding) and `pos` (the learned position embedding), each ablated and patched on its own; only
    for models with learned positions (a ModelError otherwise).

    dictionaries (features.Dictionary: SAEs, transcoders) are spliced in at their hook points: their features
    active on the task's prompts and their errors become nodes (`r6.f12`, `r6.err`; evaluator.splices).
    """

    def __init__(self, model: Model, task: Task, ablation: str = "mean", metric: str = "logit_diff",
                 qkv: bool = True, weights: Weights | None = None, engine: Engine | None = None,
                 split_embed: bool = False, positions: str | tuple = "last", reduce: str | None = None,
                 dictionaries: Sequence = ()):
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
        self.metric: Metric = get_metric(metric)
        # the task as given (saved with runs) and as run: logprob feeds each answer after its prompt
        self.model, self.task, self.ablation = model, task, ablation
        task, self.readout = make_readout(task, self.metric, positions, reduce)
        self.run_task, self.positions, self.reduce = task, positions, self.readout.reduce
        self.engine = engine or Engine(model, weights)
        self.w = self.engine.w
        self.L, self.H = model.n_layers, model.n_heads
        self.attn_only = model.attn_only
        if split_embed:
            self.engine.require_learned_positions()
        self.split_embed = bool(split_embed)
        self.dictionaries, sites = feature_sites(self.engine, task, dictionaries)
        self.graph = ModelGraph(self.L, self.H, self.attn_only, qkv, parallel=self.engine.parallel,
                                split_embed=self.split_embed, features=sites)
        self.index = index_of(self.graph)
        self.senders = self.index.senders
        self.sender_index = {s: i for i, s in enumerate(self.senders)}
        self.S = self.index.S
        self.layout = Layout.of(self.graph, self.index, self.L, self.H, self.attn_only)
        self.batched_passes = 0
        self.forward_passes = 0
        self.forward_equivalents = 0.0
        self.backward_passes = 0
        self._check_task(task)
        self.slots: Slots = task_slots(task)
        self.Q = self.slots.Q
        first, inverse = distinct_rows(task, ablation, self.readout, self.slots)
        self.engine.check(task.clean[first])  # never silently wrong: the engine reproduces the bridge here
        self.rows_inverse = inverse
        self.rows_first = first  # the task row each distinct row is (its first occurrence)
        counts = torch.bincount(inverse, minlength=len(first)).float()
        rows = Batch.of(task.clean[first], self.readout.rows(first), counts)
        self._slot_rows = self.slots.rows(first)  # [B, P] slot of each distinct row's positions
        self.read_slots = read_slots(self._slot_rows, rows, self.Q)  # CPU bookkeeping, as the masks
        self.batch = rows.to(self.engine.device)
        self.forward = StackedForward(self.engine, self.index, self.layout, self.metric, self.H, self.Q,
                                      self._slot_rows, self.batch)
        self.causal_suffix = True  # evaluator.suffix on (False: every pass over the whole prompt; tests, benchmarks)
        self._suffix = CausalSuffix(self.forward, rows)
        self.forward.splices = make_splices(self.dictionaries, self.index, self.engine)
        self._units: list | None = None
        everything = Batch.of(task.corrupted, self.readout, torch.ones(len(task))).to(self.engine.device)
        with torch.inference_mode():
            empty = self._empty_masks()
            self._embed_clean = self._embed_live(self.batch.tokens)
            corrupt = self._forward(None, -1, empty, self._embed_live(task.corrupted), source=None, batch=everything)
            self.source = self.forward.source = ablation_source(corrupt, first, ablation, task, self.forward.splices)
            self.clean_run = self._forward(None, -1, empty, self._embed_clean)
            self._baselines(corrupt, everything, inverse)

    def _baselines(self, corrupt: Run, everything: Batch, inverse: torch.Tensor) -> None:
        """full, corrupted and empty scores; a metric that compares with the full model (kl, l2) first
        gets the clean run's outputs as its reference."""
        if not self.metric.two_columns:
            logits = self.clean_run.logits.float()
            self.batch.ref = logits if self.metric.reference == "logits" else torch.log_softmax(logits, -1)
            everything.ref = self.batch.ref[inverse]
        self._finish(self.clean_run, self.batch)
        self._finish(corrupt, everything)
        self.full = self.clean_run.score
        self.corrupted = corrupt.score
        self.empty = self.score(nodes=self.senders)

    def _embed_live(self, tokens: torch.Tensor):
        """The live embedding of `tokens` as the forward pass takes it: [B, P, d], or in a split-embed
        graph the list [tok, pos] of its parts."""
        return list(self.engine.embed_parts(tokens)) if self.split_embed else self.engine.embed(tokens)

    def _check_task(self, task: Task) -> None:
        """The prompts within the context, token ids inside the model's vocabularies; prompts of mixed
        lengths only on a causal model (padding is exact only there)."""
        eng = self.engine
        check_context(task, eng.n_ctx)
        if task.mixed and not eng.w.causal:
            raise ValueError(f"task {task.name!r} has prompts of {len(set(task.lengths.tolist()))} different token "
                             f"lengths, but model {self.model.name!r} attends bidirectionally, so the padding of the "
                             "shorter prompts would change their computation; split the task by length (one task "
                             "per template) for this model")
        check_token_ids(task, self.readout, eng.d_vocab_in, eng.d_vocab_out)


    # ------------------------------------------------------------------ public API

    def score(self, nodes: Iterable = (), edges: Iterable = (), at: Iterable = (), edges_at: Iterable = ()) -> float:
        """Metric with `nodes` ablated, `edges` removed, nodes ablated at slots (`at`) and edges removed at
        slots (`edges_at`); everything else live."""
        return self.run(nodes, edges, at, edges_at).score

    def run(self, nodes: Iterable = (), edges: Iterable = (), at: Iterable = (), edges_at: Iterable = ()) -> Run:
        """A cached run of the full model with `nodes` ablated, `edges` removed, units `at` ablated and
        edge units `edges_at` removed."""
        return self.extend(self.clean_run, nodes, edges, at, edges_at)

    def extend(self, run: Run, nodes: Iterable = (), edges: Iterable = (), at: Iterable = (),
               edges_at: Iterable = ()) -> Run:
        """The run of `run`'s circuit with `nodes` also ablated, `edges` also removed, the nodes of `at`
        also ablated at single slots and the edges of `edges_at` also removed at single slots.

        Nodes and edges are names or graph index ids (lists or 1-d tensors); `at` holds unit names
        (`a9.1@end`, `m3@5`) or unit ids (node id * Q + slot, see `unit`), `edges_at` edge unit names
        (`a4.4@S1->a9.1.k@S1`) or ids (edge id * Q + slot, see `edge_unit`).
        """
        return self.extend_many(run, [(nodes, edges, at, edges_at)])[0]

    def extend_many(self, run: Run, variants: Iterable) -> list:
        """extend(run, nodes, edges[, at[, edges_at]]) for each such tuple in `variants`, as one forward pass
        over all of them stacked along the batch (from the earliest layer any of them touches). Each run
        is what extend would return (a variant that removes nothing returns `run` itself)."""
        changes = [self._change(run, *v) for v in variants]
        todo = [i for i, c in enumerate(changes) if c is not None]
        out = [run] * len(changes)
        if todo:
            start = min(changes[i][1] for i in todo)
            with torch.inference_mode():
                runs = self._forward_many(run, start, [changes[i][0] for i in todo], self._embed_clean)
            for i, r in zip(todo, runs):
                out[i] = r
        return out

    def _change(self, run: Run, nodes: Iterable, edges: Iterable, at: Iterable = (),
                edges_at: Iterable = ()) -> tuple | None:
        """(masks of `run`'s circuit with `nodes`, `edges`, units `at` and edge units `edges_at` also removed,
        the earliest stage that changes), or None when they remove nothing new. A node ablated at every
        slot becomes ablated, an edge removed at every slot removed (the same things)."""
        ix, Q = self.index, self.Q
        n = ids_of(nodes, ix.node)
        e = ids_of(edges, ix.edge)
        u = ids_of(at, self.unit)
        eu = ids_of(edges_at, self.edge_unit)
        if len(eu):
            ee, eq = eu // Q, eu % Q
            er, es = ix.edge_recv[ee], ix.edge_src[ee]
            new = ~run.masks.removed[er, es]
            if run.masks.removed_at is not None:
                new &= ~run.masks.removed_at[er, es, eq]
            ee, eq, er, es = ee[new], eq[new], er[new], es[new]
        if len(n):
            if bool((n == ix.logits).any()):
                raise ValueError("the logits node cannot be ablated; remove its incoming edges instead")
            n = n[~run.masks.ablated[n]]
        if len(e):
            e = e[~run.masks.removed[ix.edge_recv[e], ix.edge_src[e]]]
        if len(u):
            un, uq = u // Q, u % Q
            new = ~run.masks.ablated[un] & ~run.masks.at[un, uq]
            un, uq = un[new], uq[new]
        if not len(n) and not len(e) and not (len(u) and len(un)) and not (len(eu) and len(ee)):
            return None
        masks = run.masks.copy()
        start = 3 * self.L
        if len(n):
            masks.ablated[n] = True
            start = min(start, int(self.layout.node_stage[n].min()))
        if len(e):
            masks.removed[ix.edge_recv[e], ix.edge_src[e]] = True
            start = min(start, int(self.layout.edge_stage[e].min()))
        if len(u) and len(un):
            masks.at[un, uq] = True
            whole = un[masks.at[un].all(1)]
            masks.ablated[whole] = True
            start = min(start, int(self.layout.node_stage[un].min()))
        if len(eu) and len(ee):
            if masks.removed_at is None:
                masks.removed_at = torch.zeros(ix.R, self.S, Q, dtype=torch.bool)
            masks.removed_at[er, es, eq] = True
            whole = masks.removed_at[er, es].all(1)
            masks.removed[er[whole], es[whole]] = True
            start = min(start, int(self.layout.edge_stage[ee].min()))
        return masks, start

    # ------------------------------------------------------------------ units: a node at one slot

    @property
    def unit_names(self) -> list:
        """Names of every (sender, slot) unit, by unit id = sender id * Q + slot: `a9.1@end`, `m3@5`."""
        if self._units is None:
            self._units = [unit_name(s, q) for s in self.senders for q in self.slots.names]
            self._unit_id = {u: i for i, u in enumerate(self._units)}
        return self._units

    def edge_unit_name(self, u: int) -> str:
        """`a4.4@S1->a9.1.k@S1` of edge unit id u = edge id * Q + slot."""
        return edge_unit_name(self.index.edges[u // self.Q], self.slots.names[u % self.Q])

    def edge_unit(self, name: str | int) -> int:
        """Edge unit id of `sender@slot->receiver@slot` (both ends at the same slot)."""
        if isinstance(name, int):
            if not 0 <= name < self.index.E * self.Q:
                raise ValueError(f"edge unit id {name} is outside 0..{self.index.E * self.Q - 1}")
            return name
        edge, slot = split_edge_unit(name)
        return self.index.edge(edge) * self.Q + self.slots.index(slot)

    def unit(self, name: str | int) -> int:
        """Unit id of `node@slot` (a ValueError naming the problem for an unknown node or slot)."""
        if isinstance(name, int):
            if not 0 <= name < self.S * self.Q:
                raise ValueError(f"unit id {name} is outside 0..{self.S * self.Q - 1}")
            return name
        self.unit_names
        i = self._unit_id.get(name)
        if i is None:  # not a unit of this evaluator: say why
            node, slot = split_unit(name)
            n = self.index.node(node)
            if n == self.index.logits:
                raise ValueError("the logits node cannot be ablated; remove its incoming edges instead")
            i = n * self.Q + self.slots.index(slot)
        return i

    def rescore(self, run: Run) -> float:
        """`run`'s circuit scored afresh from the full model (no state shared with `run`)."""
        return self.extend(self.clean_run, run.masks.ablated.nonzero()[:, 0],
                           run.removed_edges().nonzero()[:, 0], sorted(run.units), sorted(run.edge_units)).score

    def circuit_masks(self, circuit) -> tuple[torch.Tensor, torch.Tensor]:
        """(ablated node ids, removed edge ids) that make this evaluator score a saved `circuit`
        as its run did."""
        if self.graph.signature() != circuit.graph:
            mine, theirs = self.graph.signature(), dict(circuit.graph)
            if mine.pop("features", None) != theirs.pop("features", None) and mine == theirs:
                raise ValueError("the circuit's feature graph is not this evaluator's: its dictionaries (by digest) or "
                                 "their features active on its prompts differ, and a feature circuit is scored on the "
                                 "prompts it was found on with the dictionaries it was found with")
            raise ValueError(f"the circuit is over graph {circuit.graph}, the model's graph is {self.graph.signature()}")
        m = self.index.masks_of(circuit.nodes, None if circuit.node_level else circuit.edges)
        return m.ablated[: self.S].nonzero()[:, 0], m.removed.nonzero()[:, 0]

    def circuit_units(self, circuit) -> tuple[list[str], list[str]]:
        """(nodes ablated at slots, edges removed at slots) of a saved position-level `circuit`: every slot
        its `positions` record does not keep a node or edge at. The circuit's slots must be this task's."""
        pos = getattr(circuit, "positions", None) or {}
        if not pos:
            return [], []
        slots = list(pos.get("slots", []))
        if slots != list(self.slots.names):
            raise ValueError(f"the circuit's positions are slots {', '.join(slots)}, but this task's slots are "
                             f"{', '.join(self.slots.names)}: a position-level circuit scores only on prompts laid "
                             "out like its own (compare it at node level instead, e.g. with diff)")
        at = [unit_name(n, q) for n, kept in pos.get("nodes", {}).items() for q in slots
              if q not in kept and n != "logits"]  # logits: listed where the metric reads them
        edges_at = [edge_unit_name(e, q) for e, kept in pos.get("edges", {}).items() for q in slots if q not in kept]
        return at, edges_at

    def circuit_run(self, circuit) -> Run:
        """The run of a saved `circuit` (node level, edge level, or at positions) as its search left it."""
        nodes, edges = self.circuit_masks(circuit)
        at, edges_at = self.circuit_units(circuit)
        return self.run(nodes, edges, at, edges_at)

    def circuit_state(self, circuit) -> tuple[list[str], list[str]]:
        """circuit_masks as names: (ablated nodes, removed edges)."""
        nodes, edges = self.circuit_masks(circuit)
        return self.index.names(nodes, "nodes"), self.index.names(edges, "edges")

    def score_circuit(self, circuit) -> dict:
        """full, circuit, empty, corrupted, faithfulness and normalized of a saved `circuit` on this task."""
        return self.scores(self.circuit_run(circuit).score)

    def faithfulness(self, score: float) -> float:
        return faithfulness(self.metric, score, self.full, self.empty)

    def normalized(self, score: float) -> float:
        return normalized(self.metric, score, self.full, self.empty)

    def scores(self, score: float) -> dict:
        """The design's score record for a circuit scoring `score`."""
        return {"full": self.full, "circuit": score, "empty": self.empty, "corrupted": self.corrupted,
                "faithfulness": self.faithfulness(score), "normalized": self.normalized(score)}

    def stats(self) -> dict:
        out = {"forward_passes": self.forward_passes, "forward_equivalents": round(self.forward_equivalents, 3)}
        if self.backward_passes:
            out["backward_passes"] = self.backward_passes
        if self.batched_passes:
            out["batched_passes"] = self.batched_passes
        return out

    def stage_of(self, name: str) -> int:
        """Where a node or edge first changes the forward pass (see graphs.index)."""
        if "->" in name:
            return self.index.edge_stage[self.index.edge(name)]
        return self.index.node_stage[self.index.node(name)]


    def receiver_gradients(self, run: Run | None = None, alpha: float | Sequence[float] = 1.0) -> dict:
        """Gradient of the score with respect to every receiver's input, in `run`'s circuit.

        Every live sender's output is mixed `alpha` of the way from its ablation value to its
        live value (alpha = 1: the circuit itself; alpha = 0: everything ablated), which is
        the path integrated gradients walk: the relaxed forward (evaluator.relaxed) with the
        circuit's keep masks scaled by alpha, one forward and one backward pass. Several alphas:
        the sum of their gradients, from one pass over the prompt rows stacked once per alpha.
        Returns {"attn": [L] x [B, P, 3, H, d], "mlp": [L] x [B, P, d], "logits": [B, d], "hooks": per feature
        site [B, P, d] (the gradient at what the spliced site writes)} for the distinct prompt rows, each row's
        gradient weighted by its share of the task ("logits": [B, P, d] when the metric reads other positions
        than the last of full-length prompts).
        """
        if not self.metric.gradient:
            raise ValueError(f"{self.metric.name} has no gradient: attribute with logit_diff, prob or kl instead")
        alphas = [float(alpha)] if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
        if not alphas:
            raise ValueError("receiver_gradients needs at least one alpha")
        nodes, edges, edges_at = keep_tensors(self, run)
        K, inputs = len(alphas), {}
        with torch.enable_grad():
            # the masks require grad so that every receiver input is in the graph, even with all ablated
            if K == 1:  # (nodes a dictionary decomposes stay whole: their features are what alpha scales)
                scale = torch.where(self.index.decomposed[: self.S, None], 1.0, alphas[0])
                score = relaxed_score(self, (nodes * scale).requires_grad_(), edges, edges_at, inputs)
            else:
                score = relaxed_score(self, nodes.requires_grad_(), edges, edges_at, inputs, torch.tensor(alphas))
            flat = inputs["attn"] + [t for t in inputs["mlp"] if t is not None] + [inputs["logits"]] + inputs["hooks"]
            grads = torch.autograd.grad(score, flat, allow_unused=True, materialize_grads=True)
        if K > 1:  # copy k's rows are the k-th block of B: the sum over copies
            grads = [g.unflatten(0, (K, -1)).sum(0) for g in grads]
        self.count_relaxed(copies=K)
        L, J = self.L, len(inputs["hooks"])
        g_attn, rest = list(grads[:L]), list(grads[L:len(grads) - J])
        g_mlp = [None] * L if self.attn_only else rest[:L]
        return {"attn": g_attn, "mlp": g_mlp, "logits": rest[-1], "hooks": list(grads[len(grads) - J:])}

    def count_relaxed(self, backward: bool = True, copies: int = 1) -> None:
        """Count one relaxed forward (evaluator.relaxed) and its backward in the stats: a backward costs
        about two forwards (a gradient for every activation and weight product), so 3 forward-equivalents;
        a pass over the rows stacked `copies` times counts as that many (and as one batched pass)."""
        self.forward_passes += copies
        self.forward_equivalents += copies * (3.0 if backward else 1.0)
        self.backward_passes += copies * int(backward)
        self.batched_passes += copies > 1

    def sender_diffs(self, run: Run) -> torch.Tensor:
        """live − ablated output of every ordinary sender (embedding, heads, MLPs: those edges leave) in `run`,
        stacked [B, P, S0, d]."""
        return torch.stack([sender_diff(self.forward, run, s) for s in range(self.index.S0)], 2)

    @property
    def splices(self) -> list:
        """The dictionaries spliced in (evaluator.splices; empty without features, and on the hooked path)."""
        fw = getattr(self, "forward", None)
        return fw.splices if fw is not None else []

    def _grad_source(self) -> Source:
        """The ablation source as ordinary tensors (the cached ones are inference tensors)."""
        if getattr(self, "_grad_src", None) is None:
            self._grad_src = ordinary(self.source)
        return self._grad_src

    # ------------------------------------------------------------------ forward (evaluator.stacked)

    def _empty_masks(self) -> Masks:
        ix = self.index
        return Masks(torch.zeros(ix.N, dtype=torch.bool), torch.zeros(ix.R, ix.S, dtype=torch.bool),
                     torch.zeros(ix.N, self.Q, dtype=torch.bool))

    def _forward(self, base: Run | None, start: int, masks: Masks, embed_live: torch.Tensor,
                 source: Source | None = "self", count: bool = True, batch: Batch | None = None) -> Run:
        """Recompute `base`'s circuit with new masks from stage `start` on (see graphs.index)."""
        return self._forward_many(base, start, [masks], embed_live, source, count, batch)[0]

    def _forward_many(self, base: Run | None, start: int, masks: list, embed_live: torch.Tensor,
                      source: Source | None = "self", count: bool = True, batch: Batch | None = None) -> list:
        """K circuits (one per Masks) that each change `base` from stage `start` on, in one forward pass over
        their rows stacked along the batch (StackedForward.run_many; from their change's first position on where
        evaluator.suffix allows), counted in the stats."""
        src, on = self.source if source == "self" else source, self.causal_suffix
        runs, part, fills = self._suffix.run_many(base, start, masks, embed_live, src, batch or self.batch, on)
        if count:  # a suffix pass costs the share of positions it recomputes; a fill is one whole forward
            K = len(masks)
            self.forward_passes += K + fills
            self.forward_equivalents += K * self.layout.cost(start if base is not None else -1) * part + fills
            self.batched_passes += K > 1
        return runs

    def _finish(self, run: Run, batch: Batch) -> None:
        """The metric per distinct row, and the score: its mean over all the task's rows."""
        finish(self.metric, run, batch)
