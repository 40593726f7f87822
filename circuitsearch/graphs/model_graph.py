"""The computational graph of a transformer: nodes, receivers and edges, by name.

Nodes are `embed`, `a{layer}.{head}`, `m{layer}` and `logits`. A head reads its input
through three receivers `a{l}.{h}.q|k|v`; an MLP and the logits read through themselves.
An edge `src->dst` joins a sender node to a receiver that comes later in the forward pass.
With split_embed the embedding is two senders, `tok` (token embedding) and `pos` (learned
position embedding), in place of `embed`, so a circuit says which of the two a node reads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ..features.hooks import HookError, parse_feature

_HEAD = re.compile(r"^a(\d+)\.(\d+)$")
_MLP = re.compile(r"^m(\d+)$")
_RECV = re.compile(r"^a(\d+)\.(\d+)\.([qkv])$")
_FEATURE = re.compile(r"^[a-z]+\d+\.(f\d+|err)$")
EMBED_NODES = ("embed",)           # the embedding sender of the default graph
SPLIT_EMBED_NODES = ("tok", "pos")  # its two parts in a split_embed graph, in forward order


@dataclass(frozen=True)
class NodeInfo:
    """What a node name means: kind is embed, head, mlp, feature or logits; layer -1 for embed (and for `tok`
    and `pos`, the parts of the embedding in a split_embed graph: kind embed too); a feature node (`r6.f12`,
    `m5.err`: features/hooks.py) has its dictionary's layer and `head` None."""

    name: str
    kind: str
    layer: int | None
    head: int | None = None


def parse_node(name: str, n_layers: int | None = None) -> NodeInfo:
    """Parse a node name (`embed`, `tok`, `pos`, `a9.1`, `m3`, `logits`); logits sit at layer n_layers
    (None when n_layers is not given: its layer is unknown without the model)."""
    if name in EMBED_NODES or name in SPLIT_EMBED_NODES:
        return NodeInfo(name, "embed", -1)
    if name == "logits":
        return NodeInfo(name, "logits", n_layers)
    m = _HEAD.match(name)
    if m:
        return NodeInfo(name, "head", int(m.group(1)), int(m.group(2)))
    m = _MLP.match(name)
    if m:
        return NodeInfo(name, "mlp", int(m.group(1)))
    if isinstance(name, str) and _FEATURE.match(name):
        try:
            return NodeInfo(name, "feature", parse_feature(name).layer)
        except HookError:
            pass
    raise ValueError(
        f"unknown node name {name!r}: expected 'embed' (or 'tok' and 'pos' with split embeddings), "
        "'a<layer>.<head>' (e.g. a9.1), 'm<layer>', a dictionary feature ('r6.f1234', 'm5.err') or 'logits'"
    )


def receiver_node(receiver: str) -> tuple[str, str | None]:
    """Split a receiver name into (node, input): `a9.1.q` -> (`a9.1`, `q`), `m3` -> (`m3`, None)."""
    m = _RECV.match(receiver)
    if m:
        return f"a{m.group(1)}.{m.group(2)}", m.group(3)
    parse_node(receiver)
    return receiver, None


def split_edge(edge: str) -> tuple[str, str]:
    """`a4.4->a9.1.q` -> (`a4.4`, `a9.1.q`), with a clear error for anything else."""
    parts = edge.split("->")
    if len(parts) != 2:
        raise ValueError(f"bad edge name {edge!r}: expected 'sender->receiver', e.g. 'a4.4->a9.1.q'")
    receiver_node(parts[1])
    parse_node(parts[0])
    return parts[0], parts[1]


DECOMPOSING = ("attn_out", "mlp_out")  # hook kinds whose dictionary stands in for a node (and takes its edges)


def edgeless_hooks(writes) -> list[str]:
    """The hook points (of those dictionaries write) whose features have no edges: the residual stream and an
    MLP's input, where the stream would have to be cut at the hook (not built)."""
    return [str(w) for w in writes if str(w).rsplit(".", 1)[0] not in DECOMPOSING]


