"""The naive path: score a circuit with one full TransformerLens hooked forward.

Slow and simple on purpose: every hook point is the bridge's own, nothing is cached between
calls. Tests and benchmarks hold the fast evaluator to it.

On grouped-query models the bridge computes one key/value head per group of query heads, while
an edge into `a9.1.k` or `a9.1.v` changes only what query head 1 reads. Where such edges are
removed, the prompts run as one copy per query head of a group (copy c computes each group's key
and value from its c-th query head's patched input), each head's z is taken from its own copy,
and every copy continues with the assembled z, so all copies stay one forward of the circuit.

The names say the graph: `embed` is the whole embedding (hook_embed and hook_pos_embed together),
`tok` and `pos` (a split-embed graph) are hook_embed and hook_pos_embed alone.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch

from .graphs.model_graph import parse_node, receiver_node, split_edge
from .metrics import get_metric
from .models import Model
from .tasks.base import Task


def ablation_source(model: Model, task: Task, ablation: str) -> dict[str, torch.Tensor]:
    """Hook name -> ablation value, from one cached run of the corrupted prompts."""
    b = model.bridge
    keep = lambda n: n in ("hook_embed", "hook_pos_embed") or n.endswith("attn.hook_z") or n.endswith("hook_mlp_out")
    _, cache = b.run_with_cache(task.corrupted, names_filter=keep)
    out = {}
    for name in cache.keys():
        t = cache[name].detach()
        if ablation == "mean":
            t = t.mean(0, keepdim=True)
        elif ablation == "zero":
            t = torch.zeros_like(t[:1])
        out[name] = t
    if "hook_pos_embed" in out:  # `pos` of a split-embed graph ablates to its mean over positions (see patching)
        t = out["hook_pos_embed"]
        out["pos"] = t if ablation == "zero" else t.mean(1, keepdim=True).expand_as(t).clone()
    return out


def hooked_logits(model: Model, task: Task, ablation: str = "mean", nodes: Iterable[str] = (),
                  edges: Iterable[str] = (), source: dict | None = None) -> torch.Tensor:
    """Answer-position logits [n, vocab] of the clean prompts with nodes ablated and edges removed.

    A node written `a1.0@3` is ablated at token position 3 only (the number is the position).
    source: ablation_source(...) computed once by the caller; computed here if not given."""
    if task.mixed or bool(task.groups.any()):
        raise ValueError(f"task {task.name!r} has several lengths or groups; the reference oracle reads the last "
                         "position and takes one mean over all prompts, so score each group alone with it")
    b, L, H, n_kv = model.bridge, model.n_layers, model.n_heads, model.n_kv_heads
    nodes, at, removed = _removals(nodes, edges := list(edges))
    src = source if source is not None else ablation_source(model, task, ablation)
    has_pos = "hook_pos_embed" in src
    live: dict = {}

    n, rep = task.clean.shape[0], H // n_kv
    # grouped k/v read differently by the query heads of a group: one copy of the prompts per query head
    copies = rep if rep > 1 and any(r[-2:] in (".k", ".v") and v for r, v in removed.items()) else 1
    if copies > 1:  # a per-prompt ablation value (resample) follows the prompts into every copy
        src = {k: v.repeat(copies, *(1,) * (v.dim() - 1)) if v.shape[0] > 1 else v for k, v in src.items()}

    if ({"tok", "pos"} & (nodes | {s for v in removed.values() for s, _ in v})) and not has_pos:
        raise ValueError("tok and pos name the token and position embeddings of a model with learned positions; "
                         "this model has no hook_pos_embed")
    hook_of = {"tok": "hook_embed", "pos": "hook_pos_embed"}

    def diff(sender) -> torch.Tensor:
        if isinstance(sender, tuple):  # (sender, position or None): only at that position
            sender, pos = sender
            d = diff(sender)
            if pos is None:
                return d
            keep = torch.zeros(d.shape[1], 1, dtype=d.dtype)
            keep[pos] = 1
            return d * keep
        info = parse_node(sender, L)
        if sender in hook_of:
            return live[hook_of[sender]] - src["pos" if sender == "pos" else hook_of[sender]]
        if info.kind == "embed":
            d = live["hook_embed"] - src["hook_embed"]
            return d + (live["hook_pos_embed"] - src["hook_pos_embed"]) if has_pos else d
        if info.kind == "head":
            name = f"blocks.{info.layer}.attn.hook_z"
            dz = live[name][:, :, info.head] - src[name][:, :, info.head]
            return dz @ b.blocks[info.layer].attn.W_O[info.head]
        name = f"blocks.{info.layer}.hook_mlp_out"
        return live[name] - src[name]

    def at_positions(t, name, node, head=None):
        """t with `node`'s output replaced by its ablation value at its listed positions."""
        pos = at.get(node)
        if not pos:
            return t
        t = t.clone()
        s = src[name].expand_as(t)
        if head is None:
            t[:, pos] = s[:, pos]
        else:
            t[:, pos, head] = s[:, pos, head]
        return t

    def replace_hook(kind, name, layer=None):
        def fn(t, hook):
            if kind == "embed":  # embed at p: token and position embedding both (their sum is embed)
                t = at_positions(t, name, "embed")
            elif kind == "z":
                if copies > 1:  # head h reads its own copy's k/v (copy h % rep); every copy goes on with that
                    z = t.reshape(copies, n, *t.shape[1:])
                    t = torch.stack([z[h % rep][:, :, h] for h in range(H)], 2).repeat(copies, 1, 1, 1)
                for h in range(H):
                    t = at_positions(t, name, f"a{layer}.{h}", h)
            elif kind == "mlp":
                t = at_positions(t, name, f"m{layer}")
            if kind == "embed" and "embed" in nodes:
                t = src[name].expand_as(t).clone()
            elif kind == "embed" and {"hook_embed": "tok", "hook_pos_embed": "pos"}[name] in nodes:
                t = src["pos" if name == "hook_pos_embed" else name].expand_as(t).clone()
            elif kind == "z":
                ablate = [h for h in range(H) if f"a{layer}.{h}" in nodes]
                if ablate:
                    t = t.clone()
                    t[:, :, ablate] = src[name][:, :, ablate].expand(t.shape[0], -1, -1, -1)
            elif kind == "mlp" and f"m{layer}" in nodes:
                t = src[name].expand_as(t).clone()
            live[name] = t
            return t
        return fn

    def capture(key):
        def fn(t, hook):
            live[key] = t
            return t
        return fn

    def single_receiver_hook(receiver):
        def fn(t, hook):
            senders = removed.get(receiver, [])
            if not senders:
                return t
            return t - sum(diff(s) for s in senders)
        return fn

    hooks = [("hook_embed", replace_hook("embed", "hook_embed"))]
    if has_pos:
        hooks.append(("hook_pos_embed", replace_hook("embed", "hook_pos_embed")))
    for l in range(L):
        hooks.append((f"blocks.{l}.attn.hook_z", replace_hook("z", f"blocks.{l}.attn.hook_z", l)))
        if not model.attn_only:
            hooks.append((f"blocks.{l}.hook_mlp_out", replace_hook("mlp", f"blocks.{l}.hook_mlp_out", l)))
            hooks.append((f"blocks.{l}.ln2.hook_in", single_receiver_hook(f"m{l}")))
        if edges:
            hooks.append((f"blocks.{l}.hook_resid_pre", capture(f"blocks.{l}.hook_resid_pre")))
            for inp in "qkv":
                hooks.append((f"blocks.{l}.attn.{inp}.hook_out", _projection_hook(b, l, inp, removed, live, diff, copies, n, H)))
    hooks.append(("ln_final.hook_in" if model.bridge.cfg.normalization_type else "unembed.hook_in",
                  single_receiver_hook("logits")))
    with torch.no_grad():
        logits = b.run_with_hooks(task.clean.repeat(copies, 1), fwd_hooks=hooks)
    return logits[:n, -1].detach().float()


