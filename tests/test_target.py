"""Pruning to target performances: verified, nested, and the known circuits recovered."""
import pytest

from circuitsearch.algorithms.iterative import edge_candidates
from circuitsearch.algorithms.target import bisect_remove, gallop_remove, parse_targets, prune_to_targets
from circuitsearch.catalogue import load_model
from circuitsearch.patching import Evaluator
from circuitsearch.toys import PLANTED_EDGES, PLANTED_NODES, induction_task, planted_task
from conftest import self_task


def kept_nodes(ev, run):
    return {n for n in ev.senders if n not in run.nodes}


def test_planted_model_gives_exactly_the_planted_circuit():
    ev = Evaluator(load_model("test:planted"), planted_task(n=16), "mean")
    steps = prune_to_targets(ev, "0.97,0.9,0.8", progress=False)
    for s in steps:
        assert kept_nodes(ev, s.result.run) == set(PLANTED_NODES) - {"logits"}
        assert set(edge_candidates(ev, s.result.run)) == set(PLANTED_EDGES)


def test_induction_model_keeps_the_two_head_circuit():
    ev = Evaluator(load_model("induction-2l"), induction_task(n=24), "mean")
    (step,) = prune_to_targets(ev, [0.8], progress=False)
    nodes = kept_nodes(ev, step.result.run)
    assert {"a0.2", "a1.1"} <= nodes and len([n for n in nodes if n.startswith("a")]) <= 3
    assert "a0.2->a1.1.k" in edge_candidates(ev, step.result.run)  # K-composition


@pytest.mark.parametrize("level", ["nodes", "both"])
def test_targets_are_verified_and_nested(level):
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, self_task(model, n=8, seed=2), "mean")
    steps = prune_to_targets(ev, [0.8, 0.95, 0.6], level=level, progress=False)
    assert [s.target for s in steps] == [0.95, 0.8, 0.6]
    sizes = []
    for prev, s in zip([None] + steps[:-1], steps):
        run = s.result.run
        fresh = ev.faithfulness(ev.score(nodes=run.nodes, edges=run.edges))
        assert fresh == pytest.approx(s.faithfulness, abs=1e-6) and fresh >= s.target
        if prev is not None:  # nested: everything the bigger circuit removed stays removed
            assert prev.result.run.nodes <= run.nodes and prev.result.run.edges <= run.edges
        sizes.append(len(kept_nodes(ev, run)) + len(edge_candidates(ev, run)))
        assert s.forward_passes > 0 and s.backward_passes > 0
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
    assert sizes[0] < len(ev.senders) + len(ev.graph.edges)


def test_refinement_never_undoes_the_target():
    model = load_model("test:tiny-gpt")
    ev = Evaluator(model, self_task(model, n=8, seed=4), "mean")
    fast = prune_to_targets(ev, [0.9], level="nodes", refine=False, progress=False)[0]
    refined = prune_to_targets(ev, [0.9], level="nodes", progress=False)[0]
    assert refined.faithfulness >= 0.9 and fast.faithfulness >= 0.9
    assert len(kept_nodes(ev, refined.result.run)) <= len(kept_nodes(ev, fast.result.run))


@pytest.mark.parametrize("text, message", [
    ("0.9,abc", "target 'abc' is not a number"),
    ("1.5", "outside \\(0, 1\\]"),
    ("0", "outside \\(0, 1\\]"),
    ("", "is not a number"),
])
def test_bad_targets_are_rejected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_targets(text)


def test_target_run_directory_resumes_to_the_same_circuits(tmp_path):
    import json
    import shutil

    from circuitsearch.graphs.export import load_circuit
    from circuitsearch.runs import PruneConfig, RunDirError, run_targets

    cfg = PruneConfig(model="induction-2l", task="induction", level="both")
    quiet = dict(progress=False, log=lambda *a: None)
    whole = run_targets(cfg, "0.97,0.9,0.8", tmp_path / "a", **quiet)
    assert [r["target"] for r in whole] == [0.97, 0.9, 0.8] and not any(r.get("resumed") for r in whole)
    # a run killed after its first target: the later targets' directories were never written
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for t in ("0.9", "0.8"):
        shutil.rmtree(tmp_path / "b" / f"target-{t}")
    again = run_targets(cfg, "0.97,0.9,0.8", tmp_path / "b", **quiet)
    assert [r.get("resumed", False) for r in again] == [True, False, False]
    for t in ("0.97", "0.9", "0.8"):
        a, b = (load_circuit(tmp_path / d / f"target-{t}" / "circuit.json") for d in "ab")
        assert a.nodes == b.nodes and a.edges == b.edges and a.scores == b.scores
    summary = json.loads((tmp_path / "b" / "targets.json").read_text())
    assert summary["schema"] == "circuitsearch.targets/1" and len(summary["targets"]) == 3
    with pytest.raises(RunDirError, match="other settings"):
        run_targets(cfg, "0.9", tmp_path / "b", **quiet)


