"""The evaluator's hot path: K circuits' forward passes stacked along the batch, each recomputing a base
run's circuit from the earliest stage its change touches (layers before it come from the base's cache),
every head reading its own q, k and v input where edges into it are removed (path patching)."""
from __future__ import annotations

import torch

from ..engine import Engine
from ..graphs.index import GraphIndex
from ..metrics import Metric
from .edge_sums import delta as edge_delta
from .layout import Layout
from .passes import Pass
from .readout_scores import finish, readout_logits
from .splices import site_at, site_parts
from .state import Batch, Masks, Run, Source


class StackedForward:
    """Runs stacked forward passes over one model, graph and task layout; `source` is the evaluator's
    ablation source (set once the corrupted run is made)."""

    def __init__(self, engine: Engine, index: GraphIndex, layout: Layout, metric: Metric, n_heads: int, Q: int,
                 slot_rows: torch.Tensor, batch: Batch):
        self.engine, self.w, self.index, self.layout, self.metric = engine, engine.w, index, layout, metric
        self.L, self.H, self.S, self.Q = layout.L, n_heads, index.S, Q
        self.attn_only = layout.attn_only
        self.slot_rows = slot_rows  # [B, P] the slot of each of the task's distinct rows' positions
        self.batch = batch          # the task's distinct rows: the only ones position-level circuits run on
        self.source: Source | None = None
        self.splices: list = []     # feature sites (evaluator.splices), set by a feature graph's evaluator
        self._ablated_z_cache: dict = {}

    def run_many(self, base: Run | None, start: int, masks: list, embed_live: torch.Tensor,
                 src: Source | None, batch: Batch) -> list:
        """K circuits (one per Masks) that each change `base` from stage `start` on, in one forward pass
        over their rows stacked along the batch; each circuit's rows go through the same computation as
        its own pass would (equal up to the rounding of differently sized GEMMs, about 1e-6)."""
        eng, L, K = self.engine, self.L, len(masks)
        B = (embed_live[0] if isinstance(embed_live, list) else embed_live).shape[0]
        if base is None or start < 0:
            base, start = None, -1
        p = Pass([], base, start, torch.stack([m.ablated for m in masks]), torch.stack([m.removed for m in masks]),
                  B, src, device=eng.device)
        if src is not None and any(bool(m.at.any()) for m in masks):
            if batch is not self.batch:
                raise ValueError("nodes ablated at slots are scored on the task's own prompts only")
            p.at, p.slot_rows = torch.stack([m.at for m in masks]), self.slot_rows
        if src is not None and any(m.removed_at is not None for m in masks):
            if batch is not self.batch:
                raise ValueError("edges removed at slots are scored on the task's own prompts only")
            none = torch.zeros(self.index.R, self.S, self.Q, dtype=torch.bool)
            p.removed_at = torch.stack([none if m.removed_at is None else m.removed_at for m in masks])
            p.slot_rows = self.slot_rows
        if base is None:
            if isinstance(embed_live, list):  # split-embed graph: tok and pos are senders 0 and 1
                p.parts = [self.embed_part(p, s, t) for s, t in enumerate(embed_live)]
                emb = p.parts[0] + p.parts[1]
            else:
                emb = self.embed_part(p, 0, embed_live, "embed")
            p.embed = emb
            parts = [p.split(t) for t in p.parts] if p.parts is not None else None
            p.runs = [Run(self.index, m, e, [None] * L, [None] * L, [None] * L, [None] * L,
                          parts=None if parts is None else [t[k] for t in parts])
                      for k, (m, e) in enumerate(zip(masks, p.split(emb)))]
        else:
            stage = self.index.node_stage
            diffs = {s: d for s, d in base.diffs.items() if stage[s] < start}
            sums = {g: v for g, v in base.sums.items() if self.layout.group_stage[g] < start}
            hooks = {j: v for j, v in base.hooks.items() if self.index.node_stage[self.splices[j].first] < start}
            p.runs = [Run(self.index, m, base.embed, list(base.resid_pre), list(base.z), list(base.resid_mid),
                          list(base.mlp_out), diffs=dict(diffs), sums=dict(sums), parts=base.parts,
                          hooks=dict(hooks)) for m in masks]
        edges = bool(p.removed.any()) or p.removed_at is not None
        first = max(start, 0) // 3
        if first >= L:
            j = self.site("resid_pre", L)
            resid = p.tile(base.final if j is None else base.hooks[j][1])
        else:
            j = self.site("resid_pre", first)
            resid = p.embed if base is None else p.tile(base.resid_pre[first] if j is None else base.hooks[j][1])
        for l in range(first, L):
            lw = eng.layer(l)
            stage = start - 3 * l if l == first else -1  # where this layer's recomputation begins
            hab = p.ablated[:, self.layout.heads[l]] if src is not None else None  # [K, H] heads ablated
            if stage <= 1:
                if stage <= 0:
                    pre = self.splice(p, "resid_pre", l, resid, resid)
                    p.put("resid_pre", l, pre)
                else:
                    pre = p.tile(base.resid_pre[l])
                if src is not None and bool(hab.all()):
                    # every head ablated: their outputs are the ablation values, whatever they read
                    z = p.tile(self.ablated_z(src, l, B))
                    resid = self.attn_out(p, l, lw, pre, z, p.tile(self.ablated_z(src, l, B, summed=True)))
                else:
                    if stage <= 0:
                        z = self.heads_z(p, l, pre, hab, edges)
                    else:  # only some heads of this layer newly ablated: the others' z stands
                        z = torch.where(p.rows(hab)[:, None, :, None], p.ablation("z", l), p.tile(base.z[l]))
                    pm = p.at_rows(self.layout.heads[l])  # heads ablated at single slots
                    if pm is not None:
                        z = torch.where(pm[..., None], p.ablation("z", l), z)
                    resid = self.attn_out(p, l, lw, pre, z)
                p.z[l] = z
                p.put("z", l, z)
                p.put("resid_mid", l, resid)
            else:
                j = self.site("resid_mid", l)
                if j is None:
                    resid = p.tile(base.resid_mid[l])
                else:  # the splice redone from what it read, as the circuits' masks say
                    resid = self.splice(p, "resid_mid", l, p.tile(base.hooks[j][0]), p.tile(base.hooks[j][1]))
                    p.put("resid_mid", l, resid)
                pre = p.tile(base.resid_pre[l]) if eng.parallel else None
            if not self.attn_only:
                out = self.mlp_out(p, l, lw, pre if eng.parallel else resid, src, edges)
                p.mlp[l] = out
                p.put("mlp_out", l, out)
                resid = resid + out
        resid = self.splice(p, "resid_pre", L, resid, resid)  # (from first >= L: redone from what the site read)
        for run, f in zip(p.runs, p.split(resid)):
            run.final = f
        delta = edge_delta(self, p, self.layout.logits_row, ("logits",)) if edges else None
        logits = readout_logits(self.engine, self.metric, resid if delta is None else resid - delta[:, :, 0], batch, p.tile)
        for run, lg in zip(p.runs, p.split(logits)):
            run.logits = lg
            if self.metric.two_columns or batch.ref is not None:
                finish(self.metric, run, batch)
        if K > 1:
            for s, d in p.diffs.items():
                for run, v in zip(p.runs, p.split(d)):
                    run.diffs[s] = v
            for j, (f, e) in p.feats.items():
                for run, fv, ev in zip(p.runs, p.split(f), p.split(e)):
                    run.feats[j] = (fv, ev)
        return p.runs

    def mlp_out(self, p: Pass, l: int, lw, x: torch.Tensor, src: Source | None, edges: bool) -> torch.Tensor:
        """What layer l's MLP writes for its block input x (the layer's input in a parallel block), for the
        stacked rows: its ablation value where the circuit ablates it, removed edges taken from its input,
        and a dictionary at mlp_in.l or mlp_out.l (an SAE, or a transcoder) spliced in."""
        eng = self.engine
        off = p.ablated[:, self.layout.mlp[l]] if src is not None else None
        j_in, j_out = self.site("mlp_in", l), self.site("mlp_out", l)
        if src is not None and bool(off.all()):  # ablated: its input does not matter
            out = p.ablation("mlp_out", l).expand_as(x)
            return out if j_out is None else self.splice(p, "mlp_out", l, out, out)
        delta = edge_delta(self, p, self.layout.mlp_row[l], ("mlp", l)) if edges else None
        x = x if delta is None else x - delta[:, :, 0]
        h = None
        if j_in is not None or (j_out is not None and self.splices[j_out].reads != "mlp_out"):
            h = eng.norm(x, lw.ln2)  # mlp_in: what the MLP reads (and a transcoder)
            if j_in is not None:
                h = self.splice(p, "mlp_in", l, h, h)
        run = (lambda rows: eng.mlp(lw, x[rows])) if h is None else (lambda rows: eng.mlp_normed(lw, h[rows]))
        if src is not None and bool(off.any()):  # ablated in some circuits: run the others' rows
            live = p.row_ids(~off)
            out = p.ablation("mlp_out", l).expand_as(x).clone()
            out[live] = run(live)
        else:
            out = run(slice(None))
        pm = p.at_rows(self.layout.mlp[l])  # ablated at single slots
        if pm is not None:
            out = torch.where(pm, p.ablation("mlp_out", l), out)
        if j_out is None:
            return out
        reads = self.splices[j_out].reads
        x_in = out if reads == "mlp_out" else h if reads == "mlp_in" else x  # a transcoder reads mlp_in or resid_mid
        return self.splice(p, "mlp_out", l, x_in, out)

    def attn_out(self, p: Pass, l: int, lw, pre: torch.Tensor, z: torch.Tensor,
                 summed: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after layer l's attention (pre + what its heads write), with dictionaries at
        attn_out.l and resid_mid.l spliced in."""
        if self.site("attn_out", l) is None:
            mid = self.engine.add_heads(pre, lw, z, summed)
        else:
            out = (self.engine.heads_sum(lw, z) if summed is None else summed) + lw.b_O
            mid = pre + self.splice(p, "attn_out", l, out, out)
        return self.splice(p, "resid_mid", l, mid, mid)

    def site(self, kind: str, layer: int) -> int | None:
        """Index of the feature site writing hook kind.layer (None: none there)."""
        return site_at(self.splices, kind, layer) if self.splices else None

    def splice(self, p: Pass, kind: str, layer: int, x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
        """x_out with the feature site at kind.layer (if any) spliced in for the stacked rows: its features and
        error ablated as each circuit's masks say (at single slots too); rows whose circuit ablates the nodes it
        decomposes keep x_out. What the site read and wrote joins each run's hooks."""
        j = self.site(kind, layer)
        if j is None:
            return x_out
        sp = self.splices[j]
        p.hooks[j] = (x_in, x_out)
        for run, a, b in zip(p.runs, p.split(x_in), p.split(x_out)):
            run.hooks[j] = (a, b)
        if p.source is None:
            return x_out
        off = p.ablated[:, sp.ids]  # [K, n+1]
        if sp.parents:
            off = off & ~p.ablated[:, sp.parents].all(1, keepdim=True)
        pm = p.at_rows(sp.ids)
        if not bool(off.any()) and pm is None:
            return x_out  # nothing of the site ablated: the activation as it is
        cut = p.rows(off)[:, None, :]
        if pm is not None:
            if sp.parents:
                pm = pm & ~p.rows(p.ablated[:, sp.parents].all(1))[:, None, None]
            cut = cut | pm
        parts = site_parts(self.splices, p.hooks, p.feats, j)  # kept: the edges out of its features read them
        if p.K == 1:
            p.runs[0].feats[j] = parts
        return sp.apply(x_in, x_out, cut, p.ablation("feat_f", j), p.ablation("feat_e", j), parts)

    def embed_part(self, p: Pass, s: int, live: torch.Tensor, what: str = "parts") -> torch.Tensor:
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

    def heads_z(self, p: Pass, l: int, resid: torch.Tensor, hab: torch.Tensor | None,
                 edges: bool) -> torch.Tensor:
        """z of layer l's heads [K*B, P, H, dh] reading `resid`; ablated heads hold their ablation value.
        With removed edges into the layer each live head reads its own q, k, v input, and only heads
        live in some circuit are computed."""
        H, lw = self.H, self.w.layers[l]
        off = hab.all(0).tolist() if hab is not None else [False] * H
        live = [h for h in range(H) if not off[h]]
        rows = self.layout.attn_rows[l] if len(live) == H else self.layout.attn_rows[l].view(3, H)[:, live].reshape(-1)
        delta = edge_delta(self, p, rows, ("attn", l)) if edges else None
        if delta is None:
            z = self.engine.attention(lw, resid)
            partial = hab is not None and bool(hab.any())
        else:
            partial = hab is not None and bool((hab & ~hab.all(0)).any())  # ablated in some circuits only
            x = resid[:, :, None, None, :] - delta.reshape(*delta.shape[:2], 3, len(live), delta.shape[-1])
            if len(live) == H:
                z = self.engine.attention(lw, x[:, :, 0], x[:, :, 1], x[:, :, 2])
            else:
                idx = torch.tensor(live, device=self.engine.device)
                z = self.ablated_z(p.source, l, p.B)
                z = z.clone() if p.K == 1 else p.tile(z)
                z[:, :, idx] = self.engine.attention(lw, x[:, :, 0], x[:, :, 1], x[:, :, 2], heads=idx)
        if partial:
            z = torch.where(p.rows(hab)[:, None, :, None], p.ablation("z", l), z)
        return z

    def ablated_z(self, src: Source, l: int, rows: int, summed: bool = False) -> torch.Tensor:
        """Layer l's z with every head ablated [B, P, H, dh], contiguous as a computed z is, or (summed)
        what those heads write, Σ_h z_h W_O,h [B, P, d]; each computed once."""
        key = (src.kind, l, rows, summed)
        if key not in self._ablated_z_cache:
            z = src.z[l].expand(rows, *src.z[l].shape[1:]).clone()
            self._ablated_z_cache[key] = self.engine.heads_sum(self.w.layers[l], z) if summed else z
        return self._ablated_z_cache[key]
