"""Task: aligned clean and corrupted prompts with one-token answers, and its checks."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


class TaskError(ValueError):
    """A task that cannot be used as given; the message names the prompt and the fix."""


@dataclass
class Task:
    """Clean prompts, corrupted prompts and answers as token ids, aligned position by position.

    `answers[i]` is the token the model should predict after `clean[i]`; `wrong_answers[i]`
    the contrasting token (logit difference = answer − wrong). The answer is read at the
    last position. `positions` names positions shared by every prompt (S0…Sn, end).
    """

    name: str
    clean: torch.Tensor          # [n, seq] long
    corrupted: torch.Tensor      # [n, seq] long
    answers: torch.Tensor        # [n] long
    wrong_answers: torch.Tensor  # [n] long
    clean_text: list[str]
    corrupted_text: list[str]
    answer_text: list[str]
    wrong_text: list[str]
    positions: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    def subset(self, idx: Sequence[int] | torch.Tensor) -> "Task":
        """The task restricted to the prompts at idx (in that order)."""
        idx = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long)
        pick = lambda xs: [xs[i] for i in idx.tolist()]
        return Task(self.name, self.clean[idx], self.corrupted[idx], self.answers[idx],
                    self.wrong_answers[idx], pick(self.clean_text), pick(self.corrupted_text),
                    pick(self.answer_text), pick(self.wrong_text), dict(self.positions), dict(self.meta))

    def to_json(self) -> dict:
        """Everything needed to rebuild the task exactly (task.json of a run directory)."""
        return {
            "schema": "circuitsearch.task/1",
            "name": self.name,
            "clean": self.clean.tolist(), "corrupted": self.corrupted.tolist(),
            "answers": self.answers.tolist(), "wrong_answers": self.wrong_answers.tolist(),
            "clean_text": self.clean_text, "corrupted_text": self.corrupted_text,
            "answer_text": self.answer_text, "wrong_text": self.wrong_text,
            "positions": self.positions, "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Task":
        if d.get("schema") != "circuitsearch.task/1":
            raise TaskError(f"not a circuitsearch task file (schema {d.get('schema')!r}, "
                            "expected 'circuitsearch.task/1')")
        t = lambda k: torch.tensor(d[k], dtype=torch.long)
        task = cls(d["name"], t("clean"), t("corrupted"), t("answers"), t("wrong_answers"),
                   list(d["clean_text"]), list(d["corrupted_text"]), list(d["answer_text"]),
                   list(d["wrong_text"]), dict(d.get("positions", {})), dict(d.get("meta", {})))
        validate(task)
        return task


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token(tokenizer, text: str, what: str) -> int:
    """The one token id of text, or a TaskError saying how it splits."""
    ids = _encode(tokenizer, text)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise TaskError(
            f"{what} {text!r} is {len(ids)} tokens ({pieces}), not one: use an answer that the "
            "tokenizer keeps whole (mind the leading space, e.g. ' five' vs 'five')")
    return ids[0]


def build_task(name: str, tokenizer, clean: Sequence[str], corrupted: Sequence[str],
               answers: Sequence[str], wrong_answers: Sequence[str],
               positions: dict[str, int] | None = None, meta: dict | None = None) -> Task:
    """Tokenise texts into a Task, rejecting anything that breaks alignment or one-token answers."""
    if len(clean) == 0:
        raise TaskError(f"task {name!r} is empty: give at least one prompt")
    lens = {len(clean), len(corrupted), len(answers), len(wrong_answers)}
    if len(lens) != 1:
        raise TaskError(f"task {name!r}: {len(clean)} clean prompts, {len(corrupted)} corrupted, "
                        f"{len(answers)} answers, {len(wrong_answers)} wrong answers; give one of each per prompt")
    clean_ids, corr_ids = [], []
    for i, (c, x) in enumerate(zip(clean, corrupted)):
        if c == x:
            raise TaskError(f"task {name!r}, prompt {i} {c!r}: the corrupted prompt is identical to the "
                            "clean one, so it removes no signal; change the tokens that carry the pattern")
        ci, xi = _encode(tokenizer, c), _encode(tokenizer, x)
        if len(ci) != len(xi):
            raise TaskError(f"task {name!r}, prompt {i}: clean {c!r} is {len(ci)} tokens but corrupted "
                            f"{x!r} is {len(xi)}; corrupted prompts must align token by token with the clean ones")
        if clean_ids and len(ci) != len(clean_ids[0]):
            raise TaskError(f"task {name!r}, prompt {i} {c!r} is {len(ci)} tokens but prompt 0 "
                            f"{clean[0]!r} is {len(clean_ids[0])}; all prompts of a task must have the "
                            "same token length (split templates of different length into separate tasks)")
        clean_ids.append(ci)
        corr_ids.append(xi)
    ans = [single_token(tokenizer, a, f"task {name!r}, prompt {i}: answer") for i, a in enumerate(answers)]
    wrong = [single_token(tokenizer, a, f"task {name!r}, prompt {i}: wrong answer") for i, a in enumerate(wrong_answers)]
    task = Task(name, torch.tensor(clean_ids), torch.tensor(corr_ids), torch.tensor(ans), torch.tensor(wrong),
                list(clean), list(corrupted), list(answers), list(wrong_answers), dict(positions or {}), dict(meta or {}))
    validate(task)
    return task


def validate(task: Task) -> None:
    """Check shapes and alignment of a Task built by any route."""
    n = len(task)
    if n == 0:
        raise TaskError(f"task {task.name!r} is empty: give at least one prompt")
    if task.clean.shape != task.corrupted.shape:
        raise TaskError(f"task {task.name!r}: clean prompts are {tuple(task.clean.shape)} tokens but corrupted "
                        f"are {tuple(task.corrupted.shape)}; they must align token by token")
    for i in range(n):
        if torch.equal(task.clean[i], task.corrupted[i]):
            raise TaskError(f"task {task.name!r}, prompt {i} {task.clean_text[i]!r}: corrupted prompt is "
                            "identical to the clean one; change the tokens that carry the pattern")
        if task.answers[i] == task.wrong_answers[i]:
            raise TaskError(f"task {task.name!r}, prompt {i} {task.clean_text[i]!r}: answer and wrong answer "
                            f"are the same token ({task.answer_text[i]!r}); the wrong answer must differ")
    for k, p in task.positions.items():
        if not -task.seq_len <= p < task.seq_len:
            raise TaskError(f"task {task.name!r}: named position {k}={p} is outside the {task.seq_len}-token prompts")


TASK_FIELDS = ("clean", "corrupted", "answer", "wrong_answer")


def read_task_file(path: str | Path) -> list[dict]:
    """The rows of a JSONL task file, each checked: a JSON object with the four text fields.

    Needs no model, so a bad file is reported before one loads; errors name file, line and field.
    """
    path = Path(path)
    if not path.exists():
        raise TaskError(f"task file {str(path)!r} does not exist")
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TaskError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x}); save the file as UTF-8") from None
    except OSError as e:
        raise TaskError(f"task file {str(path)!r} cannot be read: {e.strerror}") from None
    rows = []
    for ln, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{ln}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{path}:{ln}: a line must be a JSON object with {', '.join(TASK_FIELDS)}, "
                            f"not {type(row).__name__} {line.strip()[:40]!r}")
        missing = [k for k in TASK_FIELDS if k not in row]
        if missing:
            raise TaskError(f"{path}:{ln}: missing {', '.join(missing)}; each line needs clean, corrupted, "
                            "answer and wrong_answer")
        if is_id_row(row):
            if rows and not is_id_row(rows[0]):
                raise TaskError(f"{path}:{ln}: token ids, but the lines before hold text; one file holds one kind")
        else:
            for k in TASK_FIELDS:
                if not isinstance(row[k], str) or not row[k]:
                    raise TaskError(f"{path}:{ln}: field {k!r} must be a non-empty string (text) or token ids "
                                    f"(clean and corrupted lists of ids, answer and wrong_answer one id each), "
                                    f"not {row[k]!r}")
            if rows and is_id_row(rows[0]):
                raise TaskError(f"{path}:{ln}: text, but the lines before hold token ids; one file holds one kind")
        rows.append(row)
    if not rows:
        raise TaskError(f"task file {str(path)!r} holds no prompts: give one JSON object a line with "
                        f"{', '.join(TASK_FIELDS)}")
    return rows


def is_id_row(row: dict) -> bool:
    """A task file line given as token ids: clean and corrupted lists of ids, answer and wrong_answer ids."""
    isid = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    return (all(isinstance(row.get(k), list) and row[k] and all(isid(v) for v in row[k]) for k in ("clean", "corrupted"))
            and isid(row.get("answer")) and isid(row.get("wrong_answer")))


def load_task(path: str | Path, tokenizer) -> Task:
    """A custom task from JSONL, one object a line: clean, corrupted, answer, wrong_answer, as text (needs
    the tokenizer) or as token ids (needs none; tokenizer None is fine)."""
    path = Path(path)
    rows = read_task_file(path)
    if is_id_row(rows[0]):
        if len({len(r["clean"]) for r in rows} | {len(r["corrupted"]) for r in rows}) > 1:
            raise TaskError(f"task file {str(path)!r}: every clean and corrupted prompt must have the same "
                            "number of token ids")
        t = lambda k: torch.tensor([r[k] for r in rows], dtype=torch.long)
        text = lambda ids: tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
        one = lambda i: text([i])
        task = Task(path.stem, t("clean"), t("corrupted"), t("answer"), t("wrong_answer"),
                    [text(r["clean"]) for r in rows], [text(r["corrupted"]) for r in rows],
                    [one(r["answer"]) for r in rows], [one(r["wrong_answer"]) for r in rows],
                    meta={"source": str(path), "token_ids": True})
        validate(task)
        return task
    if tokenizer is None:
        raise TaskError(f"task file {str(path)!r} is text, but the model has no tokenizer: give the prompts as "
                        "token ids (clean/corrupted lists of ids, answer/wrong_answer ids) or a run's task.json")
    return build_task(path.stem, tokenizer, [r["clean"] for r in rows], [r["corrupted"] for r in rows],
                      [r["answer"] for r in rows], [r["wrong_answer"] for r in rows],
                      meta={"source": str(path)})


# name -> (builder, one-line description). A builder is
# builder(tokenizer, n=..., seed=..., template=..., corruption=...) -> Task.
TASKS: dict[str, tuple[Callable[..., Task], str]] = {}


def register(name: str, description: str):
    def deco(fn):
        TASKS[name] = (fn, description)
        return fn
    return deco
