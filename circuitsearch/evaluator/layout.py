"""Where each layer's heads, MLP and receivers sit in the graph index, and what recomputing from a stage costs.

Stages (graphs.index): 3l is layer l's attention input, 3l+1 its heads' outputs, 3l+2 its MLP, 3L the
logits; a change at stage t recomputes the forward pass from there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graphs.index import GraphIndex
from ..graphs.model_graph import ModelGraph


@dataclass(frozen=True)
class Layout:
    """Ids of the graph index by layer, as the forward passes use them (tensors and slices)."""

    L: int
    attn_only: bool
    heads: list            # layer -> slice of its heads' node ids
    mlp: list              # layer -> node id of its MLP (or None)
    attn_rows: list        # layer -> [3H] receiver rows of its heads' q, k, v inputs (q of all heads first)
    mlp_row: list          # layer -> receiver row of its MLP (or None)
    logits_row: int        # receiver row of the logits
    node_stage: torch.Tensor   # [N] where each node first changes the forward
    edge_stage: torch.Tensor   # [E] where each edge first changes it
    group_stage: dict          # receiver group key -> its stage

    @classmethod
    def of(cls, graph: ModelGraph, ix: GraphIndex, L: int, H: int, attn_only: bool) -> "Layout":
        heads, mlp, attn_rows, mlp_row = [], [], [], []
        for l in range(L):
            first = ix.node_id[f"a{l}.0"]
            heads.append(slice(first, first + H))
            mlp.append(None if attn_only else ix.node_id[f"m{l}"])
            rows = [ix.receiver_id[f"a{l}.{h}.{x}" if graph.qkv else f"a{l}.{h}"] for x in "qkv" for h in range(H)]
            attn_rows.append(torch.tensor(rows, dtype=torch.long))
            mlp_row.append(None if attn_only else ix.receiver_id[f"m{l}"])
        group_stage = {("logits",): 3 * L, **{("attn", l): 3 * l for l in range(L)},
                       **{("mlp", l): 3 * l + 2 for l in range(L)}}
        return cls(L, attn_only, heads, mlp, attn_rows, mlp_row, ix.receiver_id["logits"],
                   torch.tensor(ix.node_stage, dtype=torch.long), torch.tensor(ix.edge_stage, dtype=torch.long),
                   group_stage)

    def cost(self, start: int) -> float:
        """Fraction of a full forward that recomputing from `start` costs (attention ~1/3 of a layer)."""
        if start < 0:
            return 1.0
        layer, part = divmod(start, 3)
        left = self.L - layer - (0.3 if part == 1 else 0.35 if part == 2 else 0.0)
        if self.attn_only and part == 2:
            left = self.L - layer - 1
        return max(left, 0.0) / self.L
