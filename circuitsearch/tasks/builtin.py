"""Built-in tasks of the original study: sequence continuation (digits, number words, months, days,
letters, decreasing), greater-than and IOI, each with several templates, a seed and two corruptions.

A template is one way of writing a task's prompts. Within one template every prompt has the same
token length (so it is an ordinary Task); templates differ in length. `templates(name)` lists a
task's templates in order; a builder takes `template=i`. The first two templates of every task are
the ones it has always had, drawn from the same seeds, so earlier runs rebuild the same prompts; except
decreasing, whose default (template 0) is now "Count down: 9, 8, 7, 6, " and whose old template 0 is 2.

Sequence tasks show some members of a sequence and ask for the next. The wrong answer is the last
member shown (what a model that merely copies would say). Corruptions: "random" replaces every
member by a random member of the same kind (the pattern is gone), "shuffle" shows the same members
out of order; words between members (fillers, "among words") stay as they were. SmolLM2's tokenizer
splits numbers into digits and a space before a digit into its own token, so numerals are single
digits and their answers follow a trailing space; words read best comma-separated.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .base import TASKS, Task, TaskError, build_task, register

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
DIGITS = [str(d) for d in range(10)]
# words that members are shown among (templates whose item holds {w}); single tokens kept per tokenizer
WORDS = ["cat", "dog", "tree", "lamp", "cup", "hat", "car", "book", "door", "fish", "bird", "chair",
         "table", "box", "pen", "ball", "shoe", "milk", "rain", "road"]
N_SHOWN = 4


@dataclass(frozen=True)
class TemplateInfo:
    """A task's template as listed by `templates(name)`: its index, short name and an example prompt shape."""

    index: int
    name: str
    kind: str       # plain, filler, among-words, length (sequences); sentence (ioi, greater-than)
    pattern: str


@dataclass(frozen=True)
class SeqTemplate:
    """Prompt = prefix + joiner.join(item per member) + tail; answer = answer_prefix + the next member.

    In `item`, {m} is the member and {w} a word drawn per member from WORDS (members among other
    words; the corrupted prompt keeps the same words). `key` seeds the prompts' random generator, so
    a template's prompts do not depend on its place in the list. `kind` is plain, filler (fixed words
    between members), among-words or length (the default template with another number of members).
    """

    name: str
    key: str
    joiner: str
    tail: str
    answer_prefix: str
    prefix: str = ""
    item: str = "{m}"
    n_shown: int = N_SHOWN
    kind: str = "plain"

    @property
    def fillers(self) -> list[str]:
        """The fixed words the template puts around members (none for plain and length templates)."""
        fixed = (self.item.replace("{m}", " ").replace("{w}", " ") + " " + self.joiner).replace(",", " ")
        return fixed.split()

    def pattern(self, pool: Sequence[str], step: int) -> str:
        """An example prompt and answer, 'prompt|answer', from pool's first members (for listings)."""
        shown = [pool[(i * step) % len(pool)] for i in range(self.n_shown + 1)]
        words = iter(WORDS)
        items = [self.item.format(m=m, w=next(words)) for m in shown[:-1]]
        return f"{self.prefix}{self.joiner.join(items)}{self.tail}|{self.answer_prefix}{shown[-1]}"


def _plain(name, key, joiner, tail, ans, prefix=""):
    return SeqTemplate(name, key, joiner, tail, ans, prefix)


def _lengths(base: SeqTemplate, lengths: Sequence[int]) -> list[SeqTemplate]:
    return [SeqTemplate(f"{base.name}-{k}", f"{base.name}-{k}", base.joiner, base.tail, base.answer_prefix,
                        base.prefix, base.item, k, "length") for k in lengths]


def _digit_templates(first: SeqTemplate, *others: SeqTemplate, prefix: str = "") -> list[SeqTemplate]:
    """Numeral members: a space before a digit is its own token, so prompts end in a space and answers have none."""
    return [first, *others,
            SeqTemplate("filler-apples", "filler-apples", ", ", ", ", "", prefix, item="{m} apples", kind="filler"),
            SeqTemplate("filler-then", "filler-then", " then ", " then ", "", prefix, kind="filler"),
            SeqTemplate("among-words", "among-words", " ", " ", "", prefix, item="{m} {w}", kind="among-words"),
            SeqTemplate("among-words-comma", "among-words-comma", ", ", ", ", "", prefix, item="{m} {w}",
                        kind="among-words"),
            *_lengths(first, (3, 5, 6, 7, 8))]


