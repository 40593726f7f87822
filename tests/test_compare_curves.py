"""Comparing removal orders, and faithfulness curves with MIB's CPR and CMD."""
import json

import pytest

from circuitsearch.algorithms.compare import compare_circuits, order_dirname
from circuitsearch.algorithms.curves import (PERCENTAGES, area, circuit_of_top, faithfulness_curve,
                                             removal_ranking)
from circuitsearch.algorithms.iterative import Thresholds, find_circuit
from circuitsearch.algorithms.attribution import attribute
from circuitsearch.cli import main
from circuitsearch.catalogue import load_model
from circuitsearch.patching import Evaluator
from circuitsearch.runs import PruneConfig, circuit_from_result
from circuitsearch.toys import PLANTED_EDGES, PLANTED_NODES, planted_model, planted_task
from conftest import self_task

ORDERS = ["forward", "reverse", "alternate", "random:1", "random:2"]


def compare_orders(ev, orders, level, thresholds, progress=False):
    """Prune with each order from the full model (one evaluator and thresholds) and compare."""
    circuits = []
    for order in orders:
        res = find_circuit(ev, level, thresholds, order, progress=progress)
        cfg = PruneConfig(model=ev.model.name, task=ev.task.name, level=level, ablation=ev.ablation,
                          metric=ev.metric.name, absolute=thresholds.absolute, relative=thresholds.relative,
                          on=thresholds.on, order=order, qkv=ev.graph.qkv)
        circuits.append(circuit_from_result(ev, res, cfg, ev.score(nodes=res.ablated, edges=res.removed_edges), {}))
    return compare_circuits(ev, circuits, orders)


@pytest.fixture(scope="module")
def planted():
    return Evaluator(planted_model(), planted_task(n=12), "mean")


@pytest.fixture(scope="module")
def graded():
    """A random model whose circuit depends on the order (self task: the model's own top answer)."""
    model = load_model("test:tiny-llama:3")
    return Evaluator(model, self_task(model, n=8, seed=3), "mean")


def test_every_order_finds_the_planted_circuit(planted):
    cmp = compare_orders(planted, ORDERS + ["attribution"], "both", Thresholds(0.8), progress=False)
    assert list(cmp.intersection.nodes) == list(PLANTED_NODES) == list(cmp.union.nodes)
    assert set(cmp.intersection.edges) == set(PLANTED_EDGES)
    assert cmp.order_dependent("nodes") == {} and set(cmp.kept_by("nodes").values()) == {6}
    assert cmp.intersection.scores["faithfulness"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("level, A", [("nodes", 0.9), ("both", 0.7)])
def test_counts_intersection_and_union_are_consistent(graded, level, A):
    cmp = compare_orders(graded, ORDERS, level, Thresholds(A), progress=False)
    k = len(ORDERS)
    kept = [set(c.nodes) for c in cmp.circuits]
    for n, count in cmp.kept_by("nodes").items():
        assert count == sum(n in s for s in kept)
    inter, union = set(cmp.intersection.nodes), set(cmp.union.nodes)
    assert all(inter <= s <= union for s in kept)
    dep = cmp.order_dependent("nodes")
    assert set(dep) == {n for n, c in cmp.kept_by("nodes").items() if 0 < c < k}
    assert dep or level == "both"  # with this model and A = 0.9 the node circuits differ by order
    m = cmp.diff.jaccard("nodes")
    assert all(m[i][i] == 1.0 and m[i][j] == m[j][i] for i in range(k) for j in range(k))
    # verified scores: the union keeps at least what every order's circuit keeps when nodes only
    if level == "nodes":
        ablate = [n for n in graded.senders if n not in union]
        assert cmp.union.scores["circuit"] == pytest.approx(graded.score(nodes=ablate), abs=1e-9)
    for c in cmp.circuits:
        assert c.scores["faithfulness"] >= A - 1e-9
    data = cmp.to_json()
    assert data["schema"] == "circuitsearch.comparison/1" and data["orders"] == ORDERS
    json.dumps(data)


def test_order_directory_names():
    assert order_dirname("random:3") == "random-3" and order_dirname("file:some/where/o.txt") == "file-o"


def test_compare_orders_command_resumes(tmp_path, capsys):
    args = ["compare-orders", "--model", "test:planted", "--task", "planted", "--n-prompts", "10",
            "--orders", "forward,reverse,random:1", "--out", str(tmp_path / "c"), "--quiet"]
    assert main(args) == 0
    first = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert (tmp_path / "c" / "comparison.svg").exists() and (tmp_path / "c" / "random-1" / "circuit.json").exists()
    assert "kept by every order: 3" in capsys.readouterr().out
    decisions = (tmp_path / "c" / "forward" / "decisions.jsonl").read_text()
    assert main(args) == 0  # a second run replays every order's decisions: same comparison
    again = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert again["kept_by"] == first["kept_by"] and again["intersection"]["scores"] == first["intersection"]["scores"]
    assert (tmp_path / "c" / "forward" / "decisions.jsonl").read_text() == decisions
    assert main(args[:-3] + ["--orders", "forward", "--out", str(tmp_path / "d")]) == 2
    assert "at least two distinct orders" in capsys.readouterr().err


def test_compare_orders_leaves_attribution_out_of_its_default_for_accuracy(tmp_path, capsys, monkeypatch):
    import circuitsearch.cli as cli
    monkeypatch.setattr(cli, "COMPARE_ORDERS", ("forward", "attribution", "reverse"))  # fewer prunes, same rule
    args = ["compare-orders", "--model", "test:planted", "--task", "planted", "--n-prompts", "10", "--level", "nodes",
            "--metric", "accuracy", "--out", str(tmp_path / "c"), "--quiet"]
    assert main(args) == 0
    assert "note: orders forward,reverse: attribution ranks by gradients and the accuracy metric has none" in \
        capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir()) == ["forward", "reverse"]