def _projection_hook(b, layer: int, inp: str, removed: dict, live: dict, diff, copies: int, n: int, H: int):
    """A hook recomputing the q/k/v projection of layer's heads whose `inp` input edges are removed (on
    grouped-query models copy c of the prompts holds the group's k/v as its c-th query head reads them)."""
    blk = b.blocks[layer]
    W = {"q": blk.attn.W_Q, "k": blk.attn.W_K, "v": blk.attn.W_V}[inp]
    bias = {"q": blk.attn.b_Q, "k": blk.attn.b_K, "v": blk.attn.b_V}[inp]
    ln1 = getattr(blk.ln1, "original_component", blk.ln1) if hasattr(blk, "ln1") else (lambda x: x)
    dh = W.shape[-1]

    def fn(t, hook):
        groups = W.shape[0]
        shared = groups < H  # one key/value head per group of `rep` query heads
        rep = H // groups
        for g in range(groups):
            for c in range(copies if shared else 1):
                head = g * rep + c if shared else g
                senders = removed.get(f"a{layer}.{head}.{inp}", [])
                if not senders:
                    continue
                rows = slice(c * n, (c + 1) * n) if shared else slice(None)
                x = live[f"blocks.{layer}.hook_resid_pre"][rows] - sum(diff(s)[rows] for s in senders)
                y = ln1(x) @ W[g] + (0 if bias is None else bias[g])
                t = t.clone()
                if t.dim() == 4:  # [batch, pos, head, d_head]
                    t[rows, :, g] = y
                else:  # [batch, pos, head * d_head]
                    t[rows, :, g * dh:(g + 1) * dh] = y
        return t
    return fn