def _word_templates(first: SeqTemplate, second: SeqTemplate, filler: str, lengths=(3, 5, 6, 7, 8)) -> list[SeqTemplate]:
    """Word members: the answer follows a word or comma, so it carries a leading space."""
    before = filler.partition("{m}")[0].rstrip()
    return [first, second,
            SeqTemplate(f"filler-{filler.replace('{m}', '').strip()}", f"filler:{filler}", ", ",
                        f", {before}" if before else ",", " ", item=filler, kind="filler"),
            SeqTemplate("filler-then", "filler-then", " then ", " then", " ", kind="filler"),
            # "March cat April dog ..." without punctuation: SmolLM2 continued 2 to 19 of 72 prompts; in brackets it does
            SeqTemplate("among-words-paren", "among-words-paren", ", ", ",", " ", item="{m} ({w})", kind="among-words"),
            SeqTemplate("among-words-comma", "among-words-comma", ", ", ",", " ", item="{m}, {w}",
                        kind="among-words"),
            *_lengths(first, lengths)]


SEQ_TEMPLATES: dict[str, list[SeqTemplate]] = {
    "digits": _digit_templates(_plain("space", "0", " ", " ", ""), _plain("comma", "1", ", ", ", ", "")),
    # "Count down: " first: without it SmolLM2 barely counts down (space-separated, template 1: full logit
    # difference 1.98; comma-separated, template 2 and the default until then: 3.93 with the empty circuit,
    # 0.37, above the corrupted run, 0.25); with it 9.09, corrupted 0.77, empty 0.54 (benchmarks/RESULTS.md)
    "decreasing": _digit_templates(_plain("count-down", "count-down", ", ", ", ", "", "Count down: "),
                                   _plain("space", "1", " ", " ", ""), _plain("comma", "0", ", ", ", ", ""),
                                   prefix="Count down: "),
    "number-words": _word_templates(_plain("comma", "0", ", ", ",", " "),
                                    _plain("count-space", "1", " ", "", " ", "Count: "), "page {m}"),
    "months": _word_templates(_plain("months-comma", "0", ", ", ",", " ", "Months: "),
                              _plain("comma", "1", ", ", ",", " "), "in {m}"),
    # a week has 7 days: at most 6 shown, so the answer is never a day already shown
    "days": _word_templates(_plain("comma", "0", ", ", ",", " "), _plain("days-space", "1", " ", "", " ", "Days: "),
                            "on {m}", lengths=(3, 5, 6)),
    "letters": _word_templates(_plain("comma", "0", ", ", ",", " "), _plain("space", "1", " ", "", " "),
                               "letter {m}"),
}
SEQ_MEMBERS = {"digits": DIGITS, "decreasing": DIGITS, "number-words": NUMBER_WORDS, "months": MONTHS,
               "days": DAYS, "letters": LETTERS}
CYCLIC = {"months", "days"}


def _template(name: str, template: int, n_templates: int) -> int:
    if isinstance(template, bool) or not isinstance(template, int) or not 0 <= template < n_templates:
        raise TaskError(f"task {name!r} has templates 0..{n_templates - 1}, not {template!r}; "
                        "`circuitsearch tasks` lists them")
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


def _render(t: SeqTemplate, members: Sequence[str], words: Sequence[str]) -> tuple[str, list[str]]:
    """The prompt and its prefixes ending at each member (for the members' token positions)."""
    before, _, after = t.item.partition("{m}")
    text, upto = t.prefix, []
    for i, (m, w) in enumerate(zip(members, words)):
        text += before.format(w=w) + m
        upto.append(text)
        text += after.format(w=w) + (t.joiner if i < len(members) - 1 else t.tail)
    return text, upto


def _positions(tokenizer, text: str, upto: list[str]) -> dict[str, int]:
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])
    pos = {f"S{i}": count(u) - 1 for i, u in enumerate(upto)}
    pos["end"] = count(text) - 1
    return pos


