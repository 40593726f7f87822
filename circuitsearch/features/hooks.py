"""The hook points a dictionary reads or writes, in one grammar, and the names of feature nodes.

Hook points (L a layer, counted from 0):
  resid_pre.L   the residual stream entering layer L (L = n_layers: the final stream, before the final norm)
  resid_mid.L   the residual stream after layer L's attention, before its MLP adds in
  attn_out.L    what layer L's attention writes (every head and the output bias)
  mlp_in.L      what layer L's MLP reads: its norm's output, scale and bias included (a transcoder's input)
  mlp_out.L     what layer L's MLP writes
Feature nodes are named PREFIX+L.fI (feature I) or PREFIX+L.err (the dictionary's error), the prefix naming
the site: r resid_pre, rm resid_mid, a attn_out, mi mlp_in, m mlp_out, t a transcoder (reads mlp_in.L or
resid_mid.L, writes mlp_out.L): "r6.f1234", "t5.f42", "m5.err".
"""
from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out")  # in the order a layer reaches them
PREFIX = {"resid_pre": "r", "resid_mid": "rm", "attn_out": "a", "mlp_in": "mi", "mlp_out": "m"}
TRANSCODER = "t"
_SITE = {v: k for k, v in PREFIX.items()} | {TRANSCODER: "transcoder"}


class HookError(ValueError):
    """A hook point or feature name outside the grammar; the message lists what is accepted."""


@dataclass(frozen=True, order=True)
class Hook:
    """One hook point: its kind (one of KINDS) and layer."""

    kind: str
    layer: int

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def before(self) -> tuple[int, int]:
        """Where the hook sits in the forward pass (layer, step): sorts hooks in the order the model reaches them."""
        return self.layer, KINDS.index(self.kind)


_GRAMMAR = "resid_pre.L, resid_mid.L, attn_out.L, mlp_in.L or mlp_out.L (L a layer number, e.g. resid_pre.6)"


def parse_hook(text: str | Hook) -> Hook:
    """A hook point written in our grammar (resid_pre.6); HookError naming the grammar for anything else."""
    if isinstance(text, Hook):
        return text
    m = re.fullmatch(r"([a-z_]+)\.(\d+)", str(text).strip())
    if not m or m.group(1) not in KINDS:
        hint = ""
        if str(text).startswith(("blocks.", "hook_")):
            hint = f" ({text!r} is a TransformerLens / sae_lens name: from_saelens() reads those)"
        raise HookError(f"unknown hook point {text!r}: circuitsearch's hook points are {_GRAMMAR}{hint}")
    return Hook(m.group(1), int(m.group(2)))


# sae_lens / TransformerLens hook names and ours. HookedTransformer's hook_mlp_in is the MLP block's input
# before ln2 (the residual stream after attention); ln2.hook_normalized is the normalised value before ln2's
# scale and bias (the same as mlp_in where those are folded away: check_fits checks); TL 4's bridge names the
# MLP's real input mlp.hook_in (and ln2.hook_out).
_SAELENS = [(r"blocks\.(\d+)\.hook_resid_pre", "resid_pre", 0), (r"blocks\.(\d+)\.hook_resid_post", "resid_pre", 1),
            (r"blocks\.(\d+)\.hook_resid_mid", "resid_mid", 0), (r"blocks\.(\d+)\.hook_mlp_in", "resid_mid", 0),
            (r"blocks\.(\d+)\.hook_attn_out", "attn_out", 0), (r"blocks\.(\d+)\.attn\.hook_out", "attn_out", 0),
            (r"blocks\.(\d+)\.hook_mlp_out", "mlp_out", 0), (r"blocks\.(\d+)\.mlp\.hook_out", "mlp_out", 0),
            (r"blocks\.(\d+)\.ln2\.hook_normalized", "mlp_in", 0), (r"blocks\.(\d+)\.ln2\.hook_out", "mlp_in", 0),
            (r"blocks\.(\d+)\.mlp\.hook_in", "mlp_in", 0)]
