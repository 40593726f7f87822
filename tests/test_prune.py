"""Pruning finds known circuits, thresholds behave, and a killed run resumes to the same circuit."""
import json

import pytest

from circuitsearch.algorithms.iterative import (Thresholds, dangling_nodes, edge_candidates, find_circuit,
                                                 prune)
from circuitsearch.catalogue import load_model
from circuitsearch.patching import Evaluator
from circuitsearch.runs import PruneConfig, RunDirError, run_prune
from circuitsearch.runs.store import DecisionLog
from circuitsearch.toys import PLANTED_EDGES, PLANTED_NODES, planted_model, planted_task
from conftest import random_task, self_task

ORDERS = ["forward", "reverse", "alternate", "random:1", "random:7", "attribution"]


@pytest.fixture(scope="module", params=[0, 1])
def planted(request):
    return Evaluator(planted_model(seed=request.param), planted_task(seed=request.param), "mean")


def kept_nodes(ev, result):
    return [n for n in ev.senders if n not in result.ablated] + ["logits"]


@pytest.mark.parametrize("order", ORDERS)
def test_planted_nodes_recovered_exactly(planted, order):
    result = find_circuit(planted, "nodes", Thresholds(0.8), order, progress=False)
    assert kept_nodes(planted, result) == list(PLANTED_NODES)


@pytest.mark.parametrize("order", ORDERS)
def test_planted_edges_recovered_exactly(planted, order):
    result = find_circuit(planted, "both", Thresholds(0.8), order, progress=False)
    assert kept_nodes(planted, result) == list(PLANTED_NODES)
    assert sorted(edge_candidates(planted, result.run)) == sorted(PLANTED_EDGES)
    assert planted.faithfulness(result.run.score) == pytest.approx(1.0, abs=1e-5)


def test_planted_with_resample_and_relative_threshold(planted):
    result = find_circuit(planted, "both", Thresholds(None, 0.05), "reverse", progress=False)
    assert sorted(edge_candidates(planted, result.run)) == sorted(PLANTED_EDGES)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raising_absolute_never_shrinks_the_circuit(seed):
    model = load_model("test:tiny-gpt")
    ev = Evaluator(model, self_task(model, seed=seed), "mean")
    sizes = []
    for a in (0.3, 0.6, 0.8, 0.95, 1.0):
        res = find_circuit(ev, "nodes", Thresholds(a), "reverse", progress=False)
        sizes.append(len(ev.senders) - len(res.ablated))
        assert ev.faithfulness(res.run.score) >= a - 1e-6
    assert sizes == sorted(sizes), sizes
    assert sizes[0] < sizes[-1]  # the thresholds made a difference


def test_relative_zero_accepts_no_loss():
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, self_task(model, seed=3), "mean")
    res = prune(ev, "nodes", Thresholds(None, 0.0), "forward", progress=False)
    removed = [d for d in res.decisions if d.removed]
    rejected = [d for d in res.decisions if not d.removed]
    assert rejected, "some removal must cost something on a random model"
    assert all(ev.faithfulness(d.score) >= ev.faithfulness(d.before) for d in removed)
    assert all(ev.faithfulness(d.score) < ev.faithfulness(d.before) for d in rejected)


def test_dangling_nodes_are_found():
    ev = Evaluator(planted_model(), planted_task(), "mean")
    others = [e for e in ev.graph.edges if e.startswith("a0.0->")]
    run = ev.run(edges=others)  # a0.0 feeds nothing now
    assert "a0.0" in dangling_nodes(ev, run)
    assert "a0.1" not in dangling_nodes(ev, run)


