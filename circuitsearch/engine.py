"""The forward engine: a model's weights as plain tensors and the layer functions that use them.

Everything that computes the transformer lives here (embedding, norms, rotary, the attention
of one layer with per-head q/k/v inputs, the MLP, the unembedding), on one device and dtype.
The evaluator's cached, incremental forward and its differentiable forward for attribution
both call these functions, so there is one implementation of the model to check against the
bridge (`circuitsearch.reference` stays the independent oracle).

Never silently wrong: `extract_weights` refuses, by name, every architecture and config feature
the engine does not implement (`unsupported`), and `Engine.check` compares the engine's logits
with the bridge's own forward (the evaluator runs it on the task's prompts when it is built).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import Model, ModelError

_ACT = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
        "solu": lambda x: x * F.softmax(x, dim=-1)}

# Architectures whose weights the engine reads and whose forward it reproduces (each tested against
# the bridge on a seeded tiny model: tests/test_engine_features.py). Anything else is refused by name.
ARCHITECTURES = ("TransformerLensNative", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM", "GPTJForCausalLM", "GemmaForCausalLM",
                 "PhiForCausalLM", "Phi3ForCausalLM", "OPTForCausalLM", "StableLmForCausalLM")
# HF config switches that change the computation of an architecture above in a way the engine does
# not implement (their plain value). The load check would catch them too; naming them is clearer.
_HF_NEVER = {"qk_layernorm": False, "do_layer_norm_before": True, "scale_attn_by_inverse_layer_idx": False,
             "reorder_and_upcast_attn": False, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
             "attention_multiplier": None, "logits_scaling": 1.0}
# TransformerLens 4's native model builds only these; the config flags it ignores would make the engine
# (which follows the flag) differ from the bridge, so a native config setting them is refused.
_NATIVE_IGNORES = {"parallel_attn_mlp": False, "window_size": None, "attn_types": None, "use_local_attn": False,
                   "use_normalization_before_and_after": False, "rmsnorm_uses_offset": False,
                   "scale_attn_by_inverse_layer_idx": False, "post_embedding_ln": False, "use_qk_norm": False,
                   "scale_embedding": None}
# Config features the engine does not implement on any architecture, with their plain value.
_NEVER = {"use_qk_norm": False, "post_embedding_ln": False, "scale_attn_by_inverse_layer_idx": False,
          "num_experts": None, "per_layer_head_dim": None, "per_layer_num_key_value_heads": None,
          "relative_attention_num_buckets": None, "use_normalization_before_and_after": False,
          "is_multimodal": False, "is_audio_model": False, "is_visual_model": False, "is_stateful": False}


# Largest engine-vs-bridge logit difference accepted, relative to the logit scale (Engine.check).
TOLERANCE = 1e-3


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMALL_MODEL = 256  # d_model below which one thread is fastest (see choose_threads)


def parse_device(text: str) -> torch.device:
    """A --device value as a torch device, refused with the reason when this machine has no such device."""
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {text!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text!r}: this machine has no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(f"--device {text!r}: this machine has {n} CUDA device(s), cuda:0"
                         + (f" to cuda:{n - 1}" if n > 1 else "") + "; choose one of them")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text!r}: this machine has no MPS device; use --device cpu")
    return dev


def choose_threads(model: Model, requested: int | None = None) -> int:
    """Set torch's CPU threads: `requested`, or by default one thread for small models (d_model below
    SMALL_MODEL: each op is microseconds of work, so threads only add synchronisation, and on a shared
    machine contention; measured here, 1 thread is as fast or faster) and torch's default (one per core)
    for larger ones (SmolLM2's forward: 185 ms on 1 thread, 115 ms on 2). Returns the count set."""
    n = requested if requested is not None else (1 if model.d_model < SMALL_MODEL else _DEFAULT_THREADS)
    torch.set_num_threads(n)
    return n


_DEFAULT_THREADS = torch.get_num_threads()


def features(model: Model) -> str:
    """The architecture and every config feature that departs from a plain causal pre-norm transformer."""
    cfg = model.bridge.cfg
    plain = {"parallel_attn_mlp": False, "attention_dir": "causal", "gated_mlp": False, "attn_only": False,
             "final_rms": False, "window_size": None, "attn_types": None, "rmsnorm_uses_offset": False,
             "use_normalization_before_and_after": False, "attn_scores_soft_cap": -1.0,
             "output_logits_soft_cap": -1.0, "scale_embedding": None, "rotary_adjacent_pairs": False}
    out = [f"architecture={architecture(model)}", f"normalization_type={cfg.normalization_type}",
           f"positional_embedding_type={cfg.positional_embedding_type}", f"act_fn={cfg.act_fn}"]
    if (cfg.positional_embedding_type or "") == "rotary" and cfg.rotary_dim is not None:
        out.append(f"rotary_dim={cfg.rotary_dim} of d_head={cfg.d_head}")
    if (cfg.n_key_value_heads or cfg.n_heads) != cfg.n_heads:
        out.append(f"n_key_value_heads={cfg.n_key_value_heads}")
    out += [f"{k}={getattr(cfg, k)!r}" for k, v in plain.items() if getattr(cfg, k, v) not in (v, None)]
    hf = _hf_config(model)  # the HF config says what the bridge's config may not (NeoX's rotary_pct)
    if hf is not None:
        out += [f"hf:{k}={getattr(hf, k)!r}" for k in _HF_FEATURES if getattr(hf, k, None) not in (None, False)]
    return ", ".join(out)


_HF_FEATURES = ("rotary_pct", "partial_rotary_factor", "rotary_dim", "use_parallel_residual", "sliding_window",
                "layer_types", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                "attention_bias", "mlp_bias", "rope_scaling", "scale_attn_by_inverse_layer_idx")


def architecture(model: Model) -> str:
    """The bridge's architecture name (TransformerLensNative for native models)."""
    cfg = model.bridge.cfg
    return str(getattr(cfg, "architecture", None) or getattr(cfg, "original_architecture", None) or "unknown")


def unsupported(model: Model) -> list[str]:
    """Every feature of `model` the engine does not reproduce, each named with its config value (empty: fine)."""
    b, cfg = model.bridge, model.bridge.cfg
    arch, out = architecture(model), []
    if arch not in ARCHITECTURES:
        out.append(f"architecture {arch} (the engine implements {', '.join(ARCHITECTURES)})")
    blocks = getattr(b, "blocks", None)
    if not blocks or not all(hasattr(blk, "attn") and hasattr(blk.attn, "W_Q") for blk in blocks):
        out.append("attention heads (the model has no blocks with per-head attention weights W_Q)")
        return out
    for k, plain in _NEVER.items():
        v = getattr(cfg, k, plain)
        if v not in (plain, None, False):
            out.append(f"{k}={v!r}")
    hf = _hf_config(model)
    for k, plain in _HF_NEVER.items():
        v = getattr(hf, k, plain) if hf is not None else plain
        if v != plain:
            out.append(f"hf:{k}={v!r}")
    if any(hasattr(blk, n) for blk in blocks for n in ("ln1_post", "ln2_post")):
        out.append("post-attention/post-MLP norms (Gemma 2/3 style ln1_post/ln2_post: the heads' sum "
                   "passes through a norm, so a head's write into the residual stream is not additive)")
    if arch == "TransformerLensNative":
        for k, plain in _NATIVE_IGNORES.items():
            v = getattr(cfg, k, plain)
            if v not in (plain, None, False) and k not in _NEVER:
                out.append(f"{k}={v!r} (TransformerLens 4's native model ignores it, so the config and the "
                           "model disagree)")
    pos = (cfg.positional_embedding_type or "standard").lower()
    if pos not in ("standard", "rotary"):
        out.append(f"positional_embedding_type={pos!r} (the engine implements standard and rotary)")
    if (cfg.act_fn or "").lower() not in _ACT and not cfg.attn_only:
        out.append(f"act_fn={cfg.act_fn!r} (the engine implements {', '.join(_ACT)})")
    if getattr(cfg, "attention_dir", "causal") not in ("causal", "bidirectional"):
        out.append(f"attention_dir={cfg.attention_dir!r}")
    for blk in blocks:
        for n in ("ln1", "ln2"):
            if hasattr(blk, n):
                try:
                    _norm_params(getattr(blk, n))
                except ModelError as e:
                    out.append(str(e))
                    return out
        mlp = getattr(blk, "mlp", None)
        inner = getattr(mlp, "original_component", None)
        if inner is not None and getattr(inner, "ln", None) is not None:
            out.append("a LayerNorm inside the MLP (act_fn solu_ln)")
            break
    return out


def check_supported(model: Model) -> None:
    """ModelError naming every feature of `model` the fast engine does not implement."""
    missing = unsupported(model)
    if any(m.startswith("attention heads") for m in missing):
        raise ModelError(f"model {model.name!r} ({architecture(model)}) has no attention heads: circuitsearch's "
                         "graph is made of heads and MLPs, so it does not apply to this model on any path")
    if missing:
        raise ModelError(f"the fast engine does not reproduce model {model.name!r}: it does not implement "
                         + "; ".join(missing) + ". Nothing was scored (--engine auto or hooked runs such a model "
                         "on the hook-based path)")


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
    window: int | None = None  # sliding-window attention: a query sees the last `window` keys
    q_norm: tuple | None = None  # Qwen3: an RMSNorm over each head's query and key, before rotary
    k_norm: tuple | None = None


@dataclass
class Weights:
    """Everything the forward pass needs, as plain tensors, and the architecture's switches."""

    layers: list[LayerWeights]
    W_E: torch.Tensor
    W_pos: torch.Tensor | None
    ln_final: tuple | None
    W_U: torch.Tensor  # [d, vocab]
    b_U: torch.Tensor  # [vocab]
    act: str
    attn_scale: float
    rotary: tuple | None  # (cos [n_ctx, rd], sin [n_ctx, rd], style "half" | "adjacent"); rd <= d_head
    parallel: bool = False       # attention and MLP both read the layer's input (GPT-NeoX, GPT-J)
    causal: bool = True          # False: bidirectional attention
    embed_scale: float = 1.0     # Gemma multiplies the token embedding by sqrt(d_model)
    attn_soft_cap: float = 0.0   # scores -> cap * tanh(scores / cap) when > 0
    logit_soft_cap: float = 0.0  # logits likewise
    windows: list | None = None  # per layer: a sliding-window length (keys within it of the query) or None


def _norm_params(module) -> tuple | None:
    """(kind "LN" | "RMS", weight or None, bias or None, eps) of a norm module; None for no norm.

    Read from the module itself, not the config, because configs and modules disagree (TL's native
    final_rms, param-free LNPre/RMSPre). Gemma's RMSNorm scales by 1 + weight: the offset is folded in.
    """
    inner = getattr(module, "original_component", module)
    name = type(inner).__name__
    if isinstance(inner, torch.nn.Identity):
        return None
    w, b = getattr(inner, "weight", None), getattr(inner, "bias", None)
    eps = getattr(inner, "eps", getattr(inner, "variance_epsilon", None))
    if isinstance(inner, torch.nn.LayerNorm) or name == "NativeLayerNormPre":
        kind = "LN"
    elif "RMSNorm" in name:
        kind = "RMS"
    else:
        raise ModelError(f"normalization module {name} (the engine implements LayerNorm and RMSNorm, "
                         "with or without a scale)")
    if eps is None:
        raise ModelError(f"normalization module {name} has no eps/variance_epsilon attribute")
    w = None if w is None else w.detach().float()
    if w is not None and name.startswith("Gemma"):
        w = w + 1.0
    return (kind, w, None if b is None else b.detach().float(), float(eps))


def _zeros_if_none(t, shape):
    return torch.zeros(shape) if t is None else t.detach().float()


def _cap(value) -> float:
    return float(value) if value is not None and float(value) > 0 else 0.0


def _hf_config(model: Model):
    return getattr(getattr(model.bridge, "original_model", None), "config", None)


def _parallel(cfg, hf) -> bool:
    """Attention and MLP side by side: the HF config's use_parallel_residual where it has one (GPT-NeoX,
    StableLM: TL's StableLM adapter says parallel either way), else the bridge config (GPT-J, Phi)."""
    flag = getattr(hf, "use_parallel_residual", None) if hf is not None else None
    return bool(cfg.parallel_attn_mlp) if flag is None else bool(flag)


def _windows(model: Model) -> list | None:
    """Per-layer sliding windows from the HF config (Mistral: every layer; Qwen2 etc.: layer_types)."""
    hf = _hf_config(model)
    window = getattr(hf, "sliding_window", None) if hf is not None else None
    if not window:
        return None
    L = model.n_layers
    types = getattr(hf, "layer_types", None)
    if types is None:
        return [int(window)] * L
    return [int(window) if t == "sliding_attention" else None for t in types]


def extract_weights(model: Model) -> Weights:
    """Read the bridge's (unprocessed) weights into a Weights record; ModelError for what it cannot
    reproduce (see `unsupported`)."""
    check_supported(model)
    b, cfg = model.bridge, model.bridge.cfg
    H, d = cfg.n_heads, cfg.d_model
    n_kv = cfg.n_key_value_heads or H
    rep = H // n_kv
    layers = []
    for blk in b.blocks:
        a = blk.attn
        dh = a.W_Q.shape[-1]
        expand = lambda t: t.detach().float().repeat_interleave(rep, dim=0)
        ln1 = _norm_params(blk.ln1) if hasattr(blk, "ln1") else None
        lw = LayerWeights(
            ln1=ln1,
            W_Q=a.W_Q.detach().float(), b_Q=_zeros_if_none(a.b_Q, (H, dh)),
            W_K=expand(a.W_K), b_K=expand(a.b_K) if a.b_K is not None else torch.zeros(H, dh),
            W_V=expand(a.W_V), b_V=expand(a.b_V) if a.b_V is not None else torch.zeros(H, dh),
            W_O=a.W_O.detach().float(), b_O=_zeros_if_none(a.b_O, (d,)), n_kv=n_kv)
        inner = getattr(a, "original_component", a)
        if getattr(inner, "q_norm", None) is not None:
            lw.q_norm, lw.k_norm = _norm_params(inner.q_norm), _norm_params(inner.k_norm)
        flat = lambda t: t.detach().float().permute(1, 0, 2).reshape(d, -1)
        kvb = lambda t: torch.zeros(n_kv * dh) if t is None else t.detach().float().reshape(-1)
        lw.W_qkv = torch.cat([flat(a.W_Q), flat(a.W_K), flat(a.W_V)], 1).contiguous()
        lw.b_qkv = torch.cat([lw.b_Q.reshape(-1), kvb(a.b_K), kvb(a.b_V)])
        if not cfg.attn_only:
            m = blk.mlp
            # GPT-J's block has one norm that attention and MLP share
            lw.ln2 = _norm_params(blk.ln2) if hasattr(blk, "ln2") else ln1
            lw.W_in = m.W_in.detach().float()
            lw.b_in = _zeros_if_none(m.b_in, (lw.W_in.shape[1],))
            lw.W_gate = m.W_gate.detach().float() if cfg.gated_mlp else None
            lw.W_out = m.W_out.detach().float()
            lw.b_out = _zeros_if_none(m.b_out, (d,))
            if lw.W_gate is not None:
                lw.W_gate_in = torch.cat([lw.W_gate, lw.W_in], 1).contiguous()
                b_gate = _zeros_if_none(getattr(m, "b_gate", None), (lw.W_in.shape[1],))  # Llama mlp_bias
                lw.b_gate_in = torch.cat([b_gate, lw.b_in])
        layers.append(lw)
    inner_attn = getattr(b.blocks[0].attn, "original_component", None)
    scale = getattr(inner_attn, "scaling", None)
    if scale is None:
        scale = 1.0 / float(getattr(inner_attn, "scale", math.sqrt(layers[0].W_Q.shape[-1])))
    rotary = None
    if (cfg.positional_embedding_type or "standard") == "rotary":
        rotary = _rotary_tables(model, cfg.n_ctx if cfg.n_ctx <= 4096 else 4096)
    W_pos = None
    if (cfg.positional_embedding_type or "standard") == "standard":
        W_pos = b.W_pos.detach().float()
    arch, hf = architecture(model), _hf_config(model)
    native = arch == "TransformerLensNative"
    windows = None if native else _windows(model)
    for lw, win in zip(layers, windows or []):
        lw.window = win
    return Weights(layers=layers, W_E=b.W_E.detach().float(), W_pos=W_pos,
                   ln_final=_norm_params(b.ln_final) if hasattr(b, "ln_final") else None,
                   W_U=b.W_U.detach().float(), b_U=_zeros_if_none(getattr(b, "b_U", None), (b.W_U.shape[1],)),
                   act=(cfg.act_fn or "").lower(), attn_scale=float(scale), rotary=rotary,
                   parallel=_parallel(cfg, hf) and not native,
                   causal=getattr(cfg, "attention_dir", "causal") != "bidirectional",
                   embed_scale=math.sqrt(d) if arch.startswith("Gemma") else 1.0,
                   attn_soft_cap=_cap(cfg.attn_scores_soft_cap) if native else
                   _cap(getattr(hf, "attn_logit_softcapping", None)),
                   logit_soft_cap=_cap(cfg.output_logits_soft_cap) if native else
                   _cap(getattr(hf, "final_logit_softcapping", None)),
                   windows=windows)


def _rotary_tables(model: Model, n_ctx: int) -> tuple:
    """cos/sin tables over the rotated dimensions (their width is rotary_dim, which may be < d_head)."""
    om = model.bridge.original_model
    native = getattr(om, "rotary", None)
    if native is not None:  # TransformerLens native: adjacent pairs rotate together
        return native.cos_cached.float(), native.sin_cached.float(), "adjacent"
    rot = next((m for n, m in om.named_modules() if n.endswith("rotary_emb")), None)
    if rot is None:
        raise ModelError(f"model {model.name!r} uses rotary positions but has no rotary_emb module to read")
    inner = getattr(rot, "original_component", rot)
    if architecture(model) == "GPTJForCausalLM":  # interleaved pairs; table = [sin | cos] per position
        table = inner.embed_positions.float()[:n_ctx]
        sin, cos = table.chunk(2, -1)
        return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1), "adjacent"
    inv_freq = inner.inv_freq.float()
    scaling = float(getattr(inner, "attention_scaling", 1.0))
    freqs = torch.outer(torch.arange(n_ctx).float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)  # HF Llama / GPT-NeoX: first and second halves rotate together
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
        self.w, self.model = w, model
        self.L, self.H = model.n_layers, model.n_heads
        self.attn_only = model.attn_only
        self.d_vocab_in, self.d_vocab_out = w.W_E.shape[0], w.W_U.shape[1]
        self.n_ctx = w.rotary[0].shape[0] if w.rotary else (w.W_pos.shape[0] if w.W_pos is not None else None)
        self.parallel = w.parallel
        self._checked: dict = {}

    def layer(self, l: int) -> LayerWeights:
        return self.w.layers[l]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token (and learned position) embedding [B, P, d]."""
        x = self.w.W_E[tokens.to(self.device)]
        if self.w.embed_scale != 1.0:  # Gemma: HF multiplies by sqrt(d_model) cast to the activations' dtype
            x = x * torch.tensor(self.w.embed_scale, dtype=x.dtype)
        if self.w.W_pos is not None:
            x = x + self.w.W_pos[: tokens.shape[1]]
        return x

    def embed_parts(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embedding, learned position embedding), each [B, P, d]; their sum is embed(tokens)
        bit for bit (the same one addition). ModelError for a model without learned positions."""
        self.require_learned_positions()
        x = self.w.W_E[tokens.to(self.device)]
        if self.w.embed_scale != 1.0:
            x = x * torch.tensor(self.w.embed_scale, dtype=x.dtype)
        return x, self.w.W_pos[: tokens.shape[1]].expand_as(x)

    def require_learned_positions(self) -> None:
        """ModelError unless the model adds a learned position embedding to its token embedding (what a
        graph with separate tok and pos senders needs)."""
        if self.w.W_pos is None:
            raise ModelError(f"model {self.model.name!r} has no learned position embedding to split off "
                             f"(positional_embedding_type={self.model.bridge.cfg.positional_embedding_type!r}: "
                             "positions enter inside attention, not as an input to the residual stream), so its "
                             "embedding cannot be split into tok and pos senders: use the default graph (one "
                             "`embed` sender, no --split-embed)")

    def norm(self, x: torch.Tensor, params: tuple | None) -> torch.Tensor:
        """LayerNorm or RMSNorm as `params` (kind, weight, bias, eps) say; identity for None."""
        if params is None:
            return x
        kind, w, b, eps = params
        if kind == "LN":
            return F.layer_norm(x, (x.shape[-1],), w, b, eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x = x if w is None else x * w
        return x if b is None else x + b

    def rope(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotary positions on q or k [B, P, H, e] whose first position is `offset`."""
        cos, sin, style = self.w.rotary
        P, rd = x.shape[1], cos.shape[-1]
        cos, sin = cos[offset:offset + P, None, :], sin[offset:offset + P, None, :]
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
        return self.attend(lw, *self.qkv(lw, xq, xk, xv, heads))

    def qkv(self, lw: LayerWeights, xq, xk=None, xv=None, heads: torch.Tensor | None = None,
            offset: int = 0) -> tuple:
        """(q, k, v) [B, P, h, dh] per query head (keys and values of a kv head repeated for each of its query
        heads), normed and rotated as attention uses them; the inputs' first position is `offset`."""
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
        if lw.q_norm is not None:
            q, k = self.norm(q, lw.q_norm), self.norm(k, lw.k_norm)
        if self.w.rotary is not None:
            q, k = self.rope(q, offset), self.rope(k, offset)
        return q, k, v

    def attend(self, lw: LayerWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """z [B, Pq, h, dh] of queries q [B, Pq, h, e] over keys and values [B, Pk, h, e]: the queries are the
        last Pq of the Pk positions (all of them in a whole forward; a causal suffix's otherwise)."""
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * self.w.attn_scale
        if self.w.attn_soft_cap:  # Gemma 2 style, before the mask
            scores = self.w.attn_soft_cap * torch.tanh(scores / self.w.attn_soft_cap)
        mask = self._mask(k.shape[1], lw.window, scores.device, q.shape[1])
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)

    def _mask(self, P: int, window: int | None, device, queries: int | None = None) -> torch.Tensor | None:
        """Key positions each query may not see [Pq, P] (None: it sees all): later ones when causal,
        ones `window` or more before it under a sliding window; the queries are the last `queries` (default
        all P) positions."""
        pos = torch.arange(P, device=device)
        gap = pos[P - (queries or P):, None] - pos[None, :]  # query - key
        mask = gap < 0 if self.w.causal else None
        if window is not None and P > window:
            far = gap >= window
            mask = far if mask is None else mask | far
        return mask

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
        """What the MLP writes for its block input x [..., d] (its norm, then mlp_normed)."""
        return self.mlp_normed(lw, self.norm(x, lw.ln2))

    def mlp_normed(self, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """What the MLP writes for its normalised input h (the norm's output: hook point mlp_in)."""
        act = _ACT[self.w.act]
        if lw.W_gate_in is not None:
            gate, pre = (h @ lw.W_gate_in + lw.b_gate_in).chunk(2, -1)
            post = act(gate) * pre
        else:
            post = act(h @ lw.W_in + lw.b_in)
        return post @ lw.W_out + lw.b_out

    def unembed(self, last: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from residuals [..., d] (the answer position's [B, d], or every position's [B, P, d]):
        only columns `cols` [B, c] of [B, d] if given."""
        normed = self.norm(last, self.w.ln_final)
        if cols is not None:
            W = self.w.W_U[:, cols]  # [d, B, c]
            logits = torch.einsum("bd,dbc->bc", normed, W) + self.w.b_U[cols]
        else:
            logits = normed @ self.w.W_U + self.w.b_U
        cap = self.w.logit_soft_cap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The whole model's logits at every position [B, P, vocab], layer by layer (no ablation)."""
        resid = self.embed(tokens)
        for l in range(self.L):
            lw = self.layer(l)
            mid = self.add_heads(resid, lw, self.attention(lw, resid))
            if not self.attn_only:
                mid = mid + self.mlp(lw, resid if self.parallel else mid)
            resid = mid
        return self.unembed(resid)

    def check(self, tokens: torch.Tensor, tolerance: float = None) -> float:
        """Compare this engine's logits with the bridge's own forward on `tokens` [B, P] (every position);
        returns the largest difference relative to the logit scale, ModelError past `tolerance`.

        Tolerance (default TOLERANCE): max |engine - bridge| <= 1e-3 * max(1, max |bridge logit|). Float32
        rounding of a different but equivalent order of operations stays near 1e-6 of the logit scale
        (SmolLM2, 30 layers: 5e-6); a real difference (a mask, a bias, a norm, rotary) moves logits by 1e-2
        of their scale or more, so 1e-3 leaves a wide margin on both sides. The check is of semantics:
        an engine in another dtype or on another device is checked through a float32 CPU copy of itself
        (bfloat16 rounding alone moves a random 3-layer model's logits by ~7 % of their scale, which
        would hide a real error). One bridge forward; the result is remembered per token tensor, so an
        engine shared by evaluators checks each task once.
        """
        key = (tuple(tokens.shape), hash(tokens.cpu().numpy().tobytes()))
        if key in self._checked:
            return self._checked[key]
        if self.dtype not in (torch.float32, torch.float64) or self.device.type != "cpu":
            worst = Engine(self.model).check(tokens, tolerance)
            self._checked[key] = worst
            return worst
        tol = TOLERANCE if tolerance is None else tolerance
        with torch.inference_mode():
            ref = self.model.bridge(tokens.to(self._bridge_device()))
            ref = (ref.logits if hasattr(ref, "logits") else ref).float().cpu()
            mine = self.forward(tokens).float().cpu()
        if ref.shape != mine.shape:
            raise ModelError(f"model {self.model.name!r}: the engine's logits are {tuple(mine.shape)} but the "
                             f"bridge's are {tuple(ref.shape)}")
        diff = (mine - ref).abs()
        scale = max(1.0, float(ref.abs().max()))
        worst = float(diff.max()) / scale
        if not worst <= tol:  # also catches NaN
            b, p, v = (int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
            raise ModelError(
                f"the fast engine does not reproduce model {self.model.name!r}: its logits differ from the "
                f"bridge's forward by up to {float(diff.max()):.3g} (prompt {b}, position {p}, token {v}: engine "
                f"{float(mine[b, p, v]):.5g}, bridge {float(ref[b, p, v]):.5g}), {worst:.2g} of the logit scale "
                f"{scale:.3g}, past the tolerance {tol:g}. Config features involved: {features(self.model)}. "
                "Nothing was scored; report the model, and run it with --engine auto or hooked (the hook-based path)")
        self._checked[key] = worst
        return worst

    def _bridge_device(self):
        try:
            return next(self.model.bridge.parameters()).device
        except StopIteration:
            return torch.device("cpu")
