"""Tasks: built-ins by name, custom tasks from JSONL, and the filter that keeps answered prompts."""
from __future__ import annotations

import torch

from . import builtin  # noqa: F401  (registers the built-in tasks)
from .base import TASKS, TEMPLATES, Task, TaskError, build_task, concat_tasks, load_task

__all__ = ["Task", "TaskError", "build_task", "load_task", "TASKS", "get_task", "list_tasks", "filter_correct",
           "answered", "note_answered"]


def list_tasks() -> list[tuple[str, str]]:
    return [(name, desc) for name, (_, desc) in TASKS.items()]


def answered(task: Task, model) -> torch.Tensor:
    """Which prompts [n] the model answers correctly: its clean top-1 prediction at the prompt's last real
    position is the answer (for a multi-token answer, its first token after those it shares with the wrong
    one, which the task already feeds). One forward pass of the bridge."""
    with torch.no_grad():
        logits = model.bridge(task.clean)
        pred = logits[torch.arange(len(task)), task.lengths - 1].argmax(-1)  # each prompt's last real position
    return pred == task.answers


def note_answered(task: Task, model) -> Task:
    """`task` with meta n_correct (how many prompts the model answers correctly, see `answered`) and
    wrong_prompts (the indices of the others): a task file is used whole, so this is said, not filtered."""
    ok = answered(task, model)
    task.meta.update(n_correct=int(ok.sum()), wrong_prompts=(~ok).nonzero()[:, 0].tolist())
    return task


def filter_correct(task: Task, model, keep: int | None = None) -> Task:
    """Only the prompts whose clean top-1 prediction is the answer (at most `keep` of them)."""
    ok = answered(task, model).nonzero()[:, 0].tolist()
    if not ok:
        which = f" (template {task.meta['template']})" if "template" in task.meta else ""
        raise TaskError(f"the model answers none of the {len(task)} prompts of task {task.name!r}{which} correctly; "
                        "try another template (`circuitsearch tasks` lists them), or pass --keep-all to keep the "
                        "prompts it answers wrongly (the full model must still beat the empty circuit)")
    kept = task.subset(ok[:keep] if keep else ok)
    kept.meta.update(n_generated=len(task), n_correct=len(ok), n_kept=len(kept))
    return kept


def get_task(name: str, tokenizer, n: int = 24, seed: int = 0, template: int | str = 0, corruption: str | None = None,
             model=None, filter: bool = True) -> Task:
    """A built-in task of n prompts; with a model and filter on, only prompts it answers correctly.
    template "all": n prompts in all, spread evenly over the templates and joined into one task (each
    template its own group), so a study over every template costs what one template costs."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)} (or a .jsonl file)")
    if n < 1:
        raise TaskError(f"n must be at least 1, not {n}")
    if template == "all":
        if name not in TEMPLATES:
            raise TaskError(f"task {name!r} does not declare how many templates it has, so --template all "
                            "cannot list them; give a template number")
        T = TEMPLATES[name]
        if n < T:
            raise TaskError(f"--template all spreads the {n} prompts over task {name!r}'s {T} templates: give "
                            f"--n-prompts {T} or more (at least one prompt a template)")
        share = [n // T + (t < n % T) for t in range(T)]  # n in all, as even as it goes
        parts = [get_task(name, tokenizer, k, seed, t, corruption, model, filter) for t, k in enumerate(share)]
        meta = dict(parts[0].meta, template="all",
                    templates=[{k: p.meta[k] for k in ("n_generated", "n_correct", "n_kept") if k in p.meta}
                               for p in parts])
        for k in ("n_generated", "n_correct", "n_kept"):  # totals over the templates
            meta.pop(k, None)
            if all(k in p.meta for p in parts):
                meta[k] = sum(p.meta[k] for p in parts)
        meta["groups"] = list(range(len(parts)))
        return concat_tasks(name, parts, meta)
    builder = TASKS[name][0]
    kw = {"seed": seed, "template": template}
    if corruption is not None:
        kw["corruption"] = corruption
    if model is None:
        return builder(tokenizer, n=n, **kw)
    if not filter:  # every prompt kept; how many the model answers is said
        return note_answered(builder(tokenizer, n=n, **kw), model)
    # at least 72 candidates: --template all asks a few prompts of each template, and a weak template
    # (letters 1: 6 of 72 answered) would otherwise have none; the first 3n are the same prompts either way
    return filter_correct(builder(tokenizer, n=max(3 * n, 72), **kw), model, keep=n)
