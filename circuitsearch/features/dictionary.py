"""A dictionary of features at a hook point: a sparse autoencoder, or a transcoder that reads one hook point
and writes another (an MLP's input to its output).

encode(x) = act((x - b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc), with act one of
  relu      max(0, pre)
  jumprelu  max(0, pre) where pre > threshold (per feature), else 0
  topk      the k largest pre-activations of each row, through max(0, ·); the rest 0
decode(f) = f @ W_dec + b_dec, so activation = Σ_i f_i·W_dec[i] + b_dec + error, exactly.
The digest (sha256 of the tensors and every setting encode/decode read) identifies it in run settings.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from .hooks import PRE_SCALE, Hook, HookError, feature_name, parse_hook, prefix_of

ACTIVATIONS = ("relu", "jumprelu", "topk")


class DictionaryError(ValueError):
    """A dictionary that cannot be used as given (or not with this model); the message names the fix."""


@dataclass
class Dictionary:
    """Encoder and decoder weights, the activation and the hook points read (`hook`) and written (`out_hook`,
    a transcoder's; None: the same as `hook`). `meta` carries what the source said (model, sae_lens names)."""

    W_enc: torch.Tensor            # [d_in, F]
    b_enc: torch.Tensor            # [F]
    W_dec: torch.Tensor            # [F, d_out]
    b_dec: torch.Tensor            # [d_out]
    kind: str = "relu"             # relu, jumprelu, topk
    hook: str = "resid_pre.0"      # the hook point read, in our grammar (hooks.py)
    out_hook: str | None = None    # the hook point written (a transcoder), None: hook
    threshold: torch.Tensor | None = None  # [F], jumprelu
    k: int | None = None           # topk
    apply_b_dec_to_input: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.hook = str(parse_hook(self.hook))
        self.out_hook = None if self.out_hook is None or str(parse_hook(self.out_hook)) == self.hook \
            else str(parse_hook(self.out_hook))
        self.validate()

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.W_dec.shape[1])

    @property
    def writes(self) -> Hook:
        """The hook point the reconstruction replaces (out_hook for a transcoder, else hook)."""
        return parse_hook(self.out_hook or self.hook)

    @property
    def is_transcoder(self) -> bool:
        return self.out_hook is not None

    def feature_name(self, i: int | None) -> str:
        """Node name of feature i (None: the error node), e.g. r6.f12 (see hooks.py)."""
        return feature_name(self.hook, i, self.out_hook)

    @property
    def prefix(self) -> str:
        return prefix_of(self.hook, self.out_hook)

    def validate(self) -> None:
        """DictionaryError for inconsistent shapes, an unknown activation, a bad k or threshold, NaN/inf weights."""
        if self.kind not in ACTIVATIONS:
            raise DictionaryError(f"unknown activation {self.kind!r}: a dictionary's activation is one of "
                                  f"{', '.join(ACTIVATIONS)}")
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise DictionaryError(f"{name} must be a floating-point tensor, not {type(t).__name__}"
                                      f"{'' if not isinstance(t, torch.Tensor) else ' of ' + str(t.dtype)}")
        if self.W_enc.dim() != 2 or self.W_dec.dim() != 2:
            raise DictionaryError(f"W_enc and W_dec must be matrices; they are {tuple(self.W_enc.shape)} and "
                                  f"{tuple(self.W_dec.shape)}")
        d_in, F = self.W_enc.shape
        want = {"b_enc": (F,), "W_dec": (F, self.W_dec.shape[1]), "b_dec": (self.W_dec.shape[1],), "threshold": (F,)}
        for name, shape in want.items():
            if name in tensors and tuple(tensors[name].shape) != shape:
                raise DictionaryError(f"inconsistent shapes: W_enc is {tuple(self.W_enc.shape)} (d_in x features), so "
                                      f"{name} must be {shape}, but it is {tuple(tensors[name].shape)}")
        if self.apply_b_dec_to_input and self.d_in != self.d_out:
            raise DictionaryError(f"apply_b_dec_to_input subtracts b_dec (width {self.d_out}) from the input (width "
                                  f"{d_in}): it needs d_in == d_out; set it False (transcoders never use it)")
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise DictionaryError(f"{name} holds {bad} NaN or infinite value(s): the dictionary is broken "
                                      "(a diverged training run?); retrain it or load another file")
        if self.kind == "jumprelu" and self.threshold is None:
            raise DictionaryError("a jumprelu dictionary needs its per-feature threshold tensor")
        if self.kind != "jumprelu" and self.threshold is not None:
            raise DictionaryError(f"a threshold tensor was given to a {self.kind} dictionary; only jumprelu uses one")
        if self.kind == "topk":
            if not isinstance(self.k, int) or not 1 <= self.k <= F:
                raise DictionaryError(f"topk needs k between 1 and the number of features ({F}), not {self.k!r}")
        elif self.k is not None:
            raise DictionaryError(f"k={self.k} was given to a {self.kind} dictionary; only topk uses k")
        if self.out_hook is not None:
            h, o = parse_hook(self.hook), parse_hook(self.out_hook)
            if o.kind != "mlp_out" or h.kind not in ("mlp_in", "resid_mid") or h.layer != o.layer:
                raise DictionaryError(f"transcoder {self.hook} -> {self.out_hook}: a transcoder stands in for an MLP, "
                                      "so it reads mlp_in.L (or resid_mid.L) and writes mlp_out.L of the same layer")

    def _t(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device, dtype=like.dtype)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., F] of activations x [..., d_in]."""
        if self.apply_b_dec_to_input:
            x = x - self._t(self.b_dec, x)
        return x @ self._t(self.W_enc, x) + self._t(self.b_enc, x)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Feature activations from pre-activations (the dictionary's activation function)."""
        if self.kind == "relu":
            return pre.relu()
        if self.kind == "jumprelu":
            return pre.relu() * (pre > self._t(self.threshold, pre)).to(pre.dtype)
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations f [..., F] of activations x [..., d_in]."""
        return self.activate(self.pre(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f @ W_dec + b_dec [..., d_out]."""
        return f @ self._t(self.W_dec, f) + self._t(self.b_dec, f)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)): the dictionary's reconstruction (a transcoder's prediction of its out_hook)."""
        return self.decode(self.encode(x))

    def config(self) -> dict:
        """Every setting encode and decode read, and the hook points (what the digest covers with the tensors)."""
        return {"kind": self.kind, "k": self.k, "hook": self.hook, "out_hook": self.out_hook,
                "apply_b_dec_to_input": bool(self.apply_b_dec_to_input), "d_in": self.d_in,
                "n_features": self.n_features, "d_out": self.d_out}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out

    def digest(self) -> str:
        """sha256 (hex) of the config and the tensors (as float32, C order): changes with any weight or setting."""
        h = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode())
        for name, t in sorted(self.tensors().items()):
            a = t.detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(a.shape)}".encode())
            h.update(a.numpy().tobytes())
        return h.hexdigest()


def check_fits(d: Dictionary, model_or_engine) -> None:
    """DictionaryError unless `d` can run on the model (a Model or an Engine): its widths equal d_model, its
    layers exist, the model has MLPs where it reads or writes one; NaN/inf and shapes are checked as well."""
    engine = model_or_engine if hasattr(model_or_engine, "w") and hasattr(model_or_engine, "model") else None
    model = engine.model if engine is not None else model_or_engine
    d.validate()
    name, L, width = model.name, model.n_layers, model.d_model
    for which, hook in (("reads", parse_hook(d.hook)), ("writes", d.writes)):
        top = L if hook.kind == "resid_pre" else L - 1
        if not 0 <= hook.layer <= top:
            raise DictionaryError(f"the dictionary {which} {hook}, but model {name!r} has {L} layers (0 to {L - 1}"
                                  f"{'; resid_pre.' + str(L) + ' is the final residual stream' if hook.kind == 'resid_pre' else ''}"
                                  "): load the dictionary made for this model, or give the hook it was trained at")
        if hook.kind.startswith("mlp") and model.attn_only:
            raise DictionaryError(f"the dictionary {which} {hook}, but model {name!r} is attention-only (no MLPs)")
    for what, have in (("d_in", d.d_in), ("d_out", d.d_out)):
        if have != width:
            hook = d.hook if what == "d_in" else str(d.writes)
            raise DictionaryError(f"the dictionary's {what} is {have} but {hook} of model {name!r} is {width} wide "
                                  f"(d_model): it was made for another model; train one for {name!r} "
                                  "(`circuitsearch train-sae`) or load the one made for it")
    if d.meta.get("saelens_hook", "").endswith(PRE_SCALE):
        _check_pre_scale(d, model, engine)


def _check_pre_scale(d: Dictionary, model, engine) -> None:
    """sae_lens's ln2.hook_normalized is the normalised value before ln2's scale and bias; it equals what the MLP
    reads (mlp_in) only if the model's ln2 has neither (folded into W_in, as with TransformerLens' fold_ln)."""
    layer = parse_hook(d.hook).layer
    if engine is not None:
        ln2 = engine.layer(layer).ln2
        w, b = (ln2[1], ln2[2]) if ln2 else (None, None)
        trivial = (w is None or bool((w == 1).all())) and (b is None or bool((b == 0).all()))
    else:
        norm = getattr(model.bridge.blocks[layer], "ln2", None)
        trivial = norm is None or all(bool((p == (1.0 if n.endswith("weight") else 0.0)).all())
                                      for n, p in norm.named_parameters())
    if not trivial:
        raise DictionaryError(f"the dictionary reads {d.meta['saelens_hook']} (the normalised value before ln2's scale "
                              f"and bias), but model {model.name!r} has a non-trivial ln2 at layer {layer}, so that "
                              "is not what its MLP reads (mlp_in): use the dictionary with the model it was trained "
                              "on (weights folded, e.g. TransformerLens fold_ln), or retrain it at mlp_in")


__all__ = ["Dictionary", "DictionaryError", "check_fits", "HookError", "ACTIVATIONS"]