TO_SAELENS = {"resid_pre": "blocks.{}.hook_resid_pre", "resid_mid": "blocks.{}.hook_resid_mid",
              "attn_out": "blocks.{}.hook_attn_out", "mlp_in": "blocks.{}.mlp.hook_in",
              "mlp_out": "blocks.{}.hook_mlp_out"}
PRE_SCALE = "ln2.hook_normalized"  # the one sae_lens name that equals mlp_in only where ln2 has no scale or bias


def from_saelens(name: str) -> Hook:
    """Our hook point for a sae_lens / TransformerLens hook name; HookError naming the unknown name and the
    ones understood (an attention head's hook_z, the embedding, MLP neurons... are not hook points here)."""
    for pattern, kind, shift in _SAELENS:
        m = re.fullmatch(pattern, str(name).strip())
        if m:
            return Hook(kind, int(m.group(1)) + shift)
    raise HookError(f"sae_lens hook {name!r} is not a hook point circuitsearch reads: it understands "
                    "blocks.L.hook_resid_pre, blocks.L.hook_resid_post, blocks.L.hook_resid_mid, blocks.L.hook_mlp_in, "
                    "blocks.L.hook_attn_out, blocks.L.hook_mlp_out, blocks.L.ln2.hook_normalized and "
                    "blocks.L.mlp.hook_in (per-head hook_z, MLP neurons and the embedding are not supported)")


def to_saelens(hook: Hook | str) -> str:
    """The sae_lens / TransformerLens name of our hook point (what save_dictionary writes as hook_name)."""
    h = parse_hook(hook)
    return TO_SAELENS[h.kind].format(h.layer)


@dataclass(frozen=True)
class FeatureName:
    """A parsed feature node name: its site (a hook kind, or "transcoder"), layer and feature (None: the error)."""

    site: str
    layer: int
    index: int | None

    @property
    def is_error(self) -> bool:
        return self.index is None

    def __str__(self) -> str:
        prefix = TRANSCODER if self.site == "transcoder" else PREFIX[self.site]
        return f"{prefix}{self.layer}." + ("err" if self.index is None else f"f{self.index}")


def prefix_of(hook: Hook | str, out_hook: Hook | str | None = None) -> str:
    """The node-name prefix of a dictionary reading `hook` (and writing `out_hook`, for a transcoder)."""
    h = parse_hook(hook)
    if out_hook is not None and parse_hook(out_hook) != h:
        return TRANSCODER
    return PREFIX[h.kind]


def feature_name(hook: Hook | str, i: int | None, out_hook: Hook | str | None = None) -> str:
    """The node name of feature i (None: the error node) of a dictionary at `hook`: feature_name("resid_pre.6",
    1234) == "r6.f1234"; a transcoder (out_hook mlp_out.L) names its features tL.fI."""
    h = parse_hook(hook)
    layer = parse_hook(out_hook).layer if out_hook is not None else h.layer
    if i is not None and (not isinstance(i, int) or i < 0):
        raise HookError(f"feature index {i!r} must be a non-negative integer")
    return f"{prefix_of(h, out_hook)}{layer}." + ("err" if i is None else f"f{i}")


def parse_feature(name: str) -> FeatureName:
    """The site, layer and feature of a feature node name ("m5.f42", "r6.err", "t5.f3"); HookError otherwise."""
    m = re.fullmatch(r"([a-z]+)(\d+)\.(?:f(\d+)|(err))", str(name).strip())
    if not m or m.group(1) not in _SITE:
        raise HookError(f"{name!r} is not a feature node name: PREFIX+LAYER.fINDEX or PREFIX+LAYER.err, the prefix "
                        f"one of {', '.join(sorted(_SITE))} (e.g. r6.f1234, m5.err, t5.f42)")
    return FeatureName(_SITE[m.group(1)], int(m.group(2)), None if m.group(4) else int(m.group(3)))
