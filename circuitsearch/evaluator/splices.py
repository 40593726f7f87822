"""Dictionaries spliced into the forward pass at their hook points (graph features, design.md).

At a site the activation x_out is split exactly into its features' contributions f_i·W_dec[i], b_dec and an
error e = x_out − x̂ (x̂ the dictionary's reconstruction from what it reads, x_in: x_out itself for an SAE, the
MLP's input for a transcoder). A circuit that ablates feature i writes x_out + (a_i − f_i)·W_dec[i], one that
ablates the error x_out + (a_e − e), a (ablation values) taken from the corrupted run as for every node; with
nothing ablated the activation is x_out itself, bit for bit. Features that are not nodes (inactive on the
task's prompts) stay in x_out as they are, whatever the circuit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Splice:
    """One dictionary's site in the forward pass: it reads `reads` and writes `writes` (hook kinds) of `layer`;
    its nodes are ids first .. first+n-1 (features `active` of the dictionary) and first+n (the error);
    `parents`: the node ids it decomposes (a row whose parents are all ablated keeps their ablation value)."""

    dictionary: object       # features.dictionary.Dictionary (encode, decode, W_dec)
    reads: str
    writes: str
    layer: int
    first: int
    active: torch.Tensor     # [n] feature indices, on the engine's device
    W: torch.Tensor          # [n, d] their decoder rows, on the engine's device and dtype
    parents: list

    @property
    def n(self) -> int:
        return len(self.active)

    @property
    def ids(self) -> slice:
        """Node ids of the site's features and its error."""
        return slice(self.first, self.first + self.n + 1)

    def parts(self, x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations of the node features [..., n], error [..., d]) of one site's input and output."""
        f = self.dictionary.encode(x_in)
        return f[..., self.active], x_out - self.dictionary.decode(f)

    def apply(self, x_in: torch.Tensor, x_out: torch.Tensor, cut: torch.Tensor, f_abl: torch.Tensor,
              e_abl: torch.Tensor, parts: tuple | None = None) -> torch.Tensor:
        """x_out with each node feature and the error moved `cut` [..., n+1] (1: ablated, 0: kept; fractions in
        the relaxed forward) of the way to its ablation value (`parts`: self.parts(x_in, x_out), if taken)."""
        f, e = parts if parts is not None else self.parts(x_in, x_out)
        c = cut.to(x_out.dtype)
        return x_out + ((f_abl - f) * c[..., : self.n]) @ self.W + (e_abl - e) * c[..., self.n:]


def make_splices(dictionaries: list, index, engine) -> list:
    """The Splice of each of the graph's feature sites (index.sites), with its Dictionary (same order)."""
    out = []
    dev, dt = engine.device, engine.dtype
    for site, d, first in zip(index.sites, dictionaries, index.site_first):
        # the dictionary's weights on the engine's device and dtype once (encode would move them every call)
        d = replace(d, **{k: v.to(dev, dt) for k, v in d.tensors().items()})
        active = torch.tensor(site.active, dtype=torch.long, device=dev)
        reads = site.hook.rsplit(".", 1)[0]
        writes = site.writes.rsplit(".", 1)[0]
        parents = [index.node_id[p] for p in site.parents(index.graph.n_heads)]
        out.append(Splice(d, reads, writes, site.layer, first, active, d.W_dec[active], parents))
    return out


def site_parts(splices: list, hooks: dict, feats: dict, j: int) -> tuple:
    """Site j's (node features' activations, error) from what it read and wrote (`hooks`), encoded once and kept
    in `feats` (a run's or a pass's)."""
    if j not in feats:
        feats[j] = splices[j].parts(*hooks[j])
    return feats[j]


def site_diffs(splices: list, source, run) -> list:
    """Per feature site: (live − ablated activations of its node features [B, P, n], of its error [B, P, d]) in
    `run` (live: as the circuit computes them; `source` holds the ablation values)."""
    out = []
    for j in range(len(splices)):
        f, e = site_parts(splices, run.hooks, run.feats, j)
        out.append((f - source.feat_f[j], e - source.feat_e[j]))
    return out


def site_at(splices: list, kind: str, layer: int) -> int | None:
    """Index of the splice writing hook `kind`.`layer` (None: none there)."""
    for j, s in enumerate(splices):
        if s.writes == kind and s.layer == layer:
            return j
    return None