def test_dangling_removal_keeps_the_thresholds():
    from circuitsearch.algorithms.iterative import PruneResult, remove_dangling
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, self_task(model, seed=1), "mean")
    # a0.0 writes to nothing (every edge out of it removed): ablating it is exact. A layer-1 head
    # that reads nothing live (every edge into it removed) still writes a constant that matters.
    cut_out = [e for e in ev.graph.edges if e.startswith("a0.0->")]
    for head in ev.graph.heads(1):
        cut_in = [e for e in ev.graph.edges if e.split("->")[1].startswith(head + ".")]
        run = ev.run(edges=cut_in + cut_out)
        cost = ev.faithfulness(run.score) - ev.faithfulness(ev.extend(run, nodes=[head]).score)
        if cost > 1e-3:
            break
    else:
        pytest.fail("no layer-1 head whose constant output matters")
    assert {head, "a0.0"} <= set(dangling_nodes(ev, run))
    assert ev.extend(run, nodes=["a0.0"]).score == pytest.approx(run.score, abs=1e-5)
    strict = PruneResult(run)
    remove_dangling(ev, strict, Thresholds(None, 0.0))  # no removal may cost anything
    assert "a0.0" in strict.run.nodes and head not in strict.run.nodes
    loose = PruneResult(run)
    remove_dangling(ev, loose, Thresholds(0.0, None))
    assert {head, "a0.0"} <= loose.run.nodes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_levels_end_above_the_absolute_threshold(seed):
    model = load_model("test:tiny-gpt")
    ev = Evaluator(model, self_task(model, seed=seed), "mean")
    res = find_circuit(ev, "both", Thresholds(0.8), "alternate", progress=False)
    assert ev.faithfulness(ev.score(nodes=res.ablated, edges=res.removed_edges)) >= 0.8 - 1e-6


@pytest.mark.parametrize("kw, message", [
    (dict(absolute=1.5), "outside \\[0, 1\\]"),
    (dict(absolute=-0.1), "outside \\[0, 1\\]"),
    (dict(relative=2.0), "outside \\[0, 1\\]"),
    (dict(absolute=None, relative=None), "both thresholds are off"),
    (dict(on="loss"), "faithfulness' or 'metric"),
])
def test_bad_thresholds_are_rejected(kw, message):
    with pytest.raises(ValueError, match=message):
        Thresholds(**kw)


def test_bad_order_and_level_are_rejected(planted):
    with pytest.raises(ValueError, match="unknown order 'sideways'"):
        prune(planted, "nodes", Thresholds(), "sideways")
    with pytest.raises(ValueError, match="random needs an integer seed"):
        prune(planted, "nodes", Thresholds(), "random:x")
    with pytest.raises(ValueError, match="unknown level 'heads'"):
        find_circuit(planted, "heads")


def _cfg(**kw):
    return PruneConfig(model="test:planted", task="planted", n_prompts=12, **kw)


def kill_after(monkeypatch, k):
    """Make the decision log raise KeyboardInterrupt once k new decisions are written, as a kill would."""
    record, written = DecisionLog.record, []

    def killing(self, decision):
        record(self, decision)
        written.append(decision)
        if len(written) >= k:
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(DecisionLog, "record", killing)


@pytest.mark.parametrize("order", ["alternate", None])  # None: the default, attribution
def test_killed_run_resumes_to_the_same_circuit(tmp_path, monkeypatch, order):
    cfg = lambda: _cfg(order=order)
    whole = run_prune(cfg(), tmp_path / "whole", progress=False, log=lambda *a: None)
    n_decisions = whole.stats["decisions"]
    assert n_decisions > 30
    for k in (1, 17, n_decisions - 3):
        out = tmp_path / f"killed{k}"
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            kill_after(m, k)
            run_prune(cfg(), out, progress=False, log=lambda *a: None)
        assert len((out / "decisions.jsonl").read_text().splitlines()) == k
        assert not (out / "circuit.json").exists()
        with open(out / "decisions.jsonl", "a") as f:  # a kill in the middle of writing a line
            f.write('{"phase": "nod')
        resumed = run_prune(cfg(), out, progress=False, log=lambda *a: None)
        assert resumed.stats["replayed"] == k
        # the cost reported is the whole run's, not only the resumed session's
        assert resumed.stats["all_sessions"]["forward_passes"] > resumed.stats["forward_passes"]
        assert resumed.nodes.keys() == whole.nodes.keys() and resumed.edges.keys() == whole.edges.keys()
        assert resumed.scores == whole.scores
        assert (out / "decisions.jsonl").read_text() == (tmp_path / "whole" / "decisions.jsonl").read_text()
    # replaying a finished run applies its removals without scoring them: a few passes, not one per removal
    # (the attribution order ranks each phase again on replay, which costs its EAP-IG passes on top)
    again = run_prune(cfg(), tmp_path / "whole", progress=False, log=lambda *a: None, curves=False)
    assert again.nodes.keys() == whole.nodes.keys() and again.scores == whole.scores
    removals = sum(1 for line in (tmp_path / "whole" / "decisions.jsonl").read_text().splitlines()
                   if '"removed": true' in line)
    bound = min(removals, whole.stats["forward_passes"]) if order == "alternate" else whole.stats["forward_passes"]
    assert again.stats["forward_passes"] < bound / 2
    assert again.stats["all_sessions"]["forward_passes"] >= whole.stats["forward_passes"] + again.stats["forward_passes"]
    assert "Over all its sessions" in (tmp_path / "whole" / "report.md").read_text()


