"""Attribution patching: a linear estimate of every node's and every edge's effect at once.

Removing edge s->r changes r's input by -(live_s - ablated_s), so to first order the score
moves by -(live_s - ablated_s) · ∂score/∂input_r, summed over prompts and positions (EAP,
Syed et al. 2023). EAP-IG (Hanna et al. 2024) averages the gradient over m points on the
path from the empty circuit to the circuit, every live sender's output mixed α = 1/m … 1 of
the way from its ablation value to its live value, which works for mean, resample and zero
ablation alike (m = 1 is EAP). Ablating a node removes all its present out-edges, so a
node's estimate is the sum of theirs. Per slot of positions (a node at one slot, `a9.1@end`),
the same sum runs over the prompt positions of that slot only: the slot estimates of a node add
up to its estimate, from the same single backward pass. Estimates are signed changes of the
metric; rankings order by magnitude.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..evaluator.splices import site_diffs
from ..patching import Evaluator, Run

METHODS = ("eap", "eap-ig")
SCHEMA = "circuitsearch.attribution/1"


@dataclass
class Attribution:
    """Estimated change of the score when each node is ablated / each edge removed."""

    method: str
    steps: int
    nodes: dict = field(default_factory=dict)
    edges: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)  # what the circuit attributed already removes
    units: dict = field(default_factory=dict)  # node@slot -> estimate (when asked for: attribute(units=True))
    edge_units: dict = field(default_factory=dict)  # sender@slot->receiver@slot -> estimate (edge_units=True)

    def ranking(self, level: str) -> list[str]:
        """Names at `level` ("nodes" or "edges") from least to most important (|estimate|).

        Ties keep forward order, so rankings are deterministic.
        """
        scores = self.estimates(level)
        names = list(scores)
        return sorted(names, key=lambda n: abs(scores[n]))

    def top(self, level: str, k: int) -> list[str]:
        """The k most important names at `level`."""
        return self.ranking(level)[::-1][:k]

    def estimates(self, level: str) -> dict:
        """Name -> estimate at one search level (nodes, positions, edges, edge-positions)."""
        table = {"nodes": self.nodes, "edges": self.edges, "positions": self.units, "edge-positions": self.edge_units}
        if level not in table:
            raise ValueError(f"attribution level must be one of {', '.join(table)}, not {level!r}")
        if level == "positions" and not self.units and self.nodes:
            raise ValueError("these estimates have no per-slot values: attribute with units=True")
        if level == "edge-positions" and not self.edge_units and self.edges:
            raise ValueError("these estimates have no per-slot edge values: attribute with edge_units=True")
        return table[level]

    def to_json(self) -> dict:
        out = {"schema": SCHEMA, "method": self.method, "steps": self.steps, "base": self.base,
               "nodes": self.nodes, "edges": self.edges}
        if self.units:
            out["units"] = self.units
        if self.edge_units:
            out["edge_units"] = self.edge_units
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Attribution":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not an attribution file: schema {d.get('schema')!r}, expected {SCHEMA!r}")
        return cls(d["method"], int(d["steps"]), dict(d["nodes"]), dict(d["edges"]), dict(d.get("base", {})),
                   dict(d.get("units", {})), dict(d.get("edge_units", {})))

    def save(self, path) -> None:
        from ..io import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))


def attribute(ev: Evaluator, run: Run | None = None, method: str = "eap-ig", steps: int = 5,
              units: bool = False, edge_units: bool = False) -> Attribution:
    """Attribution scores for every node and edge still present in `run`'s circuit (default: all), with
    `units` for every node at every slot still present (`a9.1@end`), with `edge_units` for every edge at
    every slot still present (`a4.4@S1->a9.1.k@S1`; edges × slots of them: ask for them on small circuits)

    EAP costs one forward and one backward pass; EAP-IG `steps` of each.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose {' or '.join(METHODS)}")
    if method == "eap":
        steps = 1
    if steps < 1:
        raise ValueError(f"EAP-IG needs at least 1 step, not {steps}")
    run = run or ev.clean_run
    grads = ev.receiver_gradients(run, alpha=[k / steps for k in range(1, steps + 1)])  # Σ over the steps
    est = edge_estimates(ev, run, method, steps, by_slot=units or edge_units, grads=grads)  # [E] or [E, Q]
    ix = ev.index
    present_mask = run.present_edges()
    present = present_mask.nonzero()[:, 0].tolist()
    total = est.sum(1) if est.dim() == 2 else est
    values = total.tolist()
    edges = {ix.edges[i]: values[i] for i in present}
    nodes = {n: 0.0 for n in ix.senders if n not in run.nodes}
    for e, v in edges.items():
        src = e.split("->", 1)[0]
        if src in nodes:
            nodes[src] += v
    feats = feature_estimates(ev, run, grads, steps, by_slot=units)  # [S - S0] or [S - S0, Q]
    if feats is not None:
        total_f = (feats.sum(1) if feats.dim() == 2 else feats).tolist()
        for k, n in enumerate(ix.senders[ix.S0:]):
            if n in nodes:
                nodes[n] = total_f[k]
    for n in ix.names(ix.decomposed[: ix.S].nonzero()[:, 0], "nodes"):
        nodes.pop(n, None)  # a decomposed node is not a candidate: its features are
    unit_est = {}
    if units:  # a node at a slot: the sum of its present out-edges' estimates at that slot
        S, Q = ev.S, ev.Q
        per = torch.zeros(S, Q, dtype=est.dtype).index_add_(0, ix.edge_src[present_mask], est[present_mask])
        if feats is not None:
            per[ix.S0:] = feats
        alive = run.present_units() & ~ix.decomposed[:S, None]
        names, flat = ev.unit_names, per.flatten().tolist()
        unit_est = {names[u]: flat[u] for u in alive.flatten().nonzero()[:, 0].tolist()}
    edge_est = {}
    if edge_units:
        flat = est.flatten().tolist()
        present_u = run.present_edge_units(ev.read_slots).flatten().nonzero()[:, 0].tolist()
        edge_est = {ev.edge_unit_name(u): flat[u] for u in present_u}
    base = {"ablated_nodes": sorted(run.nodes), "removed_edges": int(run.removed_edges().sum())}
    if run.units:
        base["ablated_units"] = sorted(ev.unit_names[u] for u in run.units)
    if run.edge_units:
        base["removed_edge_units"] = len(run.edge_units)
    return Attribution(method, steps, nodes, edges, base, unit_est, edge_est)


