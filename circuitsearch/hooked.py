"""The hook-based evaluation path: the evaluator's semantics through the bridge's own hook points.

For models the fast engine does not reproduce (engine.unsupported names a feature, or its load check
fails) whose bridge still has per-head attention and heads and MLPs that write additively into the
residual stream. Every circuit is one full bridge forward with hooks, nothing cached between circuits:
an ablated node's output is replaced at its output hook (blocks.0.hook_resid_pre for `embed`,
attn.hook_z per head, hook_mlp_out), a removed edge patches its receiver's input (a head's q/k/v
projection recomputed from the patched residual, the MLP's norm input, the final norm's input).
Slower than the engine, same semantics; `check_structure` verifies every assumption this makes on the
task's clean prompts before anything is scored, so a model it does not fit is refused, not mis-scored.

Grouped-query attention: the bridge computes one key/value projection per key/value head, while the
graph gives every query head its own k and v inputs. When query heads of one group read different
k/v inputs, the forward runs the prompts once per distinct input ("copies" stacked along the batch),
each head takes its z from its own copy, and every copy continues with the assembled z, so the copies
stay equal downstream; the cost is a wider batch, the result exact. Gradients for attribution
(receiver_gradients) take the same route: one hooked forward and backward, every receiver's input a
tensor of its own.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from .engine import architecture, check_supported, features
from .graphs.index import EMBED, HEAD, MLP, index_of
from .graphs.model_graph import ModelGraph
from .metrics import get_metric
from .models import Model, ModelError
from .readout import make_readout
from .evaluator.layout import Layout
from .patching import (ABLATIONS, Batch, Evaluator, Masks, Run, Source, check_context, check_token_ids,
                       distinct_rows)
from .tasks.base import Task
from .tasks.slots import task_slots

# Largest departure from the additive structure check_structure accepts, relative to the residual
# stream's scale: float32 sums of a few hundred terms in another order stay near 1e-6 of it; a norm
# after the heads' sum, or a hook at another point of the computation, moves it by 1e-2 or more.
STRUCTURE_TOLERANCE = 1e-4
POSITIONS_REFUSED = ("position-level circuits (nodes or edges at single slots) run on the fast engine only; "
                     "this model is on the hook-based path, so prune it without the positions level")


def refusals(model: Model) -> list[str]:
    """What the hook-based path cannot express on `model`, each named (empty: it can try; the structure
    check on the task's prompts then decides)."""
    check_supported_heads(model)
    cfg, out = model.bridge.cfg, []
    experts = getattr(cfg, "num_experts", None)
    if experts:
        out.append(f"num_experts={experts!r} (mixture-of-experts routing: the graph has one MLP node per layer "
                   "and cannot express which expert a token is routed to)")
    if getattr(cfg, "is_stateful", False):
        out.append("is_stateful=True (a recurrent state is not a sum of head and MLP writes)")
    blocks = model.bridge.blocks
    if any(hasattr(blk, n) for blk in blocks for n in ("ln1_post", "ln2_post")):
        out.append("post-attention/post-MLP norms (ln1_post/ln2_post, Gemma 2/3 style: the heads' sum passes "
                   "through a norm, so one head's write into the residual stream is not defined)")
    names = set(model.bridge.hook_dict)
    need = ["blocks.0.hook_resid_pre"]
    for l in range(model.n_layers):
        need += [f"blocks.{l}.hook_resid_pre", f"blocks.{l}.attn.hook_z",
                 *(f"blocks.{l}.attn.{x}.hook_out" for x in "qkv")]
        if not model.attn_only:
            need += [f"blocks.{l}.hook_mlp_out", f"blocks.{l}.ln2.hook_in"]
    missing = [n for n in dict.fromkeys(need) if n not in names]
    if missing:
        out.append(f"hook points {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} (the hook-based "
                   "path reads and patches the residual stream, head outputs and MLP inputs there)")
    if "ln_final.hook_in" not in names and "unembed.hook_in" not in names:
        out.append("hook point ln_final.hook_in or unembed.hook_in (the logits' input)")
    for n in ("W_Q", "W_K", "W_V", "W_O"):
        if not all(getattr(blk.attn, n, None) is not None for blk in blocks):
            out.append(f"per-head attention weights attn.{n}")
    return out


def refuse_readout(task: Task, metric, split_embed: bool, positions, reduce) -> None:
    """What the hook-based path does not do yet, refused by name: it reads the metric at the last position
    of prompts of one length and template, with one embedding sender (never an approximation of the rest)."""
    if split_embed:
        raise ModelError("--split-embed runs on the fast engine only; this model runs on the hook-based path, "
                         "which has one embedding sender: leave out --split-embed")
    run_task, readout = make_readout(task, metric, positions, reduce)
    if task.mixed or bool(task.groups.any()):
        raise ValueError(f"task {task.name!r} holds several templates or token lengths; the hook-based path this "
                         "model runs on reads one length and template: give one template (--template N)")
    if not readout.last_only or run_task is not task:
        raise ValueError(f"--positions {positions} / --metric {metric.name} read the metric at other positions than "
                         "the prompt's last; the hook-based path this model runs on reads the last position only: "
                         "use --positions last with logit_diff, prob, kl, accuracy or l2")


def check_supported_heads(model: Model) -> None:
    """ModelError for a model without attention heads: no path applies (the graph is heads and MLPs)."""
    from .engine import unsupported

    if any(m.startswith("attention heads") for m in unsupported(model)):
        check_supported(model)  # raises the by-name refusal


def refuse(model: Model) -> None:
    """ModelError naming everything the hook-based path cannot express on `model`."""
    why = refusals(model)
    if why:
        raise ModelError(f"model {model.name!r} ({architecture(model)}) cannot be scored on the hook-based path "
                         f"either: {'; '.join(why)}. Nothing was scored")


@dataclass(frozen=True)
class Structure:
    """What check_structure found: whether each layer's MLP reads the layer's input (parallel blocks),
    the hook holding the logits' input, and the largest relative departure seen."""

    parallel: bool
    final_in: str
    worst: float


def _norm(module):
    """The norm module itself (the bridge wrapper's original component), identity for none."""
    if module is None:
        return lambda x: x
    return getattr(module, "original_component", module)


def _project(blk, x_name: str, resid: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """ln1(resid) @ W_x + b_x for all groups [B, P, G, dh] or one group [B, P, dh]."""
    a = blk.attn
    W = getattr(a, f"W_{x_name.upper()}")
    b = getattr(a, f"b_{x_name.upper()}")
    h = _norm(getattr(blk, "ln1", None))(resid)
    if group is None:
        y = torch.einsum("bpd,gde->bpge", h, W)
        return y if b is None else y + b
    y = h @ W[group]
    return y if b is None else y + b[group]


def _as_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """A q/k/v projection output as [B, P, groups, dh] (the bridge gives that or [B, P, groups * dh])."""
    return t if t.dim() == 4 else t.view(*t.shape[:2], groups, -1)


def check_structure(model: Model, tokens: torch.Tensor) -> Structure:
    """Verify on `tokens` what the hook-based path assumes, from one captured bridge forward: the residual
    stream at every layer's input, the MLP's norm input and the logits' input is the embedding plus the
    heads' writes (Σ_h z_h W_O,h) and MLP outputs before it, plus a constant (biases); and each q/k/v
    projection is ln1(layer input) @ W + b. Decides per model whether MLPs read the layer's input
    (parallel) or the residual after attention. ModelError naming the hook and the departure otherwise."""
    b, L = model.bridge, model.n_layers
    names = set(b.hook_dict)
    final_in = "ln_final.hook_in" if "ln_final.hook_in" in names else "unembed.hook_in"
    keep = {final_in}
    for l in range(L):
        keep |= {f"blocks.{l}.hook_resid_pre", f"blocks.{l}.attn.hook_z", *(f"blocks.{l}.attn.{x}.hook_out" for x in "qkv")}
        if not model.attn_only:
            keep |= {f"blocks.{l}.hook_mlp_out", f"blocks.{l}.ln2.hook_in"}
    with torch.no_grad():
        _, cache = b.run_with_cache(tokens, names_filter=lambda n: n in keep)
    c = {n: cache[n].detach().float() for n in keep}
    scale = max(1.0, max(float(c[f"blocks.{l}.hook_resid_pre"].abs().max()) for l in range(L)),
                float(c[final_in].abs().max()))
    tol = STRUCTURE_TOLERANCE * scale
    worst = 0.0

    def off_by(actual, predicted):  # departure from "predicted + a constant vector"
        r = actual - predicted
        return float((r - r[:1, :1]).abs().max())

    def fail(what, dev):
        raise ModelError(f"model {model.name!r} cannot be scored on the hook-based path: {what} departs from what "
                         f"the path assumes by up to {dev:.3g} ({dev / scale:.2g} of the residual scale {scale:.3g}, "
                         f"tolerance {STRUCTURE_TOLERANCE:g}). Config features: {features(model)}. Nothing was scored")

    acc = c["blocks.0.hook_resid_pre"]
    parallel = set()
    for l in range(L):
        blk = b.blocks[l]
        pre = c[f"blocks.{l}.hook_resid_pre"]
        dev = off_by(pre, acc)
        worst = max(worst, dev)
        if dev > tol:
            fail(f"the residual stream at blocks.{l}.hook_resid_pre is not the sum of the embedding, heads' "
                 "writes (z W_O) and MLP outputs before it", dev)
        for x in "qkv":
            name = f"blocks.{l}.attn.{x}.hook_out"
            with torch.no_grad():
                mine = _project(blk, x, pre)
            got = _as_groups(c[name], mine.shape[2])
            dev = float((mine - got).abs().max()) if mine.shape == got.shape else float("inf")
            yscale = max(1.0, float(got.abs().max()))
            worst = max(worst, dev / yscale * scale)
            if not dev <= STRUCTURE_TOLERANCE * yscale:
                fail(f"{name} is not ln1(blocks.{l}.hook_resid_pre) @ W_{x.upper()} + b_{x.upper()} "
                     f"(shapes {tuple(got.shape)} and {tuple(mine.shape)})", dev / yscale * scale)
        heads = torch.einsum("bphe,hed->bpd", c[f"blocks.{l}.attn.hook_z"], blk.attn.W_O.float())
        if model.attn_only:
            acc = acc + heads
            continue
        mlp_in = c[f"blocks.{l}.ln2.hook_in"]
        seq, par = off_by(mlp_in, acc + heads), off_by(mlp_in, acc)
        if min(seq, par) > tol:
            fail(f"the MLP input blocks.{l}.ln2.hook_in is neither the layer's input nor the residual after its "
                 "heads' writes", min(seq, par))
        worst = max(worst, min(seq, par))
        parallel.add(par < seq)
        acc = acc + heads + c[f"blocks.{l}.hook_mlp_out"]
    if len(parallel) > 1:
        raise ModelError(f"model {model.name!r}: some layers' MLPs read the layer's input and others the residual "
                         "after attention; the graph has one layout for all layers. Nothing was scored")
    dev = off_by(c[final_in], acc)
    worst = max(worst, dev)
    if dev > tol:
        fail(f"the logits' input {final_in} is not the sum of every write", dev)
    return Structure(parallel=parallel == {True}, final_in=final_in, worst=worst / scale)


class HookedEvaluator(Evaluator):
    """The Evaluator's interface and semantics through bridge hooks (see the module docstring).

    run/extend/extend_many/rescore recompute the whole forward for every circuit (no layer cache):
    each circuit counts as one forward pass and one forward-equivalent. receiver_gradients (attribution)
    is one hooked forward and backward through the bridge.
    """

    path = "hooked"

    def __init__(self, model: Model, task: Task, ablation: str = "mean", metric: str = "logit_diff",
                 qkv: bool = True, split_embed: bool = False, positions: str | tuple = "last",
                 reduce: str | None = None):
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
        refuse(model)
        self.model, self.task, self.ablation = model, task, ablation
        self.metric = get_metric(metric)
        refuse_readout(task, self.metric, split_embed, positions, reduce)
        self.split_embed = False
        self.run_task, self.readout = make_readout(task, self.metric, positions, reduce)
        self.positions, self.reduce = positions, self.readout.reduce
        self.engine, self.w = None, None
        self._embed_clean = None  # Evaluator.extend_many passes it on; the hooked forward embeds itself
        self.bridge = model.bridge
        self.L, self.H, self.n_kv = model.n_layers, model.n_heads, model.n_kv_heads
        self.attn_only = model.attn_only
        self._check_task(task)
        self.slots = task_slots(self.run_task)
        self.Q, self._units = self.slots.Q, None
        first, inverse = distinct_rows(task, ablation)
        self._slot_rows = self.slots.rows(first)
        self.read_slots = torch.ones(self.Q, dtype=torch.bool)  # position-level circuits are refused here
        self.structure = check_structure(model, task.clean[first])
        self.graph = ModelGraph(self.L, self.H, self.attn_only, qkv, parallel=self.structure.parallel)
        self.index = index_of(self.graph)
        self.senders = self.index.senders
        self.sender_index = {s: i for i, s in enumerate(self.senders)}
        self.S = self.index.S
        kinds = set(self.index.node_kind[: self.S])
        if not kinds <= {EMBED, HEAD, MLP}:  # never score a sender this path does not know as another one
            raise ModelError(f"the hook-based path knows embed, head and MLP senders; this graph has kinds {kinds}")
        self.layout = Layout.of(self.graph, self.index, self.L, self.H, self.attn_only)
        self.batched_passes = self.forward_passes = self.backward_passes = 0
        self.forward_equivalents = 0.0
        self.rows_inverse = inverse
        counts = torch.bincount(inverse, minlength=len(first)).float()
        self.batch = Batch(task.clean[first], task.answers[first], task.wrong_answers[first], counts)
        everything = Batch(task.corrupted, task.answers, task.wrong_answers, torch.ones(len(task)))
        self._W_O = [blk.attn.W_O.detach() for blk in self.bridge.blocks]
        with torch.inference_mode():
            corrupt = self._source_run(task.corrupted, first)
            self.clean_run = self._hooked(self._empty_masks(), self.batch)
            self._baselines(corrupt, everything, inverse)

    # ------------------------------------------------------------------ what differs from Evaluator

    def _check_task(self, task: Task) -> None:
        """The Evaluator's checks with the bridge's context and vocabularies (there is no engine here)."""
        cfg = self.bridge.cfg
        check_context(task, getattr(cfg, "n_ctx", None))
        check_token_ids(task, self.readout, cfg.d_vocab, getattr(cfg, "d_vocab_out", None) or cfg.d_vocab)

    def receiver_gradients(self, run: Run | None = None, alpha=1.0) -> dict:
        """Evaluator.receiver_gradients through the bridge: one hooked forward (every live sender's output
        mixed `alpha` of the way from its ablation value, every receiver's input a tensor of its own: each
        head's q/k/v input recomputed through the projection, on grouped-query models one copy of the
        prompts per query head of a group) and one backward pass; several alphas: one each, summed."""
        if not self.metric.gradient:
            raise ValueError(f"{self.metric.name} has no gradient: attribute with logit_diff, prob or kl instead")
        if not isinstance(alpha, (int, float)):
            gs = [self.receiver_gradients(run, a) for a in alpha]
            add = lambda xs: None if xs[0] is None else sum(xs[1:], xs[0])
            return {"attn": [add(x) for x in zip(*(g["attn"] for g in gs))],
                    "mlp": [add(x) for x in zip(*(g["mlp"] for g in gs))],
                    "logits": add([g["logits"] for g in gs])}
        run = run or self.clean_run
        if bool(run.masks.at.any()) or run.masks.removed_at is not None:
            raise ValueError(POSITIONS_REFUSED)
        ix, L, H, S, n_kv = self.index, self.L, self.H, self.S, self.n_kv
        rep = H // n_kv
        V, batch = rep, self.batch
        B = len(batch.tokens)
        src = self._grad_source()
        ablated = run.masks.ablated.clone()
        removed = run.masks.removed & ~ablated[None, :S]
        tile = (lambda t: t) if V == 1 else (lambda t: t.repeat(V, *[1] * (t.dim() - 1)))
        mix = lambda live, abl: abl + alpha * (live - abl)
        live, diffs = {}, {}
        inputs = {"attn": [None] * L, "mlp": [None] * L, "logits": None}

        diff = self._differ(live, src, diffs, B)

        def delta(row: int):
            senders = removed[row].nonzero()[:, 0].tolist()
            return sum(diff(s) for s in senders) if senders else None

        def resid_pre(l):
            def fn(t, hook):
                x = t[:B]
                if l == 0:
                    x = x.detach().clone().requires_grad_()
                    x = live["embed"] = torch.where(ablated[0], src.embed, mix(x, src.embed))
                live["pre", l] = x
                rows = self.layout.attn_rows[l].view(3, H).tolist()
                ds = [[delta(rows[i][h]) for h in range(H)] for i in range(3)]
                inp = x[:, :, None, None, :].expand(*x.shape[:2], 3, H, x.shape[-1])
                if any(d is not None for row in ds for d in row):
                    zero = torch.zeros_like(x)
                    inp = inp - torch.stack([torch.stack([zero if d is None else d for d in row], 2) for row in ds], 2)
                inputs["attn"][l] = inp
                return tile(x)
            return fn

        def projection(l, name):
            i, blk = "qkv".index(name), self.bridge.blocks[l]

            def fn(t, hook):
                inp = inputs["attn"][l]
                if name == "q":
                    y = tile(torch.stack([_project(blk, "q", inp[:, :, 0, h], h) for h in range(H)], 2))
                else:  # copy c: each group's key/value head computed from its c-th query head's input
                    y = torch.cat([torch.stack([_project(blk, name, inp[:, :, i, g * rep + c], g) for g in range(n_kv)], 2)
                                   for c in range(V)], 0)
                return y.to(t.dtype).view(t.shape)
            return fn

        def z_hook(l):
            off = ablated[self.layout.heads[l]][None, None, :, None]

            def fn(t, hook):
                z = t[:B] if V == 1 else torch.stack([t[(h % rep) * B:(h % rep + 1) * B, :, h] for h in range(H)], 2)
                z = live["z", l] = torch.where(off, src.z[l], mix(z, src.z[l]))
                return tile(z)
            return fn

        def mlp_in(l):
            def fn(t, hook):
                d = delta(self.layout.mlp_row[l])
                x = inputs["mlp"][l] = t[:B].clone() if d is None else t[:B] - d
                return tile(x)
            return fn

        def mlp_out(l):
            off = bool(ablated[self.layout.mlp[l]])

            def fn(t, hook):
                m = t[:B]
                m = live["mlp", l] = src.mlp_out[l].expand_as(m) if off else mix(m, src.mlp_out[l])
                return tile(m)
            return fn

        def final(t, hook):
            d = delta(self.layout.logits_row)
            x = inputs["logits"] = t[:B].clone() if d is None else t[:B] - d
            return tile(x)

        hooks = []
        for l in range(L):
            hooks.append((f"blocks.{l}.hook_resid_pre", resid_pre(l)))
            hooks += [(f"blocks.{l}.attn.{x}.hook_out", projection(l, x)) for x in "qkv"]
            hooks.append((f"blocks.{l}.attn.hook_z", z_hook(l)))
            if not self.attn_only:
                hooks += [(f"blocks.{l}.ln2.hook_in", mlp_in(l)), (f"blocks.{l}.hook_mlp_out", mlp_out(l))]
        hooks.append((self.structure.final_in, final))
        with torch.enable_grad():
            logits = self.bridge.run_with_hooks(tile(batch.tokens), fwd_hooks=hooks)
            logits = getattr(logits, "logits", logits)
            last = self._read(logits[:B, -1], batch.cols)
            per = self.metric.per_prompt(last, batch.answers, batch.wrong, batch.ref)
            score = (per * batch.weight).sum() / batch.weight.sum()
            flat = inputs["attn"] + [t for t in inputs["mlp"] if t is not None] + [inputs["logits"]]
            grads = torch.autograd.grad(score, flat, allow_unused=True, materialize_grads=True)
        self.forward_passes += 1
        self.forward_equivalents += 3.0  # the backward costs about two forwards (Evaluator.count_relaxed)
        self.backward_passes += 1
        g_attn, rest = list(grads[:L]), list(grads[L:])
        return {"attn": g_attn, "mlp": [None] * L if self.attn_only else rest[:L], "logits": rest[-1][:, -1]}

    def sender_diffs(self, run: Run) -> torch.Tensor:
        """live − ablated output of every sender in `run`, stacked [B, P, S, d] (one hooked forward)."""
        out = []
        self._hooked(run.masks, self.batch, diffs_out=out)
        return torch.stack(out, 2)

    def _forward_many(self, base, start, masks: list, embed_live=None, source="self", count: bool = True,
                      batch: Batch | None = None) -> list:
        """One full hooked forward per circuit (base and start are ignored: nothing is cached)."""
        batch = batch or self.batch
        if any(bool(m.at.any()) or m.removed_at is not None for m in masks):
            raise ValueError(POSITIONS_REFUSED)
        runs = [self._hooked(m, batch) for m in masks]
        if count:
            self.forward_passes += len(runs)
            self.forward_equivalents += float(len(runs))
        return runs

    # ------------------------------------------------------------------ the hooked forward

    def _source_run(self, corrupted: torch.Tensor, rows: torch.Tensor) -> Run:
        """Capture the corrupted prompts' embed, z and MLP outputs (one forward), set self.source, and
        return the corrupted run (its answer-position logits) for the `corrupted` score."""
        L = self.L
        keep = {"blocks.0.hook_resid_pre", *(f"blocks.{l}.attn.hook_z" for l in range(L))}
        if not self.attn_only:
            keep |= {f"blocks.{l}.hook_mlp_out" for l in range(L)}
        logits, cache = self.bridge.run_with_cache(corrupted, names_filter=lambda n: n in keep)
        embed = cache["blocks.0.hook_resid_pre"].detach()
        z = [cache[f"blocks.{l}.attn.hook_z"].detach() for l in range(L)]
        mlp = [None if self.attn_only else cache[f"blocks.{l}.hook_mlp_out"].detach() for l in range(L)]
        if self.ablation == "resample":
            f = lambda t: None if t is None else t[rows]
        elif self.ablation == "mean":
            f = lambda t: None if t is None else t.mean(0, keepdim=True)
        else:
            f = lambda t: None if t is None else torch.zeros_like(t[:1])
        self.source = Source(self.ablation, f(embed), [f(t) for t in z], [f(t) for t in mlp])
        self.forward_passes += 1
        self.forward_equivalents += 1.0
        run = Run(self.index, self._empty_masks(), None, [], [], [], [])
        everything = torch.stack([self.task.answers, self.task.wrong_answers], 1)
        run.logits = self._read(logits[:, -1], everything)
        return run

    def _read(self, last: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The metric's view of answer-position logits [B, vocab]: the two columns, or all in float32."""
        last = last.float()
        return last.gather(1, cols) if self.metric.two_columns else last

    def _plan(self, masks: Masks):
        """Per layer: q senders per head, k and v senders per head, the distinct (k, v) inputs of each
        key/value group and which of them each head reads; and the number of copies the forward needs."""
        H, n_kv = self.H, self.n_kv
        rep = H // n_kv
        live = ~masks.ablated[: self.S]
        removed = masks.removed & live[None]
        senders = lambda row: tuple(removed[row].nonzero()[:, 0].tolist())
        layers, copies = [], 1
        for l in range(self.L):
            rows = self.layout.attn_rows[l].view(3, H).tolist()
            q = [senders(rows[0][h]) for h in range(H)]
            kv = [(senders(rows[1][h]), senders(rows[2][h])) for h in range(H)]
            classes, which = [], []
            for g in range(n_kv):
                distinct = list(dict.fromkeys(kv[g * rep:(g + 1) * rep]))
                classes.append(distinct)
                which += [distinct.index(kv[h]) for h in range(g * rep, (g + 1) * rep)]
                copies = max(copies, len(distinct))
            layers.append((q, classes, which))
        mlp = [None if self.attn_only else senders(self.layout.mlp_row[l]) for l in range(self.L)]
        return layers, mlp, senders(self.layout.logits_row), copies

    def _differ(self, live: dict, src: Source, diffs: dict, B: int):
        """diff(s): sender s's live − ablated output [B, P, d] from the outputs a hooked forward has
        recorded in `live` so far, cached in `diffs`."""
        ix = self.index

        def diff(s: int) -> torch.Tensor:
            d = diffs.get(s)
            if d is None:
                kind, layer = ix.node_kind[s], ix.node_layer[s]
                if kind == EMBED:
                    d = live["embed"] - src.embed
                elif kind == HEAD:
                    h = ix.node_head[s]
                    d = (live["z", layer][:, :, h] - src.z[layer][:, :, h]) @ self._W_O[layer][h]
                else:
                    d = live["mlp", layer] - src.mlp_out[layer]
                diffs[s] = d = d.expand(B, *d.shape[1:])
            return d
        return diff

    def _hooked(self, masks: Masks, batch: Batch, diffs_out: list | None = None) -> Run:
        """The run of one circuit: one bridge forward of batch's rows with the circuit's hooks (diffs_out:
        filled with every sender's live − ablated output)."""
        ix, L, H, B = self.index, self.L, self.H, len(batch.tokens)
        src = self.source
        layers, mlp_senders, logit_senders, V = self._plan(masks)
        ablated = masks.ablated.tolist()
        tile = (lambda t: t) if V == 1 else (lambda t: t.repeat(V, *[1] * (t.dim() - 1)))
        live: dict = {}   # ("embed",) / ("z", l) / ("mlp", l) / ("pre", l) -> copy 0's rows
        diffs: dict = {}

        diff = self._differ(live, src, diffs, B)

        def total(senders) -> torch.Tensor:
            return sum(diff(s) for s in senders)

        def resid_pre(l):
            def fn(t, hook):
                if l == 0 and ablated[0]:
                    t = tile(src.embed.expand(B, *t.shape[1:]).contiguous())
                if l == 0:
                    live["embed"] = t[:B]
                live["pre", l] = t[:B]
                return t
            return fn

        def projection(l, x):
            q, classes, _ = layers[l]
            blk = self.bridge.blocks[l]

            def fn(t, hook):
                groups = H if x == "q" else self.n_kv
                out = _as_groups(t, groups).clone()
                made = {}
                for g in range(groups):
                    per_copy = [q[g]] if x == "q" else [c[0 if x == "k" else 1] for c in classes[g]]
                    for c, senders in enumerate(per_copy):
                        if not senders:
                            continue
                        if senders not in made:
                            made[senders] = live["pre", l] - total(senders)
                        y = _project(blk, x, made[senders], g).to(out.dtype)
                        if x == "q":
                            out[:, :, g] = tile(y)
                        else:
                            out[c * B:(c + 1) * B, :, g] = y
                return out.view(t.shape)
            return fn

        def z_hook(l):
            _, _, which = layers[l]
            heads = [h for h in range(H) if ablated[ix.node_id[f"a{l}.{h}"]]]

            def fn(t, hook):
                z = t[:B]
                if V > 1 and any(which):
                    z = z.clone()
                    for h, c in enumerate(which):
                        if c:
                            z[:, :, h] = t[c * B:(c + 1) * B, :, h]
                if heads:
                    z = z.clone()
                    z[:, :, heads] = src.z[l][:, :, heads].expand(B, -1, -1, -1).to(z.dtype)
                live["z", l] = z
                return tile(z) if V > 1 else z
            return fn

        def mlp_in(l):
            def fn(t, hook):
                s = mlp_senders[l]
                return t - tile(total(s)).to(t.dtype) if s else t
            return fn

        def mlp_out(l):
            off = ablated[ix.node_id[f"m{l}"]]

            def fn(t, hook):
                if off:
                    t = tile(src.mlp_out[l].expand(B, *t.shape[1:]).to(t.dtype).contiguous())
                live["mlp", l] = t[:B]
                return t
            return fn

        def final(t, hook):
            return t - tile(total(logit_senders)).to(t.dtype) if logit_senders else t

        needs_pre = {l for l in range(L) if any(layers[l][0]) or any(any(c != ((), ()) for c in g)
                                                                      for g in layers[l][1])}
        hooks = [("blocks.0.hook_resid_pre", resid_pre(0))]
        for l in range(L):
            if l and l in needs_pre:
                hooks.append((f"blocks.{l}.hook_resid_pre", resid_pre(l)))
            if l in needs_pre:
                hooks += [(f"blocks.{l}.attn.{x}.hook_out", projection(l, x)) for x in "qkv"]
            hooks.append((f"blocks.{l}.attn.hook_z", z_hook(l)))
            if not self.attn_only:
                if mlp_senders[l]:
                    hooks.append((f"blocks.{l}.ln2.hook_in", mlp_in(l)))
                hooks.append((f"blocks.{l}.hook_mlp_out", mlp_out(l)))
        if logit_senders:
            hooks.append((self.structure.final_in, final))
        tokens = tile(batch.tokens)
        with torch.inference_mode():
            logits = self.bridge.run_with_hooks(tokens, fwd_hooks=hooks)
            if diffs_out is not None:
                diffs_out += [diff(s) for s in range(self.S)]
        logits = getattr(logits, "logits", logits)
        run = Run(self.index, masks, None, [], [], [], [])
        run.logits = self._read(logits[:B, -1], batch.cols)
        if self.metric.two_columns or batch.ref is not None:
            self._finish(run, batch)
        return run


def make_evaluator(model: Model, task: Task, ablation: str = "mean", metric: str = "logit_diff", qkv: bool = True,
                   engine: str = "auto", device: str = "cpu", dtype: str = "float32", log=None,
                   split_embed: bool = False, positions: str | tuple = "last", reduce: str | None = None,
                   dictionaries=()):
    """The evaluator for `model`: the fast engine when it implements the model and its load check passes,
    else (engine "auto") the hook-based path with a one-line notice to `log` saying why. engine "fast"
    refuses a model the engine does not reproduce; "hooked" always takes the hook-based path. Dictionaries
    (feature graphs) need the fast engine: the hooked path refuses them."""
    from .engine import DTYPES, Engine, unsupported

    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r} is not one of {', '.join(ENGINES)}")

    def hooked(why: str | None):
        if device != "cpu" or dtype != "float32":
            raise ValueError(f"--device {device} / --dtype {dtype} set the fast engine, and model {model.name!r} "
                             "runs on the hook-based path (the bridge as it was loaded): leave them at cpu / float32")
        if dictionaries:
            raise ValueError(f"--sae: dictionary features are spliced into the fast engine's forward, and model "
                             f"{model.name!r} would run on the hook-based path" + (f" ({why})" if why else ""))
        if why and log is not None:
            log(f"note: model {model.name!r} runs on the hook-based path (slower, same semantics): {why}")
        return HookedEvaluator(model, task, ablation, metric, qkv=qkv, split_embed=split_embed, positions=positions,
                               reduce=reduce)

    if engine == "hooked":
        return hooked(None)
    missing = unsupported(model)
    if missing:
        if engine == "fast" or any(m.startswith("attention heads") for m in missing):
            check_supported(model)  # the by-name refusal
        return hooked("the fast engine does not implement " + "; ".join(missing))
    eng = Engine(model, device=device, dtype=DTYPES[dtype])
    try:
        return Evaluator(model, task, ablation, metric, qkv=qkv, engine=eng, split_embed=split_embed,
                         positions=positions, reduce=reduce, dictionaries=dictionaries)
    except ModelError as e:
        if engine == "fast" or not str(e).startswith("the fast engine does not reproduce"):
            raise
        return hooked("the fast engine's load check failed (" + str(e).split(": ", 1)[1].split(". Config")[0] + ")")


ENGINES = ("auto", "fast", "hooked")
