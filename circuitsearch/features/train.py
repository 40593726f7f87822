"""train-sae: a small TopK or ReLU+L1 sparse autoencoder at one hook point, trained on text this machine has.

Text: the built-in tasks' prompts (clean and corrupted, with their answers) at every template, optionally text
the model writes greedily from a few neutral prefixes, or the user's own file; a model without a tokenizer
trains on sequences it samples itself from seeded random first tokens. Activations are read at every position.
Training runs on activations scaled to unit variance per dimension (folded back exactly at the end); decoder rows
are kept unit-norm. The report: explained variance, mean L0, dead features (never active on the training
activations), the next-token CE loss on the training text clean, spliced (hook replaced by the reconstruction)
and mean-ablated, and for a model with a tokenizer the task's logit difference spliced as a fraction of the
full model's.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .dictionary import Dictionary, DictionaryError, check_fits
from .hooks import parse_hook
from .splice import forward_with, hook_activations

PREFIXES = ("The", "Once upon a time", "In the morning,", "Here is a list:")
CHUNK = 64  # tokens per training sequence cut from a text file


@dataclass
class TrainSettings:
    """What train-sae was asked to do (written into the report)."""

    hook: str
    kind: str = "topk"
    features: int | None = None   # default 4 x d_model
    k: int | None = None          # topk; default 32 (at most features)
    l1: float | None = None       # relu; default 3e-3
    steps: int = 1000
    lr: float = 1e-3
    batch: int = 256
    seed: int = 0
    text: str | None = None
    generate: int = 0             # tokens the model writes greedily from PREFIXES (text models)
    task: str = "digits"          # whose logit difference is reported (text models)

    def check(self) -> None:
        """ValueError for settings that cannot train, before the model loads."""
        parse_hook(self.hook)
        if self.kind not in ("topk", "relu"):
            raise ValueError(f"--kind {self.kind!r}: train-sae trains topk or relu dictionaries")
        if self.features is not None and self.features < 1:
            raise ValueError(f"--features {self.features}: give at least 1")
        if self.kind == "topk":
            if self.l1 is not None:
                raise ValueError("--l1 is the relu dictionary's sparsity penalty; a topk one keeps k features: "
                                 "leave --l1 out or use --kind relu")
            if self.k is not None and self.k < 1:
                raise ValueError(f"--k {self.k}: give at least 1")
            if self.k is not None and self.features is not None and self.k > self.features:
                raise ValueError(f"--k {self.k} is more than --features {self.features}: k features are kept of them")
        elif self.k is not None:
            raise ValueError("--k is the topk dictionary's number of active features; leave it out for --kind relu")
        if self.l1 is not None and self.l1 < 0:
            raise ValueError(f"--l1 {self.l1} is negative")
        for name in ("steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: give at least 1")
        if self.generate < 0:
            raise ValueError(f"--generate {self.generate} is negative")
        if self.text is not None and not Path(self.text).is_file():
            raise ValueError(f"--text {self.text}: no such file")


@dataclass
class TrainResult:
    """The dictionary and its report (what training.json holds)."""

    dictionary: Dictionary
    report: dict = field(default_factory=dict)


def training_sequences(engine, s: TrainSettings) -> list[torch.Tensor]:
    """Token sequences [1, P] to read activations from (see the module docstring)."""
    model, tok = engine.model, engine.model.tokenizer
    if tok is None:
        if s.text is not None:
            raise ValueError(f"--text needs a tokenizer, and model {model.name!r} has none; leave --text out to "
                             "train on sequences the model samples itself")
        return _sampled(engine, s.seed)
    encode = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    if s.text is not None:
        ids = encode(Path(s.text).read_text())
        if len(ids) < 2:
            raise ValueError(f"--text {s.text}: fewer than 2 tokens")
        return [torch.tensor([ids[i:i + CHUNK]]) for i in range(0, len(ids) - 1, CHUNK) if len(ids[i:i + CHUNK]) > 1]
    from ..tasks import get_task
    from ..tasks.base import TASKS, TEMPLATES

    seqs = []
    for name in TASKS:
        task = get_task(name, tok, n=2 * TEMPLATES.get(name, 1), seed=s.seed,
                        template="all" if name in TEMPLATES else 0)
        for clean, corrupt, ans in zip(task.clean_text, task.corrupted_text, task.answer_text):
            seqs += [torch.tensor([encode(clean + ans)]), torch.tensor([encode(corrupt)])]
    for prefix in PREFIXES[: 4 if s.generate else 0]:
        seqs.append(_greedy(engine, torch.tensor([encode(prefix)]), max(1, s.generate // len(PREFIXES))))
    return seqs


@torch.no_grad()
def _greedy(engine, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        ids = torch.cat([ids, engine.forward(ids)[:, -1].argmax(-1, keepdim=True).cpu()], 1)
    return ids


@torch.no_grad()
def _sampled(engine, seed: int, n: int = 64, length: int = 24) -> list[torch.Tensor]:
    """n sequences the model samples (temperature 1) from seeded random first tokens."""
    g = torch.Generator().manual_seed(seed)
    length = min(length, engine.n_ctx or length)
    ids = torch.randint(0, engine.d_vocab_in, (n, 1), generator=g)
    for _ in range(length - 1):
        probs = engine.forward(ids)[:, -1].float().softmax(-1).cpu()
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return [ids]


@torch.no_grad()
def by_length(seqs: list[torch.Tensor], chunk: int = 64) -> list[torch.Tensor]:
    """The [1, P] sequences stacked into batches [n, P] of equal length (at most `chunk` rows), in order of
    length: one forward pass per batch instead of per sequence (exact: nothing is padded)."""
    groups: dict = {}
    for t in seqs:
        groups.setdefault(int(t.shape[1]), []).append(t)
    out = []
    for P in sorted(groups):
        g = groups[P]
        out += [torch.cat(g[i:i + chunk]) for i in range(0, len(g), chunk)]
    return out


def collect(engine, seqs: list[torch.Tensor], hook: str) -> torch.Tensor:
    """Activations [N, d] at `hook` at every position of every sequence (grouped by length)."""
    return torch.cat([hook_activations(engine, b, hook).reshape(-1, engine.model.d_model).float().cpu()
                      for b in by_length(seqs)])


def fit(acts: torch.Tensor, s: TrainSettings, hook: str, progress: bool = True) -> Dictionary:
    """Train the dictionary on activations [N, d] (Adam; decoder rows renormalised after every step)."""
    from tqdm import tqdm

    N, d = acts.shape
    n_feat = s.features or 4 * d
    k = min(s.k or 32, n_feat) if s.kind == "topk" else None
    l1 = 3e-3 if s.l1 is None and s.kind == "relu" else s.l1
    g = torch.Generator().manual_seed(s.seed)
    mean = acts.mean(0)
    scale = float(((acts - mean).pow(2).sum(-1).mean() / d).sqrt().clamp(min=1e-12))
    x_all = acts / scale  # unit variance per dimension, on average
    W_dec = torch.randn(n_feat, d, generator=g)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    params = {"W_enc": W_dec.t().clone(), "b_enc": torch.zeros(n_feat), "W_dec": W_dec, "b_dec": mean / scale}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=s.lr)
    bar = tqdm(range(s.steps), desc=f"train-sae {hook}", disable=not progress, unit="step")
    for _ in bar:
        x = x_all[torch.randint(0, N, (min(s.batch, N),), generator=g)]
        pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        if k is not None:
            vals, idx = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        else:
            f = pre.relu()
        x_hat = f @ params["W_dec"] + params["b_dec"]
        mse = (x_hat - x).pow(2).sum(-1).mean() / d
        loss = mse + (l1 * f.sum(-1).mean() if l1 else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True).clamp(min=1e-8)
        bar.set_postfix(mse=f"{mse.item():.4f}")
    p = {n: t.detach() for n, t in params.items()}
    # trained on x / scale: relu and topk commute with a positive factor, so b_enc and b_dec times `scale` give
    # features scale times larger on the raw activations, decoded through the same unit-norm rows
    return Dictionary(p["W_enc"], p["b_enc"] * scale, p["W_dec"], p["b_dec"] * scale, kind=s.kind, hook=hook, k=k,
                      apply_b_dec_to_input=True)


@torch.no_grad()
def evaluate(engine, d: Dictionary, acts: torch.Tensor, seqs: list[torch.Tensor], task=None) -> dict:
    """Explained variance, L0, dead features, CE loss clean / spliced / mean-ablated, the task's logit difference."""
    f = d.encode(acts)
    x_hat = d.decode(f)
    ev = 1 - float((acts - x_hat).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
    active = (f > 0)
    out = {"explained_variance": ev, "mean_l0": float(active.sum(-1).float().mean()),
           "dead_features": int((~active.any(0)).sum()), "n_features": d.n_features,
           "n_activations": int(acts.shape[0])}
    mean = acts.mean(0)
    ce = {"clean": [], "spliced": [], "mean_ablated": []}
    for b in by_length([s for s in seqs if s.shape[1] >= 2]):
        runs = {"clean": engine.forward(b), "spliced": forward_with(engine, b, d.hook, d.reconstruct),
                "mean_ablated": forward_with(engine, b, d.hook, lambda a: mean.to(a).expand_as(a))}
        for name, logits in runs.items():
            ce[name].append(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten().to(logits.device),
                                            reduction="sum"))
    n_pred = sum(int(s.shape[1]) - 1 for s in seqs if s.shape[1] >= 2)
    for name, vals in ce.items():
        out[f"ce_{name}"] = float(sum(vals) / n_pred)
    gap = out["ce_mean_ablated"] - out["ce_clean"]
    out["ce_recovered"] = (out["ce_mean_ablated"] - out["ce_spliced"]) / gap if gap > 0 else None
    if task is not None:
        out.update(_task_metric(engine, d, task))
    return out


