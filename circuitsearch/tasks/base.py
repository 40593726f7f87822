"""Task: aligned clean and corrupted prompts with their answers, and its checks.

Prompts of different token lengths share one [n, Pmax] tensor, right-padded with PAD: with
causal attention no position reads a later one, so padding never changes a real position.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch


class TaskError(ValueError):
    """A task that cannot be used as given; the message names the prompt and the fix."""


PAD = 0  # token id after a prompt's end; any id gives the same result (causal attention never reads it)
SCHEMA_1, SCHEMA_2 = "circuitsearch.task/1", "circuitsearch.task/2"


@dataclass
class Task:
    """Clean prompts, corrupted prompts and answers as token ids, aligned position by position.

    `answers[i]` is the token the model should predict after `clean[i]`; `wrong_answers[i]`
    the contrasting token (logit difference = answer − wrong). The answer is read at each
    prompt's last real position, `lengths[i] - 1` (prompts are right-padded with PAD).
    `positions` names positions: an int shared by every prompt (negative: from each prompt's
    end) or a list of one position per prompt. `groups` labels each prompt's template (mean
    ablation averages within a template and length). A multi-token answer keeps its ids in
    `answer_ids`/`wrong_ids`; the `fed[i]` tokens they share are already appended to the prompt.
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
    positions: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    lengths: torch.Tensor | None = None   # [n] real tokens of each prompt (default: all of them)
    groups: torch.Tensor | None = None    # [n] template/group id of each prompt (default: 0)
    answer_ids: list | None = None        # [n] token ids of each whole answer (multi-token answers only)
    wrong_ids: list | None = None         # [n] token ids of each whole wrong answer
    fed: list | None = None               # [n] answer tokens appended to the prompt (shared with the wrong one)

    def __post_init__(self):
        n, P = self.clean.shape[0], self.clean.shape[1]
        if self.lengths is None:
            self.lengths = torch.full((n,), P, dtype=torch.long)
        if self.groups is None:
            self.groups = torch.zeros(n, dtype=torch.long)
        self.lengths = torch.as_tensor(self.lengths, dtype=torch.long)
        self.groups = torch.as_tensor(self.groups, dtype=torch.long)

    @property
    def mixed(self) -> bool:
        """Whether the prompts have different token lengths (so some are padded)."""
        return bool((self.lengths != self.seq_len).any())

    @property
    def plain(self) -> bool:
        """One length, one group, one-token answers: what schema 1 describes."""
        return not self.mixed and not bool(self.groups.any()) and self.answer_ids is None

    def position(self, name: str) -> torch.Tensor:
        """Named position `name` of every prompt [n] (non-negative, inside each prompt)."""
        if name not in self.positions:
            raise TaskError(f"task {self.name!r} has no position named {name!r}; its positions: "
                            f"{', '.join(self.positions) or 'none'}")
        v = self.positions[name]
        p = torch.as_tensor(v, dtype=torch.long).expand(len(self)).clone()
        return torch.where(p < 0, self.lengths + p, p)

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.clean.shape[1])

    def subset(self, idx: Sequence[int] | torch.Tensor) -> "Task":
        """The task restricted to the prompts at idx (in that order)."""
        idx = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long)
        pick = lambda xs: [xs[i] for i in idx.tolist()]
        opt = lambda xs: None if xs is None else pick(xs)
        positions = {k: pick(v) if isinstance(v, list) else v for k, v in self.positions.items()}
        return Task(self.name, self.clean[idx], self.corrupted[idx], self.answers[idx],
                    self.wrong_answers[idx], pick(self.clean_text), pick(self.corrupted_text),
                    pick(self.answer_text), pick(self.wrong_text), positions, dict(self.meta),
                    self.lengths[idx], self.groups[idx], opt(self.answer_ids), opt(self.wrong_ids), opt(self.fed))

    def to_json(self) -> dict:
        """Everything needed to rebuild the task exactly (task.json of a run directory). A plain task
        (one length, one group, one-token answers) is written as schema 1, as before; others as 2."""
        out = {
            "schema": SCHEMA_1 if self.plain else SCHEMA_2,
            "name": self.name,
            "clean": self.clean.tolist(), "corrupted": self.corrupted.tolist(),
            "answers": self.answers.tolist(), "wrong_answers": self.wrong_answers.tolist(),
            "clean_text": self.clean_text, "corrupted_text": self.corrupted_text,
            "answer_text": self.answer_text, "wrong_text": self.wrong_text,
            "positions": self.positions, "meta": self.meta,
        }
        if not self.plain:
            out.update(lengths=self.lengths.tolist(), groups=self.groups.tolist())
            if self.answer_ids is not None:
                out.update(answer_ids=self.answer_ids, wrong_ids=self.wrong_ids, fed=self.fed)
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Task":
        if d.get("schema") not in (SCHEMA_1, SCHEMA_2):
            raise TaskError(f"not a circuitsearch task file (schema {d.get('schema')!r}, "
                            f"expected {SCHEMA_1!r} or {SCHEMA_2!r})")
        t = lambda k: torch.tensor(d[k], dtype=torch.long)
        opt = lambda k: t(k) if d.get(k) is not None else None
        lst = lambda k: list(d[k]) if d.get(k) is not None else None
        task = cls(d["name"], t("clean"), t("corrupted"), t("answers"), t("wrong_answers"),
                   list(d["clean_text"]), list(d["corrupted_text"]), list(d["answer_text"]),
                   list(d["wrong_text"]), dict(d.get("positions", {})), dict(d.get("meta", {})),
                   opt("lengths"), opt("groups"), lst("answer_ids"), lst("wrong_ids"), lst("fed"))
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


