"""sae_lens's saved format, read and written without sae_lens (which does not import beside TransformerLens 4).

A directory with cfg.json and sae_weights.safetensors (tensors W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out],
b_dec, threshold for JumpReLU). cfg.json as sae_lens 6 writes it: architecture (standard, topk, jumprelu,
transcoder, jumprelu_transcoder), d_in, d_sae, d_out (transcoders), k (topk), apply_b_dec_to_input,
normalize_activations, metadata {hook_name, hook_name_out, model_name, sae_lens_version}; before 6.0 the
hook is hook_point or hook_name at top level, activation_fn_str / activation_fn names the activation and a
TopK is activation_fn "topk" with activation_fn_kwargs {"k": K}. Exact rewrites done on reading (recorded in
meta["folded"]): log_threshold -> threshold = exp, a scaling_factor folded into W_dec's rows, a TopK's
rescale_acts_by_decoder_norm folded into W_enc, b_enc and W_dec.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..io import atomic_write_bytes, atomic_write_text
from .dictionary import Dictionary, DictionaryError
from .hooks import from_saelens, parse_hook, to_saelens

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"  # the sae_lens config layout save_dictionary writes (6.x: hooks under metadata)
_ARCH = {"standard": (None, False), "topk": ("topk", False), "jumprelu": ("jumprelu", False),
         "transcoder": (None, True), "jumprelu_transcoder": ("jumprelu", True)}


def load_dictionary(path: str | Path, hook: str | None = None, kind: str | None = None, k: int | None = None,
                    out_hook: str | None = None) -> Dictionary:
    """A dictionary from sae_lens's directory (cfg.json + sae_weights.safetensors) or a plain .safetensors file
    of W_enc, b_enc, W_dec, b_dec (+ threshold) with `hook` (and kind / k / out_hook) given here. `hook`, for a
    directory, overrides the cfg's hook (which must then be one we cannot read, or agree)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / CFG).is_file() or not (p / WEIGHTS).is_file():
            raise DictionaryError(f"{path} is not a sae_lens dictionary: it needs {CFG} and {WEIGHTS} "
                                  f"(found: {', '.join(sorted(x.name for x in p.iterdir())) or 'nothing'})")
        try:
            cfg = json.loads((p / CFG).read_text())
        except json.JSONDecodeError as e:
            raise DictionaryError(f"{p / CFG} is not JSON ({e})") from None
        return from_saelens_cfg(cfg, _read_tensors(p / WEIGHTS), hook=hook, source=str(p))
    if p.suffix == ".safetensors" and p.is_file():
        if hook is None:
            raise DictionaryError(f"{path} is a bare .safetensors file: say which hook point it reads "
                                  "(hook='resid_pre.6', --hook on the command line)")
        t = _read_tensors(p)
        _require(t, path)
        kind = kind or ("jumprelu" if "threshold" in t or "log_threshold" in t else ("topk" if k else "relu"))
        threshold = t.get("threshold", torch.exp(t["log_threshold"]) if "log_threshold" in t else None)
        return Dictionary(t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], kind=kind, hook=hook, out_hook=out_hook,
                          threshold=threshold, k=k, meta={"source": str(p)})
    raise DictionaryError(f"no dictionary at {path}: give a sae_lens directory ({CFG} + {WEIGHTS}) or a "
                          ".safetensors file")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    except Exception as e:  # a truncated or foreign file
        raise DictionaryError(f"{path} is not a readable safetensors file ({e})") from None


def _require(t: dict, where) -> None:
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in t]
    if missing:
        raise DictionaryError(f"{where} lacks tensor(s) {', '.join(missing)} (it holds {', '.join(sorted(t))}): a "
                              "dictionary needs W_enc [d_in, F], b_enc [F], W_dec [F, d_out], b_dec [d_out]")


def _field(cfg: dict, *names, default=None):
    """A cfg field under any of its names, at top level or in metadata (sae_lens 6 moved hooks there)."""
    meta = cfg.get("metadata") or {}
    for n in names:
        for where in (cfg, meta):
            if where.get(n) is not None:
                return where[n]
    return default


