"""Tasks: built-ins by name, custom tasks from JSONL, and the filter that keeps answered prompts."""
from __future__ import annotations

import torch

from . import builtin  # noqa: F401  (registers the built-in tasks)
from .base import TASKS, TEMPLATES, Task, TaskError, build_task, concat_tasks, load_task

__all__ = ["Task", "TaskError", "build_task", "load_task", "TASKS", "get_task", "list_tasks", "filter_correct"]


def list_tasks() -> list[tuple[str, str]]:
    return [(name, desc) for name, (_, desc) in TASKS.items()]


def filter_correct(task: Task, model, keep: int | None = None) -> Task:
    """Only the prompts whose clean top-1 prediction is the answer (at most `keep` of them)."""
    with torch.no_grad():
        logits = model.bridge(task.clean)
        pred = logits[torch.arange(len(task)), task.lengths - 1].argmax(-1)  # each prompt's last real position
    ok = (pred == task.answers).nonzero()[:, 0].tolist()
    if not ok:
        which = f" (template {task.meta['template']})" if "template" in task.meta else ""
        raise TaskError(f"the model answers none of the {len(task)} prompts of task {task.name!r}{which} correctly; "
                        "try another template, or turn the filter off")
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
    if model is None or not filter:
        return builder(tokenizer, n=n, **kw)
    # at least 72 candidates: --template all asks a few prompts of each template, and a weak template
    # (letters 1: 6 of 72 answered) would otherwise have none; the first 3n are the same prompts either way
    return filter_correct(builder(tokenizer, n=max(3 * n, 72), **kw), model, keep=n)
