"""Attribution patching: a linear estimate of every node's and every edge's effect at once.

Removing edge s->r changes r's input by -(live_s - ablated_s), so to first order the score
moves by -(live_s - ablated_s) · ∂score/∂input_r, summed over prompts and positions (EAP,
Syed et al. 2023). EAP-IG (Hanna et al. 2024) averages the gradient over m points on the
path from the empty circuit to the circuit, every live sender's output mixed α = 1/m … 1 of
the way from its ablation value to its live value, which works for mean, resample and zero
ablation alike (m = 1 is EAP). Ablating a node removes all its present out-edges, so a
node's estimate is the sum of theirs. Estimates are signed changes of the metric; rankings
order by magnitude.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

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

    def ranking(self, level: str) -> list[str]:
        """Names at `level` ("nodes" or "edges") from least to most important (|estimate|).

        Ties keep forward order, so rankings are deterministic.
        """
        scores = self._level(level)
        names = list(scores)
        return sorted(names, key=lambda n: abs(scores[n]))

    def top(self, level: str, k: int) -> list[str]:
        """The k most important names at `level`."""
        return self.ranking(level)[::-1][:k]

    def _level(self, level: str) -> dict:
        if level not in ("nodes", "edges"):
            raise ValueError(f"attribution level must be 'nodes' or 'edges', not {level!r}")
        return self.nodes if level == "nodes" else self.edges

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "method": self.method, "steps": self.steps, "base": self.base,
                "nodes": self.nodes, "edges": self.edges}

    @classmethod
    def from_json(cls, d: dict) -> "Attribution":
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not an attribution file: schema {d.get('schema')!r}, expected {SCHEMA!r}")
        return cls(d["method"], int(d["steps"]), dict(d["nodes"]), dict(d["edges"]), dict(d.get("base", {})))

    def save(self, path) -> None:
        from ..io import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))


def attribute(ev: Evaluator, run: Run | None = None, method: str = "eap-ig", steps: int = 5) -> Attribution:
    """Attribution scores for every node and edge still present in `run`'s circuit (default: all).

    EAP costs one forward and one backward pass; EAP-IG `steps` of each.
    """
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose {' or '.join(METHODS)}")
    if method == "eap":
        steps = 1
    if steps < 1:
        raise ValueError(f"EAP-IG needs at least 1 step, not {steps}")
    run = run or ev.clean_run
    est = edge_estimates(ev, run, method, steps)
    ix = ev.index
    present = run.present_edges().nonzero()[:, 0].tolist()
    values = est.tolist()
    edges = {ix.edges[i]: values[i] for i in present}
    nodes = {n: 0.0 for n in ix.senders if n not in run.nodes}
    for e, v in edges.items():
        src = e.split("->", 1)[0]
        if src in nodes:
            nodes[src] += v
    return Attribution(method, steps, nodes, edges,
                       {"ablated_nodes": sorted(run.nodes), "removed_edges": int(run.removed_edges().sum())})


def edge_estimates(ev: Evaluator, run: Run, method: str = "eap-ig", steps: int = 5) -> torch.Tensor:
    """Estimated change of the score when each edge of the graph index is removed from `run`'s circuit [E]
    (edges no longer present get the estimate of removing them again: meaningless, filter them)."""
    steps = 1 if method == "eap" else steps
    L, H, S = ev.L, ev.H, ev.S
    grads = None
    for k in range(1, steps + 1):
        g = ev.receiver_gradients(run, alpha=k / steps)
        if grads is None:
            grads = g
        else:
            grads = {"attn": [a + b for a, b in zip(grads["attn"], g["attn"])],
                     "mlp": [None if a is None else a + b for a, b in zip(grads["mlp"], g["mlp"])],
                     "logits": grads["logits"] + g["logits"]}
    ix = ev.index
    with torch.inference_mode():
        D = ev.sender_diffs(run)  # [B, P, S, d] live - ablated
        scale = -1.0 / steps
        est = torch.zeros(ix.R, S, dtype=D.dtype)  # receiver row x sender
        for l in range(L):
            n = ix.n_embed + l * (H + (0 if ev.attn_only else 1))  # senders before layer l's heads
            G = grads["attn"][l].flatten(2, 3)  # [B, P, 3H, d], q of every head, then k, then v
            E = torch.einsum("bprd,bpsd->rs", G, D[:, :, :n]) * scale
            est[:, :n].index_add_(0, ev._attn_rows[l], E)  # one receiver per head: q, k and v summed
            if not ev.attn_only:
                est[ev._mlp_row[l], : n + H] = torch.einsum("bpd,bpsd->s", grads["mlp"][l], D[:, :, : n + H]) * scale
        g = grads["logits"]  # [B, d] at the last position, or [B, P, d] when the metric reads several
        est[ev._logits_row] = (torch.einsum("bd,bsd->s", g, D[:, -1]) if g.dim() == 2
                               else torch.einsum("bpd,bpsd->s", g, D)) * scale
    return est[ix.edge_recv, ix.edge_src]


