"""Built-in tasks build aligned, deterministic prompts; bad input is refused with a clear message."""
import json

import pytest
import torch

from circuitsearch.tasks import TASKS, TaskError, build_task, get_task, load_task

CORRUPTIONS = {"greater-than": ["random", "nine"], "ioi": ["abc", "random"]}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    from circuitsearch.models import smollm2_gguf_path
    p = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("template", [0, 1])
def test_builtin_tasks_build_aligned(tok, name, template):
    for corruption in CORRUPTIONS.get(name, ["random", "shuffle"]):
        t = get_task(name, tok, n=8, seed=1, template=template, corruption=corruption)
        assert len(t) == 8 and t.clean.shape == t.corrupted.shape
        assert all(not torch.equal(a, b) for a, b in zip(t.clean, t.corrupted))
        assert all(len(tok(a, add_special_tokens=False)["input_ids"]) == 1 for a in t.answer_text)
        assert (t.answers != t.wrong_answers).all()
        again = get_task(name, tok, n=8, seed=1, template=template, corruption=corruption)
        assert again.clean_text == t.clean_text and torch.equal(again.corrupted, t.corrupted)
        other = get_task(name, tok, n=8, seed=2, template=template, corruption=corruption)
        assert other.clean_text != t.clean_text or other.corrupted_text != t.corrupted_text


def test_named_positions_point_at_members(tok):
    t = get_task("months", tok, n=4, seed=0)
    months = t.clean_text[0].removeprefix("Months: ").rstrip(",").split(", ")
    for i, m in enumerate(months):
        assert tok.decode(t.clean[0, t.positions[f"S{i}"]]).strip() == m
    assert t.positions["end"] == t.seq_len - 1


def test_sequence_answers_continue_the_sequence(tok):
    t = get_task("digits", tok, n=6, seed=3)
    for text, ans, wrong in zip(t.clean_text, t.answer_text, t.wrong_text):
        digits = [int(x) for x in text.split()]
        assert int(ans) == digits[-1] + 1 and int(wrong) == digits[-1]


@pytest.mark.parametrize("clean, corrupted, answer, wrong, message", [
    (["1 2 3 4 "], ["5 1 9 2 "], "10", "1", "begins with the wrong answer"),
    (["1 2 3 4 "], ["5 1 9 2 "], "1", "10", "is a prefix of the wrong answer"),
    (["1 2 3 4 "], ["5 1 9 2 "], "10", "10", "the same token"),
    (["1 2 3 4 "], ["5 1 9 "], "5", "4", "corrupted prompts must align"),
    ([], [], None, None, "is empty"),
    (["1 2 3 4 "], ["1 2 3 4 "], "5", "4", "identical to the clean one"),
    (["1 2 3 4 "], ["4 3 2 1 "], "5", "5", "the same token"),
])
def test_bad_input_is_rejected(tok, clean, corrupted, answer, wrong, message):
    n = len(clean)
    with pytest.raises(TaskError, match=message):
        build_task("mine", tok, clean, corrupted, [answer] * n, [wrong] * n)


def test_unknown_task_and_template(tok):
    with pytest.raises(TaskError, match="unknown task 'sums'.*digits"):
        get_task("sums", tok)
    with pytest.raises(TaskError, match="templates 0..10, not 99"):
        get_task("digits", tok, template=99)
    with pytest.raises(TaskError, match="unknown corruption"):
        get_task("digits", tok, corruption="melt")


def test_load_task_jsonl(tok, tmp_path):
    rows = [{"clean": "1 2 3 4 ", "corrupted": "7 2 9 1 ", "answer": "5", "wrong_answer": "4"},
            {"clean": "3 4 5 6 ", "corrupted": "3 1 8 2 ", "answer": "7", "wrong_answer": "6"}]
    good = tmp_path / "mine.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = load_task(good, tok)
    assert t.name == "mine" and len(t) == 2 and t.answer_text == ["5", "7"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"clean": "1 2 ", "answer": "3"}) + "\n")
    with pytest.raises(TaskError, match="bad.jsonl:1: missing corrupted, wrong_answer"):
        load_task(bad, tok)
    bad.write_text("{not json\n")
    with pytest.raises(TaskError, match="not valid JSON"):
        load_task(bad, tok)
    with pytest.raises(TaskError, match="does not exist"):
        load_task(tmp_path / "nope.jsonl", tok)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "number-words", "months", "decreasing"])
def test_filter_keeps_answered_prompts(smollm2, name):
    t = get_task(name, smollm2.tokenizer, n=24, model=smollm2)
    assert t.meta["n_kept"] == 24 and t.meta["n_generated"] == 72
    with torch.no_grad():
        clean = smollm2.bridge(t.clean)[:, -1]
        corrupt = smollm2.bridge(t.corrupted)[:, -1]
    assert (clean.argmax(-1) == t.answers).all()
    ld = lambda lg: (lg.gather(1, t.answers[:, None]) - lg.gather(1, t.wrong_answers[:, None])).mean()
    assert ld(clean) > ld(corrupt) + 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits", "decreasing"])
def test_default_template_gives_a_sound_baseline(smollm2, name):
    """decreasing's space-separated template gave a full logit difference of 1.82 with the empty circuit
    (0.275) above the corrupted run (0.241): both baselines near 15 % of the full score. The default
    template must put the full model far above both."""
    from circuitsearch.patching import Evaluator
    ev = Evaluator(smollm2, get_task(name, smollm2.tokenizer, n=24, model=smollm2), "mean")
    assert ev.full > 3 and max(ev.empty, ev.corrupted) < 0.1 * ev.full
