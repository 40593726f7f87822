"""The evaluator: scores any circuit (ablated nodes, removed edges) on a task, fast.

It drives the forward engine layer by layer, so a change at layer l recomputes only layers
l..L-1 from the cached residual stream of the circuit it extends, every head can take its own
q, k and v input (path patching), and logit difference reads just two unembedding columns.
`circuitsearch.reference` checks it against a plain TransformerLens hooked forward.

A circuit is two masks over the graph index: ablated nodes and removed edges (the latter
dense, receiver × sender). Names are turned into indices once, where they enter.

Semantics (design.md): an ablated node's output is replaced by its ablation value (mean over
the corrupted prompts of the same template and length per position, the aligned corrupted
prompt, or zero). A removed edge
s->r makes receiver r read `resid - (live_s - ablated_s)`: the sender's ablated output in
place of its live output in the current (pruned) run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from .engine import Engine, Weights
from .graphs.index import EMBED, HEAD, GraphIndex, index_of
from .graphs.model_graph import ModelGraph, edge_unit_name, split_edge_unit, split_unit, unit_name
from .metrics import Metric, faithfulness, get_metric, normalized
from .models import Model
from .readout import Readout, make_readout
from .tasks.base import Task
from .tasks.slots import Slots, task_slots

ABLATIONS = ("mean", "resample", "zero")
REFRESH = 32  # incremental updates of a receiver group's edge sum before it is taken in full again


# --------------------------------------------------------------------------- state

@dataclass
class Masks:
    """What a circuit removes: `ablated` [N] nodes (logits never) and `removed` [R, S] edges,
    by receiver row and sender column of the graph index; `at` [N, Q] nodes ablated at single
    slots of positions (tasks.slots), on top of `ablated` (a node ablated is ablated at every slot);
    `removed_at` [R, S, Q] edges removed at single slots, on top of `removed` (None: none)."""

    ablated: torch.Tensor
    removed: torch.Tensor
    at: torch.Tensor
    removed_at: torch.Tensor | None = None

    def copy(self) -> "Masks":
        return Masks(self.ablated.clone(), self.removed.clone(), self.at.clone(),
                     None if self.removed_at is None else self.removed_at.clone())


@dataclass
class Run:
    """One forward pass of a circuit, cached layer by layer so that extensions start midway."""

    index: GraphIndex
    masks: Masks
    embed: torch.Tensor       # [B, P, d] embed output (after ablation)
    resid_pre: list           # [L] input of each layer
    z: list                   # [L] head outputs before W_O, after ablation [B, P, H, dh]
    resid_mid: list           # [L] after attention
    mlp_out: list             # [L] after ablation
    final: torch.Tensor | None = None       # [B, P, d] residual after the last layer
    score: float = float("nan")
    per_prompt: torch.Tensor | None = None  # metric per prompt
    logits: torch.Tensor | None = None      # readout logits ([B, 2] or [B, vocab]; [B, T, ...] at T positions)
    diffs: dict = field(default_factory=dict)  # sender index -> live - ablated output
    sums: dict = field(default_factory=dict)   # receiver group -> (rows, Σ over removed senders, updates since full)
    parts: list | None = None  # split-embed graph: [tok, pos] outputs after ablation (embed is their sum)
    _names: dict = field(default_factory=dict, repr=False)

    @property
    def nodes(self) -> frozenset:
        """Names of the ablated nodes."""
        if "nodes" not in self._names:
            self._names["nodes"] = frozenset(self.index.names(self.masks.ablated.nonzero()[:, 0], "nodes"))
        return self._names["nodes"]

    @property
    def edges(self) -> frozenset:
        """Names of the removed edges (every edge ever removed, also those of nodes ablated since)."""
        if "edges" not in self._names:
            self._names["edges"] = frozenset(self.index.names(self.removed_edges().nonzero()[:, 0], "edges"))
        return self._names["edges"]

    def removed_edges(self) -> torch.Tensor:
        """The removed-edge mask over the index's edges [E]."""
        return self.masks.removed[self.index.edge_recv, self.index.edge_src]

    def present_edges(self) -> torch.Tensor:
        """Edges still in the circuit [E]: not removed, both ends alive."""
        return self.index.present_edges(self.masks.ablated, self.removed_edges())

    def present_nodes(self) -> torch.Tensor:
        """Senders still in the circuit [S] (not ablated)."""
        return ~self.masks.ablated[: self.index.S]

    def present_units(self) -> torch.Tensor:
        """(sender, slot) pairs still in the circuit [S, Q]: the node not ablated, nor at that slot."""
        S = self.index.S
        return ~self.masks.ablated[:S, None] & ~self.masks.at[:S]

    def present_edge_units(self, read: torch.Tensor | None = None) -> torch.Tensor:
        """Which (edge, slot) pairs still carry something [E, Q]: the edge present, not removed at the slot,
        its sender not ablated there, and its receiver not ablated there unless it is a head's key or value
        (read there by later queries of a head live elsewhere); with `read` [Q] (Evaluator.read_slots), edges
        into the logits only at the slots the metric reads."""
        ix, m = self.index, self.masks
        ok = self.present_edges()[:, None] & ~m.at[ix.edge_src]
        if m.removed_at is not None:
            ok &= ~m.removed_at[ix.edge_recv, ix.edge_src]
        ok &= ~(m.at[ix.edge_dst_node] & ~ix.edge_kv[:, None])
        if read is not None:
            ok &= (ix.edge_dst_node != ix.logits)[:, None] | read[None]
        return ok

    @property
    def edge_units(self) -> frozenset:
        """Edges removed at single slots, as edge unit ids (edge id * Q + slot) of edges still present."""
        if "edge_units" not in self._names:
            m, ix = self.masks, self.index
            if m.removed_at is None:
                self._names["edge_units"] = frozenset()
            else:
                ra = m.removed_at[ix.edge_recv, ix.edge_src] & self.present_edges()[:, None]
                self._names["edge_units"] = frozenset(ra.flatten().nonzero()[:, 0].tolist())
        return self._names["edge_units"]

    @property
    def units(self) -> frozenset:
        """(node, slot) pairs ablated at single slots, as unit ids (node * Q + slot) of nodes still present."""
        if "units" not in self._names:
            at = self.masks.at & ~self.masks.ablated[:, None]
            self._names["units"] = frozenset((at.flatten().nonzero()[:, 0]).tolist())
        return self._names["units"]