def from_saelens_cfg(cfg: dict, t: dict[str, torch.Tensor], hook: str | None = None,
                     source: str = "cfg") -> Dictionary:
    """A Dictionary from a sae_lens cfg dict and its tensors (any version's field names; refusals name the field)."""
    _require(t, source)
    arch = str(cfg.get("architecture") or "standard")
    act = str(_field(cfg, "activation_fn", "activation_fn_str", default="relu"))
    kw = cfg.get("activation_fn_kwargs") or {}
    if arch == "standard" and act == "topk":  # sae_lens < 6: a TopK is a standard SAE with a topk activation
        arch = "topk"
    if arch not in _ARCH:
        raise DictionaryError(f"{source}: sae_lens architecture {arch!r} is not supported (circuitsearch reads "
                              f"{', '.join(_ARCH)}; a gated SAE or a skip transcoder's extra path is not a feature)")
    kind, transcoder = _ARCH[arch]
    kind = kind or "relu"
    if act not in ("relu", "topk") and not (arch == "jumprelu" and act == "jumprelu"):
        raise DictionaryError(f"{source}: activation_fn {act!r} is not supported (relu, topk, jumprelu)")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", False):
        raise DictionaryError(f"{source}: normalize_activations={norm!r} rescales every input by a factor kept outside "
                              "these files; fold it into the weights (sae_lens: fold_activation_norm_scaling_factor) "
                              "and save again")
    if (cfg.get("reshape_activations") or "none") != "none":
        raise DictionaryError(f"{source}: reshape_activations={cfg['reshape_activations']!r} (per-head hook_z "
                              "dictionaries) is not supported")
    meta = {"source": source, "architecture": arch, "folded": []}
    for key, names in (("model_name", ("model_name",)), ("saelens_hook", ("hook_name", "hook_point")),
                       ("saelens_hook_out", ("hook_name_out",)), ("sae_lens_version", ("sae_lens_version",))):
        if _field(cfg, *names) is not None:
            meta[key] = _field(cfg, *names)
    ours = cfg.get("circuitsearch") or {}
    in_hook, out = _hooks(cfg, hook, ours, transcoder, source)
    if hook is not None:
        meta.pop("saelens_hook", None)  # read where the caller says, not by sae_lens's name
    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"]
    threshold = t.get("threshold")
    if threshold is None and "log_threshold" in t:
        threshold = torch.exp(t["log_threshold"])
        meta["folded"].append("log_threshold -> threshold = exp(log_threshold)")
    if kind != "jumprelu":
        threshold = None
    W_dec = _fold_scaling(t, W_dec, meta, source)
    k = None
    if kind == "topk":
        k = cfg.get("k", kw.get("k"))
        if k is None:
            raise DictionaryError(f"{source}: a topk dictionary's cfg needs k (or activation_fn_kwargs.k)")
        k = int(k)
        if cfg.get("rescale_acts_by_decoder_norm"):
            norms = W_dec.norm(dim=-1).clamp(min=1e-8)  # topk(pre * n) then / n before W_dec: the same map
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
            meta["folded"].append("rescale_acts_by_decoder_norm: decoder norms folded into W_enc, b_enc, W_dec")
    d = Dictionary(W_enc, b_enc, W_dec, b_dec, kind=kind, hook=in_hook, out_hook=out, threshold=threshold, k=k,
                   apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", not transcoder)), meta=meta)
    for name, want in (("d_in", d.d_in), ("d_sae", d.n_features), ("d_out", d.d_out)):
        if name in cfg and cfg[name] is not None and int(cfg[name]) != want:
            raise DictionaryError(f"{source}: cfg.json says {name}={cfg[name]} but the weights have {want} (W_enc "
                                  f"{tuple(d.W_enc.shape)}, W_dec {tuple(d.W_dec.shape)}): the files do not belong "
                                  "together")
    return d


def _hooks(cfg: dict, hook, ours: dict, transcoder: bool, source: str):
    """(hook read, hook written or None) from the caller, our own cfg block, or sae_lens's hook names."""
    name = _field(cfg, "hook_name", "hook_point")
    if hook is not None:
        in_hook = str(parse_hook(hook))
    elif ours.get("hook"):
        in_hook = str(parse_hook(ours["hook"]))
    elif name is None:
        raise DictionaryError(f"{source}: cfg.json names no hook (hook_name / hook_point): give hook='resid_pre.6'")
    else:
        if _field(cfg, "hook_head_index") is not None:
            raise DictionaryError(f"{source}: a dictionary of one attention head (hook_head_index) is not supported")
        in_hook = str(from_saelens(name))
        layer = _field(cfg, "hook_layer")
        if layer is not None and int(layer) != parse_hook(in_hook).layer and "resid_post" not in name:
            raise DictionaryError(f"{source}: hook_name {name!r} is at layer {parse_hook(in_hook).layer} but "
                                  f"hook_layer says {layer}: fix cfg.json")
    out = ours.get("out_hook")
    name_out = _field(cfg, "hook_name_out")
    if out is None and name_out is not None:
        out = str(from_saelens(name_out))
    if transcoder and out is None:
        raise DictionaryError(f"{source}: a transcoder's cfg must say where it writes (metadata.hook_name_out)")
    return in_hook, out


def _fold_scaling(t: dict, W_dec: torch.Tensor, meta: dict, source: str) -> torch.Tensor:
    """sae_lens's finetuning scaling_factor multiplies the features before W_dec: fold it into W_dec's rows."""
    s = t.get("scaling_factor", t.get("finetuning_scaling_factor"))
    if s is None or bool(torch.all(s == 1)):
        return W_dec
    if s.shape != (W_dec.shape[0],):
        raise DictionaryError(f"{source}: scaling_factor is {tuple(s.shape)}, not one value per feature")
    meta["folded"].append("scaling_factor folded into W_dec's rows")
    return W_dec * s[:, None]


def saelens_cfg(d: Dictionary, model_name: str | None = None) -> dict:
    """cfg.json for `d` in sae_lens 6's layout (plus our own block, which sae_lens ignores)."""
    arch = {("relu", False): "standard", ("topk", False): "topk", ("jumprelu", False): "jumprelu",
            ("relu", True): "transcoder", ("jumprelu", True): "jumprelu_transcoder"}.get((d.kind, d.is_transcoder))
    if arch is None:
        raise DictionaryError(f"sae_lens has no architecture for a {d.kind} transcoder")
    meta = {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": FORMAT_VERSION,
            "hook_name": d.meta.get("saelens_hook") or to_saelens(d.hook), "hook_head_index": None,
            "model_name": model_name or d.meta.get("model_name"), "prepend_bos": False}
    cfg = {"architecture": arch, "d_in": d.d_in, "d_sae": d.n_features, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": bool(d.apply_b_dec_to_input), "normalize_activations": "none",
           "reshape_activations": "none", "metadata": meta}
    if d.kind == "topk":
        cfg.update(k=d.k, rescale_acts_by_decoder_norm=False)
    if d.is_transcoder:
        cfg["d_out"] = d.d_out
        meta["hook_name_out"] = to_saelens(d.out_hook)
    cfg["circuitsearch"] = {"hook": d.hook, "out_hook": d.out_hook, "digest": d.digest(),
                            **{k: v for k, v in d.meta.items() if k in ("trained_by", "model", "report")}}
    return cfg


def save_dictionary(d: Dictionary, directory: str | Path, model_name: str | None = None) -> Path:
    """Write `d` in sae_lens's format (cfg.json + sae_weights.safetensors) to `directory`, atomically: the files
    are written into a new directory beside it, which then replaces it, so a reader sees the old or the new."""
    from safetensors.torch import save

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in d.tensors().items()}
        atomic_write_bytes(tmp / WEIGHTS, save(tensors, metadata={"format": "pt"}))
        atomic_write_text(tmp / CFG, json.dumps(saelens_cfg(d, model_name), indent=1) + "\n")
        keep = [p for p in target.iterdir() if p.name not in (CFG, WEIGHTS)] if target.is_dir() else []
        for p in keep:  # a training report or other files beside the dictionary stay
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


_LOADED: dict = {}


def load_spec(spec: str) -> Dictionary:
    """The dictionary a command line names: a sae_lens directory, or a bare .safetensors file with its hook point
    after `@` (`sae.safetensors@resid_pre.6`). Loaded once per path, size and modification time."""
    path, hook = str(spec), None
    if "@" in path and not Path(path).exists():
        path, hook = path.rsplit("@", 1)
    p = Path(path).expanduser()
    try:
        st = p.stat()
        key = (str(p.resolve()), hook, st.st_size, st.st_mtime_ns)
    except OSError:
        raise DictionaryError(f"--sae {spec}: no such file or directory (give a sae_lens directory, or "
                              "FILE.safetensors@HOOK, e.g. sae.safetensors@resid_pre.6)") from None
    if p.is_dir() and (p / CFG).is_file():
        key += ((p / WEIGHTS).stat().st_mtime_ns if (p / WEIGHTS).exists() else 0, (p / CFG).stat().st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = load_dictionary(p, hook=hook)
    return _LOADED[key]
