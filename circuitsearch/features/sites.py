"""Which of a dictionary's features become graph nodes: those active on the task's prompts.

A dictionary has thousands to millions of features; a task's prompts light up a few hundred. A feature that is
zero at every real position of every clean and corrupted prompt contributes nothing there and ablates to nothing
(its mean, resampled and zero values are all 0), so it is not a node; it stays in the activation as it is.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..graphs.model_graph import FeatureSite
from .dictionary import DictionaryError, check_fits
from .hooks import parse_hook
from .splice import hook_activations


def active_features(engine, tokens: torch.Tensor, lengths: torch.Tensor, d) -> torch.Tensor:
    """[F] bool: features of `d` nonzero at some real position (before `lengths`) of `tokens` [n, P]."""
    with torch.inference_mode():
        x = hook_activations(engine, tokens, d.hook)
        f = d.encode(x.to(engine.dtype))
        real = torch.arange(tokens.shape[1], device=f.device)[None] < lengths.to(f.device)[:, None]
        return ((f != 0) & real[..., None]).flatten(0, 1).any(0).cpu()


def feature_sites(engine, task, dictionaries: Sequence) -> tuple[list, tuple]:
    """(the dictionaries in forward order, their FeatureSites) for `task` on the engine's model; refuses a
    dictionary that does not fit the model and two dictionaries writing one hook point."""
    ds = sorted(dictionaries, key=lambda d: d.writes.before)
    seen: dict = {}
    for d in ds:
        check_fits(d, engine)
        w = str(d.writes)
        if w in seen:
            raise DictionaryError(f"two dictionaries write {w} ({seen[w]} and {d.hook}): a hook point is split into "
                                  "one dictionary's features; give one of them")
        seen[w] = d.hook
        if parse_hook(d.hook).kind == "resid_mid" and engine.parallel and d.is_transcoder:
            raise DictionaryError(f"transcoder {d.hook} -> {w}: in a parallel block the MLP reads the layer's input, "
                                  "not resid_mid; train it on mlp_in")
    sites = []
    tokens, lengths = torch.cat([task.clean, task.corrupted]), task.lengths.repeat(2)  # one pass over both
    for d in ds:
        active = tuple(active_features(engine, tokens, lengths, d).nonzero()[:, 0].tolist())
        sites.append(FeatureSite(d.hook, str(d.writes), d.prefix, d.writes.layer, active, d.digest(), d.n_features))
    return ds, tuple(sites)
