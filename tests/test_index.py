"""The graph index (names parsed once), the one-receiver-per-head graph, and the two bugs found as a user.

The index must agree with the names it replaces; the evaluator must give the same score whether
a circuit comes as names or as index ids; and the bugs stay fixed.
"""
import pytest
import torch

from circuitsearch.algorithms.attribution import attribute
from circuitsearch.algorithms.iterative import edge_candidates
from circuitsearch.catalogue import load_model
from circuitsearch.graphs.index import index_of
from circuitsearch.graphs.model_graph import ModelGraph, parse_node, receiver_node, split_edge
from circuitsearch.models import build_test_model
from circuitsearch.patching import Evaluator
from conftest import random_task, self_task


@pytest.mark.parametrize("graph", [ModelGraph(3, 4), ModelGraph(2, 3, attn_only=True), ModelGraph(2, 2, qkv=False)])
def test_index_tables_agree_with_the_names(graph):
    ix = index_of(graph)
    assert ix is index_of(ModelGraph(graph.n_layers, graph.n_heads, graph.attn_only, graph.qkv))  # built once
    assert ix.nodes == graph.nodes and ix.edges == graph.edges and ix.senders == graph.nodes[:-1]
    for i, e in enumerate(ix.edges):
        src, dst = split_edge(e)
        assert ix.nodes[int(ix.edge_src[i])] == src
        assert ix.receivers[int(ix.edge_recv[i])] == dst
        assert ix.nodes[int(ix.edge_dst_node[i])] == receiver_node(dst)[0]
    for i, n in enumerate(ix.nodes):
        info = parse_node(n, graph.n_layers)
        assert (ix.node_layer[i], ix.node_head[i]) == (info.layer, -1 if info.head is None else info.head)


def test_present_edges_is_the_string_definition():
    """Edges still present = not removed and both ends alive, as the names would say."""
    ix = index_of(ModelGraph(3, 4))
    g = torch.Generator().manual_seed(0)
    ablated = torch.rand(ix.N, generator=g) < 0.3
    ablated[ix.logits] = False
    removed = torch.rand(ix.E, generator=g) < 0.5
    dead = {ix.nodes[i] for i in ablated.nonzero()[:, 0].tolist()}
    gone = {ix.edges[i] for i in removed.nonzero()[:, 0].tolist()}
    by_names = [e for e in ix.edges if e not in gone and split_edge(e)[0] not in dead
                and receiver_node(split_edge(e)[1])[0] not in dead]
    assert ix.names(ix.present_edges(ablated, removed).nonzero()[:, 0], "edges") == by_names


def test_unknown_names_are_refused_with_the_reason():
    ix = index_of(ModelGraph(2, 2))
    with pytest.raises(ValueError, match="not in this model"):
        ix.node("a5.0")
    with pytest.raises(ValueError, match="unknown node name"):
        ix.node("head7")
    with pytest.raises(ValueError, match="does not feed"):
        ix.edge("a1.0->a0.0.q")


def test_logits_has_no_layer_without_the_model():
    assert parse_node("logits").layer is None
    assert parse_node("logits", 30).layer == 30


def test_names_and_ids_score_the_same(test_model):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=4)
    ev = Evaluator(test_model, task, "mean")
    nodes, edges = ev.senders[1::3], ev.graph.edges[::7]
    by_name = ev.score(nodes=nodes, edges=edges)
    by_id = ev.score(nodes=ev.index.node_ids(nodes), edges=torch.tensor(ev.index.edge_ids(edges)))
    assert by_name == by_id and by_name != ev.full
    run = ev.run(nodes, edges)
    assert run.nodes == frozenset(nodes) and run.edges == frozenset(edges)
    assert ev.rescore(run) == run.score


def test_one_receiver_per_head_is_named_as_the_head():
    """qkv=False: an edge into a head is `a0.1->a1.2` and removes its q, k and v input together."""
    g = ModelGraph(2, 3, qkv=False)
    assert "a0.1->a1.2" in g.edges and not any(e.endswith((".q", ".k", ".v")) for e in g.edges)
    model = load_model("test:tiny-gpt")
    task = self_task(model, seed=1)
    one, three = Evaluator(model, task, "mean", qkv=False), Evaluator(model, task, "mean", qkv=True)
    for src in ("embed", "a0.1", "m0"):
        joint = one.score(edges=[f"{src}->a1.2"])
        split = three.score(edges=[f"{src}->a1.2.{x}" for x in "qkv"])
        assert joint == pytest.approx(split, abs=1e-6) and joint != pytest.approx(one.full, abs=1e-6)


def test_attribution_works_when_embed_is_ablated():
    """Bug: attribute() raised 'element 0 of tensors does not require grad' once embed was ablated."""
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, self_task(model, seed=2), "mean")
    run = ev.run(nodes=["embed"])
    a = attribute(ev, run, "eap-ig", steps=3)
    assert "embed" not in a.nodes and set(a.edges) == set(edge_candidates(ev, run))
    assert any(abs(v) > 1e-6 for v in a.nodes.values())  # live heads still write something that matters


def test_answers_are_checked_against_the_output_vocabulary():
    """Bug: answer ids were checked against the input vocabulary; a smaller output one gave an IndexError."""
    cfg = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, d_vocab_out=12, n_ctx=8,
               act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", init_mode="gpt2")
    model = build_test_model(cfg, seed=0)
    task = random_task(12, seq=5)
    task.clean[0, 0] = 19  # a valid input token above the output vocabulary
    Evaluator(model, task, "mean")  # prompts may use the whole input vocabulary
    task.answers[0] = 15
    with pytest.raises(ValueError, match="answers hold token ids outside the model's vocabulary.*output vocabulary "
                                         "is ids 0..11"):
        Evaluator(model, task, "mean")
