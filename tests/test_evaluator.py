"""The evaluator against the plain model and a naive TransformerLens hooked forward."""
import dataclasses
import random

import pytest
import torch

from circuitsearch.patching import ABLATIONS, Evaluator
from circuitsearch.reference import hooked_score
from conftest import random_task

TOL = 1e-4


def plain_logit_diff(model, task):
    with torch.no_grad():
        logits = model.bridge(task.clean)[:, -1]
    return float((logits.gather(1, task.answers[:, None]) - logits.gather(1, task.wrong_answers[:, None])).mean())


def out_edges(ev, node):
    return [e for e in ev.graph.edges if e.split("->")[0] == node]


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_nothing_ablated_equals_plain_forward(test_model, ablation):
    task = random_task(test_model.bridge.cfg.d_vocab)
    ev = Evaluator(test_model, task, ablation)
    assert abs(ev.full - plain_logit_diff(test_model, task)) < TOL
    assert abs(ev.score(nodes=[], edges=[]) - hooked_score(test_model, task, ablation)) < TOL
    # the baselines faithfulness and normalized divide by, each against its own independent value
    assert abs(ev.corrupted - plain_logit_diff(test_model, dataclasses.replace(task, clean=task.corrupted))) < TOL
    assert abs(ev.empty - hooked_score(test_model, task, ablation, nodes=ev.senders)) < TOL
    assert abs(ev.empty - ev.full) > 1e-3


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_nodes_match_hooked_reference(test_model, ablation):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=1)
    ev = Evaluator(test_model, task, ablation)
    rng = random.Random(0)
    changed = 0
    for k in (1, 3, len(ev.senders) // 2):
        nodes = rng.sample(ev.senders, k)
        fast = ev.score(nodes=nodes)
        changed += abs(fast - ev.full) > 1e-3
        assert abs(fast - hooked_score(test_model, task, ablation, nodes=nodes)) < TOL, nodes
    assert changed >= 2  # the sets tested really change the score


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_edges_match_hooked_reference(test_model, ablation):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=2)
    ev = Evaluator(test_model, task, ablation)
    rng = random.Random(1)
    # Zero-ablating 70% of edges leaves LayerNorm inputs near zero, where float32 rounding in the
    # two summation orders is amplified (the two paths agree to 3e-8 in float64): stop at 30%.
    for frac in (0.05, 0.3, 0.7) if ablation != "zero" else (0.05, 0.15, 0.3):
        edges = rng.sample(ev.graph.edges, int(frac * len(ev.graph.edges)))
        nodes = rng.sample(ev.senders, 2) if frac >= 0.3 else []
        fast = ev.score(nodes=nodes, edges=edges)
        assert abs(fast - ev.full) > 1e-4 or frac < 0.1  # the larger sets really change the score
        assert abs(fast - hooked_score(test_model, task, ablation, nodes=nodes, edges=edges)) < TOL


def grouped_uniform(edges, n_heads, n_kv):
    """Extend k/v edges to every query head sharing the key/value head, as the hooked path needs."""
    rep, out = n_heads // n_kv, set()
    for e in edges:
        s, r = e.split("->")
        if r[-2:] in (".k", ".v"):
            node, inp = r.rsplit(".", 1)
            layer, head = node[1:].split(".")
            g = int(head) // rep
            out.update(f"{s}->a{layer}.{h}.{inp}" for h in range(g * rep, (g + 1) * rep))
        else:
            out.add(e)
    return sorted(out)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_grouped_query_edges_match_hooked_reference(ablation):
    """Under grouped-query attention an edge into a k or v receiver is per query head: removed for a1.0.k
    alone it is another circuit than removed for the whole key/value group, and the reference (one copy of
    the prompts per query head of a group) agrees with the evaluator on both."""
    from circuitsearch.catalogue import load_model
    model = load_model("test:tiny-llama")
    assert model.n_kv_heads < model.n_heads
    task = random_task(model.bridge.cfg.d_vocab, seed=3)
    ev = Evaluator(model, task, ablation)
    rng = random.Random(2)
    for edges in (rng.sample(ev.graph.edges, 80),
                  grouped_uniform(rng.sample(ev.graph.edges, 80), model.n_heads, model.n_kv_heads)):
        fast = ev.score(edges=edges)
        assert abs(fast - ev.full) > 1e-3
        assert abs(fast - hooked_score(model, task, ablation, edges=edges)) < TOL
    for receiver in ("a1.0.k", "a2.3.v"):
        one = [e for e in ev.graph.edges if e.endswith(receiver)]
        group = grouped_uniform(one, model.n_heads, model.n_kv_heads)
        alone, whole = ev.score(edges=one), ev.score(edges=group)
        assert abs(alone - whole) > 1e-4, receiver  # one query head's k/v is not its group's
        assert abs(alone - hooked_score(model, task, ablation, edges=one)) < TOL, receiver
        assert abs(whole - hooked_score(model, task, ablation, edges=group)) < TOL, receiver


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_node_ablation_equals_removing_its_out_edges(test_model, ablation):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=4)
    ev = Evaluator(test_model, task, ablation)
    for node in ["embed", ev.graph.heads(0)[1], ev.graph.layer_nodes(1)[-1], ev.graph.heads(ev.L - 1)[0]]:
        by_node, by_edges = ev.score(nodes=[node]), ev.score(edges=out_edges(ev, node))
        assert abs(by_node - by_edges) < TOL, node
    nodes = ev.graph.heads(0)[:2]
    assert abs(ev.score(nodes=nodes) - ev.score(edges=sum((out_edges(ev, n) for n in nodes), []))) < TOL


