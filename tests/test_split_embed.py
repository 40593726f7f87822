"""Separate token and position embedding senders (`tok`, `pos`: ModelGraph(split_embed=True),
--split-embed) on seeded models with learned positions, held to the default graph's `embed` and to
the naive hooked reference (the bridge's hook_embed and hook_pos_embed)."""
import json
import random

import pytest
import torch

from circuitsearch.algorithms.attribution import attribute
from circuitsearch.algorithms.iterative import edge_candidates, find_circuit
from circuitsearch.algorithms.search import Thresholds
from circuitsearch.catalogue import load_model
from circuitsearch.cli import main
from circuitsearch.config import PruneConfig
from circuitsearch.graphs.circuit import model_graph_of, node_sort_key
from circuitsearch.graphs.diff import diff_circuits
from circuitsearch.graphs.export import dumps_circuit, load_circuit, loads_circuit
from circuitsearch.graphs.model_graph import ModelGraph, parse_node
from circuitsearch.graphs.render import positions, to_dot
from circuitsearch.models import ModelError
from circuitsearch.patching import ABLATIONS, Evaluator
from circuitsearch.reference import hooked_score
from circuitsearch.toys import PLANTED_EDGES, PLANTED_NODES, planted_model, planted_task
from conftest import self_task

TOL = 1e-4


@pytest.fixture(scope="module", params=["test:tiny-gpt", "test:tiny-attn"])
def gpt(request):
    """Seeded models with learned positions: LayerNorm + MLPs, and attention-only without norms."""
    return load_model(request.param)


def pair(model, ablation, seed=0):
    """(default-graph evaluator, split-graph evaluator) of one task."""
    task = self_task(model, seed=seed)
    return Evaluator(model, task, ablation), Evaluator(model, task, ablation, split_embed=True)


def out_edges(ev, node):
    return [e for e in ev.graph.edges if e.split("->")[0] == node]


# ------------------------------------------------------------------ graph and names

def test_split_graph_names_and_default_unchanged():
    g, s = ModelGraph(2, 3), ModelGraph(2, 3, split_embed=True)
    assert g.nodes[0] == "embed" and "tok" not in g.nodes and g.signature() == {
        "n_layers": 2, "n_heads": 3, "attn_only": False, "qkv": True}
    assert s.nodes[:2] == ["tok", "pos"] and "embed" not in s.nodes and s.nodes[2:] == g.nodes[1:]
    assert s.signature()["split_embed"] is True and ModelGraph.from_signature(s.signature()) == s
    assert model_graph_of(s.signature()) == s
    # every receiver reads tok and pos where it read embed, nothing else changes
    assert len(s.edges) == len(g.edges) + len([r for n in g.nodes for r in g.receivers_of(n)])
    assert [e for e in s.edges if not e.startswith(("tok->", "pos->"))] == \
        [e for e in g.edges if not e.startswith("embed->")]
    for r in ("a0.1.q", "a1.2.v", "m0", "logits"):
        i = s.edges.index(f"tok->{r}")
        assert s.edges[i + 1] == f"pos->{r}"
    assert parse_node("tok") == parse_node("tok", 2) and parse_node("pos").kind == "embed"
    assert parse_node("pos").layer == -1
    assert sorted(["pos", "a0.0", "tok", "logits"], key=lambda n: node_sort_key(n, 2)) == \
        ["tok", "pos", "a0.0", "logits"]


def test_names_of_the_other_graph_are_refused_with_the_fix():
    g, s = ModelGraph(2, 3), ModelGraph(2, 3, split_embed=True)
    with pytest.raises(ValueError, match="--split-embed"):
        g.check_node("pos")
    with pytest.raises(ValueError, match="--split-embed"):
        g.check_edge("tok->m0")
    with pytest.raises(ValueError, match="'tok' .token. and 'pos'"):
        s.check_node("embed")
    with pytest.raises(ValueError, match="splits the embedding"):
        s.check_edge("embed->a1.0.k")


# ------------------------------------------------------------------ scores

@pytest.mark.parametrize("ablation", ABLATIONS)
def test_nothing_removed_scores_the_full_model(gpt, ablation):
    d, s = pair(gpt, ablation)
    assert s.full == d.full  # the same embedding, bit for bit: tok + pos is embed's one addition
    assert torch.equal(s.clean_run.embed, d.clean_run.embed)
    with torch.no_grad():
        logits = gpt.bridge(s.task.clean)[:, -1]
    plain = float((logits.gather(1, s.task.answers[:, None]) - logits.gather(1, s.task.wrong_answers[:, None])).mean())
    assert abs(s.full - plain) < TOL
    assert abs(s.score() - hooked_score(gpt, s.task, ablation)) < TOL