def _removals(nodes, edges: list) -> tuple[set, dict, dict]:
    """(nodes ablated whole, node -> positions where it alone is ablated, receiver -> [(sender, position or
    None)] removed edges); a head's receiver without an input is its q, k and v together, and an edge
    removed whole is removed at every position."""
    nodes = set(nodes)
    at = defaultdict(list)
    for n in [n for n in nodes if "@" in n]:
        node, _, pos = n.partition("@")
        at[node].append(int(pos))
        nodes.discard(n)
    removed = defaultdict(list)
    for e in edges:
        pos = None
        if "@" in e:  # an edge at one position: sender@p->receiver@p
            (s, _, p1), (r, _, p2) = (x.partition("@") for x in e.split("->"))
            assert p1 == p2, e
            pos = int(p1)
        else:
            s, r = split_edge(e)
        node, inp = receiver_node(r)
        for recv in ([f"{node}.{x}" for x in "qkv"] if inp is None and parse_node(node).kind == "head" else [r]):
            if (s, pos) not in removed[recv]:
                removed[recv].append((s, pos))
    for recv, senders in removed.items():
        whole = {s for s, p in senders if p is None}
        removed[recv] = [(s, p) for s, p in senders if p is None or s not in whole]
    return nodes, at, removed


def hooked_score(model: Model, task: Task, ablation: str = "mean", metric: str = "logit_diff",
                 nodes: Iterable[str] = (), edges: Iterable[str] = (), source: dict | None = None) -> float:
    """The metric of hooked_logits, computed on the whole vocabulary."""
    m = get_metric(metric)
    logits = hooked_logits(model, task, ablation, nodes, edges, source)
    ref = None
    if metric == "kl":
        with torch.no_grad():
            ref = torch.log_softmax(model.bridge(task.clean)[:, -1].float(), -1)
    if m.two_columns:
        logits = torch.stack([logits.gather(1, task.answers[:, None])[:, 0],
                              logits.gather(1, task.wrong_answers[:, None])[:, 0]], 1)
    return m(logits, task.answers, task.wrong_answers, ref)
