"""Attribution patching (EAP, EAP-IG) against exact patching."""
import pytest
import torch
from scipy.stats import spearmanr

from circuitsearch.algorithms.attribution import Attribution, attribute
from circuitsearch.catalogue import load_model
from circuitsearch.patching import ABLATIONS, Evaluator
from circuitsearch.toys import PLANTED_EDGES, PLANTED_NODES, planted_task
from conftest import self_task


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_edges_into_unnormalised_logits_are_exact(ablation):
    # test:tiny-attn has no normalisation: the logits are linear in their input, so the
    # first-order estimate of removing an edge into them is the exact effect
    model = load_model("test:tiny-attn")
    assert model.bridge.cfg.normalization_type is None
    ev = Evaluator(model, self_task(model, seed=3), ablation)
    a = attribute(ev, method="eap")
    into_logits = [e for e in ev.graph.edges if e.endswith("->logits")]
    exact = torch.tensor([ev.score(edges=[e]) - ev.full for e in into_logits])
    est = torch.tensor([a.edges[e] for e in into_logits])
    assert exact.abs().max() > 1e-3
    assert torch.allclose(est, exact, atol=1e-4), (est, exact)


@pytest.mark.parametrize("name", ["test:tiny-llama", "test:tiny-gpt"])
def test_rank_correlation_with_exact_node_and_edge_effects(name):
    model = load_model(name)
    ev = Evaluator(model, self_task(model, seed=0), "mean")
    exact_nodes = [ev.score(nodes=[n]) - ev.full for n in ev.senders]
    edges = ev.graph.edges[:: max(1, len(ev.graph.edges) // 80)]
    exact_edges = [ev.score(edges=[e]) - ev.full for e in edges]
    for method, floor_nodes in (("eap", 0.5), ("eap-ig", 0.6)):
        a = attribute(ev, method=method, steps=5)
        assert spearmanr([a.nodes[n] for n in ev.senders], exact_nodes)[0] >= floor_nodes, method
        assert spearmanr([a.edges[e] for e in edges], exact_edges)[0] >= 0.6, method


def test_planted_circuit_ranks_first():
    ev = Evaluator(load_model("test:planted"), planted_task(n=16), "mean")
    a = attribute(ev)
    planted = set(PLANTED_NODES) - {"logits"}
    assert set(a.top("nodes", len(planted))) == planted
    assert set(a.top("edges", len(PLANTED_EDGES))) == set(PLANTED_EDGES)
    assert a.ranking("nodes")[-1] in planted and a.ranking("nodes")[0] not in planted


def test_attribution_of_a_pruned_circuit_covers_only_what_is_left():
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, self_task(model), "mean")
    removed = [e for e in ev.graph.edges if e.endswith("->logits")][:3]
    run = ev.run(nodes=["a0.1", "m1"], edges=removed)
    a = attribute(ev, run, method="eap")
    assert "a0.1" not in a.nodes and "m1" not in a.nodes and set(a.nodes) == set(ev.senders) - {"a0.1", "m1"}
    assert not set(removed) & set(a.edges)
    assert not any(e.startswith(("a0.1->", "m1->")) or e.endswith(("->a0.1.q", "->m1")) for e in a.edges)
    for n in ("embed", "a1.0", "m0"):  # a node's estimate is the sum over its present out-edges
        assert a.nodes[n] == pytest.approx(sum(v for e, v in a.edges.items() if e.startswith(n + "->")), abs=1e-6)
    # a different circuit has different gradients
    assert a.nodes["embed"] != pytest.approx(attribute(ev, method="eap").nodes["embed"], abs=1e-6)


def test_eap_ig_with_one_step_is_eap_and_json_round_trips(tmp_path):
    model = load_model("test:tiny-gpt")
    ev = Evaluator(model, self_task(model), "resample")
    a, b = attribute(ev, method="eap"), attribute(ev, method="eap-ig", steps=1)
    assert a.edges == b.edges
    c = attribute(ev, method="eap-ig", steps=4)
    assert c.edges != a.edges
    c.save(tmp_path / "a.json")
    import json
    assert Attribution.from_json(json.loads((tmp_path / "a.json").read_text())).edges == c.edges
    assert ev.stats()["backward_passes"] == 1 + 1 + 4


def test_bad_requests_are_rejected():
    model = load_model("test:tiny-attn")
    with pytest.raises(ValueError, match="accuracy has no gradient"):
        attribute(Evaluator(model, self_task(model), "mean", "accuracy"))
    ev = Evaluator(model, self_task(model), "mean")
    with pytest.raises(ValueError, match="unknown attribution method 'eap-xl'"):
        attribute(ev, method="eap-xl")
    with pytest.raises(ValueError, match="at least 1 step"):
        attribute(ev, method="eap-ig", steps=0)
    with pytest.raises(ValueError, match="not an attribution file"):
        Attribution.from_json({"schema": "circuitsearch.circuit/1"})
