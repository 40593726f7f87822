"""The relaxed forward: the evaluator's circuit semantics with continuous masks, differentiable in them.

A sender s with keep m_s (per slot of positions) writes ablated_s + m_s·(live_s − ablated_s); an edge
s->r with keep c_rs makes r read resid − (1 − c_rs)·(output_s − ablated_s), so a cut edge carries the
sender's ablated output and a kept one its (relaxed) output. At masks in {0, 1} this is exactly
`Evaluator.score` of that circuit (torch.lerp is exact at both ends), which tests/test_relaxed.py checks
for every ablation, level and test model. Learned-mask search (algorithms/masks.py) optimises through it,
and attribution (Evaluator.receiver_gradients) differentiates it with respect to every receiver's input.
"""
from __future__ import annotations

import torch

from .readout_scores import per_prompt, readout_logits, weighted_mean
from .splices import site_at
from .state import Batch, Source

# `ev` below is a patching.Evaluator; not imported, as the evaluator imports this module (imports point down)


def faithfulness_map(ev: "Evaluator") -> tuple[float, float]:
    """(f0, f1) with faithfulness(score) = f0 + f1·score: faithfulness is affine in the score."""
    f0 = ev.faithfulness(0.0)
    return f0, ev.faithfulness(1.0) - f0


