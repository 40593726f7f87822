"""The relaxed forward: the evaluator's circuit semantics with continuous masks, differentiable in them.

A sender s with keep m_s (per slot of positions) writes ablated_s + m_s·(live_s − ablated_s); an edge
s->r with keep c_rs makes r read resid − (1 − c_rs)·(output_s − ablated_s), so a cut edge carries the
sender's ablated output and a kept one its (relaxed) output. At masks in {0, 1} this is exactly
`Evaluator.score` of that circuit (torch.lerp is exact at both ends), which tests/test_relaxed.py checks
for every ablation, level and test model. Learned-mask search (algorithms/masks.py) optimises through it.
"""
from __future__ import annotations

import torch

from .patching import Evaluator


def faithfulness_map(ev: Evaluator) -> tuple[float, float]:
    """(f0, f1) with faithfulness(score) = f0 + f1·score: faithfulness is affine in the score."""
    f0 = ev.faithfulness(0.0)
    return f0, ev.faithfulness(1.0) - f0


def keep_tensors(ev: Evaluator, run=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The binary circuit of `run` (default: the full model) as keep masks: nodes [S, Q], edges [R, S] and
    edges at slots [R, S, Q] (None when no edge is removed at a single slot), as floats."""
    m = (run or ev.clean_run).masks
    S = ev.S
    nodes = (~m.ablated[:S, None] & ~m.at[:S]).float()
    edges = (~m.removed).float()
    at = None if m.removed_at is None else (~m.removed_at).float()
    return nodes, edges, at


def relaxed_score(ev: Evaluator, nodes: torch.Tensor, edges: torch.Tensor | None = None,
                  edges_at: torch.Tensor | None = None) -> torch.Tensor:
    """The task score (a 0-d tensor, differentiable in the masks) of the circuit whose senders are kept by
    `nodes` [S, Q] (or [S]), edges by `edges` [R, S] and edges at single slots by `edges_at` [R, S, Q]
    (None: all kept). One forward pass; counts are the caller's (Evaluator.count_relaxed)."""
    eng, L, H = ev.engine, ev.L, ev.H
    src = ev._grad_source()
    slot = ev._slot_rows                                    # [B, P]
    if nodes.dim() == 1:
        nodes = nodes[:, None].expand(-1, ev.Q)
    keep = nodes[:, slot]                                   # [S, B, P]
    if edges_at is not None and edges is None:
        edges = torch.ones(ev.index.R, ev.S, dtype=nodes.dtype)
    cut = None if edges is None else 1.0 - edges            # [R, S]
    if cut is not None and edges_at is None and not bool((cut.detach() != 0).any()):
        cut = None
    on = (nodes.detach() != 0).any(1)                       # [S] senders live at some slot
    chunks: list = []                                       # (first sender id, [B, P, n, d] output − ablated)

    def delta(rows: torch.Tensor) -> torch.Tensor | None:
        """Σ_s cut[r, s]·(output_s − ablated_s) for receivers `rows` -> [B, P, r, d] (None: nothing cut)."""
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
                t = torch.einsum("rs,bpsd->bprd", c.to(D.dtype), D)
            else:
                k = edges[rows][:, first:first + n, None, None] * edges_at[rows][:, first:first + n][..., slot]
                c = 1.0 - k                                 # [r, n, B, P]
                if not bool(((c.detach() != 0).flatten(2).any(2) & on[None, first:first + n]).any()):
                    continue
                t = torch.einsum("rsbp,bpsd->bprd", c.to(D.dtype), D)
            total = t if total is None else total + t
        return total

    tokens = ev.batch.tokens
    if ev.split_embed:
        parts = [torch.lerp(a, t, keep[s][..., None].to(t.dtype))
                 for s, (t, a) in enumerate(zip(eng.embed_parts(tokens), src.parts))]
        chunks.append((0, torch.stack([p - a for p, a in zip(parts, src.parts)], 2)))
        resid = parts[0] + parts[1]
    else:
        live = eng.embed(tokens)
        emb = torch.lerp(src.embed.expand_as(live), live, keep[0][..., None].to(live.dtype))
        chunks.append((0, (emb - src.embed)[:, :, None]))
        resid = emb
    for l in range(L):
        lw = eng.layer(l)
        hs = ev._heads[l]
        a_z = src.z[l]
        m_h = keep[hs].permute(1, 2, 0)[..., None]          # [B, P, H, 1]
        d = delta(ev._attn_rows[l])
        if d is None:
            z = eng.attention(lw, resid)
        else:
            x = resid[:, :, None, None, :] - d.reshape(*d.shape[:2], 3, H, d.shape[-1])
            live_h = on[hs].nonzero()[:, 0]
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
        pre, resid = resid, eng.add_heads(resid, lw, z)
        if not ev.attn_only:
            s = ev._mlp[l]
            d = delta(torch.tensor([ev._mlp_row[l]]))
            x = pre if eng.parallel else resid
            x = x if d is None else x - d[:, :, 0]
            a_m = src.mlp_out[l]
            if bool(on[s]):
                m = torch.lerp(a_m.expand_as(x), eng.mlp(lw, x), keep[s][..., None].to(x.dtype))
            else:
                m = a_m.expand_as(x)
            if cut is not None:
                chunks.append((s, (m - a_m)[:, :, None]))
            resid = resid + m
    d = delta(torch.tensor([ev._logits_row]))
    x = resid if d is None else resid - d[:, :, 0]
    b = ev.batch
    logits = ev._readout_logits(x, b)
    per = ev._per_prompt(logits, b)
    return (per * b.weight).sum() / b.weight.sum()
