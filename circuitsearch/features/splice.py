"""A hook point's activations, and the model run with a hook point's activation replaced, through the engine's
own layer functions (embed, attention, add_heads, norm, mlp_normed, unembed), composed as Engine.forward does:
with nothing replaced the logits are Engine.forward's.
"""
from __future__ import annotations

from typing import Callable

import torch

from .dictionary import Dictionary, check_fits
from .hooks import Hook, parse_hook

Replace = Callable[[torch.Tensor], torch.Tensor]


class _Reached(Exception):
    """Raised inside the walk once the activation asked for is read (the rest of the model is not run)."""

    def __init__(self, value: torch.Tensor):
        self.value = value


def _check_layer(engine, hook: Hook) -> None:
    top = engine.L if hook.kind == "resid_pre" else engine.L - 1
    if not 0 <= hook.layer <= top:
        raise ValueError(f"hook point {hook}: model {engine.model.name!r} has layers 0 to {engine.L - 1}"
                         + (f" (resid_pre.{engine.L} is the final residual stream)" if hook.kind == "resid_pre" else ""))
    if hook.kind.startswith("mlp") and engine.attn_only:
        raise ValueError(f"hook point {hook}: model {engine.model.name!r} is attention-only (it has no MLPs)")


def _walk(engine, tokens: torch.Tensor, edits: dict[Hook, Callable[[torch.Tensor, dict], torch.Tensor]],
          reads: set[Hook]) -> torch.Tensor:
    """Logits [B, P, vocab]; at each hook in `edits` its activation a becomes edits[hook](a, seen), `seen` holding
    the activations of the hooks in `reads` reached so far (a transcoder's output reads its input there)."""
    seen: dict[Hook, torch.Tensor] = {}
    wanted = set(edits) | reads

    def at(kind: str, layer: int, a: torch.Tensor) -> torch.Tensor:
        h = Hook(kind, layer)
        if h in reads:
            seen[h] = a
        return edits[h](a, seen) if h in edits else a

    resid = engine.embed(tokens)
    for l in range(engine.L):
        resid = at("resid_pre", l, resid)
        lw = engine.layer(l)
        z = engine.attention(lw, resid)
        if Hook("attn_out", l) in wanted:
            mid = resid + at("attn_out", l, engine.heads_sum(lw, z) + lw.b_O)
        else:
            mid = engine.add_heads(resid, lw, z)
        mid = at("resid_mid", l, mid)
        if not engine.attn_only:
            x = resid if engine.parallel else mid
            if Hook("mlp_in", l) in wanted or Hook("mlp_out", l) in wanted:
                out = engine.mlp_normed(lw, at("mlp_in", l, engine.norm(x, lw.ln2)))
                mid = mid + at("mlp_out", l, out)
            else:
                mid = mid + engine.mlp(lw, x)
        resid = mid
    resid = at("resid_pre", engine.L, resid)
    return engine.unembed(resid)


def hook_activations(engine, tokens: torch.Tensor, hook: str | Hook) -> torch.Tensor:
    """The activation [B, P, d] at `hook` on `tokens` [B, P]; the layers after it are not run."""
    h = parse_hook(hook)
    _check_layer(engine, h)

    def stop(a, seen):
        raise _Reached(a)

    try:
        _walk(engine, tokens, {h: stop}, set())
    except _Reached as r:
        return r.value
    raise AssertionError(f"the walk never reached {h}")  # pragma: no cover (every valid hook is reached)


def forward_with(engine, tokens: torch.Tensor, hook: str | Hook, replace_fn: Replace,
                 read: str | Hook | None = None) -> torch.Tensor:
    """Logits [B, P, vocab] with the activation at `hook` replaced by replace_fn(a); with `read`, replace_fn gets
    the activation at `read` (reached earlier in the pass) instead: a transcoder's mlp_out from its mlp_in."""
    h = parse_hook(hook)
    _check_layer(engine, h)
    if read is None:
        return _walk(engine, tokens, {h: lambda a, seen: replace_fn(a)}, set())
    r = parse_hook(read)
    _check_layer(engine, r)
    if r.before >= h.before:
        raise ValueError(f"forward_with: {r} is not reached before {h}, so {h} cannot be computed from it")
    return _walk(engine, tokens, {h: lambda a, seen: replace_fn(seen[r])}, {r})


def spliced_forward(engine, tokens: torch.Tensor, d: Dictionary, error: bool = False) -> torch.Tensor:
    """Logits with the dictionary's reconstruction in place of what it writes (for a transcoder: its prediction
    from its input in place of the MLP's output). error=True adds the error back (the model's own logits)."""
    check_fits(d, engine)
    src, dst = parse_hook(d.hook), d.writes
    if not error:
        return forward_with(engine, tokens, dst, d.reconstruct, read=None if src == dst else src)

    def exact(a, seen):
        x = seen[src] if src != dst else a
        return d.reconstruct(x) + (a - d.reconstruct(x))

    return _walk(engine, tokens, {dst: exact}, {src} if src != dst else set())
