"""Random-circuit baselines: exact sizes, connectivity checked independently (networkx), the same seed
the same circuits, the planted circuit above every random one of its size, clear errors for bad input."""
import json
import random

import networkx as nx
import numpy as np
import pytest

from circuitsearch.baselines import (BaselineError, Sizes, distribution, edges_among, on_paths, random_circuit,
                                     random_circuits, sizes_of)
from circuitsearch.cli import main
from circuitsearch.config import PruneConfig
from circuitsearch.graphs.export import load_circuit
from circuitsearch.graphs.model_graph import ModelGraph, parse_node, receiver_node, split_edge
from circuitsearch.runs import run_prune
from circuitsearch.runs.baseline import run_baseline
from circuitsearch.toys import PLANTED_NODES

QUIET = dict(log=lambda *a: None)
SMOLLM2_GRAPH = ModelGraph(30, 9)          # SmolLM2-135M's graph: 30 layers x 9 heads, q/k/v receivers
DIGITS_SIZES = Sizes(10, 20, 142, ("embed",))  # the demo's circuit


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    run_prune(PruneConfig(model="test:planted", task="planted", n_prompts=12), out, progress=False, curves=False,
              **QUIET)
    return out


def independently_connected(nodes, edges) -> bool:
    """Every node on a path embed -> logits, by networkx over sender -> receiver node."""
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    g.add_edges_from((s, receiver_node(r)[0]) for s, r in map(split_edge, edges))
    return all(nx.has_path(g, "embed", n) and nx.has_path(g, n, "logits") for n in nodes)


def kinds(nodes):
    k = [parse_node(n).kind for n in nodes]
    return k.count("head"), k.count("mlp"), k.count("embed"), k.count("logits")


@pytest.mark.parametrize("connected", [False, True])
@pytest.mark.parametrize("graph,sizes", [(SMOLLM2_GRAPH, DIGITS_SIZES), (ModelGraph(2, 4), Sizes(2, 1, 5, ("embed",))),
                                         (SMOLLM2_GRAPH, Sizes(3, 0, 6, ("embed",)))])
def test_random_circuits_have_exactly_the_sizes_asked(graph, sizes, connected):
    draws = random_circuits(graph, sizes, 25, seed=3, connected=connected)
    for d in draws:
        assert kinds(d.nodes) == (sizes.heads, sizes.mlps, 1, 1)
        assert len(d.edges) == len(set(d.edges)) == sizes.edges
        kept = set(d.nodes)
        for e in d.edges:
            graph.check_edge(e)  # a real edge of the model
            s, r = split_edge(e)
            assert s in kept and receiver_node(r)[0] in kept
    assert len({d for d in draws}) > 20  # random: hardly any two alike


def test_connected_circuits_are_connected_checked_independently():
    plain = random_circuits(SMOLLM2_GRAPH, DIGITS_SIZES, 30, seed=1)
    connected = random_circuits(SMOLLM2_GRAPH, DIGITS_SIZES, 30, seed=1, connected=True)
    assert all(independently_connected(d.nodes, d.edges) for d in connected)
    # the check can fail: uniformly drawn edges leave some node off every path
    assert sum(not independently_connected(d.nodes, d.edges) for d in plain) >= 25
    # and the package's own check agrees with networkx on both kinds
    for d in plain + connected:
        assert (on_paths(SMOLLM2_GRAPH, d.nodes, d.edges) == set(d.nodes)) == independently_connected(d.nodes, d.edges)


def test_the_same_seed_gives_the_same_circuits():
    a = random_circuits(SMOLLM2_GRAPH, DIGITS_SIZES, 10, seed=7, connected=True)
    assert a == random_circuits(SMOLLM2_GRAPH, DIGITS_SIZES, 10, seed=7, connected=True)
    assert a != random_circuits(SMOLLM2_GRAPH, DIGITS_SIZES, 10, seed=8, connected=True)


def test_a_node_level_circuit_gets_node_level_baselines():
    sizes = Sizes(4, 3, None, ("embed",))
    for d in random_circuits(SMOLLM2_GRAPH, sizes, 5, seed=0, connected=True):
        assert d.edges is None and kinds(d.nodes) == (4, 3, 1, 1)
        assert independently_connected(d.nodes, edges_among(SMOLLM2_GRAPH, d.nodes))


def test_impossible_sizes_are_refused_naming_why():
    with pytest.raises(BaselineError, match="does not fit"):
        random_circuit(ModelGraph(2, 4), Sizes(9, 0, 3, ("embed",)), random.Random(0))
    with pytest.raises(BaselineError, match="no random connected circuit"):  # 6 heads need > 3 edges to connect
        random_circuit(SMOLLM2_GRAPH, Sizes(6, 0, 3, ("embed",)), random.Random(0), connected=True)
    with pytest.raises(BaselineError, match="no embedding sender"):
        random_circuit(SMOLLM2_GRAPH, Sizes(1, 0, 2, ()), random.Random(0), connected=True)


def test_the_distribution_matches_numpy():
    values = [0.3, 0.1, 0.7, 0.5, 0.5, 0.9, 0.2]
    d = distribution(values, 0.5)
    assert d["mean"] == pytest.approx(np.mean(values)) and d["std"] == pytest.approx(np.std(values, ddof=1))
    for q, v in d["quantiles"].items():
        assert v == pytest.approx(np.quantile(values, float(q)))
    assert d["percentile"] == pytest.approx(100 * (3 + 2 / 2) / 7)  # 3 below, 2 tied
    assert d["at_or_above"] == 4 and d["p"] == pytest.approx(5 / 8)
    assert d["z"] == pytest.approx((0.5 - np.mean(values)) / np.std(values, ddof=1))
    assert distribution([0.2, 0.2], 0.9)["z"] is None  # no spread: no z-score, not a huge one


