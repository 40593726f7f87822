"""Edge sums: what a receiver loses when edges into it are removed, Σ over removed live senders of
(live − ablated output), whole and at single slots, kept per receiver group in each run and updated
incrementally when a run is extended (refreshed in full every REFRESH updates)."""
from __future__ import annotations

import torch

from ..graphs.index import EMBED, FEATURE, HEAD
from .passes import Pass
from .splices import site_parts
from .state import Run

REFRESH = 32  # incremental updates of a receiver group's edge sum before it is taken in full again


def sender_diff(fw, run: Run, s: int) -> torch.Tensor:
    """live − ablated output of sender s in `run` (cached in run.diffs)."""
    d = run.diffs.get(s)
    if d is None:
        ix = fw.index
        kind, layer = ix.node_kind[s], ix.node_layer[s]
        if kind == EMBED:
            d = run.embed - fw.source.embed if run.parts is None else run.parts[s] - fw.source.parts[s]
        elif kind == HEAD:
            h = ix.node_head[s]
            zl = run.z[layer][:, :, h] - fw.source.z[layer][:, :, h]
            d = zl @ fw.w.layers[layer].W_O[h]
        elif kind == FEATURE:
            d = feature_diff(fw, run.hooks, run.feats, s, lambda what, j: getattr(fw.source, what)[j])
        else:
            d = run.mlp_out[layer] - fw.source.mlp_out[layer]
        run.diffs[s] = d
    return d


def feature_diff(fw, hooks: dict, feats: dict, s: int, ablation) -> torch.Tensor:
    """live − ablated output of feature (or error) node s: (f − a)·W_dec[i], or e − a_e, from what its site read
    and wrote (`hooks`; the site's parts cached in `feats`); `ablation(what, j)` gives the site's ablation values."""
    j = fw.index.site_of[s]
    sp = fw.splices[j]
    f, e = site_parts(fw.splices, hooks, feats, j)
    k = s - sp.first
    if k == sp.n:
        return e - ablation("feat_e", j)
    return (f[..., k] - ablation("feat_f", j)[..., k])[..., None] * sp.W[k]


def pass_diff(fw, p: Pass, s: int) -> torch.Tensor:
    """live − ablated output of sender s, computed in pass p, for all its stacked rows [K*B, P, d]."""
    if p.K == 1:
        return sender_diff(fw, p.runs[0], s)
    d = p.diffs.get(s)
    if d is None:
        ix = fw.index
        kind, layer = ix.node_kind[s], ix.node_layer[s]
        if kind == EMBED:
            d = p.embed - p.ablation("embed") if p.parts is None else p.parts[s] - p.ablation("parts", s)
        elif kind == HEAD:
            h = ix.node_head[s]
            d = (p.z[layer][:, :, h] - p.ablation("z", layer)[:, :, h]) @ fw.w.layers[layer].W_O[h]
        elif kind == FEATURE:
            d = feature_diff(fw, p.hooks, p.feats, s, p.ablation)
        else:
            d = p.mlp[layer] - p.ablation("mlp_out", layer)
        p.diffs[s] = d
    return d


def weighted(fw, p: Pass, coef: torch.Tensor, ids: list, own: bool):
    """Σ_s coef[k, r, s] · D[s] -> [K, B, P, r, d]: D the diffs computed in pass p (own) or the base's."""
    if not ids:
        return 0.0
    if own:
        D = torch.stack([pass_diff(fw, p, s) for s in ids], 2)
        return torch.einsum("krs,kbpsd->kbprd", coef.to(D.device, D.dtype), D.unflatten(0, (p.K, p.B)))
    D = torch.stack([sender_diff(fw, p.base, s) for s in ids], 2)
    return torch.einsum("krs,bpsd->kbprd", coef.to(D.device, D.dtype), D)


def delta(fw, p: Pass, rows, group) -> torch.Tensor | None:
    """Σ over removed live senders of (live − ablated), per receiver in `rows` -> [K*B, P, len(rows), d]:
    edges removed whole (delta_whole) and at single slots (delta_at), or None when there are none."""
    whole = delta_whole(fw, p, rows, group)
    if p.removed_at is None:
        return whole
    at = delta_at(fw, p, rows)
    if at is None:
        return whole
    return at if whole is None else whole + at


