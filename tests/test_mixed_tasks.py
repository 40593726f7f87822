"""Tasks of mixed lengths, multi-token answers and metrics read at several positions (issue 14).

A mixed-length task is right-padded; with causal attention that is exact, so it must score what
its groups score alone, weighted by their prompts, for any circuit and ablation.
"""
import json

import pytest
import torch

from circuitsearch.algorithms.iterative import Thresholds, edge_candidates, find_circuit
from circuitsearch.catalogue import load_model
from circuitsearch.metrics import get_metric
from circuitsearch.patching import Evaluator
from circuitsearch.readout import make_readout
from circuitsearch.tasks.base import PAD, Task, TaskError, build_task, concat_tasks, load_task, pad
from circuitsearch.toys import induction_task
from conftest import random_task
from test_engine_features import native

TOL = 1e-5


def group_task(vocab: int, n: int, length: int, seed: int, name: str = "g") -> Task:
    """n random prompts of one length (no pad id 0 in them); answers any ids, wrong answer another."""
    return random_task(vocab, n, length, seed, low=1, name=name)


def mixed_parts(vocab: int):
    """Three groups: lengths 5, 8 and 5 again (a second template of the same length), one prompt repeated."""
    a = group_task(vocab, 4, 5, 1)
    a = a.subset([0, 1, 2, 3, 1])  # a repeated row: de-duplicated, weighted 2
    return [a, group_task(vocab, 3, 8, 2), group_task(vocab, 2, 5, 3)]


@pytest.fixture(scope="module", params=["test:tiny-llama", "test:tiny-gpt"])
def model(request):
    return load_model(request.param)


def circuits(ev):
    """Nothing removed, some nodes ablated, some edges removed, both."""
    nodes = [ev.senders[1], ev.senders[-2]]
    edges = [e for e in ev.index.edges if e.endswith("->logits") or ".k" in e][:6]
    return [((), ()), (nodes, ()), ((), edges), (nodes[:1], edges[2:])]


@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
def test_mixed_lengths_score_as_their_groups_alone(model, ablation):
    parts = mixed_parts(model.bridge.cfg.d_vocab)
    mixed = concat_tasks("mixed", parts)
    assert mixed.mixed and mixed.seq_len == 8 and mixed.lengths.tolist() == [5] * 5 + [8] * 3 + [5] * 2
    assert mixed.groups.tolist() == [0] * 5 + [1] * 3 + [2] * 2
    ev = Evaluator(model, mixed, ablation)
    alone = [Evaluator(model, p, ablation) for p in parts]
    n = torch.tensor([len(p) for p in parts], dtype=torch.float64)
    for nodes, edges in circuits(ev):
        want = float((torch.tensor([e.score(nodes, edges) for e in alone], dtype=torch.float64) * n).sum() / n.sum())
        got = ev.score(nodes, edges)
        assert abs(got - want) < TOL * max(1.0, abs(want)), (nodes, edges, got, want)
    # the same holds for the full model, the corrupted run and the empty circuit
    for key in ("full", "corrupted", "empty"):
        want = float(sum(getattr(e, key) * len(p) for e, p in zip(alone, parts)) / len(mixed))
        assert abs(getattr(ev, key) - want) < TOL * max(1.0, abs(want)), key


def test_padding_ids_do_not_matter(model):
    mixed = concat_tasks("mixed", mixed_parts(model.bridge.cfg.d_vocab))
    other = mixed.subset(range(len(mixed)))
    pad_cells = torch.arange(mixed.seq_len)[None] >= mixed.lengths[:, None]
    assert pad_cells.any()
    other.clean[pad_cells] = 7
    other.corrupted[pad_cells] = 11
    a, b = Evaluator(model, mixed), Evaluator(model, other)
    nodes = [a.senders[2]]
    assert abs(a.full - b.full) < TOL and abs(a.score(nodes) - b.score(nodes)) < TOL


