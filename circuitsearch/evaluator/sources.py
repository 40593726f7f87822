"""Ablation values: what an ablated node's output is replaced by (design.md), taken from the corrupted run."""
from __future__ import annotations

import torch

from ..tasks.base import Task
from .state import Run, Source


def ablation_source(corrupt: Run, rows: torch.Tensor, ablation: str, task: Task, splices=()) -> Source:
    """The ablation source; in a split-embed graph `pos` ablates to its mean over the prompt's positions.

    Every prompt has the same position embedding at a position, so its mean (or resampled) value
    there is itself: ablated so, `pos` could never be removed. Its mean over positions keeps its
    scale and removes where a token is. (`embed` and `tok` keep the per-position definition.)"""
    src = source_values(corrupt, rows, ablation, task, splices)
    if src.parts is not None and ablation != "zero":
        pos = src.parts[1]
        lengths = (task.lengths[rows] if pos.shape[0] == len(rows) else task.lengths[:1]).to(pos.device)
        real = (torch.arange(pos.shape[1], device=pos.device)[None] < lengths[:, None]).to(pos.dtype)
        avg = (pos * real[..., None]).sum(1, keepdim=True) / lengths.to(pos.dtype)[:, None, None]
        src.parts = [src.parts[0], avg.expand_as(pos).clone()]
    return src


def source_values(corrupt: Run, rows: torch.Tensor, ablation: str, task: Task, splices=()) -> Source:
    """Ablation values from the corrupted run (over all the task's rows); resample keeps `rows`.

    Mean: the mean over the corrupted prompts of the same group (template and length) at each
    position; with one group one shared row, as always, else one row per distinct row (its group's).
    Feature graphs: each site's feature activations and error in the corrupted run (`splices`), reduced alike.
    """
    f = _reducer(rows, ablation, task)
    opt = lambda t: None if t is None else f(t)
    feats = [s.parts(*corrupt.hooks[j]) for j, s in enumerate(splices)]
    return Source(ablation, f(corrupt.embed), [f(t) for t in corrupt.z], [opt(t) for t in corrupt.mlp_out],
                  None if corrupt.parts is None else [f(t) for t in corrupt.parts],
                  [f(a) for a, _ in feats], [f(e) for _, e in feats])


def _reducer(rows: torch.Tensor, ablation: str, task: Task):
    """The function taking a corrupted-run tensor [all rows, ...] to its ablation values (see source_values)."""
    if ablation == "resample":
        return lambda t: t[rows.to(t.device)]
    _, gid = torch.unique(torch.stack([task.groups, task.lengths], 1), dim=0, return_inverse=True)
    G = int(gid.max()) + 1
    if ablation == "mean" and G > 1:
        count = torch.bincount(gid, minlength=G).float()

        def mean(t):
            g = gid.to(t.device)
            sums = torch.zeros(G, *t.shape[1:], dtype=t.dtype, device=t.device).index_add_(0, g, t)
            return (sums / count.view(G, *[1] * (t.dim() - 1)).to(t.device, t.dtype))[g[rows.to(t.device)]]
        return mean
    if ablation == "mean":
        return lambda t: t.mean(0, keepdim=True)
    return lambda t: torch.zeros_like(t[:1])


def ordinary(src: Source) -> Source:
    """`src` as ordinary tensors, for autograd (the cached ones are inference tensors)."""
    c = lambda t: None if t is None else t.clone()
    return Source(src.kind, c(src.embed), [c(t) for t in src.z], [c(t) for t in src.mlp_out],
                  None if src.parts is None else [c(t) for t in src.parts], [c(t) for t in src.feat_f],
                  [c(t) for t in src.feat_e])