def pad(rows: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """Token id rows of any lengths as one [n, width] tensor, right-padded with PAD."""
    width = width or max(len(r) for r in rows)
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def group_ids(labels: Sequence | None, n: int) -> tuple[torch.Tensor, list]:
    """Template/group labels (any hashable, e.g. names or numbers) as ids 0.. in order of first use."""
    if labels is None:
        return torch.zeros(n, dtype=torch.long), []
    names = list(dict.fromkeys(labels))
    ids = {g: i for i, g in enumerate(names)}
    return torch.tensor([ids[g] for g in labels], dtype=torch.long), names


def _answer_split(tokenizer, name: str, i: int, what: str, prompt: str, corrupted: str, text: str) -> list[int]:
    """The token ids of answer `text`, the same after the clean and the corrupted prompt as alone,
    else a TaskError showing how it splits (a teacher-forced answer must be the same tokens in both runs)."""
    ids = _encode(tokenizer, text)
    if not ids:
        raise TaskError(f"task {name!r}, prompt {i}: {what} {text!r} has no tokens")
    names = lambda t: [tokenizer.decode([x]) for x in t]
    after, shown = {}, {}
    for kind, ptext in (("clean", prompt), ("corrupted", corrupted)):
        whole, head = _encode(tokenizer, ptext + text), _encode(tokenizer, ptext)
        after[kind] = whole[len(head):] if whole[: len(head)] == head else None
        shown[kind] = (names(after[kind]) if after[kind] is not None else
                       f"merged with the prompt's last token into {names(whole[max(len(head) - 1, 0):])}")
    if after["clean"] != after["corrupted"]:
        raise TaskError(f"task {name!r}, prompt {i}: {what} {text!r} splits as {shown['clean']} after the "
                        f"clean prompt but {shown['corrupted']} after the corrupted one; the answer must be "
                        "the same tokens after both (change the prompt's last characters, e.g. end both with a space)")
    if after["clean"] != ids:
        raise TaskError(f"task {name!r}, prompt {i}: {what} {text!r} is {names(ids)} alone but {shown['clean']} "
                        "after the prompt; move the characters the tokenizer merges into the prompt or the answer")
    return ids


def first_difference(a: Sequence[int], w: Sequence[int], answer: str, wrong: str) -> int:
    """Where token lists a (answer) and w (wrong answer) first differ; TaskError when one is the other's prefix."""
    c = 0
    while c < min(len(a), len(w)) and a[c] == w[c]:
        c += 1
    if c == len(a) or c == len(w):
        kind = "the same tokens as" if len(a) == len(w) else ("a prefix of" if c == len(a) else "begins with")
        raise TaskError(f"{answer} is {kind} {wrong}, so no token tells them apart; choose answers that differ "
                        "in a token")
    return c


def build_task(name: str, tokenizer, clean: Sequence[str], corrupted: Sequence[str],
               answers: Sequence[str], wrong_answers: Sequence[str],
               positions: dict[str, Any] | None = None, meta: dict | None = None,
               groups: Sequence | None = None) -> Task:
    """Tokenise texts into a Task, rejecting anything that breaks alignment or makes the answer ambiguous.

    Prompts may differ in length (they are right-padded); `groups` labels each prompt's template.
    An answer or wrong answer of several tokens is cut at the first token where the two differ:
    the tokens they share are appended to the prompt, clean and corrupted alike (`Task.fed`), and
    the full ids are kept for the teacher-forced `logprob` metric.
    """
    if len(clean) == 0:
        raise TaskError(f"task {name!r} is empty: give at least one prompt")
    lens = {len(clean), len(corrupted), len(answers), len(wrong_answers)} | ({len(groups)} if groups is not None else set())
    if len(lens) != 1:
        raise TaskError(f"task {name!r}: {len(clean)} clean prompts, {len(corrupted)} corrupted, "
                        f"{len(answers)} answers, {len(wrong_answers)} wrong answers"
                        + (f", {len(groups)} groups" if groups is not None else "") + "; give one of each per prompt")
    clean_ids, corr_ids = [], []
    for i, (c, x) in enumerate(zip(clean, corrupted)):
        if c == x:
            raise TaskError(f"task {name!r}, prompt {i} {c!r}: the corrupted prompt is identical to the "
                            "clean one, so it removes no signal; change the tokens that carry the pattern")
        ci, xi = _encode(tokenizer, c), _encode(tokenizer, x)
        if len(ci) != len(xi):
            raise TaskError(f"task {name!r}, prompt {i}: clean {c!r} is {len(ci)} tokens but corrupted "
                            f"{x!r} is {len(xi)}; corrupted prompts must align token by token with the clean ones")
        clean_ids.append(ci)
        corr_ids.append(xi)
    one = lambda t: len(_encode(tokenizer, t)) == 1
    multi = not all(one(a) and one(w) for a, w in zip(answers, wrong_answers))
    answer_ids = wrong_ids = fed = None
    if not multi:  # one-token answers, tokenised alone (as always)
        ans = [single_token(tokenizer, a, f"task {name!r}, prompt {i}: answer") for i, a in enumerate(answers)]
        wrong = [single_token(tokenizer, a, f"task {name!r}, prompt {i}: wrong answer") for i, a in enumerate(wrong_answers)]
    else:
        ans, wrong, answer_ids, wrong_ids, fed = [], [], [], [], []
        for i in range(len(clean)):
            a = _answer_split(tokenizer, name, i, "answer", clean[i], corrupted[i], answers[i])
            w = _answer_split(tokenizer, name, i, "wrong answer", clean[i], corrupted[i], wrong_answers[i])
            c = first_difference(a, w, f"task {name!r}, prompt {i}: answer {answers[i]!r}",
                                 f"the wrong answer {wrong_answers[i]!r}")
            clean_ids[i] = clean_ids[i] + a[:c]
            corr_ids[i] = corr_ids[i] + a[:c]
            ans.append(a[c])
            wrong.append(w[c])
            answer_ids.append(a)
            wrong_ids.append(w)
            fed.append(c)
    gids, names = group_ids(groups, len(clean))
    meta = dict(meta or {})
    if names:
        meta.setdefault("groups", names)
    task = Task(name, pad(clean_ids), pad(corr_ids), torch.tensor(ans), torch.tensor(wrong),
                list(clean), list(corrupted), list(answers), list(wrong_answers), dict(positions or {}), meta,
                torch.tensor([len(r) for r in clean_ids]), gids, answer_ids, wrong_ids, fed)
    validate(task)
    return task


def concat_tasks(name: str, tasks: Sequence[Task], meta: dict | None = None) -> Task:
    """Several tasks (e.g. one per template) as one: padded to the longest, each its own group.

    Named positions that every part has become per-prompt lists; the others are dropped (listed
    in meta["dropped_positions"]), since a name must say where it is in every prompt.
    """
    if not tasks:
        raise TaskError(f"task {name!r}: no parts to join")
    rows = lambda k: [r for t in tasks for r in (getattr(t, k)[i, : t.lengths[i]].tolist() for i in range(len(t)))]
    cat = lambda k: [x for t in tasks for x in getattr(t, k)]
    multi = any(t.answer_ids is not None for t in tasks)
    ids = lambda t, k, one: getattr(t, k) if getattr(t, k) is not None else [[int(a)] for a in one]
    shared = [k for k in tasks[0].positions if all(k in t.positions for t in tasks)]
    positions = {k: torch.cat([t.position(k) for t in tasks]).tolist() for k in shared}
    dropped = sorted({k for t in tasks for k in t.positions} - set(shared))
    groups = torch.cat([torch.full((len(t),), g, dtype=torch.long) for g, t in enumerate(tasks)])
    meta = dict(meta or {})
    if dropped:
        meta["dropped_positions"] = dropped
    task = Task(name, pad(rows("clean")), pad(rows("corrupted")), torch.cat([t.answers for t in tasks]),
                torch.cat([t.wrong_answers for t in tasks]), cat("clean_text"), cat("corrupted_text"),
                cat("answer_text"), cat("wrong_text"), positions, meta, torch.cat([t.lengths for t in tasks]), groups,
                [x for t in tasks for x in ids(t, "answer_ids", t.answers)] if multi else None,
                [x for t in tasks for x in ids(t, "wrong_ids", t.wrong_answers)] if multi else None,
                [x for t in tasks for x in (t.fed or [0] * len(t))] if multi else None)
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
    if task.lengths.shape != (n,) or task.groups.shape != (n,):
        raise TaskError(f"task {task.name!r}: lengths and groups must hold one entry per prompt ({n}), not "
                        f"{tuple(task.lengths.shape)} and {tuple(task.groups.shape)}")
    if bool((task.lengths < 1).any()) or bool((task.lengths > task.seq_len).any()):
        raise TaskError(f"task {task.name!r}: prompt lengths must be 1..{task.seq_len} (the padded width), "
                        f"not {sorted(set(task.lengths.tolist()))}")
    for k in ("answer_ids", "wrong_ids", "fed"):
        v = getattr(task, k)
        if v is not None and len(v) != n:
            raise TaskError(f"task {task.name!r}: {k} holds {len(v)} entries for {n} prompts")
    for i in range(n):
        ln = int(task.lengths[i])
        if torch.equal(task.clean[i, :ln], task.corrupted[i, :ln]):
            raise TaskError(f"task {task.name!r}, prompt {i} {task.clean_text[i]!r}: corrupted prompt is "
                            "identical to the clean one; change the tokens that carry the pattern")
        if task.answers[i] == task.wrong_answers[i]:
            raise TaskError(f"task {task.name!r}, prompt {i} {task.clean_text[i]!r}: answer and wrong answer "
                            f"are the same token ({task.answer_text[i]!r}); the wrong answer must differ")
    for k, p in task.positions.items():
        if isinstance(p, list):
            if len(p) != n:
                raise TaskError(f"task {task.name!r}: named position {k} lists {len(p)} positions for {n} prompts")
        elif not isinstance(p, int):
            raise TaskError(f"task {task.name!r}: named position {k}={p!r} must be a position or a list of one per prompt")
        where = task.position(k)
        bad = ((where < 0) | (where >= task.lengths)).nonzero()[:, 0].tolist()
        if bad:
            i = bad[0]
            raise TaskError(f"task {task.name!r}: named position {k}={int(where[i])} is outside prompt {i}'s "
                            f"{int(task.lengths[i])} tokens")


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
                                    f"(clean and corrupted lists of ids, answer and wrong_answer one id or a list of ids each), "
                                    f"not {row[k]!r}")
            if rows and is_id_row(rows[0]):
                raise TaskError(f"{path}:{ln}: text, but the lines before hold token ids; one file holds one kind")
        rows.append(row)
    if not rows:
        raise TaskError(f"task file {str(path)!r} holds no prompts: give one JSON object a line with "
                        f"{', '.join(TASK_FIELDS)}")
    return rows