def sequence_task(name: str, tokenizer, n: int = 24, seed: int = 0, template: int = 0,
                  corruption: str = "random") -> Task:
    """Some members of a sequence (the template says how many and how written), then the next as the answer."""
    pool, options = SEQ_MEMBERS[name], SEQ_TEMPLATES[name]
    t = options[_template(name, template, len(options))]
    usable = _single_token_members(tokenizer, pool, t.answer_prefix)
    words = sorted(_single_token_members(tokenizer, WORDS, " ")) if "{w}" in t.item else []
    rng = random.Random(f"{name}:{seed}:{t.key}:{corruption}")
    step, k = (-1 if name == "decreasing" else 1), t.n_shown
    if k + 1 > len(pool):
        raise TaskError(f"task {name!r}, template {t.name!r}: {k} members shown but the sequence has {len(pool)}")
    starts = range(len(pool)) if name in CYCLIC else (
        range(0, len(pool) - k) if step > 0 else range(k, len(pool)))
    seqs = [[(st + step * i) % len(pool) for i in range(k + 1)] for st in starts]
    seqs = [idx for idx in seqs if all(pool[i] in usable for i in idx)]
    if not seqs:
        raise TaskError(f"task {name!r}: no sequence of {k + 1} members is single-token for this tokenizer")
    clean, corrupted, answers, wrong, positions = [], [], [], [], None
    for i in range(n):
        idx = rng.choice(seqs)
        members = [pool[j] for j in idx[:k]]
        bad = _corrupt(rng, members, sorted(usable), corruption)
        slot_words = [rng.choice(words) for _ in members] if words else [""] * k
        text, upto = _render(t, members, slot_words)
        pos = _positions(tokenizer, text, upto)
        if positions is not None and pos != positions:
            raise TaskError(f"task {name!r}, template {t.name!r}, prompt {i} {text!r}: members sit at {pos}, "
                            f"but prompt 0 has them at {positions}; a member or word splits differently here")
        positions = pos
        clean.append(text)
        corrupted.append(_render(t, bad, slot_words)[0])
        answers.append(t.answer_prefix + pool[idx[k]])
        wrong.append(t.answer_prefix + members[-1])
    return build_task(name, tokenizer, clean, corrupted, answers, wrong, positions,
                      {"template": template, "template_name": t.name, "seed": seed, "corruption": corruption,
                       "builtin": name})


def _register_sequence(name: str, description: str) -> None:
    register(name, description, templates=len(SEQ_TEMPLATES[name]))(
        lambda tokenizer, **kw: sequence_task(name, tokenizer, **kw))


_register_sequence("digits", "increasing numerals: '3 4 5 6 ' -> '7'")
_register_sequence("decreasing", "decreasing numerals: 'Count down: 9, 8, 7, 6, ' -> '5'")
_register_sequence("number-words", "number words: 'one, two, three, four,' -> ' five'")
_register_sequence("months", "months: 'March, April, May, June,' -> ' July'")
_register_sequence("days", "days of the week: 'Monday, Tuesday, Wednesday, Thursday,' -> ' Friday'")
_register_sequence("letters", "letters: 'C, D, E, F,' -> ' G'")

# {c}{t}{u}: the start year's century (after the 1), tens and units digits; the prompt ends at the
# end year's century so the next token is its tens digit
GT_TEMPLATES = ["The war lasted from the year 1{c}{t}{u} to the year 1{c}",
                "The contract ran from 1{c}{t}{u} until 1{c}",
                "The expedition lasted from the year 1{c}{t}{u} to the year 1{c}",
                "The drought lasted from the year 1{c}{t}{u} to the year 1{c}",
                "The siege lasted from the year 1{c}{t}{u} to the year 1{c}",
                "The king ruled from the year 1{c}{t}{u} to the year 1{c}",
                "The famine lasted from the year 1{c}{t}{u} to the year 1{c}",
                "The company traded from 1{c}{t}{u} until 1{c}"]


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
                      {"template": template, "template_name": f"gt-{template}", "seed": seed,
                       "corruption": corruption, "builtin": "greater-than"})