def _task_metric(engine, d: Dictionary, task) -> dict:
    """Mean logit difference (answer - wrong answer at the last real position) full and spliced."""
    last = (task.lengths - 1).to(engine.device)
    rows = torch.arange(len(task), device=engine.device)

    def diff(logits):
        at = logits[rows, last]
        return float((at[rows, task.answers.to(at.device)] - at[rows, task.wrong_answers.to(at.device)]).mean())

    full = diff(engine.forward(task.clean))
    spliced = diff(forward_with(engine, task.clean, d.hook, d.reconstruct))
    return {"task": task.name, "task_prompts": len(task), "logit_diff_full": full, "logit_diff_spliced": spliced,
            "logit_diff_recovered": spliced / full if full else None}


def train_sae(engine, s: TrainSettings, progress: bool = True, log=print) -> TrainResult:
    """Collect activations, fit, evaluate: the dictionary (checked to fit the model) and its report."""
    s.check()
    hook = str(parse_hook(s.hook))
    if s.kind == "topk" and s.k is not None and s.k > (s.features or 4 * engine.model.d_model):
        raise ValueError(f"--k {s.k} is more than the {s.features or 4 * engine.model.d_model} features")
    t0 = time.perf_counter()
    seqs = training_sequences(engine, s)
    acts = collect(engine, seqs, hook)
    t1 = time.perf_counter()
    log(f"{acts.shape[0]} activations at {hook} from {len(seqs)} sequences ({t1 - t0:.1f} s)")
    d = fit(acts, s, hook, progress)
    d.meta.update(trained_by="circuitsearch train-sae", model=engine.model.name)
    check_fits(d, engine)
    t2 = time.perf_counter()
    task = None
    if engine.model.tokenizer is not None and s.task:
        from ..tasks import get_task
        try:
            task = get_task(s.task, engine.model.tokenizer, n=24, seed=s.seed, model=engine.model)
        except ValueError as e:  # a task the model answers nowhere: the CE figures still say how good it is
            log(f"note: no task metric ({e})")
    report = {"settings": asdict(s), "model": engine.model.name, "hook": hook, "digest": d.digest(),
              "seconds_collect": round(t1 - t0, 2), "seconds_train": round(t2 - t1, 2),
              **evaluate(engine, d, acts, seqs, task)}
    report["seconds_eval"] = round(time.perf_counter() - t2, 2)
    return TrainResult(d, report)


def summary_lines(r: dict) -> list[str]:
    """A few lines saying how good the dictionary is (what train-sae prints)."""
    fmt = lambda v: "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = [f"{r['settings']['kind']} dictionary at {r['hook']} of {r['model']}: {r['n_features']} features, "
             f"trained on {r['n_activations']} activations in {r['seconds_train']} s",
             f"  explained variance {fmt(r['explained_variance'])}  mean L0 {r['mean_l0']:.1f}  dead features "
             f"{r['dead_features']} of {r['n_features']}",
             f"  next-token CE: clean {fmt(r['ce_clean'])}  spliced {fmt(r['ce_spliced'])}  mean-ablated "
             f"{fmt(r['ce_mean_ablated'])}  (recovered {fmt(r['ce_recovered'])})"]
    if r.get("task"):
        lines.append(f"  {r['task']} logit difference: full {fmt(r['logit_diff_full'])}  spliced "
                     f"{fmt(r['logit_diff_spliced'])}  (recovered {fmt(r['logit_diff_recovered'])})")
    return lines


__all__ = ["TrainSettings", "TrainResult", "train_sae", "summary_lines", "DictionaryError"]