def is_id_row(row: dict) -> bool:
    """A task file line given as token ids: clean and corrupted lists of ids, answer and wrong_answer ids
    (one id, or a list of ids for an answer of several tokens)."""
    isid = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    ids = lambda v: isinstance(v, list) and v and all(isid(x) for x in v)
    return (all(ids(row.get(k)) for k in ("clean", "corrupted"))
            and all(isid(row.get(k)) or ids(row.get(k)) for k in ("answer", "wrong_answer")))


def _row_group(row: dict):
    """A task file line's template/group label (either field; None when it has neither)."""
    return row.get("template", row.get("group"))


def load_task(path: str | Path, tokenizer) -> Task:
    """A custom task from JSONL, one object a line: clean, corrupted, answer, wrong_answer, as text (needs
    the tokenizer) or as token ids (needs none; tokenizer None is fine), and optionally a `template` or
    `group` label. Prompts may differ in length; each corrupted prompt must match its clean one."""
    path = Path(path)
    rows = read_task_file(path)
    labels = [_row_group(r) for r in rows]
    for ln, (r, g) in enumerate(zip(rows, labels), 1):
        if "template" in r and "group" in r:
            raise TaskError(f"{path}: prompt {ln} has both 'template' and 'group'; give one label")
        if g is not None and (isinstance(g, bool) or not isinstance(g, (str, int))):
            raise TaskError(f"{path}: prompt {ln}: template/group must be a name or a number, not {g!r}")
    if all(g is None for g in labels):
        labels = None
    elif any(g is None for g in labels):
        i = labels.index(None)
        raise TaskError(f"{path}: prompt {i + 1} has no template/group but others do; label every prompt or none")
    if is_id_row(rows[0]):
        for i, r in enumerate(rows):
            if len(r["clean"]) != len(r["corrupted"]):
                raise TaskError(f"task file {str(path)!r}, prompt {i + 1}: clean is {len(r['clean'])} token ids but "
                                f"corrupted is {len(r['corrupted'])}; corrupted prompts must align token by token "
                                "with the clean ones (prompts of different lengths are fine)")
        text = lambda ids: tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
        as_list = lambda v: v if isinstance(v, list) else [v]
        answers = [as_list(r["answer"]) for r in rows]
        wrongs = [as_list(r["wrong_answer"]) for r in rows]
        multi = any(len(a) > 1 or len(w) > 1 for a, w in zip(answers, wrongs))
        fed = [first_difference(a, w, f"{path}: prompt {i + 1}: answer {a}", f"the wrong answer {w}") if multi else 0
               for i, (a, w) in enumerate(zip(answers, wrongs))]
        clean = [r["clean"] + a[:c] for r, a, c in zip(rows, answers, fed)]
        corrupted = [r["corrupted"] + a[:c] for r, a, c in zip(rows, answers, fed)]
        gids, names = group_ids(labels, len(rows))
        meta = {"source": str(path), "token_ids": True} | ({"groups": names} if names else {})
        task = Task(path.stem, pad(clean), pad(corrupted),
                    torch.tensor([a[c] for a, c in zip(answers, fed)]), torch.tensor([w[c] for w, c in zip(wrongs, fed)]),
                    [text(r["clean"]) for r in rows], [text(r["corrupted"]) for r in rows],
                    [text(a) for a in answers], [text(w) for w in wrongs],
                    meta=meta, lengths=torch.tensor([len(r) for r in clean]), groups=gids,
                    answer_ids=answers if multi else None, wrong_ids=wrongs if multi else None,
                    fed=fed if multi else None)
        validate(task)
        return task
    if tokenizer is None:
        raise TaskError(f"task file {str(path)!r} is text, but the model has no tokenizer: give the prompts as "
                        "token ids (clean/corrupted lists of ids, answer/wrong_answer ids) or a run's task.json")
    return build_task(path.stem, tokenizer, [r["clean"] for r in rows], [r["corrupted"] for r in rows],
                      [r["answer"] for r in rows], [r["wrong_answer"] for r in rows],
                      meta={"source": str(path)}, groups=labels)


# name -> (builder, one-line description). A builder is
# builder(tokenizer, n=..., seed=..., template=..., corruption=...) -> Task.
TASKS: dict[str, tuple[Callable[..., Task], str]] = {}
# name -> how many templates its builder has (0..count-1), for --template all
TEMPLATES: dict[str, int] = {}


def register(name: str, description: str, templates: int | None = None):
    """Register a built-in task builder; `templates` (their count) makes `--template all` available."""
    def deco(fn):
        TASKS[name] = (fn, description)
        if templates is not None:
            TEMPLATES[name] = templates
        return fn
    return deco
