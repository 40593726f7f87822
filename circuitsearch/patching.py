"""The evaluator: scores any circuit (ablated nodes, removed edges) on a task, fast.

It reads the model's weights once from the TransformerBridge and drives the layers itself,
so a change at layer l recomputes only layers l..L-1 from the cached residual stream of the
circuit it extends, every head can take its own q, k and v input (path patching), and logit
difference reads just two unembedding columns. `circuitsearch.reference` checks it against
a plain TransformerLens hooked forward.

Semantics (design.md): an ablated node's output is replaced by its ablation value (mean over
the corrupted prompts per position, the aligned corrupted prompt, or zero). A removed edge
s->r makes receiver r read `resid - (live_s - ablated_s)`: the sender's ablated output in
place of its live output in the current (pruned) run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

from .graphs.model_graph import ModelGraph, parse_node, receiver_node, split_edge
from .metrics import Metric, faithfulness, get_metric, normalized
from .models import Model
from .tasks.base import Task

ABLATIONS = ("mean", "resample", "zero")
_QKV = {"q": 0, "k": 1, "v": 2}
_ACT = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


# --------------------------------------------------------------------------- weights

@dataclass
class LayerWeights:
    ln1: tuple | None
    W_Q: torch.Tensor  # [H, d, dh]
    b_Q: torch.Tensor  # [H, dh]
    W_K: torch.Tensor  # [H, d, dh], expanded to one copy per query head
    b_K: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    W_O: torch.Tensor  # [H, dh, d]
    b_O: torch.Tensor  # [d]
    W_qkv: torch.Tensor | None = None  # [d, (H + 2 * n_kv) * dh]: shared-input projection, kv heads grouped
    b_qkv: torch.Tensor | None = None
    n_kv: int = 0
    W_gate_in: torch.Tensor | None = None  # [d, 2 * d_mlp] gate and in fused into one GEMM
    b_gate_in: torch.Tensor | None = None
    ln2: tuple | None = None
    W_in: torch.Tensor | None = None    # [d, d_mlp]
    b_in: torch.Tensor | None = None
    W_gate: torch.Tensor | None = None  # [d, d_mlp] for gated MLPs
    W_out: torch.Tensor | None = None   # [d_mlp, d]
    b_out: torch.Tensor | None = None


@dataclass
class Weights:
    """Everything the forward pass needs, as plain tensors."""

    layers: list[LayerWeights]
    W_E: torch.Tensor
    W_pos: torch.Tensor | None
    ln_final: tuple | None
    W_U: torch.Tensor  # [d, vocab]
    b_U: torch.Tensor  # [vocab]
    norm: str | None   # "LN", "RMS" or None
    eps: float
    act: str
    attn_scale: float
    rotary: tuple | None  # (cos [n_ctx, rd], sin [n_ctx, rd], style "half" | "adjacent")


def _norm_params(module) -> tuple | None:
    inner = getattr(module, "original_component", module)
    w = getattr(inner, "weight", None)
    if w is None:
        return None
    b = getattr(inner, "bias", None)
    return (w.detach().float(), None if b is None else b.detach().float())


def _zeros_if_none(t, shape):
    return torch.zeros(shape) if t is None else t.detach().float()


def extract_weights(model: Model) -> Weights:
    """Read the bridge's (unprocessed) weights into a Weights record."""
    b, cfg = model.bridge, model.bridge.cfg
    H, d = cfg.n_heads, cfg.d_model
    n_kv = cfg.n_key_value_heads or H
    rep = H // n_kv
    layers = []
    for blk in b.blocks:
        a = blk.attn
        dh = a.W_Q.shape[-1]
        expand = lambda t: t.detach().float().repeat_interleave(rep, dim=0)
        lw = LayerWeights(
            ln1=_norm_params(blk.ln1) if hasattr(blk, "ln1") else None,
            W_Q=a.W_Q.detach().float(), b_Q=_zeros_if_none(a.b_Q, (H, dh)),
            W_K=expand(a.W_K), b_K=expand(a.b_K) if a.b_K is not None else torch.zeros(H, dh),
            W_V=expand(a.W_V), b_V=expand(a.b_V) if a.b_V is not None else torch.zeros(H, dh),
            W_O=a.W_O.detach().float(), b_O=_zeros_if_none(a.b_O, (d,)), n_kv=n_kv)
        flat = lambda t: t.detach().float().permute(1, 0, 2).reshape(d, -1)
        kvb = lambda t: torch.zeros(n_kv * dh) if t is None else t.detach().float().reshape(-1)
        lw.W_qkv = torch.cat([flat(a.W_Q), flat(a.W_K), flat(a.W_V)], 1).contiguous()
        lw.b_qkv = torch.cat([lw.b_Q.reshape(-1), kvb(a.b_K), kvb(a.b_V)])
        if not cfg.attn_only:
            m = blk.mlp
            lw.ln2 = _norm_params(blk.ln2)
            lw.W_in = m.W_in.detach().float()
            lw.b_in = _zeros_if_none(m.b_in, (lw.W_in.shape[1],))
            lw.W_gate = m.W_gate.detach().float() if cfg.gated_mlp else None
            lw.W_out = m.W_out.detach().float()
            lw.b_out = _zeros_if_none(m.b_out, (d,))
            if lw.W_gate is not None:
                lw.W_gate_in = torch.cat([lw.W_gate, lw.W_in], 1).contiguous()
                lw.b_gate_in = torch.cat([torch.zeros(lw.W_in.shape[1]), lw.b_in])
        layers.append(lw)
    norm = cfg.normalization_type.upper() if cfg.normalization_type else None
    if norm not in (None, "LN", "RMS"):
        raise NotImplementedError(f"normalization {cfg.normalization_type!r} is not supported by the evaluator")
    inner_attn = getattr(b.blocks[0].attn, "original_component", None)
    scale = getattr(inner_attn, "scaling", None)
    if scale is None:
        scale = 1.0 / getattr(inner_attn, "scale", math.sqrt(layers[0].W_Q.shape[-1]))
    rotary = None
    if (cfg.positional_embedding_type or "standard") == "rotary":
        rotary = _rotary_tables(model, cfg.n_ctx if cfg.n_ctx <= 4096 else 4096)
    W_pos = None
    if (cfg.positional_embedding_type or "standard") == "standard":
        W_pos = b.W_pos.detach().float()
    return Weights(layers=layers, W_E=b.W_E.detach().float(), W_pos=W_pos,
                   ln_final=_norm_params(b.ln_final) if hasattr(b, "ln_final") else None,
                   W_U=b.W_U.detach().float(), b_U=_zeros_if_none(getattr(b, "b_U", None), (b.W_U.shape[1],)),
                   norm=norm, eps=float(cfg.eps), act=cfg.act_fn, attn_scale=float(scale), rotary=rotary)