NAMES = ["Mary", "John", "Tom", "James", "Anna", "Paul", "Kate", "Mark", "Sarah", "David", "Laura", "Peter"]
# {A} and {B} are the two names introduced (in random order: ABBA or BABA), {S} the subject named again;
# the prompt ends where the indirect object (the other name) comes next. In the style of the IOI paper.
IOI_TEMPLATES = ["When {A} and {B} went to the store, {S} gave a drink to",
                 "Then, {A} and {B} had a long argument, and afterwards {S} said to",
                 "After {A} and {B} went to the park, {S} handed a ball to",
                 "While {A} and {B} were cooking in the kitchen, {S} passed the salt to",
                 "Then, {A} and {B} went to the library. {S} gave a book to",
                 "When {A} and {B} arrived at the party, {S} offered a cake to",
                 "Yesterday {A} and {B} visited the museum, and {S} showed a painting to",
                 "After the meeting, {A} and {B} stayed in the office. {S} sent an email to",
                 "While {A} and {B} were walking to the station, {S} lent an umbrella to",
                 "Once {A} and {B} got to the beach, {S} threw the ball to",
                 "Later, {A} and {B} sat down at the restaurant, and {S} passed the menu to",
                 "When {A} and {B} finished the game, {S} gave the trophy to",
                 "After dinner, {A} and {B} went for a walk, and {S} told a story to",
                 "On Monday, {A} and {B} went to the market, and {S} sold a basket to",
                 "After school, {A} and {B} played in the garden. {S} gave a flower to"]


@register("ioi", "indirect object: 'When Mary and John went to the store, John gave a drink to' -> ' Mary'",
          templates=len(IOI_TEMPLATES))
def ioi(tokenizer, n: int = 24, seed: int = 0, template: int = 0, corruption: str = "abc") -> Task:
    """Answer the indirect object (the name said once), wrong answer the subject (said twice).
    Corruptions: 'abc' (the repeated name becomes a third name) or 'random' (all three random)."""
    t = IOI_TEMPLATES[_template("ioi", template, len(IOI_TEMPLATES))]
    if corruption not in ("abc", "random"):
        raise TaskError(f"unknown corruption {corruption!r} for ioi: use abc or random")
    # names follow a space in every template (none starts with a name), so only " Name" must be one token
    names = [m for m in NAMES if len(tokenizer(" " + m, add_special_tokens=False)["input_ids"]) == 1]
    rng = random.Random(f"ioi:{seed}:{template}:{corruption}")
    clean, corrupted, answers, wrong = [], [], [], []
    for _ in range(n):
        io, s, c, d, e = rng.sample(names, 5)
        a, b = (io, s) if rng.random() < 0.5 else (s, io)
        clean.append(t.format(A=a, B=b, S=s))
        corrupted.append(t.format(A=a, B=b, S=c) if corruption == "abc" else t.format(A=c, B=d, S=e))
        answers.append(" " + io)
        wrong.append(" " + s)
    return build_task("ioi", tokenizer, clean, corrupted, answers, wrong, _ioi_positions(tokenizer, t),
                      {"template": template, "template_name": f"ioi-{template}", "seed": seed,
                       "corruption": corruption, "builtin": "ioi"})


def _ioi_positions(tokenizer, t: str) -> dict[str, int]:
    """Token positions of the first name (A), the second (B) and the repeated subject (S2); names are
    single tokens, so they hold for every prompt of the template."""
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])
    fill = {"A": NAMES[0], "B": NAMES[1], "S": NAMES[1]}
    upto = lambda key: t[: t.index("{" + key + "}")].format(**fill) + fill[key]
    return {"A": count(upto("A")) - 1, "B": count(upto("B")) - 1, "S2": count(upto("S")) - 1, "end": -1}


def templates(name: str) -> list[TemplateInfo]:
    """The templates of built-in task `name` in order (index i is `template=i`)."""
    if name in SEQ_TEMPLATES:
        step = -1 if name == "decreasing" else 1
        pool = SEQ_MEMBERS[name]
        start = {"digits": 1, "decreasing": 9, "number-words": 1, "months": 2, "days": 0, "letters": 2}[name]
        pool = pool[start:] + pool[:start] if step > 0 else pool[: start + 1][::-1]
        return [TemplateInfo(i, t.name, t.kind, t.pattern(pool, 1)) for i, t in enumerate(SEQ_TEMPLATES[name])]
    if name == "ioi":
        return [TemplateInfo(i, f"ioi-{i}", "sentence", t + "|") for i, t in enumerate(IOI_TEMPLATES)]
    if name == "greater-than":
        return [TemplateInfo(i, f"gt-{i}", "sentence", t + "|") for i, t in enumerate(GT_TEMPLATES)]
    known = [k for k in TASKS if k in SEQ_TEMPLATES or k in ("ioi", "greater-than")]
    raise TaskError(f"{name!r} is not a built-in task with templates; built-in tasks: {', '.join(known)}")