def delta_at(fw, p: Pass, rows) -> torch.Tensor | None:
    """Σ over edges removed at single slots into receivers `rows`: each sender's live − ablated output at
    the positions of the slots its edge is removed at [K*B, P, len(rows), d] (None: no such edge).
    Taken in full every pass: position-level edge removals are few."""
    sel = [rows] if isinstance(rows, int) else rows
    M = p.removed_at[:, sel] & ~p.removed[:, sel, :, None] & ~p.ablated[:, None, : fw.S, None]  # [K, r, S, Q]
    senders = M.any(3).any(1).any(0).nonzero()[:, 0].tolist()
    if not senders:
        return None
    K, B = p.K, p.B

    def diff(s: int, recomputed: bool) -> torch.Tensor:  # [K, B, P, d]: this pass's, or the base's for all K
        if recomputed:
            return pass_diff(fw, p, s).unflatten(0, (K, B))
        d = sender_diff(fw, p.base, s)
        return d.expand(K, *d.shape)

    later = (fw.layout.node_stage[senders] >= p.start).tolist()
    D = torch.stack([diff(s, new) for s, new in zip(senders, later)], 3)  # [K, B, P, s', d]
    Mr = M[:, :, senders][..., p.slot_rows]  # [K, r, s', B, P]
    return torch.einsum("krsbp,kbpsd->kbprd", Mr.to(D.device, D.dtype), D).flatten(0, 1)


def delta_whole(fw, p: Pass, rows, group) -> torch.Tensor | None:
    """Σ over live senders of removed edges of (live − ablated), per receiver in `rows` ->
    [K*B, P, len(rows), d].

    Kept per receiver group in each run (run.sums). Extending a base from stage `start`, only what
    changed is added to the base's sum: senders recomputed from `start` on (their new minus their
    old contribution) and edges newly removed from senders below it; the full sum is taken when
    that would be no cheaper, and after REFRESH updates in a row (to bound float rounding drift).
    """
    sel = [rows] if isinstance(rows, int) else rows
    key = tuple(sel) if isinstance(sel, list) else tuple(sel.tolist())
    mask = p.removed[:, sel] & ~p.ablated[:, None, : fw.S]  # [K, r, S] removed live senders per row
    present = mask.any(0).any(0)
    if not bool(present.any()):
        return None
    base, K = p.base, p.K
    later = (fw.layout.node_stage[: fw.S] >= p.start).tolist()
    prev = base.sums.get(group) if base is not None else None
    total = None
    if prev is not None and prev[0] == key and prev[2] < REFRESH:
        old = base.masks.removed[sel] & ~base.masks.ablated[: fw.S]
        touched = (mask.any(0) | old).any(0).tolist()
        new = (mask & ~old).any(0).any(0).tolist()
        changed = [s for s in range(fw.S) if later[s] and touched[s]]
        added = [s for s in range(fw.S) if not later[s] and new[s]]
        if 2 * len(changed) + len(added) < int(present.sum()):
            shared = torch.cat([-old[:, changed].expand(K, -1, -1).float(),
                                (mask & ~old)[:, :, added].float()], 2)
            total = (prev[1][None] + weighted(fw, p, mask[:, :, changed], changed, True)
                     + weighted(fw, p, shared, changed + added, False))
            count = prev[2] + 1
    if total is None:
        idx = present.nonzero()[:, 0].tolist()
        own = [s for s in idx if later[s]]
        below = [s for s in idx if not later[s]]
        total = weighted(fw, p, mask[:, :, own], own, True) + weighted(fw, p, mask[:, :, below], below, False)
        count = 0
    total = total.expand(K, *total.shape[1:])  # an unchanged base sum still has one circuit
    for run, t in zip(p.runs, total.unbind(0)):
        run.sums[group] = (key, t, count)
    return total.flatten(0, 1)