def test_cli_target_and_attribute(tmp_path, capsys):
    import json

    from circuitsearch.cli import main

    assert main(["prune", "--model", "test:planted", "--task", "planted", "--target", "0.9",
                 "--out", str(tmp_path / "t"), "--quiet"]) == 0
    assert "target-0.9" in (tmp_path / "t" / "report.md").read_text()
    assert (tmp_path / "t" / "target-0.9" / "circuit.svg").exists()
    assert main(["prune", "--model", "test:planted", "--task", "planted", "--target", "0.9,2",
                 "--out", str(tmp_path / "u")]) == 2
    assert "outside (0, 1]" in capsys.readouterr().err
    assert main(["attribute", "--model", "test:planted", "--task", "planted", "--check",
                 "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "rank correlation with exact single-node ablation" in out and "a1.2" in out
    data = json.loads((tmp_path / "a" / "attribution.json").read_text())
    assert data["schema"] == "circuitsearch.attribution/1" and set(data["nodes"]) >= {"embed", "a0.1", "m0", "a1.2"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_galloping_refinement_finds_the_planted_circuit_in_any_order(seed):
    import random
    ev = Evaluator(load_model("test:planted"), planted_task(n=16), "mean")
    order = list(ev.senders)
    random.Random(seed).shuffle(order)
    run, info = gallop_remove(ev, ev.run(), order, "nodes", 0.8, patience=None)
    assert kept_nodes(ev, run) == set(PLANTED_NODES) - {"logits"}
    assert ev.faithfulness(run.score) >= 0.8 and info["tried"] == len(order)
    assert info["removed"] == len(order) - len(kept_nodes(ev, run))
    # patience: with the planted nodes first, one kept in a row already ends the pass
    first = sorted(order, key=lambda n: n not in PLANTED_NODES)
    _, short = gallop_remove(ev, ev.run(), first, "nodes", 0.8, patience=1)
    assert short == {"candidates": len(order), "removed": 0, "scores": 1, "tried": 1, "wasted_rows": 0}


def decisions_of(result):
    return [(d.phase, d.pass_, d.candidate, d.chunk, d.removed) for d in result.decisions]


@pytest.mark.parametrize("seed", [0, 3])
def test_batched_refinement_makes_the_decisions_of_one_at_a_time(seed):
    """Speculation along the failure path: the same tries, verdicts, circuit and effects as batch 1, in fewer
    forward passes of the evaluator (stacked ones)."""
    import random
    from circuitsearch.algorithms.search import PruneResult
    out = {}
    for batch in (1, 4, 16):
        ev = Evaluator(load_model("test:planted"), planted_task(n=16), "mean")
        order = list(ev.senders)
        random.Random(seed).shuffle(order)
        result = PruneResult(ev.run())
        run, info = gallop_remove(ev, ev.run(), order, "nodes", 0.8, patience=None, result=result, batch=batch)
        scores = [d.score for d in result.decisions]
        out[batch] = (decisions_of(result), run.nodes, info, scores, dict(result.effects), ev.batched_passes)
    one = out[1]
    assert one[5] == 0 and "wasted_rows" not in one[2]
    for batch in (4, 16):
        got = out[batch]
        assert got[0] == one[0] and got[1] == one[1]
        assert {k: v for k, v in got[2].items() if k != "wasted_rows"} == one[2]
        assert got[3] == pytest.approx(one[3], abs=1e-5)
        assert got[4].keys() == one[4].keys()
        assert got[5] > 0, "no stacked pass: the refinement did not speculate"


def test_target_search_at_batch_1_and_16_logs_the_same_decisions(tmp_path):
    """prune --target through the run directory: decisions.jsonl equal for --batch 1 and the default."""
    import json
    from circuitsearch.cli import main
    logs = {}
    for batch in ("1", "16"):
        out = tmp_path / f"b{batch}"
        assert main(["prune", "--model", "induction-2l", "--task", "induction", "--n-prompts", "24",
                     "--target", "0.9,0.8", "--batch", batch, "--quiet", "--out", str(out)]) == 0
        rows = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
        logs[batch] = rows
    key = lambda r: (r["phase"], r["pass"], r["candidate"], r.get("chunk"), r["removed"], r.get("target"))
    assert [key(r) for r in logs["1"]] == [key(r) for r in logs["16"]]
    assert len(logs["1"]) > 10
    assert [r["score"] for r in logs["1"]] == pytest.approx([r["score"] for r in logs["16"]], abs=1e-5)


def test_bisection_removes_the_longest_passing_prefix():
    ev = Evaluator(load_model("test:planted"), planted_task(n=16), "mean")
    planted = set(PLANTED_NODES) - {"logits"}
    order = [n for n in ev.senders if n not in planted] + sorted(planted)
    run, info = bisect_remove(ev, ev.run(), order, "nodes", 0.8)
    assert kept_nodes(ev, run) == planted and info["removed"] == len(order) - len(planted)
    assert info["scores"] <= len(order).bit_length() + 1


@pytest.mark.parametrize("metric", ["logit_diff", "kl"])
def test_removal_order_puts_estimated_gains_first_and_drops_in_faithfulness(metric):
    from circuitsearch.algorithms.attribution import attribute
    from circuitsearch.algorithms.target import removal_order
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, self_task(model, n=8, seed=2), "mean", metric)
    run = ev.run()
    order, drops = removal_order(ev, run, "nodes")
    est = attribute(ev, run).nodes
    sign = 1 if ev.metric.higher_is_better else -1
    gains = [sign * est[n] for n in order]
    assert sorted(order) == sorted(est) and gains == sorted(gains, reverse=True)
    for n in order:  # a drop is the faithfulness the estimate says the removal costs
        assert drops[n] == pytest.approx(ev.faithfulness(run.score) - ev.faithfulness(run.score + est[n]))
        assert (drops[n] > 0) == (sign * est[n] < 0) or abs(est[n]) < 1e-12


def test_target_search_resumes_mid_target_from_its_decision_log(tmp_path, monkeypatch):
    """Killed after k logged decisions (inside a target, before any checkpoint of it), the target
    search replays its log and ends in the same circuits, scoring only what the log lacks."""
    import json

    from circuitsearch.graphs.export import load_circuit
    from circuitsearch.runs import PruneConfig, run_targets
    from circuitsearch.runs.store import DecisionLog, read_decisions

    cfg = PruneConfig(model="induction-2l", task="induction", level="both")
    quiet = dict(progress=False, log=lambda *a: None)
    run_targets(cfg, "0.9,0.8", tmp_path / "whole", **quiet)
    logged = read_decisions(tmp_path / "whole" / "decisions.jsonl")
    c = load_circuit(tmp_path / "whole" / "target-0.8" / "circuit.json")
    estimated = c.method.get("estimated_effects", [])
    single = {d["candidate"] for d in logged if d["target"] == 0.8 and d["pass"] == "refine" and d["chunk"] == 1}
    # every effect in the circuit is either measured (the candidate was scored alone) or marked as an estimate
    held = {n: e for n, e in {**c.nodes, **c.edges}.items() if e is not None}
    assert held and set(held) == single & set(held) | set(estimated) and not set(estimated) & single
    assert c.method["order"] == "gain" and c.method["attribution"] == "eap-ig"
    assert {d["target"] for d in logged} == {0.9, 0.8} and {d["pass"] for d in logged} >= {"bisect:0", "refine"}
    record = DecisionLog.record
    for k in (1, 7, len(logged) - 2):
        out = tmp_path / f"killed{k}"
        written = []

        def killing(self, decision, written=written, k=k):
            record(self, decision)
            written.append(decision)
            if len(written) >= k:
                raise KeyboardInterrupt("killed")

        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(DecisionLog, "record", killing)
            run_targets(cfg, "0.9,0.8", out, **quiet)
        assert len(read_decisions(out / "decisions.jsonl")) == k
        run_targets(cfg, "0.9,0.8", out, **quiet)
        for t in ("0.9", "0.8"):
            a, b = (load_circuit(d / f"target-{t}" / "circuit.json") for d in (tmp_path / "whole", out))
            assert a.nodes.keys() == b.nodes.keys() and a.edges.keys() == b.edges.keys()
            assert a.scores["faithfulness"] == pytest.approx(b.scores["faithfulness"], abs=1e-6)
        assert len(read_decisions(out / "decisions.jsonl")) == len(logged)
        if k > 5:  # replayed verdicts are not scored again: the resumed session runs fewer forward passes
            spent = lambda d: json.loads((d / "targets.json").read_text())["stats"]["forward_passes"]
            assert spent(out) < spent(tmp_path / "whole")


def test_estimated_effects_are_marked_apart_from_measured_ones():
    """With patience 1 the refinement scores few candidates alone: the rest of the circuit's effects are
    attribution estimates, and circuit.json says which (method.estimated_effects)."""
    from circuitsearch.config import PruneConfig
    from circuitsearch.runs import circuit_from_result
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, self_task(model, n=8, seed=2), "mean")
    step = prune_to_targets(ev, [0.9], level="both", progress=False, patience=1)[0]
    res = step.result
    assert res.estimates and not set(res.estimates) & set(res.effects)
    c = circuit_from_result(ev, res, PruneConfig(model="test:tiny-llama", order="gain"), res.final, {})
    marked = set(c.method["estimated_effects"])
    held = {n for n, e in {**c.nodes, **c.edges}.items() if e is not None}
    assert marked and marked <= held and marked == held - set(res.effects)
    assert all(c.nodes.get(n, c.edges.get(n)) == res.estimates[n] for n in marked)
