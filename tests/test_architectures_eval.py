"""The evaluator's semantics on a bidirectional model and a parallel-block (GPT-NeoX) model, and the
load-time check that refuses an engine which does not reproduce the bridge."""
import dataclasses
import random

import pytest
import torch

from circuitsearch.models import Model, ModelError
from circuitsearch.patching import Evaluator
from circuitsearch.reference import hooked_score
from conftest import random_task
from test_engine_features import hf_model, native

TOL = 1e-4


@pytest.fixture(scope="module", params=["bidirectional", "parallel"])
def arch_model(request):
    if request.param == "bidirectional":
        return native(attention_dir="bidirectional")
    return Model.from_hf(hf_model("neox-parallel"), name="tiny-neox")


def plain_logit_diff(model, task):
    with torch.no_grad():
        logits = model.bridge(task.clean)[:, -1]
    return float((logits.gather(1, task.answers[:, None]) - logits.gather(1, task.wrong_answers[:, None])).mean())


def test_full_score_is_the_models_own(arch_model):
    task = random_task(64, seed=3)
    ev = Evaluator(arch_model, task)
    assert abs(ev.full - plain_logit_diff(arch_model, task)) < TOL
    assert abs(ev.score() - hooked_score(arch_model, task)) < TOL
    assert abs(ev.corrupted - plain_logit_diff(arch_model, dataclasses.replace(task, clean=task.corrupted))) < TOL
    assert abs(ev.empty - hooked_score(arch_model, task, nodes=ev.senders)) < TOL
    assert abs(ev.empty - ev.full) > 1e-3


def test_node_ablation_equals_removing_its_out_edges(arch_model):
    task = random_task(64, seed=4)
    ev = Evaluator(arch_model, task)
    moved = 0
    for node in ("embed", "a0.1", "m0", "a1.3"):
        edges = [e for e in ev.graph.edges if e.split("->")[0] == node]
        by_node, by_edges = ev.score(nodes=[node]), ev.score(edges=edges)
        moved += abs(by_node - ev.full) > 1e-3
        assert abs(by_node - by_edges) < TOL, node
    assert moved >= 3


def test_nodes_and_edges_match_hooked_reference(arch_model):
    task = random_task(64, seed=5)
    ev = Evaluator(arch_model, task)
    rng = random.Random(0)
    for k in (1, 3):
        nodes = rng.sample(ev.senders, k)
        assert abs(ev.score(nodes=nodes) - hooked_score(arch_model, task, nodes=nodes)) < TOL, nodes
    # every kind of edge: into q/k/v (on the grouped-query model per query head), MLPs and the logits
    pool = ev.graph.edges
    changed = 0
    for frac in (0.05, 0.3):
        edges = rng.sample(pool, int(frac * len(pool)))
        fast = ev.score(edges=edges)
        changed += abs(fast - ev.full) > 1e-4
        assert abs(fast - hooked_score(arch_model, task, edges=edges)) < TOL
    assert changed


def test_parallel_graph_has_no_edges_from_a_layers_heads_into_its_mlp():
    m = Model.from_hf(hf_model("neox-parallel"), name="tiny-neox")
    ev = Evaluator(m, random_task(64, seed=6))
    assert ev.graph.parallel and ev.graph.signature()["parallel"] is True
    assert "a0.1->m0" not in ev.graph.edges and "a0.1->m1" in ev.graph.edges and "m0->m1" in ev.graph.edges
    assert [s for s in ev.graph.senders_into("m1")] == ["embed", "a0.0", "a0.1", "a0.2", "a0.3", "m0"]
    with pytest.raises(ValueError, match="does not feed"):
        ev.score(edges=["a1.0->m1"])


def test_mlp_gradient_is_the_bridges(arch_model):
    """receiver_gradients' MLP input gradient equals autograd through the bridge at the MLP's input
    hook (a parallel MLP reads the layer's input, so reading resid after attention would differ)."""
    task = random_task(64, n=4, seed=7)
    ev = Evaluator(arch_model, task)
    g = ev.receiver_gradients()["mlp"][1]
    hook = "blocks.1.ln2.hook_in"
    grads = {}

    def keep(t, hook):
        grads["x"] = t.detach().requires_grad_()
        return grads["x"]

    b = arch_model.bridge
    with torch.enable_grad():
        logits = b.run_with_hooks(task.clean, fwd_hooks=[(hook, keep)])[:, -1]
        ld = logits.gather(1, task.answers[:, None]) - logits.gather(1, task.wrong_answers[:, None])
        ld.mean().backward()
    assert len(ev.batch.tokens) == len(task)  # distinct prompts: the evaluator's rows are the task's
    assert float(g.abs().max()) > 1e-4
    assert torch.allclose(g, grads["x"].grad, atol=1e-5, rtol=1e-3)


def test_an_engine_that_differs_from_the_bridge_is_refused():
    """The issue's case: a bidirectional model scored with a causal mask. The load-time check names
    the largest difference and the config features."""
    from circuitsearch.engine import Engine

    m = native(attention_dir="bidirectional")
    engine = Engine(m)
    engine.w.causal = True  # what the evaluator silently did before
    with pytest.raises(ModelError, match=r"differ from the bridge's forward by up to .*attention_dir='bidirectional'"):
        Evaluator(m, random_task(64, seed=8), engine=engine)


def test_batched_search_on_these_models(arch_model):
    """Speculative batching (stacked circuits) on a bidirectional and a parallel-block model: every
    circuit of a batched pass scores as its own pass, and the search makes the sequential decisions."""
    from circuitsearch.algorithms.iterative import Thresholds, find_circuit
    from conftest import self_task

    ev = Evaluator(arch_model, self_task(arch_model, n=6, seed=2))
    rng = random.Random(3)
    base = ev.run(edges=rng.sample(range(len(ev.graph.edges)), len(ev.graph.edges) // 4))
    variants = [([], rng.sample(range(len(ev.graph.edges)), 2)), (["m0"], []), (["a1.0"], []), ([], [])]
    for (n, e), r in zip(variants, ev.extend_many(base, variants)):
        assert abs(r.score - ev.extend(base, nodes=n, edges=e).score) < TOL
    one = find_circuit(ev, "both", Thresholds(0.6, 0.1), "reverse", progress=False, batch=1)
    many = find_circuit(ev, "both", Thresholds(0.6, 0.1), "reverse", progress=False, batch=8)
    trace = lambda r: [(d.phase, d.pass_, d.candidate, d.removed) for d in r.decisions]
    assert trace(one) == trace(many) and 0 < sum(d.removed for d in one.decisions) < len(one.decisions)