def _rotary_tables(model: Model, n_ctx: int) -> tuple:
    om = model.bridge.original_model
    native = getattr(om, "rotary", None)
    if native is not None:  # TransformerLens native: adjacent pairs rotate together
        return native.cos_cached.float(), native.sin_cached.float(), "adjacent"
    rot = om.model.rotary_emb
    inner = getattr(rot, "original_component", rot)
    inv_freq = inner.inv_freq.float()
    scaling = float(getattr(inner, "attention_scaling", 1.0))
    freqs = torch.outer(torch.arange(n_ctx).float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)  # HF Llama: first and second halves rotate together
    return emb.cos() * scaling, emb.sin() * scaling, "half"


# --------------------------------------------------------------------------- state

@dataclass
class Masks:
    """What a circuit removes: ablated nodes and removed edges, as boolean tensors.

    Senders are indexed in forward order (embed, then each layer's heads and MLP).
    """

    embed: bool
    heads: torch.Tensor    # [L, H] ablated heads
    mlps: torch.Tensor     # [L] ablated MLPs
    e_attn: torch.Tensor   # [L, 3, H, S] removed edges into q/k/v receivers
    e_mlp: torch.Tensor    # [L, S] removed edges into MLPs
    e_logits: torch.Tensor  # [S] removed edges into the logits

    def copy(self) -> "Masks":
        return Masks(self.embed, self.heads.clone(), self.mlps.clone(), self.e_attn.clone(),
                     self.e_mlp.clone(), self.e_logits.clone())


