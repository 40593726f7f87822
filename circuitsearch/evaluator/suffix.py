"""Causal suffix: on a causal model, a pass whose circuits differ from their base only at slots whose positions
all lie at or after position p recomputes positions >= p only.

Positions before p see nothing of the change (attention looks back only), so they keep the base's cached
activations; the suffix's queries attend over the base's cached keys and values of the prefix followed by their
own. The pass itself is the ordinary stacked forward (evaluator.stacked) run on the suffix: the base's caches,
the ablation source, the slot map and the readout positions cut at p, the engine's attention given the prefix's
keys and values. Its runs are then the base's prefix joined to the new suffix, so later extensions start from
whole runs. Keys and values are cached in runs (Run.kv) once a change at slots has been asked for (before that,
node- and edge-level searches pay no memory for them); a base without them gets them from one full forward.
Everything the suffix cannot honour (a node or edge changed whole, the whole prompt touched, a readout before p,
a mask kind it does not know, dictionaries spliced in, a bidirectional model) runs the full recompute, never an
approximation.
"""
from __future__ import annotations

import dataclasses

import torch

from ..engine import SMALL_MODEL
from .stacked import StackedForward
from .state import Batch, Masks, Run, Source

KNOWN_MASKS = ("ablated", "removed", "at", "removed_at")  # mask kinds whose meaning the suffix rule covers


class KVEngine:
    """The engine as a stacked pass sees it: attention keeps each layer's keys and values for the runs'
    caches (`keep`), and in a suffix pass (`offset` > 0) sets the base's cached keys and values of the
    positions before `offset` (`prefix`) in front of the suffix's own. Everything else is the engine's."""

    def __init__(self, engine):
        self.engine = engine
        self._layer = {id(lw): l for l, lw in enumerate(engine.w.layers)}
        self.offset, self.prefix, self.keep, self.kept = 0, None, False, {}

    def __getattr__(self, name):
        if name == "engine":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    def attention(self, lw, xq, xk=None, xv=None, heads: torch.Tensor | None = None) -> torch.Tensor:
        """Engine.attention, over the prefix's keys and values too in a suffix pass."""
        eng, l = self.engine, self._layer[id(lw)]
        q, k, v = eng.qkv(lw, xq, xk, xv, heads, self.offset)
        if self.offset:
            entry = self.prefix[l]
            if entry is None:
                raise RuntimeError(f"causal suffix: the base run has no cached keys of layer {l}, whose heads it "
                                   "never computed (a bug: such heads stay ablated in every extension)")
            pk, pv = (t[:, : self.offset] for t in entry)
            if heads is not None:
                pk, pv = pk[:, :, heads], pv[:, :, heads]
            rep = q.shape[0] // pk.shape[0]  # the stacked circuits
            if rep > 1:
                pk, pv = pk.repeat(rep, 1, 1, 1), pv.repeat(rep, 1, 1, 1)
            k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
        if self.keep:
            self.kept[l] = (k, v, heads)
        return eng.attend(lw, q, k, v)

    def runs_kv(self, base: Run | None, runs: list) -> None:
        """Give each of a pass's runs its keys and values: the layers this pass attended at, the base's
        elsewhere (layers it did not recompute; a layer whose heads are all ablated is never read)."""
        L = len(self.engine.w.layers)
        if base is not None and base.kv is None:  # the layers below the pass would be missing: none at all
            for run in runs:
                run.kv = None
            self.kept = {}
            return
        per = [[None] * L if base is None else list(base.kv) for _ in runs]
        for l, (k, v, heads) in self.kept.items():
            if heads is not None:  # only the live heads: the others are ablated in every circuit of the pass
                H = self.engine.H
                full = [t.new_zeros(*t.shape[:2], H, t.shape[-1]) for t in (k, v)]
                full[0][:, :, heads], full[1][:, :, heads] = k, v
                k, v = full
            ks, vs = k.chunk(len(runs), 0), v.chunk(len(runs), 0)
            for kv, a, b in zip(per, ks, vs):
                kv[l] = (a, b)
        for run, kv in zip(runs, per):
            run.kv = kv
        self.kept = {}


