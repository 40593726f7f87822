"""Built-in tasks: sequence continuation (digits, words, months, days, letters, decreasing),
greater-than and IOI, each with two templates, a seed and two corruptions.

Sequence tasks show four members of a sequence and ask for the fifth. The wrong answer is
the last member shown (what a model that merely copies would say). Corruptions: "random"
replaces every member by a random member of the same kind (the pattern is gone), "shuffle"
shows the same members out of order. SmolLM2's tokenizer splits numbers into digits, so
numerals are single digits separated by spaces; words read best comma-separated.
"""
from __future__ import annotations

import random
from typing import Sequence

from .base import Task, TaskError, build_task, register

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
DIGITS = [str(d) for d in range(10)]
N_SHOWN = 4

# template: (joiner between members, text after the last member, prefix of the answer)
SEQ_TEMPLATES = {
    "digits": [(" ", " ", ""), (", ", ", ", "")],
    # comma-separated first: space-separated, SmolLM2 barely counts down (full logit difference 1.82,
    # and mean ablation of every node scored above the corrupted run); with commas 3.87 vs 0.32 / 0.16
    "decreasing": [(", ", ", ", ""), (" ", " ", "")],
    "number-words": [(", ", ",", " "), (" ", "", " ")],
    "months": [(", ", ",", " "), (" ", "", " ")],
    "days": [(", ", ",", " "), (" ", "", " ")],
    "letters": [(", ", ",", " "), (" ", "", " ")],
}
SEQ_MEMBERS = {"digits": DIGITS, "decreasing": DIGITS, "number-words": NUMBER_WORDS, "months": MONTHS,
               "days": DAYS, "letters": LETTERS}
SEQ_PREFIX = {"number-words": ["", "Count: "], "months": ["Months: ", ""], "days": ["", "Days: "]}
SEQ_TEMPLATES["months"] = [(", ", ",", " "), (", ", ",", " ")]  # template 1 differs by its prefix
CYCLIC = {"months", "days"}


def _template(name: str, template: int, n_templates: int) -> int:
    if not 0 <= template < n_templates:
        raise TaskError(f"task {name!r} has templates 0..{n_templates - 1}, not {template}")
    return template


def _single_token_members(tokenizer, pool: Sequence[str], answer_prefix: str) -> set[str]:
    """Members that are one token alone and as an answer (with its prefix), so prompts align."""
    one = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1
    return {m for m in pool if one(m) and one(answer_prefix + m)}


def _corrupt(rng: random.Random, members: list[str], pool: Sequence[str], corruption: str) -> list[str]:
    for _ in range(100):
        if corruption == "random":
            out = [rng.choice(pool) for _ in members]
        elif corruption == "shuffle":
            out = list(members)
            rng.shuffle(out)
        else:
            raise TaskError(f"unknown corruption {corruption!r} for sequence tasks: use random or shuffle")
        if out != members:
            return out
    raise TaskError(f"could not corrupt {members}: the corruption never changed the prompt")


def _positions(tokenizer, prefix: str, members: list[str], joiner: str, tail: str) -> dict[str, int]:
    pos, text = {}, prefix
    for i, m in enumerate(members):
        text += m
        pos[f"S{i}"] = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1
        text += joiner if i < len(members) - 1 else tail
    pos["end"] = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1
    return pos


def sequence_task(name: str, tokenizer, n: int = 24, seed: int = 0, template: int = 0,
                  corruption: str = "random") -> Task:
    """Four members of a sequence, then the fifth as the answer."""
    pool = SEQ_MEMBERS[name]
    joiner, tail, ans_prefix = SEQ_TEMPLATES[name][_template(name, template, len(SEQ_TEMPLATES[name]))]
    usable = _single_token_members(tokenizer, pool, ans_prefix)
    prefix = SEQ_PREFIX.get(name, ["", ""])[template]
    rng = random.Random(f"{name}:{seed}:{template}:{corruption}")
    step = -1 if name == "decreasing" else 1
    clean, corrupted, answers, wrong = [], [], [], []
    starts = range(len(pool)) if name in CYCLIC else (
        range(0, len(pool) - N_SHOWN) if step > 0 else range(N_SHOWN, len(pool)))
    seqs = [[(st + step * i) % len(pool) for i in range(N_SHOWN + 1)] for st in starts]
    seqs = [idx for idx in seqs if all(pool[i] in usable for i in idx)]
    if not seqs:
        raise TaskError(f"task {name!r}: no sequence of {N_SHOWN + 1} members is single-token for this tokenizer")
    for _ in range(n):
        idx = rng.choice(seqs)
        members = [pool[i] for i in idx[:N_SHOWN]]
        bad = _corrupt(rng, members, sorted(usable), corruption)
        clean.append(prefix + joiner.join(members) + tail)
        corrupted.append(prefix + joiner.join(bad) + tail)
        answers.append(ans_prefix + pool[idx[N_SHOWN]])
        wrong.append(ans_prefix + members[-1])
    positions = _positions(tokenizer, prefix, members, joiner, tail)
    return build_task(name, tokenizer, clean, corrupted, answers, wrong, positions,
                      {"template": template, "seed": seed, "corruption": corruption, "builtin": name})


