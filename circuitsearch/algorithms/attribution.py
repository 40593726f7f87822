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
    with torch.inference_mode():
        D = torch.stack([ev._sender_diff(run, s) for s in range(S)], 2)  # [B, P, S, d] live - ablated
        scale = -1.0 / steps
        edges: dict[str, float] = {}
        qkv = "qkv" if ev.graph.qkv else None
        for l in range(L):
            n = 1 + l * (H + (0 if ev.attn_only else 1))  # senders before layer l's heads
            G = grads["attn"][l].flatten(2, 3)  # [B, P, 3H, d]
            E = torch.einsum("bprd,bpsd->rs", G, D[:, :, :n]).view(3, H, n) * scale
            for h in range(H):
                for xi, x in enumerate("qkv"):
                    if qkv is None and xi > 0:
                        continue
                    row = E[:, h].sum(0) if qkv is None else E[xi, h]
                    for s, v in enumerate(row.tolist()):
                        edges[f"{ev.senders[s]}->a{l}.{h}.{x}"] = v
            if not ev.attn_only:
                row = torch.einsum("bpd,bpsd->s", grads["mlp"][l], D[:, :, : n + H]) * scale
                for s, v in enumerate(row.tolist()):
                    edges[f"{ev.senders[s]}->m{l}"] = v
        row = torch.einsum("bd,bsd->s", grads["logits"], D[:, -1]) * scale
        for s, v in enumerate(row.tolist()):
            edges[f"{ev.senders[s]}->logits"] = v
    present = _present_edges(ev, run)
    edges = {e: edges[e] for e in ev.graph.edges if e in present}
    nodes = {n: 0.0 for n in ev.senders if n not in run.nodes}
    for e, v in edges.items():
        src = e.split("->", 1)[0]
        if src in nodes:
            nodes[src] += v
    return Attribution(method, steps, nodes, edges,
                       {"ablated_nodes": sorted(run.nodes), "removed_edges": len(run.edges)})


def _present_edges(ev: Evaluator, run: Run) -> set[str]:
    """Edges whose removal would still change something: not removed, both ends alive."""
    from ..graphs.model_graph import receiver_node

    out = set()
    for e in ev.graph.edges:
        if e in run.edges:
            continue
        src, dst = e.split("->", 1)
        if src in run.nodes or receiver_node(dst)[0] in run.nodes:
            continue
        out.add(e)
    return out
