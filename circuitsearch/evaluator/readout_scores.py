"""From the last residual stream to the score: logits at the readout positions, the metric per row, and its
weighted mean over the task's rows."""
from __future__ import annotations

import torch

from ..engine import Engine
from ..metrics import Metric
from .state import Batch, Run


def readout_logits(engine: Engine, metric: Metric, resid: torch.Tensor, batch: Batch, tile=lambda t: t) -> torch.Tensor:
    """Logits at the batch's readout positions of the (stacked) residual [R, P, d]: [R, c] at the last
    position (c: 2 columns or the vocabulary), or [R, T, c] at each row's T positions."""
    two = metric.two_columns
    if batch.pos is None:
        return engine.unembed(resid[:, -1], tile(batch.cols) if two else None)
    pos = tile(batch.pos)
    x = resid.gather(1, pos[..., None].expand(*pos.shape, resid.shape[-1]))  # [R, T, d]
    logits = engine.unembed(x.flatten(0, 1), tile(batch.cols).flatten(0, 1) if two else None)
    return logits.unflatten(0, pos.shape)


def per_prompt(metric: Metric, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The metric of each row [B]: at its one position, or reduced (mean/sum) over its valid positions."""
    if batch.pos is None:
        return metric.per_prompt(logits, batch.answers, batch.wrong, batch.ref)
    B, T = batch.pos.shape
    ref = None if batch.ref is None else batch.ref.flatten(0, 1)
    flat = metric.per_prompt(logits.flatten(0, 1), batch.answers.flatten(), batch.wrong.flatten(), ref)
    per = torch.where(batch.valid, flat.view(B, T), torch.zeros((), dtype=flat.dtype)).sum(1)
    return per / batch.valid.sum(1) if batch.reduce == "mean" else per


def weighted_mean(per: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The task score from per-row values: each distinct row weighted by how often it occurs."""
    return (per * batch.weight).sum() / batch.weight.sum()


def finish(metric: Metric, run: Run, batch: Batch) -> None:
    """The metric per distinct row, and the score: its mean over all the task's rows."""
    run.per_prompt = per_prompt(metric, run.logits, batch)
    run.score = float(weighted_mean(run.per_prompt, batch))