def test_ablating_tok_and_pos_equals_ablating_embed_under_zero_ablation(gpt):
    """Zero is per position for every sender, so the two parts ablated are the embedding ablated."""
    d, s = pair(gpt, "zero", seed=1)
    assert abs(s.score(nodes=["tok", "pos"]) - d.score(nodes=["embed"])) < TOL
    assert abs(s.empty - d.empty) < TOL
    assert abs(s.full - d.score(nodes=["embed"])) > 1e-2  # the embedding matters: the test can fail
    # removing both parts of an edge is removing the edge
    recv = ["a1.0.k", "logits"] + ([] if gpt.attn_only else ["m0"])
    assert abs(s.score(edges=[f"{x}->{r}" for r in recv for x in ("tok", "pos")])
               - d.score(edges=[f"embed->{r}" for r in recv])) < TOL


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_pos_ablates_to_its_mean_over_positions(gpt, ablation):
    """Under mean and resample ablation `pos` takes its average over the prompt's positions (its value at
    a position is the same in every prompt, so a per-position mean would be itself and pos could never
    be removed). Checked against the bridge with hook_pos_embed replaced by hand; tok keeps the
    per-position mean, so tok ablated in the split graph is embed ablated with the live position part."""
    d, s = pair(gpt, ablation, seed=1)
    task = s.task

    def to_mean(t, hook):
        return t.mean(1, keepdim=True).expand_as(t)

    with torch.no_grad():
        logits = gpt.bridge.run_with_hooks(task.clean, fwd_hooks=[("hook_pos_embed", to_mean)])[:, -1]
    by_hand = float((logits.gather(1, task.answers[:, None]) - logits.gather(1, task.wrong_answers[:, None])).mean())
    assert abs(s.score(nodes=["pos"]) - by_hand) < TOL
    assert abs(s.score(nodes=["pos"]) - s.full) > 1e-2  # removing where tokens are matters here
    assert abs(s.score(nodes=["tok", "pos"]) - d.score(nodes=["embed"])) > 1e-3  # not the per-position mean


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_node_equals_all_its_out_edges(gpt, ablation):
    _, s = pair(gpt, ablation, seed=2)
    for node in ("tok", "pos"):
        node_score = s.score(nodes=[node])
        assert abs(node_score - s.score(edges=out_edges(s, node))) < TOL, node
    assert abs(s.score(nodes=["tok"]) - s.full) > 1e-2


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_tok_and_pos_match_the_hooked_reference(gpt, ablation):
    _, s = pair(gpt, ablation, seed=3)
    task = s.task
    for nodes in (["tok"], ["pos"], ["tok", "pos"]):
        assert abs(s.score(nodes=nodes) - hooked_score(gpt, task, ablation, nodes=nodes)) < TOL, nodes
    rng = random.Random(0)
    embed_edges = out_edges(s, "tok") + out_edges(s, "pos")
    others = [e for e in s.graph.edges if e not in embed_edges]
    changed = 0
    for k in (1, 3, len(embed_edges) // 2):
        edges = rng.sample(embed_edges, k) + rng.sample(others, 3)
        fast = s.score(edges=edges)
        changed += abs(fast - s.full) > 1e-3
        assert abs(fast - hooked_score(gpt, task, ablation, edges=edges)) < TOL, edges
    # every edge out of pos alone (the position embedding's reach), and out of tok alone
    for node in ("tok", "pos"):
        edges = out_edges(s, node)
        assert abs(s.score(edges=edges) - hooked_score(gpt, task, ablation, edges=edges)) < TOL, node
    assert changed >= 2


def test_batched_extensions_equal_scoring_from_scratch(gpt):
    """extend_many stacks circuits that recompute the embedding (the per-pass tok/pos outputs)."""
    _, s = pair(gpt, "zero", seed=4)
    base = s.run(edges=["a0.1->logits", "pos->a1.0.q"])
    variants = [(["tok"], []), (["pos"], []), ([], ["tok->a1.2.v", "pos->logits"]), (["a0.0"], ["tok->logits"])]
    runs = s.extend_many(base, variants)
    for (nodes, edges), run in zip(variants, runs):
        alone = s.score(nodes=nodes, edges=list(edges) + ["a0.1->logits", "pos->a1.0.q"])
        assert abs(run.score - alone) < TOL, (nodes, edges)
        assert abs(s.rescore(run) - run.score) < TOL


def test_rotary_model_is_refused_clearly():
    model = load_model("test:tiny-llama")
    task = self_task(model)
    with pytest.raises(ModelError, match=r"no learned position embedding.*rotary.*no --split-embed"):
        Evaluator(model, task, split_embed=True)
    Evaluator(model, task)  # the default graph is fine


# ------------------------------------------------------------------ attribution

@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_attribution_of_tok_and_pos_adds_up_to_embed(gpt, method):
    """The embedding is tok + pos and attribution is linear in a sender's output: embed->r's estimate is
    tok->r's plus pos->r's (zero ablation, where pos's estimate is not zero)."""
    d, s = pair(gpt, "zero", seed=5)
    ad, asp = attribute(d, method=method, steps=3), attribute(s, method=method, steps=3)
    assert set(asp.nodes) == set(s.senders) and {"tok", "pos"} <= set(asp.nodes)
    scale = max(abs(v) for v in ad.edges.values())
    for e, v in ad.edges.items():
        if e.startswith("embed->"):
            r = e.split("->")[1]
            assert abs(asp.edges[f"tok->{r}"] + asp.edges[f"pos->{r}"] - v) < 1e-4 * scale, e
        else:
            assert abs(asp.edges[e] - v) < 1e-4 * scale, e
    assert abs(asp.nodes["tok"] + asp.nodes["pos"] - ad.nodes["embed"]) < 1e-4 * scale
    assert abs(asp.nodes["pos"]) > 1e-3 * scale


# ------------------------------------------------------------------ search, files, CLI

def test_planted_circuit_is_found_with_tok_and_without_pos():
    """The planted model's position embedding is zero: its circuit reads tokens only."""
    ev = Evaluator(planted_model(), planted_task(), "mean", split_embed=True)
    result = find_circuit(ev, "both", Thresholds(0.8), "alternate", progress=False)
    kept = [n for n in ev.senders if n not in result.run.nodes] + ["logits"]
    assert kept == ["tok"] + [n for n in PLANTED_NODES if n != "embed"]
    assert sorted(edge_candidates(ev, result.run)) == sorted(e.replace("embed->", "tok->") for e in PLANTED_EDGES)


def test_prune_with_split_embed_end_to_end_and_the_circuit_round_trips(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", "induction-2l", "--task", "induction", "--n-prompts", "8", "--quiet",
                 "--split-embed", "--ablation", "zero", "--level", "nodes", "--out", str(out)]) == 0
    c = load_circuit(out / "circuit.json")
    assert c.graph.get("split_embed") is True
    assert "embed" not in c.nodes and {"tok", "pos"} & set(c.nodes)
    assert loads_circuit(dumps_circuit(c)) == c
    assert json.loads((out / "checkpoint.json").read_text())["config"]["split_embed"] is True
    # scored again with the graph it names, it reproduces the run's score
    model = load_model("induction-2l")
    from circuitsearch.tasks.base import Task
    task = Task.from_json(json.loads((out / "task.json").read_text()))
    ev = Evaluator(model, task, "zero", split_embed=True)
    assert abs(ev.score_circuit(c)["circuit"] - c.scores["circuit"]) < TOL
    with pytest.raises(ValueError, match="split_embed"):
        Evaluator(model, task, "zero").score_circuit(c)
    # drawn with tok and pos side by side, below the heads
    pos = positions(list(c.nodes) + ["tok", "pos"], c.n_layers)
    assert pos["tok"][1] == pos["pos"][1] < min(y for n, (x, y) in pos.items() if n not in ("tok", "pos"))
    assert pos["tok"][0] < pos["pos"][0]
    dot = to_dot(c)
    assert all(f'"{n}" [label=' in dot for n in c.nodes)


