"""The forward engine: a model's weights as plain tensors and the layer functions that use them.

Everything that computes the transformer lives here (embedding, norms, rotary, the attention
of one layer with per-head q/k/v inputs, the MLP, the unembedding), on one device and dtype.
The evaluator's cached, incremental forward and its differentiable forward for attribution
both call these functions, so there is one implementation of the model to check against the
bridge (`circuitsearch.reference` stays the independent oracle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import Model

_ACT = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class LayerWeights:
    ln1: tuple | None
    W_Q: torch.Tensor  # [H, d, dh]
    b_Q: torch.Tensor  # [H, dh]
    W_K: torch.Tensor  # [H, d, dh], expanded to one copy per query head
    b_K: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    W_O: torch.Tensor  # [H, dh, d]
    b_O: torch.Tensor  # [d]
    W_qkv: torch.Tensor | None = None  # [d, (H + 2 * n_kv) * dh]: shared-input projection, kv heads grouped
    b_qkv: torch.Tensor | None = None
    n_kv: int = 0
    W_gate_in: torch.Tensor | None = None  # [d, 2 * d_mlp] gate and in fused into one GEMM
    b_gate_in: torch.Tensor | None = None
    ln2: tuple | None = None
    W_in: torch.Tensor | None = None    # [d, d_mlp]
    b_in: torch.Tensor | None = None
    W_gate: torch.Tensor | None = None  # [d, d_mlp] for gated MLPs
    W_out: torch.Tensor | None = None   # [d_mlp, d]
    b_out: torch.Tensor | None = None


@dataclass
class Weights:
    """Everything the forward pass needs, as plain tensors."""

    layers: list[LayerWeights]
    W_E: torch.Tensor
    W_pos: torch.Tensor | None
    ln_final: tuple | None
    W_U: torch.Tensor  # [d, vocab]
    b_U: torch.Tensor  # [vocab]
    norm: str | None   # "LN", "RMS" or None
    eps: float
    act: str
    attn_scale: float
    rotary: tuple | None  # (cos [n_ctx, rd], sin [n_ctx, rd], style "half" | "adjacent")


def _norm_params(module) -> tuple | None:
    inner = getattr(module, "original_component", module)
    w = getattr(inner, "weight", None)
    if w is None:
        return None
    b = getattr(inner, "bias", None)
    return (w.detach().float(), None if b is None else b.detach().float())


def _zeros_if_none(t, shape):
    return torch.zeros(shape) if t is None else t.detach().float()


def extract_weights(model: Model) -> Weights:
    """Read the bridge's (unprocessed) weights into a Weights record."""
    b, cfg = model.bridge, model.bridge.cfg
    H, d = cfg.n_heads, cfg.d_model
    n_kv = cfg.n_key_value_heads or H
    rep = H // n_kv
    layers = []
    for blk in b.blocks:
        a = blk.attn
        dh = a.W_Q.shape[-1]
        expand = lambda t: t.detach().float().repeat_interleave(rep, dim=0)
        lw = LayerWeights(
            ln1=_norm_params(blk.ln1) if hasattr(blk, "ln1") else None,
            W_Q=a.W_Q.detach().float(), b_Q=_zeros_if_none(a.b_Q, (H, dh)),
            W_K=expand(a.W_K), b_K=expand(a.b_K) if a.b_K is not None else torch.zeros(H, dh),
            W_V=expand(a.W_V), b_V=expand(a.b_V) if a.b_V is not None else torch.zeros(H, dh),
            W_O=a.W_O.detach().float(), b_O=_zeros_if_none(a.b_O, (d,)), n_kv=n_kv)
        flat = lambda t: t.detach().float().permute(1, 0, 2).reshape(d, -1)
        kvb = lambda t: torch.zeros(n_kv * dh) if t is None else t.detach().float().reshape(-1)
        lw.W_qkv = torch.cat([flat(a.W_Q), flat(a.W_K), flat(a.W_V)], 1).contiguous()
        lw.b_qkv = torch.cat([lw.b_Q.reshape(-1), kvb(a.b_K), kvb(a.b_V)])
        if not cfg.attn_only:
            m = blk.mlp
            lw.ln2 = _norm_params(blk.ln2)
            lw.W_in = m.W_in.detach().float()
            lw.b_in = _zeros_if_none(m.b_in, (lw.W_in.shape[1],))
            lw.W_gate = m.W_gate.detach().float() if cfg.gated_mlp else None
            lw.W_out = m.W_out.detach().float()
            lw.b_out = _zeros_if_none(m.b_out, (d,))
            if lw.W_gate is not None:
                lw.W_gate_in = torch.cat([lw.W_gate, lw.W_in], 1).contiguous()
                lw.b_gate_in = torch.cat([torch.zeros(lw.W_in.shape[1]), lw.b_in])
        layers.append(lw)
    norm = cfg.normalization_type.upper() if cfg.normalization_type else None
    if norm not in (None, "LN", "RMS"):
        raise NotImplementedError(f"normalization {cfg.normalization_type!r} is not supported by the evaluator")
    inner_attn = getattr(b.blocks[0].attn, "original_component", None)
    scale = getattr(inner_attn, "scaling", None)
    if scale is None:
        scale = 1.0 / getattr(inner_attn, "scale", math.sqrt(layers[0].W_Q.shape[-1]))
    rotary = None
    if (cfg.positional_embedding_type or "standard") == "rotary":
        rotary = _rotary_tables(model, cfg.n_ctx if cfg.n_ctx <= 4096 else 4096)
    W_pos = None
    if (cfg.positional_embedding_type or "standard") == "standard":
        W_pos = b.W_pos.detach().float()
    return Weights(layers=layers, W_E=b.W_E.detach().float(), W_pos=W_pos,
                   ln_final=_norm_params(b.ln_final) if hasattr(b, "ln_final") else None,
                   W_U=b.W_U.detach().float(), b_U=_zeros_if_none(getattr(b, "b_U", None), (b.W_U.shape[1],)),
                   norm=norm, eps=float(cfg.eps), act=cfg.act_fn, attn_scale=float(scale), rotary=rotary)