def keep_tensors(ev: "Evaluator", run=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The binary circuit of `run` (default: the full model) as keep masks: nodes [S, Q], edges [R, S] and
    edges at slots [R, S, Q] (None when no edge is removed at a single slot), as floats."""
    m = (run or ev.clean_run).masks
    S = ev.S
    nodes = (~m.ablated[:S, None] & ~m.at[:S]).float()
    edges = (~m.removed).float()
    at = None if m.removed_at is None else (~m.removed_at).float()
    return nodes, edges, at


def relaxed_score(ev: "Evaluator", nodes: torch.Tensor, edges: torch.Tensor | None = None,
                  edges_at: torch.Tensor | None = None, inputs: dict | None = None,
                  copies: torch.Tensor | None = None) -> torch.Tensor:
    """The task score (a 0-d tensor, differentiable in the masks) of the circuit whose senders are kept by
    `nodes` [S, Q] (or [S]), edges by `edges` [R, S] and edges at single slots by `edges_at` [R, S, Q]
    (None: all kept). One forward pass; counts are the caller's (Evaluator.count_relaxed).

    With `inputs` (a dict) every receiver's input is also recorded there as a tensor of its own, for its
    gradient: "attn" [L] x [B, P, 3, H, d] (each head's q, k and v input), "mlp" [L] x [B, P, d] (None in
    attention-only models), "logits" [B, d] at the last position or [B, P, d] when the metric reads others.
    With `copies` [K] the prompt rows run K times stacked, copy k with every sender keep scaled by
    copies[k] (the steps of integrated gradients in one pass): the score is the sum of the K copies' scores
    and the recorded inputs have K*B rows, copy by copy.
    """
    eng, L, H, lay = ev.engine, ev.L, ev.H, ev.layout
    K = 1 if copies is None else len(copies)
    src, b, slot = _stacked(ev, K)                          # slot: [K*B, P]
    if nodes.dim() == 1:
        nodes = nodes[:, None].expand(-1, ev.Q)
    if edges_at is not None and edges is None:
        edges = torch.ones(ev.index.R, ev.S, dtype=nodes.dtype)
    # the edge masks stay where they are given (the CPU: a mask search's parameters) and decide there which
    # senders are cut; only the cut coefficients of a receiver cross to the engine's device, in _cut_sum
    cut = None if edges is None else 1.0 - edges            # [R, S]
    if cut is not None and edges_at is None and not bool((cut.detach() != 0).any()):
        cut = None
    on = (nodes.detach() != 0).any(1)                       # [S] senders live at some slot
    if copies is not None:
        on = on & bool((copies != 0).any())
    chunks: list = []                                       # (first sender id, [B, P, n, d] output − ablated)
    delta = _cut_sum(cut, edges, edges_at, on, slot, chunks)
    dev = eng.device
    keep = nodes.to(dev)[:, slot.to(dev)]                   # [S, K*B, P]
    if copies is not None:
        whole = keep
        keep = keep * copies.to(dev, keep.dtype).repeat_interleave(len(ev.batch.tokens))[None, :, None]
        dec = ev.index.decomposed[: ev.S]
        if bool(dec.any()):  # nodes a dictionary decomposes stay whole: their features are what is scaled
            keep = torch.where(dec.to(dev)[:, None, None], whole, keep)
    record = inputs is not None
    if record:
        inputs.update(attn=[None] * L, mlp=[None] * L, logits=None, hooks=[None] * len(ev.splices))
    splice = _splicer(ev, keep, src, inputs, chunks if cut is not None else None)
    resid = _embedding(ev, b.tokens, keep, src, chunks)
    for l in range(L):
        lw = eng.layer(l)
        hs = lay.heads[l]
        a_z = src.z[l]
        m_h = keep[hs].permute(1, 2, 0)[..., None]          # [B, P, H, 1]
        resid = splice("resid_pre", l, resid, resid)
        d = delta(lay.attn_rows[l])
        if d is None and not record:
            z = eng.attention(lw, resid)
        else:
            x = resid[:, :, None, None, :].expand(*resid.shape[:2], 3, H, resid.shape[-1])
            if d is not None:
                x = x - d.reshape(*d.shape[:2], 3, H, d.shape[-1])
            if record:
                inputs["attn"][l] = x
            live_h = on[hs].nonzero()[:, 0].to(dev)
            if len(live_h) == H:
                z = eng.attention(lw, x[:, :, 0], x[:, :, 1], x[:, :, 2])
            else:  # heads ablated everywhere write their ablation value, whatever they read
                z = a_z.expand(resid.shape[0], *a_z.shape[1:]).clone()
                if len(live_h):
                    z = z.index_copy(2, live_h, eng.attention(lw, x[:, :, 0, live_h], x[:, :, 1, live_h],
                                                              x[:, :, 2, live_h], heads=live_h))
        z = torch.lerp(a_z.expand_as(z), z, m_h.to(z.dtype))
        if cut is not None:
            chunks.append((hs.start, eng.head_outputs(lw, z - a_z)))
        if splice.at("attn_out", l) is not None:
            out = eng.heads_sum(lw, z) + lw.b_O
            pre, resid = resid, resid + splice("attn_out", l, out, out)
        else:
            pre, resid = resid, eng.add_heads(resid, lw, z)
        resid = splice("resid_mid", l, resid, resid)
        if not ev.attn_only:
            s = lay.mlp[l]
            d = delta(torch.tensor([lay.mlp_row[l]]))
            x = pre if eng.parallel else resid              # a parallel block's MLP reads the layer's input
            x = (x.clone() if record else x) if d is None else x - d[:, :, 0]
            if record:
                inputs["mlp"][l] = x
            a_m = src.mlp_out[l]
            if bool(on[s]):
                m = torch.lerp(a_m.expand_as(x), _mlp(ev, splice, lw, l, x), keep[s][..., None].to(x.dtype))
            else:
                m = a_m.expand_as(x)
            if cut is not None:
                chunks.append((s, (m - a_m)[:, :, None]))
            resid = resid + m
    resid = splice("resid_pre", L, resid, resid)
    d = delta(torch.tensor([lay.logits_row]))
    x = resid if d is None else resid - d[:, :, 0]
    if record and b.pos is None:  # the logits receiver's input is the last position's [B, d]
        x = inputs["logits"] = x[:, -1].clone()
        logits = eng.unembed(x, b.cols if ev.metric.two_columns else None)
    else:
        if record:
            x = inputs["logits"] = x.clone()
        logits = readout_logits(eng, ev.metric, x, b)
    per = per_prompt(ev.metric, logits, b)
    if K == 1:
        return weighted_mean(per, b)
    w = ev.batch.weight
    return (per.view(K, -1) * w).sum() / w.sum()  # Σ over copies of each copy's weighted mean


class _splicer:
    """splice(kind, layer, x_in, x_out): x_out with the feature site writing kind.layer (if any) relaxed in, its
    features and error kept as `keep` says (evaluator.splices); with `inputs`, the result is recorded in
    inputs["hooks"] for its gradient."""

    def __init__(self, ev, keep: torch.Tensor, src: Source, inputs: dict | None, chunks: list | None):
        self.splices, self.keep, self.src, self.inputs, self.chunks = ev.splices, keep, src, inputs, chunks

    def at(self, kind: str, layer: int) -> int | None:
        return site_at(self.splices, kind, layer) if self.splices else None

    def __call__(self, kind: str, layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        j = self.at(kind, layer)
        if j is None:
            return x_out
        sp = self.splices[j]
        keep = self.keep[sp.ids].permute(1, 2, 0)  # [B, P, n+1]
        f_abl, e_abl = self.src.feat_f[j], self.src.feat_e[j]
        f, e = parts = sp.parts(x_in, x_out)
        out = sp.apply(x_in, x_out, 1.0 - keep, f_abl, e_abl, parts)
        if self.inputs is not None:
            self.inputs["hooks"][j] = out
        if self.chunks is not None and sp.parents:  # its nodes send along edges: output − ablated of each
            k = keep.to(out.dtype)
            D = torch.cat([((f - f_abl) * k[..., : sp.n])[..., None] * sp.W, ((e - e_abl) * k[..., sp.n:])[:, :, None]], 2)
            self.chunks.append((sp.first, D))
        return out


def _mlp(ev, splice: _splicer, lw, l: int, x: torch.Tensor) -> torch.Tensor:
    """Layer l's MLP output for its block input x, with dictionaries at mlp_in.l and mlp_out.l relaxed in."""
    eng = ev.engine
    j_in, j_out = splice.at("mlp_in", l), splice.at("mlp_out", l)
    if j_in is None and j_out is None:
        return eng.mlp(lw, x)
    h = splice("mlp_in", l, *(2 * [eng.norm(x, lw.ln2)]))
    out = eng.mlp_normed(lw, h)
    if j_out is None:
        return out
    reads = splice.splices[j_out].reads
    return splice("mlp_out", l, out if reads == "mlp_out" else h if reads == "mlp_in" else x, out)


def _stacked(ev: "Evaluator", K: int):
    """(ablation source, batch, slot of each row's positions) for the prompt rows stacked K times."""
    src, b, slot = ev._grad_source(), ev.batch, ev._slot_rows
    if K == 1:
        return src, b, slot
    rep = lambda t: None if t is None else t.repeat(K, *[1] * (t.dim() - 1))
    per_row = lambda t: t if t is None or t.shape[0] == 1 else rep(t)  # a shared ablation value broadcasts
    src = Source(src.kind, per_row(src.embed), [per_row(t) for t in src.z], [per_row(t) for t in src.mlp_out],
                 None if src.parts is None else [per_row(t) for t in src.parts], [per_row(t) for t in src.feat_f],
                 [per_row(t) for t in src.feat_e])
    b = Batch(rep(b.tokens), rep(b.answers), rep(b.wrong), rep(b.weight), rep(b.ref), rep(b.pos), rep(b.valid),
              b.reduce)
    return src, b, rep(slot)


def _embedding(ev: "Evaluator", tokens: torch.Tensor, keep: torch.Tensor, src, chunks: list) -> torch.Tensor:
    """The relaxed embedding (the residual stream's start); its senders' output − ablated joins `chunks`."""
    eng = ev.engine
    if ev.split_embed:
        parts = [torch.lerp(a, t, keep[s][..., None].to(t.dtype))
                 for s, (t, a) in enumerate(zip(eng.embed_parts(tokens), src.parts))]
        chunks.append((0, torch.stack([p - a for p, a in zip(parts, src.parts)], 2)))
        return parts[0] + parts[1]
    live = eng.embed(tokens)
    emb = torch.lerp(src.embed.expand_as(live), live, keep[0][..., None].to(live.dtype))
    chunks.append((0, (emb - src.embed)[:, :, None]))
    return emb


def _cut_sum(cut, edges, edges_at, on: torch.Tensor, slot: torch.Tensor, chunks: list):
    """delta(rows): Σ_s cut[r, s]·(output_s − ablated_s) over the senders in `chunks` so far, for receivers
    `rows` -> [B, P, r, d] (None: nothing cut); with `edges_at`, the cut per slot of each position. The masks
    stay on their device (which senders are cut is read there); the coefficients move to the outputs'."""
    def delta(rows: torch.Tensor) -> torch.Tensor | None:
        if cut is None:
            return None
        total = None
        c_all = cut[rows]
        for first, D in chunks:
            n = D.shape[2]
            if edges_at is None:
                c = c_all[:, first:first + n]
                live = (c.detach() != 0).any(0) & on[first:first + n]
                if not bool(live.any()):
                    continue
                t = torch.einsum("rs,bpsd->bprd", c.to(D.device, D.dtype), D)
            else:
                k = edges[rows][:, first:first + n, None, None] * edges_at[rows][:, first:first + n][..., slot]
                c = 1.0 - k                                 # [r, n, B, P]
                if not bool(((c.detach() != 0).flatten(2).any(2) & on[None, first:first + n]).any()):
                    continue
                t = torch.einsum("rsbp,bpsd->bprd", c.to(D.device, D.dtype), D)
            total = t if total is None else total + t
        return total
    return delta