@dataclass
class Batch:
    """The prompt rows a forward pass runs on and how each counts in the mean metric.

    Identical rows give identical results under mean and zero ablation (and under resample
    when their corrupted prompts match too), so the evaluator runs each distinct row once and
    weights it by how often it occurs: exact, and several times faster on tasks that repeat
    prompts.
    """

    tokens: torch.Tensor    # [B, P]
    answers: torch.Tensor   # [B] (last position only) or [B, T] targets
    wrong: torch.Tensor     # [B] or [B, T]
    weight: torch.Tensor    # [B] occurrences of the row in the task
    ref: torch.Tensor | None = None  # full model's log-probs (KL) or logits (L2) per row [B, (T,) vocab]
    pos: torch.Tensor | None = None    # [B, T] readout positions; None: the last position of every row
    valid: torch.Tensor | None = None  # [B, T] which of them count
    reduce: str = "mean"               # how a row's positions become one value

    @classmethod
    def of(cls, tokens: torch.Tensor, readout: Readout, weight: torch.Tensor) -> "Batch":
        if readout.last_only:
            return cls(tokens, readout.target[:, 0], readout.wrong[:, 0], weight, reduce=readout.reduce)
        return cls(tokens, readout.target, readout.wrong, weight, pos=readout.pos, valid=readout.valid,
                   reduce=readout.reduce)

    @property
    def cols(self) -> torch.Tensor:
        return torch.stack([self.answers, self.wrong], -1)


def distinct_rows(task: Task, ablation: str, readout: Readout | None = None,
                  slots: Slots | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index of each distinct row, inverse map) over what determines a row's clean run and score:
    tokens, length, group (its mean-ablation source), readout, slots by role (which positions a slot
    ablates), and its corrupted prompt under resample."""
    parts = [task.clean, task.answers[:, None], task.wrong_answers[:, None]]
    if slots is not None and slots.by_role:
        parts.append(slots.of)
    if task.mixed or bool(task.groups.any()):
        parts += [task.lengths[:, None], task.groups[:, None]]
    if readout is not None and not readout.last_only:
        parts.append(readout.key())
    if ablation == "resample":
        parts.append(task.corrupted)
    key = torch.cat(parts, 1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((len(uniq),), len(key), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(key)), reduce="amin")
    order = first.argsort()  # keep the task's row order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return first[order], rank[inverse]


def check_context(task: Task, n_ctx: int | None) -> None:
    """Prompts no longer than the model's context (None: no limit)."""
    if n_ctx is not None and task.seq_len > n_ctx:
        raise ValueError(f"task prompts are {task.seq_len} tokens but the model's context is {n_ctx}")


def check_token_ids(task: Task, readout: Readout, vocab_in: int, vocab_out: int) -> None:
    """Prompt ids in the input vocabulary, answers and readout targets in the output vocabulary: a
    ValueError naming which, for a task made with another model's tokenizer."""
    r = readout
    for what, t, vocab, side in (("clean prompts", task.clean, vocab_in, "input"),
                                 ("corrupted prompts", task.corrupted, vocab_in, "input"),
                                 ("answers", task.answers, vocab_out, "output"),
                                 ("wrong answers", task.wrong_answers, vocab_out, "output"),
                                 ("readout targets", r.target[r.valid], vocab_out, "output"),
                                 ("readout wrong tokens", r.wrong[r.valid], vocab_out, "output")):
        if int(t.max()) >= vocab or int(t.min()) < 0:
            raise ValueError(f"task {task.name!r}: {what} hold token ids outside the model's vocabulary "
                             f"(its {side} vocabulary is ids 0..{vocab - 1}); was the task made with another "
                             "model's tokenizer?")


def read_slots(slot_rows: torch.Tensor, batch: Batch, Q: int) -> torch.Tensor:
    """The slots [Q] (bool) holding a position the metric reads in some row: only there do the logits exist
    for a position-level circuit."""
    if batch.pos is None:
        hit = slot_rows[:, -1]
    else:
        hit = slot_rows.gather(1, batch.pos)[batch.valid]
    out = torch.zeros(Q, dtype=torch.bool)
    out[hit] = True
    return out


@dataclass
class Source:
    """Ablation values (broadcastable to [B, P, ...]) for embed, head z and MLP outputs; in a split-embed
    graph `parts` holds those of tok and pos (and embed is their sum)."""

    kind: str
    embed: torch.Tensor
    z: list
    mlp_out: list
    parts: list | None = None