def test_run_directory_contents(tmp_path):
    c = run_prune(_cfg(), tmp_path, progress=False, log=lambda *a: None)
    for f in ("task.json", "circuit.json", "decisions.jsonl", "checkpoint.json", "report.md", "circuit.dot"):
        assert (tmp_path / f).exists(), f
    data = json.loads((tmp_path / "circuit.json").read_text())
    assert data["schema"] == "circuitsearch.circuit/1"
    assert sorted(data["nodes"]) == sorted(PLANTED_NODES)
    assert json.loads((tmp_path / "checkpoint.json").read_text())["status"] == "done"
    assert c.stats["forward_passes"] > 0 and c.scores["faithfulness"] >= 0.8
    # re-score from task.json + circuit.json alone
    from circuitsearch.tasks.base import Task
    task = Task.from_json(json.loads((tmp_path / "task.json").read_text()))
    ev = Evaluator(planted_model(), task, "mean")
    ablated = [n for n in ev.senders if n not in data["nodes"]]
    removed = [e for e in edge_candidates(ev, ev.run(nodes=ablated)) if e not in data["edges"]]
    assert ev.score(nodes=ablated, edges=removed) == pytest.approx(data["scores"]["circuit"], abs=1e-5)


def test_run_directory_of_other_settings_is_refused(tmp_path):
    run_prune(_cfg(), tmp_path, progress=False, log=lambda *a: None)
    with pytest.raises(RunDirError, match="absolute: 0.8 there, 0.9 now"):
        run_prune(_cfg(absolute=0.9), tmp_path, progress=False, log=lambda *a: None)


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")])
def test_decision_log_is_closed_on_every_path(tmp_path, error, status):
    log = DecisionLog(tmp_path, {"model": "m"})
    with pytest.raises(error):
        with log:
            log.record({"phase": "nodes", "candidate": "a0.0", "removed": True})
            raise error("stop")
    assert log._f.closed
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert checkpoint["status"] == status and checkpoint["decisions"] == 1 and checkpoint["config"] == {"model": "m"}
    assert len((tmp_path / "decisions.jsonl").read_text().splitlines()) == 1


# ---------------------------------------------------------------- the default order

def test_the_default_order_is_attribution_and_is_recorded(tmp_path):
    from circuitsearch.cli import build_parser

    assert build_parser().parse_args(["prune"]).order is None  # not chosen: the config resolves it
    assert PruneConfig().order is None and PruneConfig().to_json()["order"] == "attribution"
    notes = []
    c = run_prune(_cfg(), tmp_path, progress=False, log=notes.append, curves=False)
    assert c.method["order"] == "attribution" and c.method["attribution"] == "eap-ig"
    assert json.loads((tmp_path / "checkpoint.json").read_text())["config"]["order"] == "attribution"
    assert not [n for n in notes if n.startswith("note: order ")]  # the plain default needs no note
    # the same run as one that names the order: its directory resumes under an explicit --order attribution
    again = run_prune(_cfg(order="attribution"), tmp_path, progress=False, log=lambda *a: None, curves=False)
    assert again.stats["replayed"] == c.stats["decisions"]
    assert again.nodes.keys() == c.nodes.keys() and again.edges.keys() == c.edges.keys()