@dataclass
class Run:
    """One forward pass of a circuit, cached layer by layer so that extensions start midway."""

    nodes: frozenset          # ablated nodes
    edges: frozenset          # removed edges
    masks: Masks
    embed: torch.Tensor       # [B, P, d] embed output (after ablation)
    resid_pre: list           # [L] input of each layer
    z: list                   # [L] head outputs before W_O, after ablation [B, P, H, dh]
    resid_mid: list           # [L] after attention
    mlp_out: list             # [L] after ablation
    final: torch.Tensor | None = None       # [B, P, d] residual after the last layer
    score: float = float("nan")
    per_prompt: torch.Tensor | None = None  # metric per prompt
    logits: torch.Tensor | None = None      # answer-position logits ([B, 2] or [B, vocab])
    diffs: dict = field(default_factory=dict)  # sender index -> live - ablated output


@dataclass
class Batch:
    """The prompt rows a forward pass runs on and how each counts in the mean metric.

    Identical rows give identical results under mean and zero ablation (and under resample
    when their corrupted prompts match too), so the evaluator runs each distinct row once and
    weights it by how often it occurs: exact, and several times faster on tasks that repeat
    prompts.
    """

    tokens: torch.Tensor    # [B, P]
    answers: torch.Tensor   # [B]
    wrong: torch.Tensor     # [B]
    weight: torch.Tensor    # [B] occurrences of the row in the task
    ref: torch.Tensor | None = None  # full model's log-probs per row (KL metric)

    @property
    def cols(self) -> torch.Tensor:
        return torch.stack([self.answers, self.wrong], 1)


