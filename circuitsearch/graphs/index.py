"""GraphIndex: a model graph's node, receiver and edge names parsed once into integer tables.

Names (`a9.1`, `a4.4->a9.1.q`) are for people and files; the search and the evaluator work on
indices and boolean masks over them. The index is built once per graph (`ModelGraph.index`);
every name that enters the program is turned into an index here, with a clear error for a
name the graph does not have.

Indices follow forward order. Nodes: embed (or tok, pos: n_embed embedding senders), each
layer's heads then its MLP, logits; the senders are every node but logits, so a sender's index
is its node index. Receivers: for each
node after embed, its inputs (a head's q, k, v, or the head itself when the graph has one
receiver per head; an MLP; the logits). Edges: `ModelGraph.edges` order.

Stages say where a change first touches the forward pass: -1 the embedding; 3l the inputs of
layer l's heads; 3l+1 the heads' outputs; 3l+2 the MLP; 3L the logits. A node's stage is
where its output is replaced, an edge's is its receiver's. A dictionary's feature nodes (graph.features) come
after the ordinary senders; their stage is their hook's: resid_pre.l 3l, attn_out.l 3l+1, resid_mid.l, mlp_in.l
and mlp_out.l 3l+2. The nodes a dictionary decomposes (attn_out.l: layer l's heads; mlp_out.l and a
transcoder: m_l) are `decomposed`: they stay, computed as ever, and the search removes their features instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import torch

from .model_graph import ModelGraph, parse_node, receiver_node

EMBED, HEAD, MLP, LOGITS, FEATURE = 0, 1, 2, 3, 4
_KIND = {"embed": EMBED, "head": HEAD, "mlp": MLP, "logits": LOGITS, "feature": FEATURE}
_INPUT = {"q": 0, "k": 1, "v": 2, None: -1}


@dataclass(frozen=True)
class CircuitMasks:
    """What a circuit removes, as masks: `ablated` [N] nodes, `removed` [E] edges."""

    ablated: torch.Tensor
    removed: torch.Tensor


class GraphIndex:
    """Integer tables for one ModelGraph (see the module docstring for the orders)."""

    def __init__(self, graph: ModelGraph):
        self.graph = graph
        L = self.n_layers = graph.n_layers
        self.nodes: list[str] = list(graph.nodes)
        self.senders: list[str] = self.nodes[:-1]
        self.N, self.S = len(self.nodes), len(self.senders)
        self.node_id = {n: i for i, n in enumerate(self.nodes)}
        infos = [parse_node(n, L) for n in self.nodes]
        self.node_kind = [_KIND[i.kind] for i in infos]
        self.node_layer = [i.layer for i in infos]
        self.node_head = [-1 if i.head is None else i.head for i in infos]
        self.node_stage = [_node_stage(i.kind, i.layer, L) for i in infos]
        self.logits = self.N - 1
        self.n_embed = len(graph.embed_nodes)  # the embedding senders are nodes 0 .. n_embed-1
        self.sites = list(graph.features)
        self.site_first: list[int] = []  # node id of each site's first feature (its error node closes the run)
        self.site_of: dict[int, int] = {}  # feature (or error) node id -> its site
        self.decomposed = torch.zeros(self.N, dtype=torch.bool)
        for site in self.sites:
            ids = [self.node_id[n] for n in site.nodes]
            self.site_first.append(ids[0])
            stage = site_stage(site.writes, L)
            for i in ids:
                self.node_stage[i] = stage
                self.site_of[i] = len(self.site_first) - 1
            for n in site.parents(graph.n_heads):
                self.decomposed[self.node_id[n]] = True
        self.S0 = self.site_first[0] if self.sites else self.S  # the ordinary senders: 0 .. S0-1

        self.receivers: list[str] = []
        recv_node, recv_input = [], []
        for n in self.nodes[self.n_embed:]:
            for r in graph.receivers_of(n):
                self.receivers.append(r)
                recv_node.append(self.node_id[n])
                recv_input.append(_INPUT[receiver_node(r)[1]])
        self.R = len(self.receivers)
        self.receiver_id = {r: i for i, r in enumerate(self.receivers)}
        self.recv_node = recv_node
        self.recv_input = recv_input
        self.recv_stage = [self.node_stage[n] - (1 if self.node_kind[n] == HEAD else 0) for n in recv_node]

        self.edges: list[str] = list(graph.edges)
        self.E = len(self.edges)
        self.edge_id = {e: i for i, e in enumerate(self.edges)}
        src, dst = [], []
        for e in self.edges:
            s, r = e.split("->", 1)
            src.append(self.node_id[s])
            dst.append(self.receiver_id[r])
        self.edge_src_list = src
        self.edge_stage = [self.recv_stage[r] for r in dst]
        self.edge_src = torch.tensor(src, dtype=torch.long)
        self.edge_recv = torch.tensor(dst, dtype=torch.long)
        self.edge_dst_node = torch.tensor([recv_node[r] for r in dst], dtype=torch.long)
        # into a head's key or value (with one receiver per head: into the head), which later positions read
        self.edge_kv = torch.tensor([self.node_kind[recv_node[r]] == HEAD and recv_input[r] != 0 for r in dst],
                                    dtype=torch.bool)
        self._recv_node_t = torch.tensor(recv_node, dtype=torch.long)

    # ---------------------------------------------------------------- names -> indices
    def node(self, name: str | int) -> int:
        """Index of a node (names are checked against the graph)."""
        if isinstance(name, int):
            return name
        i = self.node_id.get(name)
        if i is None:
            self.graph.check_node(name)  # raises with the reason (bad name, or not in this model)
        return i

    def edge(self, name: str | int) -> int:
        """Index of an edge (names are checked against the graph)."""
        if isinstance(name, int):
            return name
        i = self.edge_id.get(name)
        if i is None:
            self.graph.check_edge(name)
        return i

    def node_ids(self, names: Iterable) -> list[int]:
        return [self.node(n) for n in names]

    def edge_ids(self, names: Iterable) -> list[int]:
        return [self.edge(e) for e in names]

    # ---------------------------------------------------------------- masks
    def present_edges(self, ablated: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
        """Edges still in the circuit [E]: not removed, and both their sender and receiver node alive.

        This is the one definition of "edges still present" (candidates, attribution, curves,
        saved circuits all use it).
        """
        return ~removed & ~ablated[self.edge_src] & ~ablated[self.edge_dst_node]

    def masks_of(self, kept_nodes: Iterable[str], kept_edges: Iterable[str] | None) -> CircuitMasks:
        """The masks of a circuit given by what it keeps (kept_edges None: every edge among kept nodes)."""
        ablated = torch.ones(self.N, dtype=torch.bool)
        ablated[self.node_ids(kept_nodes)] = False
        ablated[self.logits] = False
        removed = torch.zeros(self.E, dtype=torch.bool)
        if kept_edges is not None:
            keep = torch.zeros(self.E, dtype=torch.bool)
            keep[self.edge_ids(kept_edges)] = True
            removed = ~keep & ~ablated[self.edge_src] & ~ablated[self.edge_dst_node]
        return CircuitMasks(ablated, removed)

    def names(self, ids: Sequence[int] | torch.Tensor, level: str) -> list[str]:
        table = self.nodes if level == "nodes" else self.edges
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [table[i] for i in ids]

    def kind_of(self, node: int) -> int:
        return self.node_kind[node]


def site_stage(hook: str, n_layers: int) -> int:
    """The stage where a dictionary writing `hook` (resid_pre.6, mlp_out.3...) changes the forward pass."""
    kind, layer = hook.rsplit(".", 1)
    layer = int(layer)
    return 3 * layer + {"resid_pre": 0, "attn_out": 1, "resid_mid": 2, "mlp_in": 2, "mlp_out": 2}[kind]


def _node_stage(kind: str, layer: int, n_layers: int) -> int:
    if kind == "embed":
        return -1
    if kind == "head":
        return 3 * layer + 1
    if kind == "mlp":
        return 3 * layer + 2
    if kind == "feature":
        return -2  # set from its site by GraphIndex
    return 3 * n_layers


@lru_cache(maxsize=8)
def index_of(graph: ModelGraph) -> GraphIndex:
    """The index of `graph`, built once per graph (graphs are frozen and hashable)."""
    return GraphIndex(graph)
