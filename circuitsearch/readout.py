"""Where a task's metric is read: per prompt, T positions, each with a target and a wrong token.

`--positions last` (default) reads each prompt's last real position against its answer and
wrong answer (T = 1: the evaluator's original readout). `all` and named positions score the
prompt itself, teacher forced: at position p the target is the clean prompt's next token and
the wrong token the corrupted prompt's next token (at the last position: answer and wrong
answer). The metric per prompt is the mean (or sum) over its valid positions.
The `logprob` metric feeds the whole answer (prompt + answer[:-1]) and reads every answer token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .metrics import Metric
from .tasks.base import Task, TaskError, pad, validate

REDUCTIONS = ("mean", "sum")


@dataclass
class Readout:
    """pos, target, wrong, valid: [n, T] per prompt; `last_only`: T = 1 at the last position of
    prompts that all have the full length (read as resid[:, -1], exactly as before)."""

    pos: torch.Tensor
    target: torch.Tensor
    wrong: torch.Tensor
    valid: torch.Tensor
    reduce: str
    last_only: bool

    def rows(self, idx: torch.Tensor) -> "Readout":
        return Readout(self.pos[idx], self.target[idx], self.wrong[idx], self.valid[idx], self.reduce, self.last_only)

    def key(self) -> torch.Tensor:
        """What distinguishes two prompts' readouts, as one row of ints per prompt (de-duplication)."""
        return torch.cat([self.pos, self.target, self.wrong, self.valid.long()], 1)


def parse_positions(text: str) -> str | tuple:
    """--positions as "last", "all" or a tuple of position names."""
    text = (text or "last").strip()
    if text in ("last", "all"):
        return text
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise ValueError(f"--positions {text!r}: give last, all, or position names (e.g. S2,end)")
    return names


def _pack(per_row: list, task: Task, reduce: str) -> Readout:
    """Lists of (pos, target, wrong) per prompt as padded [n, T] tensors with a validity mask."""
    T = max(len(r) for r in per_row)
    z = lambda: torch.zeros(len(per_row), T, dtype=torch.long)
    pos, tgt, wrong, valid = z(), z(), z(), torch.zeros(len(per_row), T, dtype=torch.bool)
    for i, r in enumerate(per_row):
        if not r:
            raise TaskError(f"task {task.name!r}, prompt {i} {task.clean_text[i]!r}: no position to score "
                            "(its clean and corrupted prompts predict the same next token everywhere)")
        for j, (p, t, w) in enumerate(r):
            pos[i, j], tgt[i, j], wrong[i, j], valid[i, j] = p, t, w, True
    return Readout(pos, tgt, wrong, valid, reduce, False)


def _next(task: Task, i: int, p: int) -> tuple:
    """(target, wrong) at position p of prompt i: the next clean/corrupted tokens, or the answers at the end."""
    if p == int(task.lengths[i]) - 1:
        return int(task.answers[i]), int(task.wrong_answers[i])
    return int(task.clean[i, p + 1]), int(task.corrupted[i, p + 1])


def teacher_forced(task: Task) -> tuple[Task, list]:
    """The task with each prompt followed by its answer but the last token (clean and corrupted alike),
    and per prompt the (position, answer token) pairs that score the whole answer."""
    answers = task.answer_ids or [[int(a)] for a in task.answers]
    fed = task.fed or [0] * len(task)
    clean, corr, reads = [], [], []
    for i, (a, f) in enumerate(zip(answers, fed)):
        n = int(task.lengths[i])
        start = n - f  # where the answer begins
        clean.append(task.clean[i, :n].tolist() + a[f:-1])
        corr.append(task.corrupted[i, :n].tolist() + a[f:-1])
        reads.append([(start - 1 + j, t, t) for j, t in enumerate(a)])
    lengths = torch.tensor([len(r) for r in clean])
    if bool((lengths == task.lengths).all()):
        return task, reads
    out = Task(task.name, pad(clean), pad(corr), task.answers, task.wrong_answers, task.clean_text,
               task.corrupted_text, task.answer_text, task.wrong_text, dict(task.positions),
               dict(task.meta, teacher_forced=True), lengths, task.groups, task.answer_ids, task.wrong_ids,
               task.fed)
    validate(out)
    return out, reads


def make_readout(task: Task, metric: Metric, positions: str | tuple = "last",
                 reduce: str | None = None) -> tuple[Task, Readout]:
    """(the task as the evaluator runs it, its readout) for `metric` read at `positions`."""
    positions = parse_positions(positions) if isinstance(positions, str) else positions
    reduce = reduce or ("sum" if metric.name == "logprob" else "mean")
    if reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r} over positions; choose one of {', '.join(REDUCTIONS)}")
    n, idx = len(task), torch.arange(len(task))
    if metric.name == "logprob":
        if positions != "last":
            raise ValueError("the logprob metric reads the answer's own tokens; it takes --positions last only")
        task, reads = teacher_forced(task)
        return task, _pack(reads, task, reduce)
    if positions == "last":
        last = task.lengths - 1
        simple = not task.mixed
        return task, Readout(last[:, None], task.answers[:, None], task.wrong_answers[:, None],
                             torch.ones(n, 1, dtype=torch.bool), reduce, simple)
    needs_pair = metric.name == "logit_diff"
    rows = []
    if positions == "all":
        for i in range(n):
            r = [(p, *_next(task, i, p)) for p in range(int(task.lengths[i]))]
            rows.append([x for x in r if x[1] != x[2]] if needs_pair else r)
        return task, _pack(rows, task, reduce)
    where = {name: task.position(name) for name in positions}  # TaskError for an unknown name
    for i in range(n):
        r = []
        for name in positions:
            p = int(where[name][i])
            t, w = _next(task, i, p)
            if needs_pair and t == w:
                raise TaskError(f"task {task.name!r}, prompt {i} {task.clean_text[i]!r}: at position {name} (={p}) "
                                "the clean and corrupted prompts continue with the same token, so the logit "
                                "difference there is 0 by definition; choose positions where they differ")
            r.append((p, t, w))
        rows.append(r)
    return task, _pack(rows, task, reduce)