def _register_sequence(name: str, description: str) -> None:
    register(name, description, templates=len(SEQ_TEMPLATES[name]))(
        lambda tokenizer, **kw: sequence_task(name, tokenizer, **kw))


_register_sequence("digits", "increasing numerals: '3 4 5 6 ' -> '7'")
_register_sequence("decreasing", "decreasing numerals: '9, 8, 7, 6, ' -> '5'")
_register_sequence("number-words", "number words: 'one, two, three, four,' -> ' five'")
_register_sequence("months", "months: 'March, April, May, June,' -> ' July'")
_register_sequence("days", "days of the week: 'Monday, Tuesday, Wednesday, Thursday,' -> ' Friday'")
_register_sequence("letters", "letters: 'C D E F' -> ' G'")

GT_TEMPLATES = ["The war lasted from the year 1{c}{t}{u} to the year 1{c}",
                "The contract ran from 1{c}{t}{u} until 1{c}"]


@register("greater-than", "greater-than: 'from the year 1732 to the year 17' -> a tens digit above 3",
          templates=len(GT_TEMPLATES))
def greater_than(tokenizer, n: int = 24, seed: int = 0, template: int = 0, corruption: str = "random") -> Task:
    """The end year's tens digit (digits are single tokens here): answer start tens + 1, wrong start
    tens − 1. Corrupted prompts set the start year's tens digit to 0 ('random') or to 9 ('nine'),
    so the comparison gives no signal about which of the two the end year takes."""
    t = GT_TEMPLATES[_template("greater-than", template, len(GT_TEMPLATES))]
    rng = random.Random(f"gt:{seed}:{template}:{corruption}")
    if corruption not in ("random", "nine"):
        raise TaskError(f"unknown corruption {corruption!r} for greater-than: use random or nine")
    clean, corrupted, answers, wrong = [], [], [], []
    for _ in range(n):
        c, tens, u = rng.randint(1, 8), rng.randint(2, 7), rng.randint(0, 9)
        clean.append(t.format(c=c, t=tens, u=u))
        corrupted.append(t.format(c=c, t=0 if corruption == "random" else 9, u=u))
        answers.append(str(tens + 1))
        wrong.append(str(tens - 1))
    return build_task("greater-than", tokenizer, clean, corrupted, answers, wrong, {"end": -1},
                      {"template": template, "seed": seed, "corruption": corruption, "builtin": "greater-than"})


NAMES = ["Mary", "John", "Tom", "James", "Anna", "Paul", "Kate", "Mark", "Sarah", "David", "Laura", "Peter"]
IOI_TEMPLATES = ["When {A} and {B} went to the store, {S} gave a drink to",
                 "Then, {A} and {B} had a long argument, and afterwards {S} said to"]


@register("ioi", "indirect object: 'When Mary and John went to the store, John gave a drink to' -> ' Mary'",
          templates=len(IOI_TEMPLATES))
def ioi(tokenizer, n: int = 24, seed: int = 0, template: int = 0, corruption: str = "abc") -> Task:
    """Answer the indirect object (the name said once), wrong answer the subject (said twice).
    Corruptions: 'abc' (the repeated name becomes a third name) or 'random' (all three random)."""
    t = IOI_TEMPLATES[_template("ioi", template, len(IOI_TEMPLATES))]
    if corruption not in ("abc", "random"):
        raise TaskError(f"unknown corruption {corruption!r} for ioi: use abc or random")
    rng = random.Random(f"ioi:{seed}:{template}:{corruption}")
    clean, corrupted, answers, wrong = [], [], [], []
    for _ in range(n):
        io, s, c, d, e = rng.sample(NAMES, 5)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        clean.append(t.format(A=a, B=b, S=s))
        corrupted.append(t.format(A=a, B=b, S=c) if corruption == "abc" else t.format(A=c, B=d, S=e))
        answers.append(" " + io)
        wrong.append(" " + s)
    return build_task("ioi", tokenizer, clean, corrupted, answers, wrong, {"end": -1},
                      {"template": template, "seed": seed, "corruption": corruption, "builtin": "ioi"})