def test_a_metric_without_gradient_defaults_to_alternate_and_records_it(tmp_path):
    notes = []
    c = run_prune(_cfg(metric="accuracy"), tmp_path, progress=False, log=notes.append)
    assert ("note: order alternate: the default order, attribution, ranks by gradients and the accuracy metric "
            "has none (--order chooses another)") in notes
    curves = json.loads((tmp_path / "curves.json").read_text())["curves"]  # no EAP-IG curve without a gradient
    assert [x["name"] for x in curves] == ["removal order (alternate)"]
    assert any(n.startswith("note: no EAP-IG curve: the accuracy metric has no gradient") for n in notes)
    assert c.method["order"] == "alternate" and "attribution" not in c.method
    assert json.loads((tmp_path / "circuit.json").read_text())["method"]["order"] == "alternate"
    assert json.loads((tmp_path / "checkpoint.json").read_text())["config"]["order"] == "alternate"
    explicit = run_prune(_cfg(metric="accuracy", order="alternate"), tmp_path / "explicit", progress=False,
                         log=lambda *a: None, curves=False)
    assert explicit.nodes.keys() == c.nodes.keys() and explicit.edges.keys() == c.edges.keys()
    assert (tmp_path / "decisions.jsonl").read_text() == (tmp_path / "explicit" / "decisions.jsonl").read_text()


def test_attribution_order_with_a_metric_without_gradient_is_refused_before_loading(tmp_path):
    message = ("--order attribution ranks candidates by attribution gradients, and the accuracy metric has none: "
               "leave --order out (the default for accuracy is alternate) or choose another order, or use a metric "
               "with a gradient (logit_diff, prob, kl, l2, logprob)")
    with pytest.raises(ValueError) as e:
        PruneConfig(metric="accuracy", order="attribution").check()
    assert str(e.value) == message
    with pytest.raises(ValueError, match="the accuracy metric has none"):
        run_prune(_cfg(metric="accuracy", order="attribution"), tmp_path / "o", progress=False, log=lambda *a: None)
    assert not (tmp_path / "o").exists()


def test_a_run_started_under_the_old_default_resumes_with_its_saved_order(tmp_path, monkeypatch):
    """A directory whose checkpoint says order alternate (the default before attribution), resumed by a
    command that names no order: it replays and finishes as alternate, and says so; naming another order
    there is refused as a changed setting."""
    whole = run_prune(_cfg(order="alternate"), tmp_path / "whole", progress=False, log=lambda *a: None, curves=False)
    out = tmp_path / "old"
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        kill_after(m, 17)
        run_prune(_cfg(order="alternate"), out, progress=False, log=lambda *a: None)
    assert json.loads((out / "checkpoint.json").read_text())["config"]["order"] == "alternate"
    notes = []
    resumed = run_prune(_cfg(), out, progress=False, log=notes.append, curves=False)
    assert ("note: order alternate: the order this run directory was started with (--order not given; a new "
            "run's default is attribution); to run another order, give --order and another --out") in notes
    assert resumed.stats["replayed"] == 17 and resumed.method["order"] == "alternate"
    assert resumed.nodes.keys() == whole.nodes.keys() and resumed.edges.keys() == whole.edges.keys()
    assert resumed.scores == whole.scores
    assert (out / "decisions.jsonl").read_text() == (tmp_path / "whole" / "decisions.jsonl").read_text()
    assert json.loads((out / "checkpoint.json").read_text())["config"]["order"] == "alternate"
    # a finished old run, run again without --order: the same circuit, replayed, not a new search
    again = run_prune(_cfg(), out, progress=False, log=lambda *a: None, curves=False)
    assert again.stats["replayed"] == whole.stats["decisions"] and again.nodes.keys() == whole.nodes.keys()
    with pytest.raises(RunDirError, match="order: 'alternate' there, 'attribution' now"):
        run_prune(_cfg(order="attribution"), out, progress=False, log=lambda *a: None)