def distinct_rows(task: Task, ablation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index of each distinct row, inverse map) over the rows that determine a clean run."""
    parts = [task.clean, task.answers[:, None], task.wrong_answers[:, None]]
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


@dataclass
class Source:
    """Ablation values (broadcastable to [B, P, ...]) for embed, head z and MLP outputs."""

    kind: str
    embed: torch.Tensor
    z: list
    mlp_out: list


class Evaluator:
    """Scores circuits of `model` on `task`; every algorithm talks to the model through this.

    score(nodes, edges) ablates the given nodes and removes the given edges. For search,
    run(...) returns a cached Run and extend(run, nodes=..., edges=...) scores a circuit that
    removes a little more, recomputing only from the earliest layer the change touches.
    """

    def __init__(self, model: Model, task: Task, ablation: str = "mean", metric: str = "logit_diff",
                 qkv: bool = True, weights: Weights | None = None):
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
        self.model, self.task, self.ablation = model, task, ablation
        self.metric: Metric = get_metric(metric)
        self.w = weights or extract_weights(model)
        self.L, self.H = model.n_layers, model.n_heads
        self.attn_only = model.attn_only
        self.graph = ModelGraph(self.L, self.H, self.attn_only, qkv)
        self.senders = self.graph.inner_nodes
        self.sender_index = {s: i for i, s in enumerate(self.senders)}
        self.S = len(self.senders)
        self.forward_passes = 0
        self.forward_equivalents = 0.0
        self.backward_passes = 0
        n_ctx = self.w.rotary[0].shape[0] if self.w.rotary else (self.w.W_pos.shape[0] if self.w.W_pos is not None else None)
        if n_ctx is not None and task.seq_len > n_ctx:
            raise ValueError(f"task prompts are {task.seq_len} tokens but the model's context is {n_ctx}")
        vocab = self.w.W_E.shape[0]
        for what, t in (("clean prompts", task.clean), ("corrupted prompts", task.corrupted),
                        ("answers", task.answers), ("wrong answers", task.wrong_answers)):
            if int(t.max()) >= vocab or int(t.min()) < 0:
                raise ValueError(f"task {task.name!r}: {what} hold token ids outside the model's vocabulary of {vocab}")
        first, inverse = distinct_rows(task, ablation)
        self.rows_inverse = inverse
        counts = torch.bincount(inverse, minlength=len(first)).float()
        self.batch = Batch(task.clean[first], task.answers[first], task.wrong_answers[first], counts)
        everything = Batch(task.corrupted, task.answers, task.wrong_answers, torch.ones(len(task)))
        with torch.inference_mode():
            empty = self._empty_masks()
            self._embed_clean = self._embed(self.batch.tokens)
            corrupt = self._forward(None, -1, frozenset(), frozenset(), empty, self._embed(task.corrupted),
                                    source=None, count=True, batch=everything)
            self.source = self._make_source(corrupt, first)
            self.clean_run = self._forward(None, -1, frozenset(), frozenset(), empty, self._embed_clean, count=True)
            if not self.metric.two_columns:
                self.batch.ref = torch.log_softmax(self.clean_run.logits.float(), -1)
                everything.ref = self.batch.ref[inverse]
                self._finish(self.clean_run, self.batch)
                self._finish(corrupt, everything)
            self.full = self.clean_run.score
            self.corrupted = corrupt.score
            self.empty = self.score(nodes=self.senders)

    # ------------------------------------------------------------------ public API

    def score(self, nodes: Iterable[str] = (), edges: Iterable[str] = ()) -> float:
        """Metric with `nodes` ablated and `edges` removed (everything else live)."""
        return self.run(nodes, edges).score

    def run(self, nodes: Iterable[str] = (), edges: Iterable[str] = ()) -> Run:
        """A cached run of the full model with `nodes` ablated and `edges` removed."""
        return self.extend(self.clean_run, nodes, edges)

    def extend(self, run: Run, nodes: Iterable[str] = (), edges: Iterable[str] = ()) -> Run:
        """The run of `run`'s circuit with `nodes` also ablated and `edges` also removed."""
        nodes = [n for n in nodes if n not in run.nodes]
        edges = [e for e in edges if e not in run.edges]
        if not nodes and not edges:
            return run
        masks = run.masks.copy()
        start = 3 * self.L
        for n in nodes:
            start = min(start, self._apply_node(masks, n))
        for e in edges:
            start = min(start, self._apply_edge(masks, e))
        with torch.inference_mode():
            return self._forward(run, start, run.nodes | frozenset(nodes), run.edges | frozenset(edges),
                                 masks, self._embed_clean, count=True)

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
        return out

    def stage_of(self, name: str) -> int:
        """Where a node or edge first changes the forward pass.

        -1 the embedding; 3l the inputs of layer l's heads (edges into q/k/v); 3l+1 the heads'
        outputs (ablating a head reuses the layer's attention); 3l+2 its MLP; 3L the logits.
        """
        edge = "->" in name
        if edge:
            name = split_edge(name)[1]
        node, _ = receiver_node(name)
        info = parse_node(node, self.L)
        if info.kind == "head":
            return 3 * info.layer + (0 if edge else 1)
        return {"embed": -1, "mlp": 3 * info.layer + 2, "logits": 3 * self.L}[info.kind]

    def receiver_gradients(self, run: Run | None = None, alpha: float = 1.0) -> dict:
        """Gradient of the score with respect to every receiver's input, in `run`'s circuit.

        Every live sender's output is mixed `alpha` of the way from its ablation value to its
        live value (alpha = 1: the circuit itself; alpha = 0: everything ablated), which is
        the path integrated gradients walk. One forward and one backward pass. Returns
        {"attn": [L] x [B, P, 3, H, d], "mlp": [L] x [B, P, d], "logits": [B, d]} for the
        distinct prompt rows, each row's gradient weighted by its share of the task.
        """
        if self.metric.name == "accuracy":
            raise ValueError("accuracy has no gradient: attribute with logit_diff, prob or kl instead")
        run = run or self.clean_run
        masks, L, H = run.masks.copy(), self.L, self.H  # copies: normal tensors, not inference ones
        src = self._grad_source()
        mix = lambda live, abl: abl + alpha * (live - abl)
        inputs = {"attn": [None] * L, "mlp": [None] * L, "logits": None}
        with torch.enable_grad():
            live = self._embed(self.batch.tokens).requires_grad_()
            embed = src.embed.expand_as(live) if masks.embed else mix(live, src.embed)
            out = [embed - src.embed]  # live - ablated output of each sender in forward order
            resid = embed

            def delta(mask):  # Σ over removed senders of (live - ablated), per receiver row
                cols = mask.any(0).nonzero()[:, 0].tolist()
                if not cols:
                    return 0.0
                return torch.einsum("rs,bpsd->bprd", mask[:, cols].float(), torch.stack([out[c] for c in cols], 2))

            for l in range(L):
                lw = self.w.layers[l]
                d = delta(masks.e_attn[l].reshape(3 * H, self.S)[:, : len(out)])
                x = resid[:, :, None, None, :].expand(*resid.shape[:2], 3, H, resid.shape[-1])
                if not isinstance(d, float):
                    x = x - d.reshape(*d.shape[:2], 3, H, d.shape[-1])
                inputs["attn"][l] = x
                z = self._attention(lw, x[:, :, 0], x[:, :, 1], x[:, :, 2])
                z = torch.where(masks.heads[l][None, None, :, None], src.z[l], mix(z, src.z[l]))
                heads = torch.einsum("bphe,hed->bphd", z - src.z[l], lw.W_O)
                out += list(heads.unbind(2))
                resid = resid + torch.einsum("bphe,hed->bpd", z, lw.W_O) + lw.b_O
                if not self.attn_only:
                    d = delta(masks.e_mlp[l][None, : len(out)])
                    x = resid.clone() if isinstance(d, float) else resid - d[:, :, 0]
                    inputs["mlp"][l] = x
                    m = self._mlp(lw, x)
                    m = src.mlp_out[l].expand_as(m) if bool(masks.mlps[l]) else mix(m, src.mlp_out[l])
                    out.append(m - src.mlp_out[l])
                    resid = resid + m
            d = delta(masks.e_logits[None])
            x = resid[:, -1].clone() if isinstance(d, float) else (resid - d[:, :, 0])[:, -1]
            inputs["logits"] = x
            normed = self._norm(x, self.w.ln_final)
            b = self.batch
            if self.metric.two_columns:
                logits = torch.einsum("bd,dbc->bc", normed, self.w.W_U[:, b.cols]) + self.w.b_U[b.cols]
            else:
                logits = normed @ self.w.W_U + self.w.b_U
            per = self.metric.per_prompt(logits, b.answers, b.wrong, b.ref)
            score = (per * b.weight).sum() / b.weight.sum()
            flat = inputs["attn"] + [t for t in inputs["mlp"] if t is not None] + [x]
            grads = torch.autograd.grad(score, flat, allow_unused=True, materialize_grads=True)
        self.forward_passes += 1
        self.forward_equivalents += 1.0
        self.backward_passes += 1
        g_attn, rest = list(grads[:L]), list(grads[L:])
        g_mlp = [None] * L if self.attn_only else rest[:L]
        return {"attn": g_attn, "mlp": g_mlp, "logits": rest[-1]}

    def _grad_source(self) -> Source:
        """The ablation source as ordinary tensors (the cached ones are inference tensors)."""
        if getattr(self, "_grad_src", None) is None:
            c = lambda t: None if t is None else t.clone()
            s = self.source
            self._grad_src = Source(s.kind, c(s.embed), [c(t) for t in s.z], [c(t) for t in s.mlp_out])
        return self._grad_src

    # ------------------------------------------------------------------ masks

    def _empty_masks(self) -> Masks:
        L, H, S = self.L, self.H, self.S
        z = lambda *s: torch.zeros(*s, dtype=torch.bool)
        return Masks(False, z(L, H), z(L), z(L, 3, H, S), z(L, S), z(S))

    def _apply_node(self, masks: Masks, name: str) -> int:
        self.graph.check_node(name)
        info = parse_node(name, self.L)
        if info.kind == "embed":
            masks.embed = True
        elif info.kind == "head":
            masks.heads[info.layer, info.head] = True
        elif info.kind == "mlp":
            masks.mlps[info.layer] = True
        else:
            raise ValueError("the logits node cannot be ablated; remove its incoming edges instead")
        return self.stage_of(name)

    def _apply_edge(self, masks: Masks, edge: str) -> int:
        self.graph.check_edge(edge)
        src, dst = split_edge(edge)
        s = self.sender_index[src]
        node, inp = receiver_node(dst)
        info = parse_node(node, self.L)
        if info.kind == "head":
            if self.graph.qkv:
                masks.e_attn[info.layer, _QKV[inp], info.head, s] = True
            else:
                masks.e_attn[info.layer, :, info.head, s] = True
        elif info.kind == "mlp":
            masks.e_mlp[info.layer, s] = True
        else:
            masks.e_logits[s] = True
        return self.stage_of(edge)

    # ------------------------------------------------------------------ forward

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.w.W_E[tokens]
        if self.w.W_pos is not None:
            x = x + self.w.W_pos[: tokens.shape[1]]
        return x

    def _make_source(self, corrupt: Run, rows: torch.Tensor) -> Source:
        """Ablation values from the corrupted run (over all the task's rows); resample keeps `rows`."""
        if self.ablation == "resample":
            return Source("resample", corrupt.embed[rows], [t[rows] for t in corrupt.z],
                          [None if t is None else t[rows] for t in corrupt.mlp_out])
        mean = lambda t: None if t is None else t.mean(0, keepdim=True)
        zero = lambda t: None if t is None else torch.zeros_like(t[:1])
        f = mean if self.ablation == "mean" else zero
        return Source(self.ablation, f(corrupt.embed), [f(t) for t in corrupt.z], [f(t) for t in corrupt.mlp_out])

    def _norm(self, x: torch.Tensor, params: tuple | None) -> torch.Tensor:
        if self.w.norm is None:
            return x
        w, b = params if params is not None else (None, None)
        if self.w.norm == "LN":
            return F.layer_norm(x, (x.shape[-1],), w, b, self.w.eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.w.eps)
        return x if w is None else x * w

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin, style = self.w.rotary
        P, rd = x.shape[1], cos.shape[-1]
        cos, sin = cos[:P, None, :], sin[:P, None, :]
        xr, xp = x[..., :rd], x[..., rd:]
        if style == "half":
            x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
            rot = torch.cat([-x2, x1], -1)
        else:
            rot = torch.stack([-xr[..., 1::2], xr[..., 0::2]], -1).flatten(-2)
        out = xr * cos + rot * sin
        return torch.cat([out, xp], -1) if xp.shape[-1] else out

    def _proj(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, params) -> torch.Tensor:
        x = self._norm(x, params)
        eq = "bpd,hde->bphe" if x.dim() == 3 else "bphd,hde->bphe"
        return torch.einsum(eq, x, W) + b

    def _attention(self, lw: LayerWeights, xq, xk=None, xv=None) -> torch.Tensor:
        """z [B, P, H, dh] of every head; one shared input [B, P, d], or q, k, v inputs [B, P, H, d]."""
        if xk is None:  # shared input: one GEMM, keys and values per kv head
            B, P, _ = xq.shape
            H, dh = self.H, lw.W_Q.shape[-1]
            qkv = self._norm(xq, lw.ln1) @ lw.W_qkv + lw.b_qkv
            q = qkv[..., : H * dh].view(B, P, H, dh)
            k, v = qkv[..., H * dh:].view(B, P, 2, lw.n_kv, dh).unbind(2)
            rep = H // lw.n_kv
            if rep > 1:
                k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        else:
            q = self._proj(xq, lw.W_Q, lw.b_Q, lw.ln1)
            k = self._proj(xk, lw.W_K, lw.b_K, lw.ln1)
            v = self._proj(xv, lw.W_V, lw.b_V, lw.ln1)
        if self.w.rotary is not None:
            q, k = self._rope(q), self._rope(k)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * self.w.attn_scale
        P = q.shape[1]
        mask = torch.ones(P, P, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        return torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)

    def _mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        h = self._norm(x, lw.ln2)
        act = _ACT[self.w.act]
        if lw.W_gate_in is not None:
            gate, pre = (h @ lw.W_gate_in + lw.b_gate_in).chunk(2, -1)
            post = act(gate) * pre
        else:
            post = act(h @ lw.W_in + lw.b_in)
        return post @ lw.W_out + lw.b_out

    def _sender_diff(self, run: Run, s: int) -> torch.Tensor:
        """live − ablated output of sender s in `run` (cached in run.diffs)."""
        d = run.diffs.get(s)
        if d is None:
            info = parse_node(self.senders[s], self.L)
            if info.kind == "embed":
                d = run.embed - self.source.embed
            elif info.kind == "head":
                zl = run.z[info.layer][:, :, info.head] - self.source.z[info.layer][:, :, info.head]
                d = zl @ self.w.layers[info.layer].W_O[info.head]
            else:
                d = run.mlp_out[info.layer] - self.source.mlp_out[info.layer]
            run.diffs[s] = d
        return d

    def _delta(self, run: Run, mask: torch.Tensor) -> torch.Tensor | None:
        """Σ over removed senders of (live − ablated), per receiver row of mask [R, S] -> [B, P, R, d]."""
        cols = mask.any(0)
        if not bool(cols.any()):
            return None
        idx = [int(s) for s in cols.nonzero()[:, 0] if not self._is_ablated(run.masks, int(s))]
        if not idx:
            return None
        D = torch.stack([self._sender_diff(run, s) for s in idx], 2)  # [B, P, n, d]
        return torch.einsum("rs,bpsd->bprd", mask[:, idx].to(D.dtype), D)

    def _is_ablated(self, masks: Masks, s: int) -> bool:
        info = parse_node(self.senders[s], self.L)
        if info.kind == "embed":
            return masks.embed
        if info.kind == "head":
            return bool(masks.heads[info.layer, info.head])
        return bool(masks.mlps[info.layer])

    def _forward(self, base: Run | None, start: int, nodes: frozenset, edges: frozenset, masks: Masks,
                 embed_live: torch.Tensor, source: Source | None = "self", count: bool = True,
                 batch: Batch | None = None) -> Run:
        """Recompute `base`'s circuit with new masks from stage `start` on (see stage_of)."""
        src = self.source if source == "self" else source
        batch = batch or self.batch
        L = self.L
        if base is None or start < 0:
            embed = src.embed.expand_as(embed_live) if (masks.embed and src is not None) else embed_live
            run = Run(nodes, edges, masks, embed, [None] * L, [None] * L, [None] * L, [None] * L)
            start = -1
        else:
            run = Run(nodes, edges, masks, base.embed, list(base.resid_pre), list(base.z),
                      list(base.resid_mid), list(base.mlp_out))
            run.diffs = {s: d for s, d in base.diffs.items() if self._sender_stage(s) < start}
        first = max(start, 0) // 3
        if first >= L:
            resid = base.final
        else:
            resid = run.embed if first == 0 and start <= 0 else run.resid_pre[first]
        for l in range(first, L):
            lw = self.w.layers[l]
            stage = start - 3 * l if l == first else -1  # where this layer's recomputation begins
            if stage <= 1:
                if stage <= 0:
                    run.resid_pre[l] = resid
                    delta = self._delta(run, masks.e_attn[l].reshape(3 * self.H, self.S)) if edges else None
                    if delta is None:
                        z = self._attention(lw, resid)
                    else:
                        delta = delta.reshape(*delta.shape[:2], 3, self.H, delta.shape[-1])
                        x = resid[:, :, None, None, :] - delta  # [B, P, 3, H, d]
                        z = self._attention(lw, x[:, :, 0], x[:, :, 1], x[:, :, 2])
                else:
                    z = run.z[l]
                if src is not None and bool(masks.heads[l].any()):
                    z = torch.where(masks.heads[l][None, None, :, None], src.z[l], z)
                run.z[l] = z
                resid = run.resid_pre[l] + torch.einsum("bphe,hed->bpd", z, lw.W_O) + lw.b_O
                run.resid_mid[l] = resid
            else:
                resid = run.resid_mid[l]
            if not self.attn_only:
                delta = self._delta(run, masks.e_mlp[l][None]) if edges else None
                out = self._mlp(lw, resid if delta is None else resid - delta[:, :, 0])
                if src is not None and bool(masks.mlps[l]):
                    out = src.mlp_out[l].expand_as(out)
                run.mlp_out[l] = out
                resid = resid + out
        run.final = resid
        delta = self._delta(run, masks.e_logits[None]) if edges else None
        last = (resid if delta is None else resid - delta[:, :, 0])[:, -1]
        normed = self._norm(last, self.w.ln_final)
        if self.metric.two_columns:
            cols = batch.cols
            W = self.w.W_U[:, cols]  # [d, B, 2]
            run.logits = torch.einsum("bd,dbc->bc", normed, W) + self.w.b_U[cols]
        else:
            run.logits = normed @ self.w.W_U + self.w.b_U
        if count:
            self.forward_passes += 1
            self.forward_equivalents += self._cost(start)
        if self.metric.two_columns or batch.ref is not None:
            self._finish(run, batch)
        return run

    def _cost(self, start: int) -> float:
        """Fraction of a full forward that recomputing from `start` costs (attention ~1/3 of a layer)."""
        if start < 0:
            return 1.0
        layer, part = divmod(start, 3)
        left = self.L - layer - (0.3 if part == 1 else 0.35 if part == 2 else 0.0)
        if self.attn_only and part == 2:
            left = self.L - layer - 1
        return max(left, 0.0) / self.L

    def _finish(self, run: Run, batch: Batch) -> None:
        """The metric per distinct row, and the score: its mean over all the task's rows."""
        run.per_prompt = self.metric.per_prompt(run.logits, batch.answers, batch.wrong, batch.ref)
        run.score = float((run.per_prompt * batch.weight).sum() / batch.weight.sum())

    def _sender_stage(self, s: int) -> int:
        return self.stage_of(self.senders[s])