def edgeless_message(hooks: list[str], level: str) -> str:
    """Why a level with an edge phase is refused with dictionaries at `hooks` (edgeless_hooks)."""
    return (f"--level {level} with a dictionary at {', '.join(hooks)}: features on the residual stream or an MLP's "
            "input have no edges yet (their hook would have to cut the stream), so that graph is searched at node "
            "level; use --level nodes (or nodes,positions). Dictionaries at mlp_out.L or attn_out.L, and "
            "transcoders, take edges")


@dataclass(frozen=True)
class FeatureSite:
    """One dictionary's nodes in a graph: where it reads (`hook`) and writes (`writes`: the same, or a
    transcoder's mlp_out.L), the features that are nodes (`active`, those active on the task's prompts), its
    node-name prefix and layer (`r6` of `r6.f12`) and its digest (a changed dictionary is another graph).
    Its nodes are `{prefix}{layer}.f{i}` for i in active, then `{prefix}{layer}.err`."""

    hook: str
    writes: str
    prefix: str
    layer: int
    active: tuple
    digest: str
    n_features: int

    @property
    def nodes(self) -> list[str]:
        return [f"{self.prefix}{self.layer}.f{i}" for i in self.active] + [f"{self.prefix}{self.layer}.err"]

    def parents(self, n_heads: int) -> list[str]:
        """The ordinary nodes its features and error add up to: layer L's heads for attn_out.L, mL for mlp_out.L (an
        SAE there, or a transcoder); none for the residual stream and an MLP's input. Its nodes take their place as
        senders: the edges out of them become edges out of its features and error."""
        kind, layer = self.writes.rsplit(".", 1)
        if kind == "attn_out":
            return [f"a{layer}.{h}" for h in range(n_heads)]
        return [f"m{layer}"] if kind == "mlp_out" else []  # (DECOMPOSING: the kinds with parents)

    def signature(self) -> dict:
        return {"hook": self.hook, "writes": self.writes, "prefix": self.prefix, "layer": self.layer,
                "active": list(self.active), "digest": self.digest, "n_features": self.n_features}

    @classmethod
    def from_signature(cls, sig: dict) -> "FeatureSite":
        return cls(sig["hook"], sig["writes"], sig["prefix"], int(sig["layer"]), tuple(int(i) for i in sig["active"]),
                   sig["digest"], int(sig["n_features"]))