def test_mean_ablation_averages_within_a_group(model):
    """Two groups of one length: each row's mean source is its own group's mean, not the task's."""
    parts = [group_task(model.bridge.cfg.d_vocab, 3, 6, 5), group_task(model.bridge.cfg.d_vocab, 3, 6, 6)]
    joined = concat_tasks("two", parts)
    assert not joined.mixed
    ev = Evaluator(model, joined, "mean")
    alone = Evaluator(model, parts[1], "mean")
    assert torch.allclose(ev.source.embed[3:], alone.source.embed.expand(3, -1, -1), atol=1e-6)
    assert not torch.allclose(ev.source.embed[0], ev.source.embed[3], atol=1e-3)
    # one group: the shared source of old, one row broadcast to every prompt
    assert Evaluator(model, parts[0], "mean").source.embed.shape[0] == 1


def test_bidirectional_model_refuses_mixed_lengths():
    model = native(attention_dir="bidirectional")
    mixed = concat_tasks("mixed", mixed_parts(model.bridge.cfg.d_vocab))
    with pytest.raises(ValueError, match="attends bidirectionally.*split the task by length"):
        Evaluator(model, mixed)
    Evaluator(model, mixed_parts(model.bridge.cfg.d_vocab)[1])  # one length is fine


# ---------------------------------------------------------------- multi-token answers


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_token_answer_logprob_is_the_teacher_forced_value(model, tmp_path):
    """logprob = log p(a0 | prompt) + log p(a1 | prompt a0), from the bridge's own forward."""
    rows = [{"clean": [3, 9, 4, 1], "corrupted": [5, 2, 8, 1], "answer": [12, 30], "wrong_answer": [12, 31]},
            {"clean": [7, 7, 2], "corrupted": [6, 1, 2], "answer": [20, 21], "wrong_answer": [22]},
            {"clean": [4, 5, 6, 7, 8], "corrupted": [9, 9, 9, 9, 9], "answer": 40, "wrong_answer": 41}]
    task = load_task(write_jsonl(tmp_path / "two.jsonl", rows), None)
    # the default cuts at the first differing token: the shared first token is fed to both prompts
    assert task.fed == [1, 0, 0] and task.answers.tolist() == [30, 20, 40] and task.wrong_answers.tolist() == [31, 22, 41]
    assert task.lengths.tolist() == [5, 3, 5] and task.clean[0].tolist() == [3, 9, 4, 1, 12]
    assert task.corrupted[0].tolist() == [5, 2, 8, 1, 12]
    ev = Evaluator(model, task, metric="logprob")
    hand = []
    for r in rows:
        ans = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        fed = torch.tensor([r["clean"] + ans[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model.bridge(fed)[0].float(), -1)
        start = len(r["clean"])
        hand.append(sum(float(logp[start - 1 + j, t]) for j, t in enumerate(ans)))
    assert abs(ev.full - sum(hand) / len(hand)) < TOL
    assert ev.faithfulness(ev.full) == pytest.approx(1.0) and ev.faithfulness(ev.empty) == pytest.approx(0.0)
    # the default metric reads the first differing token after the fed prefix
    ld = Evaluator(model, task)
    with torch.no_grad():
        logits = model.bridge(torch.tensor([rows[0]["clean"] + [12]]))[0, -1]
    assert ld.clean_run.per_prompt[0] == pytest.approx(float(logits[30] - logits[31]), abs=TOL)
    assert Task.from_json(json.loads(json.dumps(task.to_json()))).answer_ids == task.answer_ids
    # the saved task is the one given, not the teacher-forced one the evaluator runs
    assert ev.task is task and ev.run_task.lengths.tolist() == [5, 4, 5]  # row 1: its answer's first token fed


def test_logprob_of_one_token_answers_is_the_answers_log_probability(model):
    task = group_task(model.bridge.cfg.d_vocab, 4, 6, 9)
    ev = Evaluator(model, task, metric="logprob")
    with torch.no_grad():
        logp = torch.log_softmax(model.bridge(task.clean)[:, -1].float(), -1)
    assert ev.full == pytest.approx(float(logp.gather(1, task.answers[:, None]).mean()), abs=TOL)


@pytest.mark.parametrize("answer, wrong, message", [
    ([5, 6], [5, 6], "is the same tokens as the wrong answer"),
    ([5], [5, 6], "is a prefix of the wrong answer"),
    ([5, 6, 7], [5, 6], "begins with the wrong answer"),
])
def test_ambiguous_multi_token_answers_are_rejected(tmp_path, answer, wrong, message):
    path = write_jsonl(tmp_path / "t.jsonl", [{"clean": [1, 2], "corrupted": [3, 4], "answer": answer,
                                               "wrong_answer": wrong}])
    with pytest.raises(TaskError, match=message):
        load_task(path, None)


# ---------------------------------------------------------------- text tasks (tokenizer only)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from circuitsearch.models import smollm2_gguf_path
    p = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def test_text_task_of_mixed_lengths_and_two_token_answers(tok, tmp_path):
    rows = [{"clean": "1 2 3 4 ", "corrupted": "7 2 9 1 ", "answer": "5", "wrong_answer": "4", "template": "short"},
            {"clean": "The capital of France is", "corrupted": "The capital of Spain is",
             "answer": " San Francisco", "wrong_answer": " San Diego", "template": "long"}]
    task = load_task(write_jsonl(tmp_path / "t.jsonl", rows), tok)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    assert task.groups.tolist() == [0, 1] and task.meta["groups"] == ["short", "long"]
    assert task.lengths.tolist() == [len(enc("1 2 3 4 ")), len(enc("The capital of France is")) + 1]
    assert task.fed == [0, 1] and task.answer_ids[1] == enc(" San Francisco")
    assert int(task.answers[1]) == enc(" Francisco")[0] and int(task.wrong_answers[1]) == enc(" Diego")[0]
    assert task.clean[0, task.lengths[0]:].eq(PAD).all()


def test_answer_that_splits_differently_after_clean_and_corrupted_is_rejected(tok):
    # ' go' + 'ing' merges into ' going'; ' at' + 'ing' does not
    with pytest.raises(TaskError, match="splits as merged with the prompt's last token into.*after the clean prompt "
                                        "but \\['ing', ' well'\\] after the corrupted one"):
        build_task("t", tok, ["I was go"], ["I was at"], ["ing well"], ["ed"])


def test_template_all_joins_the_templates(tok):
    from circuitsearch.tasks import get_task
    from circuitsearch.tasks.base import TEMPLATES
    T = TEMPLATES["digits"]
    n = 2 * T + 1  # the first template gets the odd prompt
    t = get_task("digits", tok, n=n, seed=1, template="all")
    share = [3] + [2] * (T - 1)
    parts = [get_task("digits", tok, n=k, seed=1, template=i) for i, k in enumerate(share)]
    assert len(t) == n and t.groups.tolist() == [i for i, k in enumerate(share) for _ in range(k)]
    assert t.meta["template"] == "all" and len(set(t.lengths.tolist())) > 1  # the templates differ in length
    assert torch.equal(t.clean[:3, : parts[0].seq_len], parts[0].clean)
    assert t.lengths.tolist() == [p.seq_len for p, k in zip(parts, share) for _ in range(k)]
    assert t.positions["end"] == [p.seq_len - 1 for p, k in zip(parts, share) for _ in range(k)]
    with pytest.raises(TaskError, match=f"--n-prompts {T} or more"):
        get_task("digits", tok, n=T - 1, template="all")


# ---------------------------------------------------------------- task files and schema


def test_bad_token_id_files(tmp_path):
    bad = write_jsonl(tmp_path / "b.jsonl", [{"clean": [1, 2, 3], "corrupted": [3, 4, 5], "answer": 1, "wrong_answer": 2},
                                             {"clean": [1, 2], "corrupted": [3, 4, 5], "answer": 1, "wrong_answer": 2}])
    with pytest.raises(TaskError, match="prompt 2: clean is 2 token ids but corrupted is 3.*must align token by token"):
        load_task(bad, None)
    some = write_jsonl(tmp_path / "s.jsonl", [{"clean": [1, 2], "corrupted": [3, 4], "answer": 1, "wrong_answer": 2,
                                               "group": "a"},
                                              {"clean": [1, 2, 3], "corrupted": [3, 4, 5], "answer": 1, "wrong_answer": 2}])
    with pytest.raises(TaskError, match="prompt 2 has no template/group but others do"):
        load_task(some, None)


def test_task_json_schema(tmp_path):
    plain = group_task(50, 3, 4, 0)
    assert plain.to_json()["schema"] == "circuitsearch.task/1"  # old readers still read plain tasks
    mixed = concat_tasks("m", mixed_parts(50))
    d = json.loads(json.dumps(mixed.to_json()))
    assert d["schema"] == "circuitsearch.task/2"
    back = Task.from_json(d)
    assert torch.equal(back.lengths, mixed.lengths) and torch.equal(back.groups, mixed.groups)
    assert torch.equal(back.clean, mixed.clean)
    old = plain.to_json()  # a schema-1 file of before (no lengths or groups) loads as one full-length group
    old.pop("lengths", None)
    again = Task.from_json(old)
    assert again.lengths.tolist() == [4, 4, 4] and again.groups.tolist() == [0, 0, 0]


# ---------------------------------------------------------------- positions


def test_positions_all_reads_where_clean_and_corrupted_continue_differently():
    task = induction_task(n=4, k=5, seed=1)
    _, r = make_readout(task, get_metric("logit_diff"), "all")
    # positions 5..8 predict the repeated tokens (corrupted: fresh ones), position 9 the answer
    assert r.pos[0].tolist() == [5, 6, 7, 8, 9] and r.valid.all()
    assert r.target[0, :4].tolist() == task.clean[0, 6:10].tolist() and r.target[0, 4] == task.answers[0]
    assert r.wrong[0, :4].tolist() == task.corrupted[0, 6:10].tolist()
    _, r = make_readout(task, get_metric("kl"), "all")
    assert r.pos[0].tolist() == list(range(10))  # KL: every position
    _, r = make_readout(task, get_metric("prob"), "S2,end")
    assert r.pos[:, 0].tolist() == [3] * 4 and r.pos[:, 1].tolist() == [9] * 4
    with pytest.raises(TaskError, match="no position named 'S7'"):
        make_readout(task, get_metric("prob"), "S7")
    with pytest.raises(TaskError, match="same token, so the logit difference there is 0"):
        make_readout(task, get_metric("logit_diff"), "S2")
    with pytest.raises(ValueError, match="logprob.*positions last only"):
        make_readout(task, get_metric("logprob"), "all")


@pytest.fixture(scope="module")
def induction():
    return load_model("induction-2l")


def test_per_position_metric_finds_the_induction_circuit(induction):
    """Scored at every repeated position (teacher forced), pruning keeps the previous-token head a0.2
    and an induction head in layer 1 that reads it through its key."""
    task = induction_task(n=24, k=10, seed=0)
    ev = Evaluator(induction, task, "mean", positions="all")
    assert ev.readout.valid.sum(1).tolist() == [10] * 24  # positions 10..18 and the answer
    assert ev.full > 5 and ev.faithfulness(ev.corrupted) < 0.1
    result = find_circuit(ev, "both", Thresholds(0.8), "alternate", progress=False)
    kept = [n for n in ev.senders if n not in result.ablated]
    edges = edge_candidates(ev, result.run)
    assert "a0.2" in kept
    induction_heads = [n for n in kept if n.startswith("a1.") and f"a0.2->{n}.k" in edges]
    assert induction_heads, (kept, edges)
    assert ev.faithfulness(ev.rescore(result.run)) >= 0.8


def test_attribution_over_positions_ranks_the_induction_heads_first(induction):
    from circuitsearch.algorithms.attribution import attribute
    task = induction_task(n=12, k=10, seed=0)
    ev = Evaluator(induction, task, "mean", positions="all")
    g = ev.receiver_gradients()
    assert g["logits"].shape == (len(task), task.seq_len, induction.d_model)
    assert g["logits"][:, :10].abs().max() == 0  # positions no readout reads get no gradient
    a = attribute(ev, method="eap-ig", steps=3)
    top = a.top("nodes", 3)
    assert "a0.2" in top and any(n.startswith("a1.") for n in top), top


@pytest.mark.parametrize("metric", ["kl", "l2"])
def test_distance_metrics_over_positions(model, metric):
    task = group_task(model.bridge.cfg.d_vocab, 5, 6, 4)
    ev = Evaluator(model, task, metric=metric, positions="all")
    assert ev.full == pytest.approx(0.0, abs=1e-5) and ev.empty > 0
    assert ev.faithfulness(ev.empty) == pytest.approx(0.0)
    summed = Evaluator(model, task, metric=metric, positions="all", reduce="sum")
    assert summed.empty == pytest.approx(ev.empty * 6, rel=1e-5)  # six positions each
    if metric == "l2":
        with torch.no_grad():
            full = model.bridge(task.clean).float()
            corrupt = model.bridge(task.corrupted).float()
        assert ev.corrupted == pytest.approx(float((corrupt - full).norm(dim=-1).mean()), rel=1e-4)


def test_last_position_readout_is_the_old_one(model):
    """positions=all restricted by hand to the last position equals the default readout."""
    task = group_task(model.bridge.cfg.d_vocab, 5, 6, 8)
    ev = Evaluator(model, task)
    assert ev.readout.last_only and ev.batch.pos is None
    named = Evaluator(model, Task(task.name, task.clean, task.corrupted, task.answers, task.wrong_answers,
                                  task.clean_text, task.corrupted_text, task.answer_text, task.wrong_text,
                                  {"end": -1}), positions="end")
    assert not named.readout.last_only
    nodes = [ev.senders[3]]
    assert abs(named.full - ev.full) < TOL and abs(named.score(nodes) - ev.score(nodes)) < TOL


def test_batched_extensions_on_a_mixed_task_equal_single_ones(model):
    """extend_many stacks circuits along the batch; per-row mean sources must tile with them."""
    mixed = concat_tasks("mixed", mixed_parts(model.bridge.cfg.d_vocab))
    ev = Evaluator(model, mixed, "mean", positions="all", metric="prob")
    base = ev.run([ev.senders[1]])
    variants = [([s], ()) for s in ev.senders[2:6]] + [((), [e]) for e in ev.index.edges[-3:]]
    many = ev.extend_many(base, variants)
    for (nodes, edges), run in zip(variants, many):
        one = ev.extend(base, nodes, edges)
        assert abs(run.score - one.score) < TOL and abs(run.score - ev.rescore(run)) < TOL


def test_cli_reads_the_metric_where_told(capsys):
    from circuitsearch.cli import main
    assert main(["score", "--model", "induction-2l", "--task", "induction", "--positions", "all"]) == 0
    out = json.loads(capsys.readouterr().out)
    ev = Evaluator(load_model("induction-2l"), induction_task(n=24, seed=0), positions="all")
    assert out["full"] == pytest.approx(ev.full, abs=1e-6) and out["corrupted"] == pytest.approx(ev.corrupted, abs=1e-6)
    assert main(["score", "--model", "induction-2l", "--task", "induction", "--positions", "S99"]) == 2
    assert "no position named 'S99'" in capsys.readouterr().err
    assert main(["score", "--model", "induction-2l", "--task", "induction", "--metric", "logprob",
                 "--positions", "all"]) == 2
    assert "positions last only" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses it
        main(["score", "--model", "induction-2l", "--task", "induction", "--template", "first"])
    assert "'first' is not a template number (0, 1, ...) or all" in capsys.readouterr().err


@pytest.mark.slow
def test_two_token_text_answers_on_the_embedded_model(smollm2):
    """' San Francisco' vs ' San Diego' after a prompt: logprob is the teacher-forced total from the
    bridge's plain forward, the default reads ' Francisco' vs ' Diego' after '... San'."""
    tok = smollm2.tokenizer
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]
    clean = ["The Golden Gate Bridge is in the city of", "The bridge I saw last year is in"]
    corrupted = ["The Golden Gate Tower is in the city of", "The bridge I saw last week is in"]
    task = build_task("cities", tok, clean, corrupted, [" San Francisco"] * 2, [" San Diego"] * 2,
                      groups=["a", "b"])
    assert task.mixed and task.fed == [1, 1]
    ev = Evaluator(smollm2, task, metric="logprob")
    hand, diffs = [], []
    for c in clean:
        p, a = enc(c), enc(" San Francisco")
        with torch.no_grad():
            logp = torch.log_softmax(smollm2.bridge(torch.tensor([p + a[:-1]]))[0].float(), -1)
        hand.append(sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a)))
        with torch.no_grad():
            last = smollm2.bridge(torch.tensor([p + a[:1]]))[0, -1]
        diffs.append(float(last[enc(" Francisco")[0]] - last[enc(" Diego")[0]]))
    assert ev.full == pytest.approx(sum(hand) / 2, abs=1e-4)
    assert Evaluator(smollm2, task).full == pytest.approx(sum(diffs) / 2, abs=1e-4)