def attribute_for(ev: Evaluator, run: Run, level: str, method: str = "eap-ig", steps: int = 5) -> Attribution:
    """attribute with the per-slot estimates a search level needs (positions: node units; edge-positions:
    edge units)."""
    return attribute(ev, run, method, steps, units=level == "positions", edge_units=level == "edge-positions")


def feature_estimates(ev: Evaluator, run: Run, grads: dict, steps: int, by_slot: bool = False) -> torch.Tensor | None:
    """Estimated change of the score when each feature and error node (graph ids S0..S-1) is ablated in `run`'s
    circuit [S - S0] (by_slot: at each slot alone [S - S0, Q]), from the gradients at the spliced sites
    (`grads` of receiver_gradients over `steps` alphas): −(f − a_f)·(W_dec · g), −(e − a_e)·g; None without
    features. With nothing ablated downstream they sum, site by site, to the estimate of ablating the whole
    activation the site writes (the splice is exact and linear in the features)."""
    if not ev.splices:
        return None
    with torch.inference_mode():
        onehot = torch.nn.functional.one_hot(ev._slot_rows, ev.Q).float() if by_slot else None
        out = []
        for (df, de), sp, g in zip(site_diffs(ev.splices, ev.source, run), ev.splices, grads["hooks"]):
            gw = torch.einsum("bpd,nd->bpn", g, sp.W)                     # the gradient along each decoder row
            per = torch.cat([df * gw, (de * g).sum(-1, keepdim=True)], -1)  # [B, P, n+1]
            if onehot is None:
                out.append(per.sum((0, 1)))
            else:
                out.append(torch.einsum("bpn,bpq->nq", per, onehot.to(per.device, per.dtype)))
        return (torch.cat(out, 0) * (-1.0 / steps)).cpu()