@pytest.mark.parametrize("connected", [False, True])
def test_the_planted_circuit_beats_every_random_circuit_of_its_size(planted_run, connected):
    circuit = load_circuit(planted_run / "circuit.json")
    assert set(circuit.nodes) == set(PLANTED_NODES)
    s = run_baseline(planted_run, 60, connected=connected, seed=0, batch=16, **QUIET)
    f = s["faithfulness"]
    assert s["sizes"] == {"heads": 2, "mlps": 1, "edges": circuit.n_edges, "embed": ["embed"]}
    assert f["run"] == pytest.approx(circuit.scores["faithfulness"], abs=1e-5)  # rescored as the run scored it
    assert max(c["faithfulness"] for c in s["circuits"]) < f["run"] - 0.3
    assert f["at_or_above"] == 0 and f["percentile"] == 100.0 and s["run_scores"]["on_paths"]
    assert s["stats"]["forward_passes"] == 61  # the run's circuit and every random one (counted as circuits)
    assert s["stats"]["batched_passes"] == 4   # the random ones 16 to a pass: 16, 16, 16, 12
    saved = json.loads((planted_run / "baseline.json").read_text())
    assert saved["settings"] == {"random": 60, "connected": connected, "seed": 0, "batch": 16}
    assert run_baseline(planted_run, 3, **QUIET)["stats"]["batched_passes"] == 0  # default: one circuit a pass
    assert (planted_run / "baseline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_batched_scores_are_single_scores_and_a_seed_repeats_them(planted_run):
    """Random circuits scored 16 to a pass score what each scores alone; the same seed, the same scores."""
    from circuitsearch.baselines import as_circuit
    from circuitsearch.catalogue import load_model
    from circuitsearch.evaluation import load_run, own_evaluator

    a = run_baseline(planted_run, 20, seed=5, batch=16, **QUIET)
    b = run_baseline(planted_run, 20, seed=5, batch=1, **QUIET)
    assert [c["nodes"] for c in a["circuits"]] == [c["nodes"] for c in b["circuits"]]
    assert [c["score"] for c in a["circuits"]] == pytest.approx([c["score"] for c in b["circuits"]], abs=1e-5)
    run = load_run(planted_run)
    ev = own_evaluator(run, load_model(run.circuit.model))
    for c in a["circuits"][:5]:
        from circuitsearch.baselines import Draw
        alone = ev.score_circuit(as_circuit(Draw(tuple(c["nodes"]), tuple(c["edges"])), run.circuit))
        assert alone["circuit"] == pytest.approx(c["score"], abs=1e-5)
    assert len({round(c["score"], 4) for c in a["circuits"]}) > 1  # not all one score: the test can fail


def test_the_command_prints_the_table_and_keeps_one_report_section(planted_run, capsys):
    before = (planted_run / "report.md").read_text().split("<!-- circuitsearch:baseline -->")[0]
    for _ in range(2):
        assert main(["baseline", str(planted_run), "--random", "20", "--connected"]) == 0
    out = capsys.readouterr().out
    assert "20 random connected circuits of 2 heads, 1 MLPs" in out and "run percentile" in out
    report = (planted_run / "report.md").read_text()
    assert report.count("<!-- circuitsearch:baseline -->") == 1 and report.startswith(before.rstrip("\n"))
    assert "## Against random circuits of its size" in report and "![random circuits](baseline.png)" in report


@pytest.mark.parametrize("make,args,words", [
    (lambda p: None, ["--random", "0"], ["--random 0", "at least 1"]),
    (lambda p: None, ["--random", "-3"], ["--random -3", "at least 1"]),
    (lambda p: p.mkdir(), [], ["holds no circuit.json", "finished prune run", "circuitsearch prune"]),
    (lambda p: (p.mkdir(), (p / "checkpoint.json").write_text("{}")), [], ["not finished", "run its prune command again"]),
    (lambda p: None, [], ["no such run directory"]),
])
def test_bad_input_is_an_error_naming_the_fix(planted_run, tmp_path, capsys, make, args, words):
    target = planted_run if args[:1] == ["--random"] else tmp_path / "run"
    make(target)
    assert main(["baseline", str(target), *args]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_a_circuit_over_positions_is_refused():
    from circuitsearch.graphs.circuit import Circuit

    c = Circuit("m", ModelGraph(2, 4).signature(), "t", {"embed": None, "a0.1": None, "logits": None},
                {"embed->a0.1.v": None, "a0.1->logits": None}, method={"level": "nodes,positions,edges"},
                positions={"slots": ["0", "1"], "nodes": {"a0.1": ["1"]}})
    with pytest.raises(BaselineError, match="--level both"):
        sizes_of(c)


def test_sampling_needs_no_torch():
    """circuitsearch.baselines draws and summarises without importing torch (scoring is handed an evaluator)."""
    import subprocess
    import sys

    code = ("import sys, circuitsearch.baselines as b; from circuitsearch.graphs.model_graph import ModelGraph; "
            "b.random_circuits(ModelGraph(4, 2), b.Sizes(2, 1, 4, ('embed',)), 3, connected=True); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