def test_diff_refuses_circuits_of_the_two_graphs():
    ev_d = Evaluator(planted_model(), planted_task(), "mean")
    ev_s = Evaluator(planted_model(), planted_task(), "mean", split_embed=True)
    from circuitsearch.graphs.circuit import Circuit
    circuits = [Circuit(model="test:planted", graph=ev.graph.signature(), task="planted",
                        nodes={n: None for n in ev.index.nodes}, edges={}, scores={}, method={"level": "nodes"})
                for ev in (ev_d, ev_s)]
    with pytest.raises(ValueError, match="split_embed"):
        diff_circuits(circuits, ["default", "split"])


def test_config_records_split_embed_only_when_set():
    assert "split_embed" not in PruneConfig().to_json()
    assert PruneConfig(split_embed=True).to_json()["split_embed"] is True
    with pytest.raises(ValueError, match="split_embed"):
        PruneConfig(split_embed="yes").check()


def test_cli_refuses_split_embed_on_a_rotary_model(capsys):
    assert main(["score", "--model", "test:tiny-llama", "--task", "planted", "--n-prompts", "4",
                 "--split-embed"]) == 2
    err = capsys.readouterr().err
    assert "rotary" in err and "--split-embed" in err


def test_cli_score_with_split_embed_is_the_split_evaluator(capsys):
    """score --split-embed scores with the split graph: the empty circuit ablates tok and pos, so it
    differs from the default graph's (pos ablates to its mean over positions, embed per position)."""
    args = ["score", "--model", "induction-2l", "--task", "induction", "--n-prompts", "4"]
    assert main([*args, "--split-embed"]) == 0
    split = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert split["full"] == pytest.approx(plain["full"], abs=1e-5)
    assert abs(split["empty"] - plain["empty"]) > 1e-3