class CausalSuffix:
    """The evaluator's stacked passes, over a suffix of positions where the change allows (module docstring);
    `rows`: the task's distinct rows as `fw.batch` holds them, on the CPU."""

    def __init__(self, fw: StackedForward, rows: Batch):
        self.fw = fw
        # the earliest position the metric reads in any row: a suffix must start at or before it
        self.first_read = rows.tokens.shape[1] - 1 if rows.pos is None else int(rows.pos[rows.valid].min())
        self.causal = bool(fw.w.causal)
        fw.engine = self.kv = KVEngine(fw.engine)
        self._views: dict = {}  # offset -> StackedForward over positions >= offset
        # a pass's fixed cost, in what one more circuit adds to a stacked pass (how `groups` weighs one more
        # pass against recomputing more positions): a K-circuit SmolLM2 pass on the CPU costs about 1.4 + K
        # (docs/speed.md, speculative batching); more where per-operation overhead dominates (small models,
        # accelerators). Speed only: every grouping gives the same scores
        big = fw.w.W_E.shape[1] >= SMALL_MODEL and torch.device(fw.engine.device).type == "cpu"
        self.pass_cost = 1.4 if big else 4.0

    def run_many(self, base: Run | None, start: int, masks: list, embed_live, src: Source | None, batch: Batch,
                 enabled: bool = True) -> tuple[list, float, int]:
        """(runs, the share of the circuits' positions recomputed, full forwards spent filling the base's key
        and value cache) of StackedForward.run_many(base, start, masks, embed_live, src, batch): the circuits
        grouped by where their change begins (`groups`), each group one stacked pass from its first position."""
        K = len(masks)
        offs = self.offsets(base, masks, src, batch) if enabled else [0] * K
        fills = 0
        if any(offs):
            self.kv.keep = True
            if base.kv is None:  # a base from before keys were kept: one full forward gives them
                self._full(None, -1, [base.masks], embed_live, src, batch, into=base)
                fills = 1
        P = self.fw.slot_rows.shape[1]
        runs, share = [None] * K, 0.0
        for off, idx in self.groups(offs, P):
            sub = [masks[i] for i in idx]
            out = self._suffix(base, start, sub, embed_live, off) if off else \
                self._full(base, start, sub, embed_live, src, batch)
            for i, r in zip(idx, out):
                runs[i] = r
            share += len(idx) * (P - off) / P
        return runs, share / K, fills

    def groups(self, offs: list, P: int) -> list:
        """[(offset, circuit indices)]: the circuits split into stacked passes, each from the earliest offset
        among its circuits, at the least cost: `pass_cost` per pass plus each circuit's share of positions
        recomputed (the best split of the circuits sorted by offset into runs, by dynamic programming)."""
        if len(set(offs)) == 1:
            return [(offs[0], list(range(len(offs))))]
        order = sorted(range(len(offs)), key=lambda i: -offs[i])
        o = [offs[i] for i in order]
        best, cut = [0.0] + [float("inf")] * len(o), [0] * (len(o) + 1)
        for i in range(1, len(o) + 1):
            for j in range(i):  # the last pass holds order[j:i], from offset o[i - 1]
                c = best[j] + self.pass_cost + (i - j) * (P - o[i - 1]) / P
                if c < best[i]:
                    best[i], cut[i] = c, j
        out, i = [], len(o)
        while i:
            out.append((o[i - 1], sorted(order[cut[i]:i])))
            i = cut[i]
        return out[::-1]

    def offsets(self, base: Run | None, masks: list, src: Source | None, batch: Batch) -> list:
        """Per circuit, the first position p its change reaches in any row when it differs from `base` only by
        nodes ablated and edges removed at slots; 0 (the full recompute) otherwise. CPU only."""
        fw, K = self.fw, len(masks)
        if not self.causal or base is None or src is None or batch is not fw.batch:
            return [0] * K
        if any(f.name not in KNOWN_MASKS for f in dataclasses.fields(Masks)):
            return [0] * K  # a mask kind this rule does not know about: never guess
        if getattr(fw, "splices", None):
            return [0] * K  # dictionaries spliced in at hook points (feature graphs): not cut to a suffix
        old = base.masks
        out = []
        for m in masks:
            if not torch.equal(m.ablated, old.ablated) or not torch.equal(m.removed, old.removed):
                out.append(0)  # a node or an edge changed whole: every position
                continue
            changed = (m.at & ~old.at).any(0)
            if m.removed_at is not None:
                new = m.removed_at if old.removed_at is None else m.removed_at & ~old.removed_at
                changed |= new.flatten(0, 1).any(0)
            hit = changed[fw.slot_rows]  # [B, P] positions of a changed slot
            P = hit.shape[1]
            first = torch.where(hit.any(1), hit.to(torch.uint8).argmax(1), torch.full((hit.shape[0],), P))
            off = int(first.min())
            out.append(off if 0 < off <= self.first_read else 0)
        return out

    def _full(self, base, start, masks, embed_live, src, batch, into: Run | None = None) -> list:
        """The ordinary stacked pass (keys and values kept once asked for); `into`: a run whose cache of
        keys and values this full recompute of its circuit fills."""
        kv = self.kv
        kv.offset, kv.prefix, kv.kept = 0, None, {}
        runs = self.fw.run_many(base, start, masks, embed_live, src, batch)
        if kv.keep:
            kv.runs_kv(base, runs)
        if into is not None:
            into.kv = runs[0].kv
        return runs

    def _suffix(self, base: Run, start: int, masks: list, embed_live, off: int) -> list:
        """The pass over positions >= off, its runs joined to the base's prefix."""
        fw = self.view(off)
        kv = fw.engine
        kv.offset, kv.prefix, kv.keep, kv.kept = off, base.kv, True, {}
        part = cut_run(base, off)
        if start < 0:  # from the embedding: the suffix's own
            embed_live = [t[:, off:] for t in embed_live] if isinstance(embed_live, list) else embed_live[:, off:]
        runs = fw.run_many(part, start, masks, embed_live, fw.source, fw.batch)
        kv.runs_kv(base, runs)
        kv.prefix = None
        for run in runs:
            join(run, base, part, off)
        return runs

    def view(self, off: int) -> StackedForward:
        """The stacked forward over positions >= off (built once per offset, after the evaluator's source and
        batch are final)."""
        fw = self._views.get(off)
        if fw is None:
            f, b = self.fw, self.fw.batch
            batch = Batch(b.tokens[:, off:], b.answers, b.wrong, b.weight, b.ref,
                          None if b.pos is None else (b.pos - off).clamp(min=0), b.valid, b.reduce)
            fw = StackedForward(KVEngine(self.kv.engine), f.index, f.layout, f.metric, f.H, f.Q,
                                f.slot_rows[:, off:], batch)
            fw.source = cut_source(f.source, off)
            self._views[off] = fw
        return fw