@dataclass
class _Pass:
    """One forward pass over K circuits at once: circuit k owns rows k*B..(k+1)*B of every stacked
    tensor. Holds the stacked layer outputs the pass computes and the K runs it fills."""

    runs: list
    base: Run | None
    start: int
    ablated: torch.Tensor   # [K, N]
    removed: torch.Tensor   # [K, R, S]
    B: int
    source: Source | None   # the ablation source of one circuit's rows
    at: torch.Tensor | None = None     # [K, N, Q] nodes ablated at single slots (None: none in any circuit)
    slot_rows: torch.Tensor | None = None  # [B, P] the slot of each row's positions
    removed_at: torch.Tensor | None = None  # [K, R, S, Q] edges removed at single slots (None: none)
    embed: torch.Tensor | None = None
    parts: list | None = None                  # split-embed graph: stacked tok and pos outputs
    z: dict = field(default_factory=dict)      # layer -> stacked z
    mlp: dict = field(default_factory=dict)    # layer -> stacked MLP output
    diffs: dict = field(default_factory=dict)  # sender -> stacked live − ablated output (K > 1)
    _tiled: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return self.ablated.shape[0]

    def rows(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-circuit flags [K, ...] as per-row flags [K*B, ...]."""
        return flags.repeat_interleave(self.B, 0)

    def tile(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of one circuit's B rows repeated for all K circuits."""
        return t if self.K == 1 else t.repeat(self.K, *[1] * (t.dim() - 1))

    def split(self, t: torch.Tensor) -> list:
        """A stacked tensor as K per-circuit views."""
        return [t] if self.K == 1 else list(t.unflatten(0, (self.K, self.B)).unbind(0))

    def ablation(self, what: str, l: int | None = None) -> torch.Tensor:
        """The ablation value of `what` (embed, z or mlp_out at layer l, parts at index l) for the stacked
        rows: a shared one (mean, zero) as it is, a per-row one (resample) tiled for the K circuits, once
        per pass."""
        t = getattr(self.source, what) if l is None else getattr(self.source, what)[l]
        if self.K == 1 or t.shape[0] == 1:
            return t
        if (what, l) not in self._tiled:
            self._tiled[what, l] = self.tile(t)
        return self._tiled[what, l]

    def at_rows(self, sel) -> torch.Tensor | None:
        """Which stacked rows and positions have nodes `sel` (a slice or index of node ids) ablated at a slot:
        [K*B, P, n] flags, or None when no circuit ablates any of them at a slot."""
        if self.at is None:
            return None
        a = self.at[:, sel]  # [K, n, Q]
        if a.dim() == 2:
            a = a[:, None]
        if not bool(a.any()):
            return None
        return a[:, :, self.slot_rows].permute(0, 2, 3, 1).flatten(0, 1)

    def put(self, what: str, l: int, t: torch.Tensor) -> None:
        """Store layer l's stacked `what` (resid_pre, z, resid_mid, mlp_out) in every run."""
        for run, v in zip(self.runs, self.split(t)):
            getattr(run, what)[l] = v


def _ids(items, lookup) -> torch.Tensor:
    """Names or indices (any iterable, or a tensor of indices) as a 1-d index tensor."""
    if isinstance(items, torch.Tensor):
        return items.reshape(-1).long()
    return torch.tensor([i if isinstance(i, int) else lookup(i) for i in items], dtype=torch.long)


class Evaluator:
    """Scores circuits of `model` on `task`; every algorithm talks to the model through this.

    score(nodes, edges) ablates the given nodes and removes the given edges (names or graph
    index ids). For search, run(...) returns a cached Run and extend(run, nodes=..., edges=...)
    scores a circuit that removes a little more, recomputing only from the earliest layer the
    change touches.

    split_embed=True scores circuits of the graph whose embedding is two senders, `tok` (the token
    embedding) and `pos` (the learned position embedding), each ablated and patched on its own; only
    for models with learned positions (a ModelError otherwise).
    """

    def __init__(self, model: Model, task: Task, ablation: str = "mean", metric: str = "logit_diff",
                 qkv: bool = True, weights: Weights | None = None, engine: Engine | None = None,
                 split_embed: bool = False, positions: str | tuple = "last", reduce: str | None = None):
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
        self.graph = ModelGraph(self.L, self.H, self.attn_only, qkv, parallel=self.engine.parallel,
                                split_embed=self.split_embed)
        self.index = index_of(self.graph)
        self.senders = self.index.senders
        self.sender_index = {s: i for i, s in enumerate(self.senders)}
        self.S = self.index.S
        self._layout()
        self._ablated_z_cache: dict = {}
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
        counts = torch.bincount(inverse, minlength=len(first)).float()
        self.batch = Batch.of(task.clean[first], self.readout.rows(first), counts)
        self._slot_rows = self.slots.rows(first)  # [B, P] slot of each distinct row's positions
        self.read_slots = read_slots(self._slot_rows, self.batch, self.Q)
        self._units: list | None = None
        everything = Batch.of(task.corrupted, self.readout, torch.ones(len(task)))
        with torch.inference_mode():
            empty = self._empty_masks()
            self._embed_clean = self._embed_live(self.batch.tokens)
            corrupt = self._forward(None, -1, empty, self._embed_live(task.corrupted), source=None, batch=everything)
            self.source = self._make_source(corrupt, first)
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

    def _layout(self) -> None:
        """Where each layer's heads, MLP and receivers sit in the index (ids, as tensors and slices)."""
        ix, H = self.index, self.H
        self._heads = []       # layer -> slice of its heads' node ids
        self._mlp = []         # layer -> node id of its MLP (or None)
        self._attn_rows = []   # layer -> [3H] receiver rows of its heads' q, k, v inputs (q of all heads first)
        self._mlp_row = []     # layer -> receiver row of its MLP
        qkv = self.graph.qkv
        for l in range(self.L):
            first = ix.node_id[f"a{l}.0"]
            self._heads.append(slice(first, first + H))
            self._mlp.append(None if self.attn_only else ix.node_id[f"m{l}"])
            rows = [ix.receiver_id[f"a{l}.{h}.{x}" if qkv else f"a{l}.{h}"] for x in "qkv" for h in range(H)]
            self._attn_rows.append(torch.tensor(rows, dtype=torch.long))
            self._mlp_row.append(None if self.attn_only else ix.receiver_id[f"m{l}"])
        self._logits_row = ix.receiver_id["logits"]
        self._node_stage = torch.tensor(ix.node_stage, dtype=torch.long)
        self._group_stage = {("logits",): 3 * self.L, **{("attn", l): 3 * l for l in range(self.L)},
                             **{("mlp", l): 3 * l + 2 for l in range(self.L)}}
        self._edge_stage = torch.tensor(ix.edge_stage, dtype=torch.long)

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
        n = _ids(nodes, ix.node)
        e = _ids(edges, ix.edge)
        u = _ids(at, self.unit)
        eu = _ids(edges_at, self.edge_unit)
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
            start = min(start, int(self._node_stage[n].min()))
        if len(e):
            masks.removed[ix.edge_recv[e], ix.edge_src[e]] = True
            start = min(start, int(self._edge_stage[e].min()))
        if len(u) and len(un):
            masks.at[un, uq] = True
            whole = un[masks.at[un].all(1)]
            masks.ablated[whole] = True
            start = min(start, int(self._node_stage[un].min()))
        if len(eu) and len(ee):
            if masks.removed_at is None:
                masks.removed_at = torch.zeros(ix.R, self.S, Q, dtype=torch.bool)
            masks.removed_at[er, es, eq] = True
            whole = masks.removed_at[er, es].all(1)
            masks.removed[er[whole], es[whole]] = True
            start = min(start, int(self._edge_stage[ee].min()))
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

    def receiver_gradients(self, run: Run | None = None, alpha: float = 1.0) -> dict:
        """Gradient of the score with respect to every receiver's input, in `run`'s circuit.

        Every live sender's output is mixed `alpha` of the way from its ablation value to its
        live value (alpha = 1: the circuit itself; alpha = 0: everything ablated), which is
        the path integrated gradients walk. One forward and one backward pass. Returns
        {"attn": [L] x [B, P, 3, H, d], "mlp": [L] x [B, P, d], "logits": [B, d]} for the
        distinct prompt rows, each row's gradient weighted by its share of the task ("logits":
        [B, P, d] when the metric reads other positions than the last of full-length prompts).
        """
        if not self.metric.gradient:
            raise ValueError(f"{self.metric.name} has no gradient: attribute with logit_diff, prob or kl instead")
        run = run or self.clean_run
        eng, L, H = self.engine, self.L, self.H
        ablated = run.masks.ablated.clone()  # copies: normal tensors, not inference ones
        removed = run.masks.removed.clone()
        src = self._grad_source()
        mix = lambda live, abl: abl + alpha * (live - abl)
        at = run.masks.at.clone()

        def off(sel):  # [B, P, n]: nodes `sel` ablated at each row's positions (whole, or at their slot)
            a = ablated[sel]
            if a.dim() == 0:
                a, q = a[None], at[sel][None]
            else:
                q = at[sel]
            return a | q[:, self._slot_rows].permute(1, 2, 0)
        inputs = {"attn": [None] * L, "mlp": [None] * L, "logits": None}
        with torch.enable_grad():
            # torch.where keeps the graph attached to the live embedding when it is ablated, so every
            # receiver input still requires grad (its gradient is what we want, not the embedding's)
            if self.split_embed:  # tok and pos: senders 0 and 1, each mixed and ablated on its own
                parts = [torch.where(off(s), a, mix(t.clone().requires_grad_(), a))
                         for s, (t, a) in enumerate(zip(eng.embed_parts(self.batch.tokens), src.parts))]
                out = [t - a for t, a in zip(parts, src.parts)]  # live - ablated output of each sender
                resid = parts[0] + parts[1]
            else:
                live = eng.embed(self.batch.tokens).requires_grad_()
                embed = torch.where(off(0), src.embed, mix(live, src.embed))
                out = [embed - src.embed]  # live - ablated output of each sender in forward order
                resid = embed

            ra = None if run.masks.removed_at is None else run.masks.removed_at.clone()

            def delta(mask, rows=None):  # Σ over removed senders of (live - ablated), per receiver row
                cols = mask.any(0).nonzero()[:, 0].tolist()
                d = 0.0
                if cols:
                    d = torch.einsum("rs,bpsd->bprd", mask[:, cols].float(), torch.stack([out[c] for c in cols], 2))
                if ra is None or rows is None:
                    return d
                M = ra[rows][:, : len(out)] & ~mask[..., None]  # edges removed at single slots only
                cols = M.any(2).any(0).nonzero()[:, 0].tolist()
                if not cols:
                    return d
                Mr = M[:, cols][..., self._slot_rows].float()  # [r, s', B, P]
                return d + torch.einsum("rsbp,bpsd->bprd", Mr, torch.stack([out[c] for c in cols], 2))

            for l in range(L):
                lw = eng.layer(l)
                d = delta(removed[self._attn_rows[l]][:, : len(out)], self._attn_rows[l])
                x = resid[:, :, None, None, :].expand(*resid.shape[:2], 3, H, resid.shape[-1])
                if not isinstance(d, float):
                    x = x - d.reshape(*d.shape[:2], 3, H, d.shape[-1])
                inputs["attn"][l] = x
                z = eng.attention(lw, x[:, :, 0], x[:, :, 1], x[:, :, 2])
                z = torch.where(off(self._heads[l])[..., None], src.z[l], mix(z, src.z[l]))
                out += list(eng.head_outputs(lw, z - src.z[l]).unbind(2))
                resid_pre, resid = resid, eng.add_heads(resid, lw, z)
                if not self.attn_only:
                    d = delta(removed[self._mlp_row[l]][None, : len(out)], [self._mlp_row[l]])
                    r = resid_pre if eng.parallel else resid  # a parallel block's MLP reads its input
                    x = inputs["mlp"][l] = r.clone() if isinstance(d, float) else r - d[:, :, 0]
                    m = eng.mlp(lw, x)
                    m = torch.where(off(self._mlp[l]), src.mlp_out[l], mix(m, src.mlp_out[l]))
                    out.append(m - src.mlp_out[l])
                    resid = resid + m
            d = delta(removed[self._logits_row][None], [self._logits_row])
            b = self.batch
            if b.pos is None:  # the last position: the logits receiver's input there [B, d]
                x = inputs["logits"] = resid[:, -1].clone() if isinstance(d, float) else (resid - d[:, :, 0])[:, -1]
                logits = eng.unembed(x, b.cols if self.metric.two_columns else None)
            else:  # several positions: its input at every position [B, P, d] (zero gradient where unread)
                x = inputs["logits"] = resid.clone() if isinstance(d, float) else resid - d[:, :, 0]
                logits = self._readout_logits(x, b)
            per = self._per_prompt(logits, b)
            score = (per * b.weight).sum() / b.weight.sum()
            flat = inputs["attn"] + [t for t in inputs["mlp"] if t is not None] + [x]
            grads = torch.autograd.grad(score, flat, allow_unused=True, materialize_grads=True)
        self.count_relaxed()
        g_attn, rest = list(grads[:L]), list(grads[L:])
        g_mlp = [None] * L if self.attn_only else rest[:L]
        return {"attn": g_attn, "mlp": g_mlp, "logits": rest[-1]}

    def count_relaxed(self, backward: bool = True) -> None:
        """Count one relaxed forward (circuitsearch.relaxed) and its backward in the stats: a backward costs
        about two forwards (a gradient for every activation and weight product), so 3 forward-equivalents."""
        self.forward_passes += 1
        self.forward_equivalents += 3.0 if backward else 1.0
        self.backward_passes += int(backward)

    def sender_diffs(self, run: Run) -> torch.Tensor:
        """live − ablated output of every sender in `run`, stacked [B, P, S, d]."""
        return torch.stack([self._sender_diff(run, s) for s in range(self.S)], 2)

    def _grad_source(self) -> Source:
        """The ablation source as ordinary tensors (the cached ones are inference tensors)."""
        if getattr(self, "_grad_src", None) is None:
            c = lambda t: None if t is None else t.clone()
            s = self.source
            self._grad_src = Source(s.kind, c(s.embed), [c(t) for t in s.z], [c(t) for t in s.mlp_out],
                                    None if s.parts is None else [c(t) for t in s.parts])
        return self._grad_src

    # ------------------------------------------------------------------ forward

    def _empty_masks(self) -> Masks:
        ix = self.index
        return Masks(torch.zeros(ix.N, dtype=torch.bool), torch.zeros(ix.R, ix.S, dtype=torch.bool),
                     torch.zeros(ix.N, self.Q, dtype=torch.bool))

    def _make_source(self, corrupt: Run, rows: torch.Tensor) -> Source:
        """The ablation source; in a split-embed graph `pos` ablates to its mean over the prompt's positions.

        Every prompt has the same position embedding at a position, so its mean (or resampled) value
        there is itself: ablated so, `pos` could never be removed. Its mean over positions keeps its
        scale and removes where a token is. (`embed` and `tok` keep the per-position definition.)"""
        src = self._source_values(corrupt, rows)
        if src.parts is not None and self.ablation != "zero":
            pos = src.parts[1]
            lengths = (self.run_task.lengths[rows] if pos.shape[0] == len(rows) else
                       self.run_task.lengths[:1]).to(pos.device)
            real = (torch.arange(pos.shape[1], device=pos.device)[None] < lengths[:, None]).to(pos.dtype)
            avg = (pos * real[..., None]).sum(1, keepdim=True) / lengths.to(pos.dtype)[:, None, None]
            src.parts = [src.parts[0], avg.expand_as(pos).clone()]
        return src

    def _source_values(self, corrupt: Run, rows: torch.Tensor) -> Source:
        """Ablation values from the corrupted run (over all the task's rows); resample keeps `rows`.

        Mean: the mean over the corrupted prompts of the same group (template and length) at each
        position; with one group one shared row, as always, else one row per distinct row (its group's).
        """
        if self.ablation == "resample":
            return Source("resample", corrupt.embed[rows], [t[rows] for t in corrupt.z],
                          [None if t is None else t[rows] for t in corrupt.mlp_out],
                          None if corrupt.parts is None else [t[rows] for t in corrupt.parts])
        task = self.run_task
        _, gid = torch.unique(torch.stack([task.groups, task.lengths], 1), dim=0, return_inverse=True)
        G = int(gid.max()) + 1
        if self.ablation == "mean" and G > 1:
            count = torch.bincount(gid, minlength=G).float()

            def mean(t):
                if t is None:
                    return None
                sums = torch.zeros(G, *t.shape[1:], dtype=t.dtype).index_add_(0, gid, t)
                return (sums / count.view(G, *[1] * (t.dim() - 1)).to(t.dtype))[gid[rows]]
            return Source("mean", mean(corrupt.embed), [mean(t) for t in corrupt.z], [mean(t) for t in corrupt.mlp_out],
                          None if corrupt.parts is None else [mean(t) for t in corrupt.parts])
        mean = lambda t: None if t is None else t.mean(0, keepdim=True)
        zero = lambda t: None if t is None else torch.zeros_like(t[:1])
        f = mean if self.ablation == "mean" else zero
        return Source(self.ablation, f(corrupt.embed), [f(t) for t in corrupt.z], [f(t) for t in corrupt.mlp_out],
                      None if corrupt.parts is None else [f(t) for t in corrupt.parts])

    def _sender_diff(self, run: Run, s: int) -> torch.Tensor:
        """live − ablated output of sender s in `run` (cached in run.diffs)."""
        d = run.diffs.get(s)
        if d is None:
            ix = self.index
            kind, layer = ix.node_kind[s], ix.node_layer[s]
            if kind == EMBED:
                d = run.embed - self.source.embed if run.parts is None else run.parts[s] - self.source.parts[s]
            elif kind == HEAD:
                h = ix.node_head[s]
                zl = run.z[layer][:, :, h] - self.source.z[layer][:, :, h]
                d = zl @ self.w.layers[layer].W_O[h]
            else:
                d = run.mlp_out[layer] - self.source.mlp_out[layer]
            run.diffs[s] = d
        return d

    def _pass_diff(self, p: "_Pass", s: int) -> torch.Tensor:
        """live − ablated output of sender s, computed in pass p, for all its stacked rows [K*B, P, d]."""
        if p.K == 1:
            return self._sender_diff(p.runs[0], s)
        d = p.diffs.get(s)
        if d is None:
            ix = self.index
            kind, layer = ix.node_kind[s], ix.node_layer[s]
            if kind == EMBED:
                d = p.embed - p.ablation("embed") if p.parts is None else p.parts[s] - p.ablation("parts", s)
            elif kind == HEAD:
                h = ix.node_head[s]
                d = (p.z[layer][:, :, h] - p.ablation("z", layer)[:, :, h]) @ self.w.layers[layer].W_O[h]
            else:
                d = p.mlp[layer] - p.ablation("mlp_out", layer)
            p.diffs[s] = d
        return d

    def _weighted(self, p: "_Pass", coef: torch.Tensor, ids: list, own: bool):
        """Σ_s coef[k, r, s] · D[s] -> [K, B, P, r, d]: D the diffs computed in pass p (own) or the base's."""
        if not ids:
            return 0.0
        if own:
            D = torch.stack([self._pass_diff(p, s) for s in ids], 2)
            return torch.einsum("krs,kbpsd->kbprd", coef.to(D.dtype), D.unflatten(0, (p.K, p.B)))
        D = torch.stack([self._sender_diff(p.base, s) for s in ids], 2)
        return torch.einsum("krs,bpsd->kbprd", coef.to(D.dtype), D)

    def _delta(self, p: "_Pass", rows, group) -> torch.Tensor | None:
        """Σ over removed live senders of (live − ablated), per receiver in `rows` -> [K*B, P, len(rows), d]:
        edges removed whole (_delta_whole) and at single slots (_delta_at), or None when there are none."""
        whole = self._delta_whole(p, rows, group)
        if p.removed_at is None:
            return whole
        at = self._delta_at(p, rows)
        if at is None:
            return whole
        return at if whole is None else whole + at

    def _delta_at(self, p: "_Pass", rows) -> torch.Tensor | None:
        """Σ over edges removed at single slots into receivers `rows`: each sender's live − ablated output at
        the positions of the slots its edge is removed at [K*B, P, len(rows), d] (None: no such edge).
        Taken in full every pass: position-level edge removals are few."""
        sel = [rows] if isinstance(rows, int) else rows
        M = p.removed_at[:, sel] & ~p.removed[:, sel, :, None] & ~p.ablated[:, None, : self.S, None]  # [K, r, S, Q]
        senders = M.any(3).any(1).any(0).nonzero()[:, 0].tolist()
        if not senders:
            return None
        K, B = p.K, p.B

        def diff(s: int, recomputed: bool) -> torch.Tensor:  # [K, B, P, d]: this pass's, or the base's for all K
            if recomputed:
                return self._pass_diff(p, s).unflatten(0, (K, B))
            d = self._sender_diff(p.base, s)
            return d.expand(K, *d.shape)

        later = (self._node_stage[senders] >= p.start).tolist()
        D = torch.stack([diff(s, new) for s, new in zip(senders, later)], 3)  # [K, B, P, s', d]
        Mr = M[:, :, senders][..., p.slot_rows]  # [K, r, s', B, P]
        return torch.einsum("krsbp,kbpsd->kbprd", Mr.to(D.dtype), D).flatten(0, 1)

    def _delta_whole(self, p: "_Pass", rows, group) -> torch.Tensor | None:
        """Σ over live senders of removed edges of (live − ablated), per receiver in `rows` ->
        [K*B, P, len(rows), d].

        Kept per receiver group in each run (run.sums). Extending a base from stage `start`, only what
        changed is added to the base's sum: senders recomputed from `start` on (their new minus their
        old contribution) and edges newly removed from senders below it; the full sum is taken when
        that would be no cheaper, and after REFRESH updates in a row (to bound float rounding drift).
        """
        sel = [rows] if isinstance(rows, int) else rows
        key = tuple(sel) if isinstance(sel, list) else tuple(sel.tolist())
        mask = p.removed[:, sel] & ~p.ablated[:, None, : self.S]  # [K, r, S] removed live senders per row
        present = mask.any(0).any(0)
        if not bool(present.any()):
            return None
        base, K = p.base, p.K
        later = (self._node_stage[: self.S] >= p.start).tolist()
        prev = base.sums.get(group) if base is not None else None
        total = None
        if prev is not None and prev[0] == key and prev[2] < REFRESH:
            old = base.masks.removed[sel] & ~base.masks.ablated[: self.S]
            touched = (mask.any(0) | old).any(0).tolist()
            new = (mask & ~old).any(0).any(0).tolist()
            changed = [s for s in range(self.S) if later[s] and touched[s]]
            added = [s for s in range(self.S) if not later[s] and new[s]]
            if 2 * len(changed) + len(added) < int(present.sum()):
                shared = torch.cat([-old[:, changed].expand(K, -1, -1).float(),
                                    (mask & ~old)[:, :, added].float()], 2)
                total = (prev[1][None] + self._weighted(p, mask[:, :, changed], changed, True)
                         + self._weighted(p, shared, changed + added, False))
                count = prev[2] + 1
        if total is None:
            idx = present.nonzero()[:, 0].tolist()
            own = [s for s in idx if later[s]]
            below = [s for s in idx if not later[s]]
            total = self._weighted(p, mask[:, :, own], own, True) + self._weighted(p, mask[:, :, below], below, False)
            count = 0
        total = total.expand(K, *total.shape[1:])  # an unchanged base sum still has one circuit
        for run, t in zip(p.runs, total.unbind(0)):
            run.sums[group] = (key, t, count)
        return total.flatten(0, 1)

    def _forward(self, base: Run | None, start: int, masks: Masks, embed_live: torch.Tensor,
                 source: Source | None = "self", count: bool = True, batch: Batch | None = None) -> Run:
        """Recompute `base`'s circuit with new masks from stage `start` on (see graphs.index)."""
        return self._forward_many(base, start, [masks], embed_live, source, count, batch)[0]

    def _forward_many(self, base: Run | None, start: int, masks: list, embed_live: torch.Tensor,
                      source: Source | None = "self", count: bool = True, batch: Batch | None = None) -> list:
        """K circuits (one per Masks) that each change `base` from stage `start` on, in one forward pass
        over their rows stacked along the batch; each circuit's rows go through the same computation as
        its own pass would (equal up to the rounding of differently sized GEMMs, about 1e-6)."""
        src = self.source if source == "self" else source
        batch = batch or self.batch
        eng, L, K = self.engine, self.L, len(masks)
        B = (embed_live[0] if isinstance(embed_live, list) else embed_live).shape[0]
        if base is None or start < 0:
            base, start = None, -1
        p = _Pass([], base, start, torch.stack([m.ablated for m in masks]), torch.stack([m.removed for m in masks]),
                  B, src)
        if src is not None and any(bool(m.at.any()) for m in masks):
            if batch is not self.batch:
                raise ValueError("nodes ablated at slots are scored on the task's own prompts only")
            p.at, p.slot_rows = torch.stack([m.at for m in masks]), self._slot_rows
        if src is not None and any(m.removed_at is not None for m in masks):
            if batch is not self.batch:
                raise ValueError("edges removed at slots are scored on the task's own prompts only")
            none = torch.zeros(self.index.R, self.S, self.Q, dtype=torch.bool)
            p.removed_at = torch.stack([none if m.removed_at is None else m.removed_at for m in masks])
            p.slot_rows = self._slot_rows
        if base is None:
            if isinstance(embed_live, list):  # split-embed graph: tok and pos are senders 0 and 1
                p.parts = [self._embed_part(p, s, t) for s, t in enumerate(embed_live)]
                emb = p.parts[0] + p.parts[1]
            else:
                emb = self._embed_part(p, 0, embed_live, "embed")
            p.embed = emb
            parts = [p.split(t) for t in p.parts] if p.parts is not None else None
            p.runs = [Run(self.index, m, e, [None] * L, [None] * L, [None] * L, [None] * L,
                          parts=None if parts is None else [t[k] for t in parts])
                      for k, (m, e) in enumerate(zip(masks, p.split(emb)))]
        else:
            stage = self.index.node_stage
            diffs = {s: d for s, d in base.diffs.items() if stage[s] < start}
            sums = {g: v for g, v in base.sums.items() if self._group_stage[g] < start}
            p.runs = [Run(self.index, m, base.embed, list(base.resid_pre), list(base.z), list(base.resid_mid),
                          list(base.mlp_out), diffs=dict(diffs), sums=dict(sums), parts=base.parts) for m in masks]
        edges = bool(p.removed.any()) or p.removed_at is not None
        first = max(start, 0) // 3
        if first >= L:
            resid = p.tile(base.final)
        else:
            resid = p.embed if base is None else p.tile(base.resid_pre[first])
        for l in range(first, L):
            lw = eng.layer(l)
            stage = start - 3 * l if l == first else -1  # where this layer's recomputation begins
            hab = p.ablated[:, self._heads[l]] if src is not None else None  # [K, H] heads ablated
            if stage <= 1:
                if stage <= 0:
                    pre = resid
                    p.put("resid_pre", l, pre)
                else:
                    pre = p.tile(base.resid_pre[l])
                if src is not None and bool(hab.all()):
                    # every head ablated: their outputs are the ablation values, whatever they read
                    z = p.tile(self._ablated_z(src, l, B))
                    resid = eng.add_heads(pre, lw, z, p.tile(self._ablated_z(src, l, B, summed=True)))
                else:
                    if stage <= 0:
                        z = self._heads_z(p, l, pre, hab, edges)
                    else:  # only some heads of this layer newly ablated: the others' z stands
                        z = torch.where(p.rows(hab)[:, None, :, None], p.ablation("z", l), p.tile(base.z[l]))
                    pm = p.at_rows(self._heads[l])  # heads ablated at single slots
                    if pm is not None:
                        z = torch.where(pm[..., None], p.ablation("z", l), z)
                    resid = eng.add_heads(pre, lw, z)
                p.z[l] = z
                p.put("z", l, z)
                p.put("resid_mid", l, resid)
            else:
                resid = p.tile(base.resid_mid[l])
                pre = p.tile(base.resid_pre[l]) if eng.parallel else None
            if not self.attn_only:
                off = p.ablated[:, self._mlp[l]] if src is not None else None
                if src is not None and bool(off.all()):  # ablated: its input does not matter
                    out = p.ablation("mlp_out", l).expand_as(resid)
                else:
                    delta = self._delta(p, self._mlp_row[l], ("mlp", l)) if edges else None
                    x = pre if eng.parallel else resid  # a parallel block's MLP reads the layer's input
                    x = x if delta is None else x - delta[:, :, 0]
                    if src is not None and bool(off.any()):  # ablated in some circuits: run the others' rows
                        live = p.rows(~off)
                        out = p.ablation("mlp_out", l).expand_as(resid).clone()
                        out[live] = eng.mlp(lw, x[live])
                    else:
                        out = eng.mlp(lw, x)
                    pm = p.at_rows(self._mlp[l])  # ablated at single slots
                    if pm is not None:
                        out = torch.where(pm, p.ablation("mlp_out", l), out)
                p.mlp[l] = out
                p.put("mlp_out", l, out)
                resid = resid + out
        for run, f in zip(p.runs, p.split(resid)):
            run.final = f
        delta = self._delta(p, self._logits_row, ("logits",)) if edges else None
        logits = self._readout_logits(resid if delta is None else resid - delta[:, :, 0], batch, p.tile)
        for run, lg in zip(p.runs, p.split(logits)):
            run.logits = lg
            if self.metric.two_columns or batch.ref is not None:
                self._finish(run, batch)
        if K > 1:
            for s, d in p.diffs.items():
                for run, v in zip(p.runs, p.split(d)):
                    run.diffs[s] = v
        if count:
            self.forward_passes += K
            self.forward_equivalents += K * self._cost(start)
            self.batched_passes += K > 1
        return p.runs

    def _embed_part(self, p: "_Pass", s: int, live: torch.Tensor, what: str = "parts") -> torch.Tensor:
        """Embedding sender s's output for the stacked rows: `live` tiled, its ablation value in the circuits
        that ablate s (`what`: the Source field holding it, the whole embed or the parts indexed by s)."""
        emb = p.tile(live)
        if p.source is None:
            return emb
        off = p.ablated[:, s]
        pm = None if bool(off.all()) else p.at_rows(s)  # ablated at single slots
        if not bool(off.any()) and pm is None:
            return emb
        abl = p.ablation(what, None if what == "embed" else s)
        if bool(off.all()):
            return abl.expand_as(emb)
        if bool(off.any()):
            emb = torch.where(p.rows(off)[:, None, None], abl, emb)
        return emb if pm is None else torch.where(pm, abl, emb)

    def _heads_z(self, p: "_Pass", l: int, resid: torch.Tensor, hab: torch.Tensor | None,
                 edges: bool) -> torch.Tensor:
        """z of layer l's heads [K*B, P, H, dh] reading `resid`; ablated heads hold their ablation value.
        With removed edges into the layer each live head reads its own q, k, v input, and only heads
        live in some circuit are computed."""
        H, lw = self.H, self.w.layers[l]
        off = hab.all(0).tolist() if hab is not None else [False] * H
        live = [h for h in range(H) if not off[h]]
        rows = self._attn_rows[l] if len(live) == H else self._attn_rows[l].view(3, H)[:, live].reshape(-1)
        delta = self._delta(p, rows, ("attn", l)) if edges else None
        if delta is None:
            z = self.engine.attention(lw, resid)
            partial = hab is not None and bool(hab.any())
        else:
            partial = hab is not None and bool((hab & ~hab.all(0)).any())  # ablated in some circuits only
            x = resid[:, :, None, None, :] - delta.reshape(*delta.shape[:2], 3, len(live), delta.shape[-1])
            if len(live) == H:
                z = self.engine.attention(lw, x[:, :, 0], x[:, :, 1], x[:, :, 2])
            else:
                idx = torch.tensor(live)
                z = self._ablated_z(p.source, l, p.B)
                z = z.clone() if p.K == 1 else p.tile(z)
                z[:, :, idx] = self.engine.attention(lw, x[:, :, 0], x[:, :, 1], x[:, :, 2], heads=idx)
        if partial:
            z = torch.where(p.rows(hab)[:, None, :, None], p.ablation("z", l), z)
        return z

    def _ablated_z(self, src: Source, l: int, rows: int, summed: bool = False) -> torch.Tensor:
        """Layer l's z with every head ablated [B, P, H, dh], contiguous as a computed z is, or (summed)
        what those heads write, Σ_h z_h W_O,h [B, P, d]; each computed once."""
        key = (src.kind, l, rows, summed)
        if key not in self._ablated_z_cache:
            z = src.z[l].expand(rows, *src.z[l].shape[1:]).clone()
            self._ablated_z_cache[key] = self.engine.heads_sum(self.w.layers[l], z) if summed else z
        return self._ablated_z_cache[key]

    def _cost(self, start: int) -> float:
        """Fraction of a full forward that recomputing from `start` costs (attention ~1/3 of a layer)."""
        if start < 0:
            return 1.0
        layer, part = divmod(start, 3)
        left = self.L - layer - (0.3 if part == 1 else 0.35 if part == 2 else 0.0)
        if self.attn_only and part == 2:
            left = self.L - layer - 1
        return max(left, 0.0) / self.L

    def _readout_logits(self, resid: torch.Tensor, batch: Batch, tile=lambda t: t) -> torch.Tensor:
        """Logits at the batch's readout positions of the (stacked) residual [R, P, d]: [R, c] at the last
        position (c: 2 columns or the vocabulary), or [R, T, c] at each row's T positions."""
        two = self.metric.two_columns
        if batch.pos is None:
            return self.engine.unembed(resid[:, -1], tile(batch.cols) if two else None)
        pos = tile(batch.pos)
        x = resid.gather(1, pos[..., None].expand(*pos.shape, resid.shape[-1]))  # [R, T, d]
        logits = self.engine.unembed(x.flatten(0, 1), tile(batch.cols).flatten(0, 1) if two else None)
        return logits.unflatten(0, pos.shape)

    def _per_prompt(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The metric of each row [B]: at its one position, or reduced (mean/sum) over its valid positions."""
        if batch.pos is None:
            return self.metric.per_prompt(logits, batch.answers, batch.wrong, batch.ref)
        B, T = batch.pos.shape
        ref = None if batch.ref is None else batch.ref.flatten(0, 1)
        flat = self.metric.per_prompt(logits.flatten(0, 1), batch.answers.flatten(), batch.wrong.flatten(), ref)
        per = torch.where(batch.valid, flat.view(B, T), torch.zeros((), dtype=flat.dtype)).sum(1)
        return per / batch.valid.sum(1) if batch.reduce == "mean" else per

    def _finish(self, run: Run, batch: Batch) -> None:
        """The metric per distinct row, and the score: its mean over all the task's rows."""
        run.per_prompt = self._per_prompt(run.logits, batch)
        run.score = float((run.per_prompt * batch.weight).sum() / batch.weight.sum())
