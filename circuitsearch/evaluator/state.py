"""What travels through the evaluator: a circuit's masks, a cached run, the prompt rows of a pass and the
ablation source, plus the checks that a task's prompts fit the model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..graphs.index import GraphIndex
from ..readout import Readout
from ..tasks.base import Task
from ..tasks.slots import Slots


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
    hooks: dict = field(default_factory=dict)  # feature site j -> (what it reads, what it writes) before the splice
    feats: dict = field(default_factory=dict)  # feature site j -> (its node features' activations, its error), lazily
    kv: list | None = None     # [L] (keys, values) [B, P, H, dh] each layer's heads attended over (evaluator.suffix)
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

    def to(self, device) -> "Batch":
        """The batch with every tensor on `device` (the engine's: rows, answers and weights meet activations)."""
        mv = lambda t: None if t is None else t.to(device)
        return Batch(mv(self.tokens), mv(self.answers), mv(self.wrong), mv(self.weight), mv(self.ref), mv(self.pos),
                     mv(self.valid), self.reduce)

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
    graph `parts` holds those of tok and pos (and embed is their sum); in a feature graph feat_f and feat_e
    those of each site's features and error."""

    kind: str
    embed: torch.Tensor
    z: list
    mlp_out: list
    parts: list | None = None
    feat_f: list = field(default_factory=list)  # feature site j -> ablation values of its node features [., P, n]
    feat_e: list = field(default_factory=list)  # feature site j -> ablation value of its error [., P, d]


def ids_of(items, lookup) -> torch.Tensor:
    """Names or indices (any iterable, or a tensor of indices) as a 1-d index tensor."""
    if isinstance(items, torch.Tensor):
        return items.reshape(-1).long()
    return torch.tensor([i if isinstance(i, int) else lookup(i) for i in items], dtype=torch.long)