def _cut(t, off: int):
    return None if t is None else t[:, off:]


def cut_source(src: Source, off: int) -> Source:
    """The ablation source at positions >= off."""
    return Source(src.kind, _cut(src.embed, off), [_cut(t, off) for t in src.z], [_cut(t, off) for t in src.mlp_out],
                  None if src.parts is None else [_cut(t, off) for t in src.parts])


def cut_run(run: Run, off: int) -> Run:
    """`run`'s caches at positions >= off (views), as the base of a suffix pass."""
    return Run(run.index, run.masks, _cut(run.embed, off), [_cut(t, off) for t in run.resid_pre],
               [_cut(t, off) for t in run.z], [_cut(t, off) for t in run.resid_mid],
               [_cut(t, off) for t in run.mlp_out], final=_cut(run.final, off),
               diffs={s: d[:, off:] for s, d in run.diffs.items()},
               sums={g: (key, t[:, off:], n) for g, (key, t, n) in run.sums.items()},
               parts=None if run.parts is None else [_cut(t, off) for t in run.parts])


def join(run: Run, base: Run, part: Run, off: int) -> None:
    """Make a suffix pass's `run` whole: each cache the base's own where the pass left it as it was (`part`:
    the base cut at off), else the base's positions < off followed by the suffix's. An edge sum over other
    receiver rows than the base's, or a sender difference the base never cached, is dropped (taken afresh
    when needed)."""
    def whole(new, cut, old):
        if new is None or new is cut:
            return old if new is cut else None
        return torch.cat([old[:, :off], new], 1)

    run.embed = whole(run.embed, part.embed, base.embed)
    if run.parts is not None:
        cuts = part.parts if run.parts is part.parts else [None] * len(run.parts)
        run.parts = [whole(n, c, o) for n, c, o in zip(run.parts, cuts, base.parts)]
    for what in ("resid_pre", "z", "resid_mid", "mlp_out"):
        new, cut, old = getattr(run, what), getattr(part, what), getattr(base, what)
        setattr(run, what, [whole(n, c, o) for n, c, o in zip(new, cut, old)])
    run.final = whole(run.final, part.final, base.final)
    diffs = {}
    for s, d in run.diffs.items():
        if d is part.diffs.get(s):
            diffs[s] = base.diffs[s]
        elif s in base.diffs:
            diffs[s] = torch.cat([base.diffs[s][:, :off], d], 1)
    run.diffs = diffs
    sums = {}
    for g, (key, t, n) in run.sums.items():
        was, old = part.sums.get(g), base.sums.get(g)
        if was is not None and t is was[1]:
            sums[g] = old
        elif old is not None and old[0] == key:
            sums[g] = (key, torch.cat([old[1][:, :off], t], 1), max(n, old[2]))
    run.sums = sums