def test_chained_extension_equals_scoring_from_scratch(test_model):
    """The search hot path: extending a cached pruned run gives the same score as a fresh run."""
    task = random_task(test_model.bridge.cfg.d_vocab, seed=5)
    ev = Evaluator(test_model, task, "mean")
    rng = random.Random(3)
    run, nodes, edges = ev.run(), [], []
    for step in range(12):
        if step % 2:
            e = rng.choice(ev.graph.edges)
            edges.append(e)
            run = ev.extend(run, edges=[e])
        else:
            n = rng.choice(ev.senders)
            nodes.append(n)
            run = ev.extend(run, nodes=[n])
        fresh = Evaluator(test_model, task, "mean").score(nodes=nodes, edges=edges)
        assert abs(run.score - fresh) < TOL, (nodes, edges)


def test_incremental_edge_sums_equal_full_sums(test_model):
    """Extending a run with edges updates each receiver's summed edge delta instead of re-summing
    every removed sender: over a long chain (past REFRESH updates, with nodes ablated on the way)
    every candidate scores as the same circuit run afresh, and the incremental path is taken."""
    from circuitsearch.patching import REFRESH
    ev = Evaluator(test_model, random_task(test_model.bridge.cfg.d_vocab, seed=6), "mean")
    rng = random.Random(4)
    order = list(range(len(ev.graph.edges)))
    rng.shuffle(order)
    run, ages = ev.run(edges=order[: len(order) // 3]), []
    for step, e in enumerate(order[len(order) // 3:][: 3 * REFRESH]):
        cand = ev.extend(run, edges=[e])
        assert abs(cand.score - ev.rescore(cand)) < TOL, step
        ages += [age for _, _, age in cand.sums.values()]
        if step % 3:
            run = cand  # a kept removal: later candidates extend it
        if step % 25 == 24:
            run = ev.extend(run, nodes=[rng.choice(ev.senders[1:])])
    assert 0 in ages and 1 < max(ages) <= REFRESH


@pytest.mark.parametrize("metric", ["prob", "kl", "accuracy"])
def test_other_metrics_match_hooked_reference(test_model, metric):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=6)
    ev = Evaluator(test_model, task, "mean", metric=metric)
    nodes = ev.senders[1:4]
    assert abs(ev.score(nodes=nodes) - hooked_score(test_model, task, "mean", metric, nodes=nodes)) < TOL
    if metric == "kl":
        assert abs(ev.full) < 1e-5 and ev.faithfulness(ev.full) == pytest.approx(1.0)
        assert ev.faithfulness(ev.empty) == pytest.approx(0.0)


def test_scores_and_counts(test_model):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=7)
    ev = Evaluator(test_model, task, "mean")
    assert ev.faithfulness(ev.full) == pytest.approx(1.0)
    assert ev.normalized(ev.full) == pytest.approx(1.0) and ev.normalized(ev.empty) == pytest.approx(0.0)
    assert ev.empty == pytest.approx(ev.score(nodes=ev.senders))
    before = ev.stats()
    ev.extend(ev.run(), nodes=[ev.graph.heads(ev.L - 1)[0]])
    after = ev.stats()
    assert after["forward_passes"] == before["forward_passes"] + 1
    assert 0 < after["forward_equivalents"] - before["forward_equivalents"] < 1 / ev.L + 1e-9


def test_bad_inputs_are_rejected(test_model):
    task = random_task(test_model.bridge.cfg.d_vocab)
    with pytest.raises(ValueError, match="unknown ablation 'medium'"):
        Evaluator(test_model, task, "medium")
    with pytest.raises(ValueError, match="unknown metric 'loss'"):
        Evaluator(test_model, task, metric="loss")
    ev = Evaluator(test_model, task)
    with pytest.raises(ValueError, match="unknown node name 'head9'"):
        ev.score(nodes=["head9"])
    with pytest.raises(ValueError, match="not in this model"):
        ev.score(nodes=[f"a{ev.L + 5}.0"])
    with pytest.raises(ValueError, match="does not feed"):
        ev.score(edges=[f"a{ev.L - 1}.0->a0.0.q"])
    with pytest.raises(ValueError, match="logits node cannot be ablated"):
        ev.score(nodes=["logits"])
    bad = random_task(test_model.bridge.cfg.d_vocab)
    bad.clean[0, 0] = test_model.bridge.cfg.d_vocab + 3
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        Evaluator(test_model, bad)


# ---------------------------------------------------------------- the embedded model

@pytest.mark.slow
@pytest.mark.parametrize("ablation", ABLATIONS)
def test_smollm2_nothing_ablated_equals_plain_forward(smollm2, smollm2_digits, ablation):
    ev = Evaluator(smollm2, smollm2_digits, ablation)
    assert abs(ev.full - plain_logit_diff(smollm2, smollm2_digits)) < TOL
    assert ev.full > 1.0 and ev.corrupted < ev.full  # the model does the task, the corruption breaks it


@pytest.mark.slow
def test_smollm2_fast_path_matches_hooked_reference(smollm2, smollm2_digits):
    ev = Evaluator(smollm2, smollm2_digits, "mean")
    rng = random.Random(0)
    nodes = rng.sample(ev.senders, 25)
    assert abs(ev.score(nodes=nodes) - hooked_score(smollm2, smollm2_digits, "mean", nodes=nodes)) < TOL
    edges = rng.sample(ev.graph.edges, 400)  # k/v edges per query head (grouped-query attention)
    fast = ev.score(edges=edges)
    assert abs(fast - ev.full) > 1e-2
    assert abs(fast - hooked_score(smollm2, smollm2_digits, "mean", edges=edges)) < TOL
    node = "a20.3"
    assert abs(ev.score(nodes=[node]) - ev.score(edges=out_edges(ev, node))) < TOL


@pytest.mark.parametrize("ablation", ABLATIONS)
@pytest.mark.parametrize("metric", ["logit_diff", "kl"])
def test_repeated_prompts_run_once_and_score_as_the_plain_mean(test_model, ablation, metric):
    base = random_task(test_model.bridge.cfg.d_vocab, n=4, seed=5)
    # rows 0 and 2 repeat with their own corrupted prompts; row 1 repeats exactly
    task = base.subset([0, 1, 0, 2, 1, 3, 0, 2])
    task.corrupted[2] = base.corrupted[3]
    ev = Evaluator(test_model, task, ablation, metric)
    distinct = 4 if ablation != "resample" else 5
    assert ev.batch.tokens.shape[0] == distinct and float(ev.batch.weight.sum()) == len(task)
    rng = random.Random(3)
    nodes = rng.sample(ev.senders, 3)
    edges = rng.sample(ev.graph.edges, 8)
    fast = ev.score(nodes=nodes, edges=edges)
    assert abs(fast - ev.full) > 1e-4
    assert abs(fast - hooked_score(test_model, task, ablation, metric, nodes=nodes, edges=edges)) < TOL
    if metric == "logit_diff":  # the corrupted run still covers every row
        as_clean = dataclasses.replace(task, clean=task.corrupted)
        assert abs(ev.corrupted - plain_logit_diff(test_model, as_clean)) < TOL


@pytest.mark.slow
def test_smollm2_engine_reproduces_the_bridge_at_every_position(smollm2, smollm2_digits):
    """The load check's figure for the default model: measured 4.9e-6 of the logit scale (tolerance 1e-3)."""
    from circuitsearch.engine import Engine

    assert Engine(smollm2).check(smollm2_digits.clean) < 1e-4


def test_the_load_check_costs_one_bridge_forward(test_model):
    """Building an evaluator runs the bridge once (the check); a second evaluator sharing the engine and
    the prompts runs it no more."""
    from circuitsearch.engine import Engine

    calls = []
    handle = test_model.bridge.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        task = random_task(test_model.bridge.cfg.d_vocab, seed=9)
        engine = Engine(test_model)
        Evaluator(test_model, task, engine=engine)
        assert len(calls) == 1
        Evaluator(test_model, task, "zero", engine=engine)
        assert len(calls) == 1
    finally:
        handle.remove()