@dataclass(frozen=True)
class ModelGraph:
    """Nodes and edges of a model with n_layers layers of n_heads heads.

    attn_only models have no MLP nodes. qkv=True gives heads separate q, k, v receivers;
    qkv=False gives one receiver per head, named as the head (`a4.4->a9.1`: q, k and v together).
    On grouped-query models every query head still has its own k and v receivers: the
    shared key/value projection is computed once per query head, so patching `a9.1.k`
    leaves `a9.0.k` untouched.
    parallel=True is a model whose blocks run attention and MLP side by side on the layer's
    input (GPT-NeoX/Pythia, GPT-J): the MLP of layer l does not read that layer's heads, so
    there is no edge a{l}.h->m{l}.
    split_embed=True replaces the sender `embed` by `tok` and `pos` (token and learned position
    embedding; their sum is the embedding), for models with learned positions only.
    features: dictionaries spliced in (FeatureSite, in the order the forward reaches them); their feature and
    error nodes follow the ordinary nodes (so those keep their indices), before logits. They are senders
    without edges: a feature graph is searched at node level (and positions).
    """

    n_layers: int
    n_heads: int
    attn_only: bool = False
    qkv: bool = True
    parallel: bool = False
    split_embed: bool = False
    features: tuple = ()

    def signature(self) -> dict:
        """What two circuits must share to be compared (`parallel` and `split_embed` only when set, so
        circuits saved before they existed keep their signature)."""
        sig = {"n_layers": self.n_layers, "n_heads": self.n_heads,
               "attn_only": self.attn_only, "qkv": self.qkv}
        if self.parallel:
            sig["parallel"] = True
        if self.split_embed:
            sig["split_embed"] = True
        if self.features:
            sig["features"] = [f.signature() for f in self.features]
        return sig

    @classmethod
    def from_signature(cls, sig: dict) -> "ModelGraph":
        return cls(int(sig["n_layers"]), int(sig["n_heads"]), bool(sig.get("attn_only", False)),
                   bool(sig.get("qkv", True)), bool(sig.get("parallel", False)),
                   bool(sig.get("split_embed", False)),
                   tuple(FeatureSite.from_signature(f) for f in sig.get("features", ())))

    @property
    def embed_nodes(self) -> tuple[str, ...]:
        """The embedding senders: (`embed`,), or (`tok`, `pos`) with split_embed."""
        return SPLIT_EMBED_NODES if self.split_embed else EMBED_NODES

    def heads(self, layer: int) -> list[str]:
        return [f"a{layer}.{h}" for h in range(self.n_heads)]

    def layer_nodes(self, layer: int) -> list[str]:
        """The nodes of one layer, heads first, then the MLP (the order they run in)."""
        return self.heads(layer) + ([] if self.attn_only else [f"m{layer}"])

    @cached_property
    def nodes(self) -> list[str]:
        """All nodes in forward order: embed (or tok, pos), each layer's heads then MLP, logits."""
        out = list(self.embed_nodes)
        for layer in range(self.n_layers):
            out += self.layer_nodes(layer)
        for site in self.features:
            out += site.nodes
        return out + ["logits"]

    @cached_property
    def inner_nodes(self) -> list[str]:
        """The nodes a node-level search may remove (all but logits)."""
        return self.nodes[:-1]

    def receivers_of(self, node: str) -> list[str]:
        info = parse_node(node, self.n_layers)
        if info.kind == "head":
            return [f"{node}.{x}" for x in "qkv"] if self.qkv else [node]
        if info.kind in ("mlp", "logits"):
            return [node]
        return []  # embed and features: no receivers

    def senders_into(self, node: str) -> list[str]:
        """Nodes whose output the given node reads: everything earlier in the forward pass (in a
        parallel block, an MLP does not read its own layer's heads)."""
        info = parse_node(node, self.n_layers)
        if info.kind in ("embed", "feature"):
            return []
        out = list(self.embed_nodes)
        for layer in range(self.n_layers):
            if layer > info.layer or (layer == info.layer and info.kind == "head"):
                break
            if layer == info.layer and self.parallel:
                break
            out += self.heads(layer)
            if layer == info.layer:  # an MLP reads the heads of its own layer
                break
            if not self.attn_only:
                out.append(f"m{layer}")
        if self.features:  # a decomposed node sends through its dictionary's features and error instead
            out = [x for n in out for x in self._sends_as.get(n, (n,))]
        return out

    @cached_property
    def _sends_as(self) -> dict:
        """Decomposed node -> the senders standing in for it (a site's nodes at its last parent, none at the others)."""
        out = {}
        for site in self.features:
            parents = site.parents(self.n_heads)
            for k, n in enumerate(parents):
                out[n] = tuple(site.nodes) if k == len(parents) - 1 else ()
        return out

    @cached_property
    def edges(self) -> list[str]:
        """All edges, ordered by receiver in forward order, then sender in forward order."""
        out = []
        for node in self.nodes[len(self.embed_nodes):]:
            for recv in self.receivers_of(node):
                out += [f"{s}->{recv}" for s in self.senders_into(node)]
        return out

    def layer_of(self, name: str) -> int:
        """Layer of a node, receiver or edge (an edge counts at its receiver)."""
        if "->" in name:
            name = split_edge(name)[1]
        return parse_node(receiver_node(name)[0], self.n_layers).layer

    def check_node(self, name: str) -> str:
        info = parse_node(name, self.n_layers)
        if name not in self._node_set and info.kind == "embed":
            raise ValueError(self._embed_hint(name))
        if name not in self._node_set and info.kind == "feature":
            sites = ", ".join(f"{f.prefix}{f.layer} ({f.hook}, {len(f.active)} active features)" for f in self.features)
            raise ValueError(f"feature node {name!r} is not in this graph: " + (
                f"its dictionaries are {sites}, and only features active on the task's prompts are nodes"
                if sites else "it has no dictionary (give one with --sae DIR)"))
        if name not in self._node_set:
            raise ValueError(f"node {name!r} is not in this model ({self.n_layers} layers × "
                             f"{self.n_heads} heads{', attention only' if self.attn_only else ''})")
        return info.name

    def check_edge(self, edge: str) -> str:
        if edge not in self._edge_set:
            src, dst = split_edge(edge)
            if src not in self._node_set and parse_node(src).kind == "embed":
                raise ValueError(f"edge {edge!r}: {self._embed_hint(src)}")
            raise ValueError(f"edge {edge!r} is not in this model's graph: {src} does not feed {dst}")
        return edge

    def _embed_hint(self, name: str) -> str:
        """Why an embedding node name is not in this graph, and which names are."""
        if self.split_embed:
            return (f"node {name!r} is not in this graph: it splits the embedding into 'tok' (token) and "
                    "'pos' (position) senders")
        return (f"node {name!r} is not in this graph: its embedding is one sender, 'embed' ('tok' and 'pos' "
                "exist only in a graph with split embeddings, --split-embed)")

    @cached_property
    def _node_set(self) -> frozenset:
        return frozenset(self.nodes)

    @cached_property
    def _edge_set(self) -> frozenset:
        return frozenset(self.edges)