def edge_estimates(ev: Evaluator, run: Run, method: str = "eap-ig", steps: int = 5,
                   by_slot: bool = False, grads: dict | None = None) -> torch.Tensor:
    """Estimated change of the score when each edge of the graph index is removed from `run`'s circuit [E]
    (edges no longer present get the estimate of removing them again: meaningless, filter them); with
    by_slot, the change when it is removed at each slot of positions only [E, Q] (summing to [E]).
    `grads`: receiver_gradients at the steps' alphas, if already taken."""
    steps = 1 if method == "eap" else steps
    L, H, S = ev.L, ev.H, ev.S
    alphas = [k / steps for k in range(1, steps + 1)]
    if grads is None:
        grads = ev.receiver_gradients(run, alpha=alphas)  # Σ over the steps, one pass
    ix = ev.index
    with torch.inference_mode():
        D = ev.sender_diffs(run)  # [B, P, S, d] live - ablated
        scale = -1.0 / steps
        # summed over prompt rows and positions, or (by_slot) over the positions of each slot apart
        onehot = torch.nn.functional.one_hot(ev._slot_rows, ev.Q).to(D.device, D.dtype) if by_slot else None
        sq = "q" if by_slot else ""

        def contract(spec: str, *ops):
            if onehot is None:
                return torch.einsum(spec, *ops)
            ins, out = spec.split("->")
            return torch.einsum(f"{ins},bpq->{out}q", *ops, onehot)

        est = torch.zeros(ix.R, S, *((ev.Q,) if by_slot else ()), dtype=D.dtype, device=D.device)  # receiver x sender
        for l in range(L):
            n = ix.n_embed + l * (H + (0 if ev.attn_only else 1))  # senders before layer l's heads
            G = grads["attn"][l].flatten(2, 3)  # [B, P, 3H, d], q of every head, then k, then v
            E = contract("bprd,bpsd->rs", G, D[:, :, :n]) * scale
            est[:, :n].index_add_(0, ev.layout.attn_rows[l].to(D.device), E)  # one receiver per head: q, k and v summed
            if not ev.attn_only:
                est[ev.layout.mlp_row[l], : n + H] = contract("bpd,bpsd->s", grads["mlp"][l], D[:, :, : n + H]) * scale
        g = grads["logits"]  # [B, d] at the last position, or [B, P, d] when the metric reads several
        if g.dim() == 2:  # the last position of every row
            est[ev.layout.logits_row, : ix.S0] = (torch.einsum("bd,bsd,bq->s" + sq, g, D[:, -1], onehot[:, -1]) if by_slot
                                         else torch.einsum("bd,bsd->s", g, D[:, -1])) * scale
        else:
            est[ev.layout.logits_row, : ix.S0] = contract("bpd,bpsd->s", g, D) * scale
        _feature_edges(ev, run, grads, est, contract, scale, onehot)
    return est[ix.edge_recv, ix.edge_src].cpu()  # estimates meet the CPU masks from here on


def _feature_edges(ev: Evaluator, run: Run, grads: dict, est: torch.Tensor, contract, scale: float, onehot) -> None:
    """The estimates of edges out of feature and error nodes (of dictionaries that decompose a node) into `est`
    [R, S(, Q)]: each receiver's input gradient against each feature's live − ablated output, (f − a)·W_dec[i]."""
    ix, lay = ev.index, ev.layout
    for (df, de), sp in zip(site_diffs(ev.splices, ev.source, run), ev.splices):
        if not sp.parents:
            continue
        D = torch.cat([df[..., None] * sp.W, de[:, :, None]], 2)  # [B, P, n+1, d]
        cols, stage = slice(sp.first, sp.first + sp.n + 1), ix.node_stage[sp.first]
        for l in range(ev.L):
            if 3 * l > stage:
                E = contract("bprd,bpsd->rs", grads["attn"][l].flatten(2, 3), D) * scale
                est[:, cols].index_add_(0, lay.attn_rows[l].to(D.device), E)
            if not ev.attn_only and 3 * l + 2 > stage:
                est[lay.mlp_row[l], cols] = contract("bpd,bpsd->s", grads["mlp"][l], D) * scale
        g = grads["logits"]
        if g.dim() == 2:
            est[lay.logits_row, cols] = (torch.einsum("bd,bsd,bq->sq", g, D[:, -1], onehot[:, -1]) if onehot is not None
                                         else torch.einsum("bd,bsd->s", g, D[:, -1])) * scale
        else:
            est[lay.logits_row, cols] = contract("bpd,bpsd->s", g, D) * scale


