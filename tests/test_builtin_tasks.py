"""Every built-in task and template builds aligned prompts with the SmolLM2 tokenizer, and says what it claims:
sequences continue (down for decreasing), fillers and words sit between members, IOI answers the indirect object."""
import re

import pytest
import torch

from circuitsearch.tasks import TASKS, TaskError, get_task
from circuitsearch.tasks.builtin import (GT_TEMPLATES, IOI_TEMPLATES, SEQ_MEMBERS, SEQ_TEMPLATES, WORDS,
                                         templates)

BUILTIN = ["digits", "decreasing", "number-words", "months", "days", "letters", "greater-than", "ioi"]
CORRUPTIONS = {"greater-than": ["random", "nine"], "ioi": ["abc", "random"]}
ALL = [(name, info.index) for name in BUILTIN for info in templates(name)]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    from circuitsearch.models import smollm2_gguf_path
    p = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def ntok(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def members_of(tok, t, i):
    """The members of prompt i, read at its named positions S0, S1, ..."""
    k = sum(1 for p in t.positions if re.fullmatch(r"S\d+", p))
    return [tok.decode(t.clean[i, t.positions[f"S{j}"]]).strip() for j in range(k)]


def test_every_builtin_task_has_templates():
    assert set(BUILTIN) <= set(TASKS)
    assert len(templates("ioi")) == len(IOI_TEMPLATES) == 15
    assert len(templates("greater-than")) == len(GT_TEMPLATES) >= 6
    for name in SEQ_TEMPLATES:
        kinds = [info.kind for info in templates(name)]
        assert kinds.count("filler") >= 2 and kinds.count("among-words") >= 2, name
        shown = sorted(t.n_shown for t in SEQ_TEMPLATES[name] if t.kind in ("length", "plain"))
        assert shown[0] == 3 and shown[-1] == (6 if name == "days" else 8), name
        assert [info.index for info in templates(name)] == list(range(len(SEQ_TEMPLATES[name])))
        assert len({info.name for info in templates(name)}) == len(templates(name))


@pytest.mark.parametrize("name, template", ALL)
def test_template_builds_aligned(tok, name, template):
    for corruption in CORRUPTIONS.get(name, ["random", "shuffle"]):
        t = get_task(name, tok, n=12, seed=1, template=template, corruption=corruption)
        assert len(t) == 12 and t.meta["template"] == template
        assert t.meta["template_name"] == templates(name)[template].name
        assert {ntok(tok, c) for c in t.clean_text} == {ntok(tok, c) for c in t.corrupted_text} == {t.seq_len}
        assert all(ntok(tok, a) == 1 for a in t.answer_text + t.wrong_text)
        assert t.clean.shape == t.corrupted.shape and (t.answers != t.wrong_answers).all()
        differs = (t.clean != t.corrupted).any(0).nonzero()[:, 0].tolist()
        if name in SEQ_TEMPLATES:  # only members change; fillers and words stay
            members = {t.positions[p] for p in t.positions if p.startswith("S")}
            assert differs and set(differs) <= members
        elif name == "greater-than":  # only the start year's tens digit
            assert len(differs) == 1
        elif corruption == "abc":  # only the repeated subject
            assert differs == [t.positions["S2"]]
        again = get_task(name, tok, n=12, seed=1, template=template, corruption=corruption)
        assert again.clean_text == t.clean_text and again.corrupted_text == t.corrupted_text


@pytest.mark.parametrize("name, template", [(n, i) for n, i in ALL if n in SEQ_TEMPLATES])
def test_sequences_continue(tok, name, template):
    """Members at S0.. are consecutive (downwards for decreasing), the answer is the next, the wrong answer
    the last shown; the template shows as many members as it says."""
    t = get_task(name, tok, n=12, seed=2, template=template)
    pool, step = SEQ_MEMBERS[name], (-1 if name == "decreasing" else 1)
    n_shown = SEQ_TEMPLATES[name][template].n_shown
    for i in range(len(t)):
        shown = members_of(tok, t, i)
        assert len(shown) == n_shown
        idx = [pool.index(m) for m in shown]
        assert all((b - a) % len(pool) == step % len(pool) for a, b in zip(idx, idx[1:])), shown
        assert t.answer_text[i].strip() == pool[(idx[-1] + step) % len(pool)]
        assert t.wrong_text[i].strip() == shown[-1]
        assert len(set(shown + [t.answer_text[i].strip()])) == n_shown + 1  # never a member twice
        if name == "decreasing":
            assert [int(m) for m in shown] == list(range(int(shown[0]), int(shown[0]) - n_shown, -1))
            assert int(t.answer_text[i]) == int(shown[-1]) - 1


@pytest.mark.parametrize("name", sorted(SEQ_TEMPLATES))
def test_fillers_and_words_between_members(tok, name):
    for info in templates(name):
        spec = SEQ_TEMPLATES[name][info.index]
        t = get_task(name, tok, n=12, seed=0, template=info.index)
        if info.kind == "filler":
            assert spec.fillers
            for text in t.clean_text + t.corrupted_text:
                for word in spec.fillers:
                    assert text.split().count(word) + text.split().count(word + ",") >= spec.n_shown, (word, text)
        elif info.kind == "among-words":
            assert "{w}" in spec.item
            seen = set()
            for i in range(len(t)):
                # every member is followed by a word of WORDS, the same one in the corrupted prompt
                for j in range(spec.n_shown):
                    p = t.positions[f"S{j}"]
                    nxt = p + {"{m} {w}": 1, "{m}, {w}": 2, "{m} ({w})": 2}[spec.item]
                    word = tok.decode(t.clean[i, nxt]).strip()
                    assert word in WORDS and t.clean[i, nxt] == t.corrupted[i, nxt]
                    seen.add(word)
            assert len(seen) > 3  # the words vary
        else:
            assert not spec.fillers and "{w}" not in spec.item


def test_ioi_answer_is_the_indirect_object(tok):
    for template in range(len(IOI_TEMPLATES)):
        t = get_task("ioi", tok, n=16, seed=0, template=template)
        orders = set()
        for i, text in enumerate(t.clean_text):
            io, s = t.answer_text[i].strip(), t.wrong_text[i].strip()
            words = re.findall(r"[A-Za-z]+", text)
            assert words.count(io) == 1 and words.count(s) == 2, text
            a, b, s2 = (tok.decode(t.clean[i, t.positions[k]]).strip() for k in ("A", "B", "S2"))
            assert {a, b} == {io, s} and s2 == s and t.positions["S2"] > t.positions["B"] > t.positions["A"]
            orders.add("ABBA" if a == io else "BABA")
            assert text.endswith(" to")
        assert orders == {"ABBA", "BABA"}


def test_greater_than_answer_is_above_the_start(tok):
    for template in range(len(GT_TEMPLATES)):
        t = get_task("greater-than", tok, n=16, seed=0, template=template)
        for text, ans, wrong in zip(t.clean_text, t.answer_text, t.wrong_text):
            start = re.findall(r"1\d\d\d", text)[0]
            assert text.endswith(start[:2]) and int(ans) == int(start[2]) + 1 and int(wrong) == int(start[2]) - 1


def test_first_two_templates_unchanged(tok):
    """Earlier runs rebuild their prompts by seed and template: templates 0 and 1 keep their prompts
    (these are the prompts the built-ins made before they had more templates), except decreasing's
    template 0, which became template 2 when "Count down:" became the default."""
    assert get_task("digits", tok, n=2, seed=1).clean_text == ["2 3 4 5 ", "3 4 5 6 "]
    assert get_task("months", tok, n=1, seed=0).clean_text == ["Months: August, September, October, November,"]
    assert get_task("decreasing", tok, n=1, seed=0, template=2).clean_text == ["6, 5, 4, 3, "]  # was template 0
    assert get_task("decreasing", tok, n=1, seed=0).clean_text[0].startswith("Count down: ")
    assert get_task("ioi", tok, n=1, seed=0, template=1).clean_text == [
        "Then, Sarah and David had a long argument, and afterwards David said to"]


@pytest.mark.parametrize("bad", [99, -1, "every", 1.0, True])  # "all" is --template all
def test_unknown_template_rejected(tok, bad):
    n = len(templates("digits"))
    with pytest.raises(TaskError, match=rf"task 'digits' has templates 0\.\.{n - 1}, not {re.escape(repr(bad))}"):
        get_task("digits", tok, template=bad)
    with pytest.raises(TaskError, match=r"task 'ioi' has templates 0\.\.14"):
        get_task("ioi", tok, template=15)
    with pytest.raises(TaskError, match="not a built-in task with templates; built-in tasks: digits"):
        templates("sums")


def test_templates_describe_themselves():
    digits = templates("digits")
    assert digits[0].pattern == "1 2 3 4 |5" and digits[0].kind == "plain"
    assert templates("decreasing")[0].pattern == "Count down: 9, 8, 7, 6, |5"
    assert templates("months")[2].pattern == "in March, in April, in May, in June, in| July"
    assert templates("ioi")[0].pattern.endswith("gave a drink to|")


def test_cli_lists_the_templates(capsys):
    from circuitsearch.cli import main
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "14 ioi-14" in out and "among-words-comma" in out and "planted" in out
    assert "'in March, in April, in May, in June, in| July'" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN)
def test_default_templates_are_sound_on_smollm2(smollm2, name):
    """Template 0 of every built-in task: SmolLM2 answers at least 24 of 72 prompts and the full model is far
    above the corrupted run and the empty circuit (benchmarks/task_table.py measures every template)."""
    from circuitsearch.patching import Evaluator
    t = get_task(name, smollm2.tokenizer, n=24, model=smollm2)
    assert t.meta["n_kept"] == 24
    ev = Evaluator(smollm2, t, "mean")
    assert ev.full > 3 and max(ev.corrupted, ev.empty) < 0.2 * ev.full