# ---- units: a node or edge at one slot (a named set of prompt positions) ----------------------------
_BAD_SLOT = re.compile(r"@|->|,|\s")


def check_slot_name(slot) -> str:
    """A slot name (`S1`, `end`, `5`, `rest`): a non-empty string without `@`, `->`, `,` or whitespace
    (`@` and `->` delimit unit names; `,` joins slot lists in GraphML)."""
    if not isinstance(slot, str) or not slot or _BAD_SLOT.search(slot):
        raise ValueError(f"bad slot name {slot!r}: slots are non-empty names without '@', '->', ',' or "
                         "whitespace (e.g. 'S1', 'end', '5')")
    return slot


def unit_name(node: str, slot: str) -> str:
    """`a9.1`, `end` -> `a9.1@end`: a node at one slot."""
    parse_node(node)
    return f"{node}@{check_slot_name(slot)}"


def split_unit(unit: str) -> tuple[str, str]:
    """`a9.1@end` -> (`a9.1`, `end`), with a clear error for anything else."""
    if not isinstance(unit, str) or unit.count("@") != 1 or "->" in unit:
        raise ValueError(f"bad node unit {unit!r}: expected 'node@slot', e.g. 'a9.1@end' or 'm3@S2'")
    node, slot = unit.split("@")
    parse_node(node)
    return node, check_slot_name(slot)


def edge_unit_name(edge: str, slot: str) -> str:
    """`a4.4->a9.1.k`, `S1` -> `a4.4@S1->a9.1.k@S1`: an edge at one slot (same slot on both ends)."""
    src, dst = split_edge(edge)
    check_slot_name(slot)
    return f"{src}@{slot}->{dst}@{slot}"


def split_edge_unit(unit: str) -> tuple[str, str]:
    """`a4.4@S1->a9.1.k@S1` -> (`a4.4->a9.1.k`, `S1`); both ends must name the same slot, since an edge
    carries the sender's output at position p into the receiver's input at the same p."""
    parts = unit.split("->") if isinstance(unit, str) else []
    if len(parts) != 2 or any(p.count("@") != 1 for p in parts):
        raise ValueError(f"bad edge unit {unit!r}: expected 'sender@slot->receiver@slot', e.g. "
                         "'a4.4@S1->a9.1.k@S1'")
    (src, s1), (dst, s2) = (p.split("@") for p in parts)
    if s1 != s2:
        raise ValueError(f"edge unit {unit!r} joins slot {s1!r} to slot {s2!r}: an edge carries a sender's output "
                         "at a position into a receiver's input at the same position, so it has the same slot on "
                         f"both ends (e.g. '{src}@{s1}->{dst}@{s1}')")
    check_slot_name(s1)
    edge = f"{src}->{dst}"
    split_edge(edge)
    return edge, s1