def _rotary_tables(model: Model, n_ctx: int) -> tuple:
    om = model.bridge.original_model
    native = getattr(om, "rotary", None)
    if native is not None:  # TransformerLens native: adjacent pairs rotate together
        return native.cos_cached.float(), native.sin_cached.float(), "adjacent"
    rot = om.model.rotary_emb
    inner = getattr(rot, "original_component", rot)
    inv_freq = inner.inv_freq.float()
    scaling = float(getattr(inner, "attention_scaling", 1.0))
    freqs = torch.outer(torch.arange(n_ctx).float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)  # HF Llama: first and second halves rotate together
    return emb.cos() * scaling, emb.sin() * scaling, "half"


def _to(w, device, dtype):
    """Every tensor of a Weights record (nested in layers and tuples) on `device` in `dtype`."""
    if isinstance(w, torch.Tensor):
        return w.to(device=device, dtype=dtype)
    if isinstance(w, tuple):
        return tuple(_to(x, device, dtype) if isinstance(x, torch.Tensor) or x is None else x for x in w)
    return w


class Engine:
    """The model's layer functions over its weights, on one device and dtype (default: CPU float32)."""

    def __init__(self, model: Model, weights: Weights | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        w = weights or extract_weights(model)
        if self.device.type != "cpu" or dtype != torch.float32:
            for lw in w.layers:
                for k, v in vars(lw).items():
                    setattr(lw, k, _to(v, self.device, dtype))
            for k in ("W_E", "W_pos", "ln_final", "W_U", "b_U"):
                setattr(w, k, _to(getattr(w, k), self.device, dtype))
            if w.rotary is not None:
                w.rotary = (*_to(w.rotary[:2], self.device, dtype), w.rotary[2])
        self.w = w
        self.L, self.H = model.n_layers, model.n_heads
        self.attn_only = model.attn_only
        self.d_vocab_in, self.d_vocab_out = w.W_E.shape[0], w.W_U.shape[1]
        self.n_ctx = w.rotary[0].shape[0] if w.rotary else (w.W_pos.shape[0] if w.W_pos is not None else None)

    def layer(self, l: int) -> LayerWeights:
        return self.w.layers[l]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token (and learned position) embedding [B, P, d]."""
        x = self.w.W_E[tokens.to(self.device)]
        if self.w.W_pos is not None:
            x = x + self.w.W_pos[: tokens.shape[1]]
        return x

    def norm(self, x: torch.Tensor, params: tuple | None) -> torch.Tensor:
        if self.w.norm is None:
            return x
        w, b = params if params is not None else (None, None)
        if self.w.norm == "LN":
            return F.layer_norm(x, (x.shape[-1],), w, b, self.w.eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.w.eps)
        return x if w is None else x * w

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin, style = self.w.rotary
        P, rd = x.shape[1], cos.shape[-1]
        cos, sin = cos[:P, None, :], sin[:P, None, :]
        xr, xp = x[..., :rd], x[..., rd:]
        if style == "half":
            x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
            rot = torch.cat([-x2, x1], -1)
        else:
            rot = torch.stack([-xr[..., 1::2], xr[..., 0::2]], -1).flatten(-2)
        out = xr * cos + rot * sin
        return torch.cat([out, xp], -1) if xp.shape[-1] else out

    def _proj(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, params) -> torch.Tensor:
        x = self.norm(x, params)
        eq = "bpd,hde->bphe" if x.dim() == 3 else "bphd,hde->bphe"
        return torch.einsum(eq, x, W) + b

    def attention(self, lw: LayerWeights, xq, xk=None, xv=None, heads: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, P, H, dh] of every head; one shared input [B, P, d], or q, k, v inputs [B, P, H, d].

        heads: with q, k, v inputs, compute only these heads (their inputs [B, P, h, d]) -> [B, P, h, dh].
        """
        if xk is None:  # shared input: one GEMM, keys and values per kv head
            B, P, _ = xq.shape
            H, dh = self.H, lw.W_Q.shape[-1]
            qkv = self.norm(xq, lw.ln1) @ lw.W_qkv + lw.b_qkv
            q = qkv[..., : H * dh].view(B, P, H, dh)
            k, v = qkv[..., H * dh:].view(B, P, 2, lw.n_kv, dh).unbind(2)
            rep = H // lw.n_kv
            if rep > 1:
                k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        else:
            pick = (lambda t: t) if heads is None else (lambda t: t[heads])
            q = self._proj(xq, pick(lw.W_Q), pick(lw.b_Q), lw.ln1)
            k = self._proj(xk, pick(lw.W_K), pick(lw.b_K), lw.ln1)
            v = self._proj(xv, pick(lw.W_V), pick(lw.b_V), lw.ln1)
        if self.w.rotary is not None:
            q, k = self.rope(q), self.rope(k)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * self.w.attn_scale
        P = q.shape[1]
        mask = torch.ones(P, P, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        return torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)

    def heads_sum(self, lw: LayerWeights, z: torch.Tensor) -> torch.Tensor:
        """Σ_h z_h W_O,h: what the heads write into the residual stream, without the bias [B, P, d]."""
        return torch.einsum("bphe,hed->bpd", z, lw.W_O)

    def add_heads(self, resid: torch.Tensor, lw: LayerWeights, z: torch.Tensor,
                  summed: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the attention layer: resid + Σ_h z_h W_O,h + b_O (`summed`: that
        sum, already computed)."""
        return resid + (self.heads_sum(lw, z) if summed is None else summed) + lw.b_O

    def head_outputs(self, lw: LayerWeights, z: torch.Tensor) -> torch.Tensor:
        """Each head's write into the residual stream, without the bias [B, P, H, d]."""
        return torch.einsum("bphe,hed->bphd", z, lw.W_O)

    def mlp(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x, lw.ln2)
        act = _ACT[self.w.act]
        if lw.W_gate_in is not None:
            gate, pre = (h @ lw.W_gate_in + lw.b_gate_in).chunk(2, -1)
            post = act(gate) * pre
        else:
            post = act(h @ lw.W_in + lw.b_in)
        return post @ lw.W_out + lw.b_out

    def unembed(self, last: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at the answer position from its residual [B, d]: only columns `cols` [B, c] if given."""
        normed = self.norm(last, self.w.ln_final)
        if cols is not None:
            W = self.w.W_U[:, cols]  # [d, B, c]
            return torch.einsum("bd,dbc->bc", normed, W) + self.w.b_U[cols]
        return normed @ self.w.W_U + self.w.b_U