# ---- curves -------------------------------------------------------------------------------------

def test_area_is_the_mib_trapezoid():
    assert area(PERCENTAGES, [1.0] * 10) == pytest.approx(0.999)
    assert area([0, 100], [0.0, 1.0]) == pytest.approx(0.5)
    f = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert area(PERCENTAGES, f) == pytest.approx(0.95 + 0.015)  # 1 from 5 to 100 %, a ramp from 2 to 5 %


def test_planted_curve_reaches_one_at_the_planted_edges(planted):
    ranking = attribute(planted, method="eap-ig").ranking("edges")
    c = faithfulness_curve(planted, ranking, "eap-ig")
    n = len(planted.graph.edges)
    assert c.kept == [int(p / 100 * n) for p in PERCENTAGES] and c.kept[-1] == n
    assert c.faithfulness[-1] == pytest.approx(1.0, abs=1e-6)  # everything kept = the full model
    for k, f in zip(c.kept, c.faithfulness):
        if k == 0:
            assert f == pytest.approx(0.0, abs=1e-6)  # nothing kept = the empty circuit
        if k >= len(PLANTED_EDGES):  # the top edges are the planted ones
            assert f == pytest.approx(1.0, abs=1e-5)
    assert c.cpr == pytest.approx(area(PERCENTAGES, c.faithfulness))
    assert c.cmd == pytest.approx(area(PERCENTAGES, [abs(1 - f) for f in c.faithfulness]))
    assert c.forward_passes <= len(PERCENTAGES)  # keeping everything is the cached full run


def test_keeping_edges_equals_removing_the_rest(graded):
    """The cheap form (ablate senders without kept out-edges) scores as removing every other edge."""
    keep = set(list(graded.graph.edges)[::7])
    nodes, removed = circuit_of_top(graded, keep)
    everything_else = [e for e in graded.graph.edges if e not in keep]
    assert graded.score(nodes=nodes, edges=removed) == pytest.approx(graded.score(edges=everything_else), abs=1e-5)


def test_removal_ranking_puts_the_circuit_on_top(graded):
    res = find_circuit(graded, "both", Thresholds(0.7), "reverse", progress=False)
    c = circuit_from_result(graded, res, PruneConfig(model="m", task="t", order="reverse"), res.run.score, {})
    r = removal_ranking(graded, res.decisions, c)
    assert sorted(r) == sorted(graded.graph.edges)  # a total order over every edge
    assert set(r[-len(c.edges):]) == set(c.edges)
    curve = faithfulness_curve(graded, r, "removal")
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-6)


def test_bad_ranking_is_refused(planted):
    with pytest.raises(ValueError, match="does not have"):
        faithfulness_curve(planted, ["a9.9->logits"])


def test_prune_report_shows_curves(tmp_path):
    from circuitsearch.runs import run_prune
    run_prune(PruneConfig(model="test:planted", task="planted", n_prompts=10), tmp_path, progress=False,
              log=lambda *a: None)
    data = json.loads((tmp_path / "curves.json").read_text())
    # the default order, attribution
    assert [c["name"] for c in data["curves"]] == ["removal order (attribution)", "EAP-IG ranking"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "![faithfulness curves](curves.png)" in report and "CPR" in report
