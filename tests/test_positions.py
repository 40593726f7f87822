"""Position-level circuits: slots of a task, nodes ablated at single slots, their invariants."""
import random

import pytest
import torch

from circuitsearch.patching import ABLATIONS, Evaluator
from circuitsearch.reference import hooked_score
from circuitsearch.tasks import concat_tasks
from circuitsearch.tasks.slots import REST, task_slots
from conftest import random_task

TOL = 1e-4


def test_fixed_length_slots_are_positions_named_by_the_task():
    task = random_task(50, n=4, seq=6)
    task.positions = {"S0": 1, "S1": 2, "end": -1}
    s = task_slots(task)
    assert s.names == ("0", "S0", "S1", "3", "4", "end")
    assert not s.by_role
    assert s.of.tolist() == [list(range(6))] * 4


def test_role_slots_partition_prompts_of_several_lengths():
    a, b = random_task(50, n=3, seq=5, seed=1), random_task(50, n=3, seq=7, seed=2)
    a.positions, b.positions = {"X": 1, "end": -1}, {"X": 3, "end": -1}
    task = concat_tasks("mixed", [a, b])
    s = task_slots(task)
    assert s.by_role and s.names == ("X", "end", REST)
    for i in range(len(task)):
        n = int(task.lengths[i])
        row = s.of[i, :n].tolist()
        assert row.count(0) == 1 and row.index(0) == (1 if i < 3 else 3)
        assert row.count(1) == 1 and row[n - 1] == 1
        assert row.count(2) == n - 2  # every other real position is `rest`


def test_slot_names_that_would_break_unit_names_are_refused():
    task = random_task(50, n=2, seq=5)
    task.positions = {"a@b": 1}
    with pytest.raises(Exception, match="cannot name a slot"):
        task_slots(task)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_a_node_at_every_slot_is_the_node(test_model, ablation):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=3)
    ev = Evaluator(test_model, task, ablation)
    rng = random.Random(0)
    for node in rng.sample(ev.senders, 4):
        whole = ev.score(nodes=[node])
        units = [f"{node}@{q}" for q in ev.slots.names]
        assert ev.score(at=units) == pytest.approx(whole, abs=1e-6)
        run = ev.run(at=units)
        assert bool(run.masks.ablated[ev.index.node(node)])  # recorded as the node ablated
        part = ev.score(at=units[:-1])
        assert part != pytest.approx(whole, abs=1e-7) or abs(whole - ev.full) < 1e-6


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_nodes_at_positions_match_hooked_reference(test_model, ablation):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=4)
    ev = Evaluator(test_model, task, ablation)
    rng = random.Random(1)
    changed = 0
    for k in (1, 3, 12):
        picks = [(rng.choice(ev.senders), rng.randrange(task.seq_len)) for _ in range(k)]
        fast = ev.score(at=[f"{n}@{ev.slots.names[p]}" for n, p in picks])
        ref = hooked_score(test_model, task, ablation, nodes=[f"{n}@{p}" for n, p in picks])
        changed += abs(fast - ev.full) > 1e-3
        assert abs(fast - ref) < TOL, picks
    assert changed >= 2


def test_nodes_at_positions_with_edges_and_nodes_match_reference(test_model):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=5)
    ev = Evaluator(test_model, task, "mean")
    rng = random.Random(2)
    edges = rng.sample(ev.graph.edges, len(ev.graph.edges) // 5)
    nodes = rng.sample(ev.senders, 2)
    picks = [(rng.choice(ev.senders), rng.randrange(task.seq_len)) for _ in range(6)]
    fast = ev.score(nodes=nodes, edges=edges, at=[f"{n}@{ev.slots.names[p]}" for n, p in picks])
    ref = hooked_score(test_model, task, "mean", nodes=nodes + [f"{n}@{p}" for n, p in picks], edges=edges)
    assert abs(fast - ref) < TOL


def test_units_extend_incrementally_and_in_batches(test_model):
    """Chained extensions with units equal one extension from the full model, and extend_many's K
    variants equal K single extensions."""
    task = random_task(test_model.bridge.cfg.d_vocab, seed=6)
    ev = Evaluator(test_model, task, "mean")
    rng = random.Random(3)
    units = rng.sample(ev.unit_names, 10)
    edges = rng.sample(ev.graph.edges, 8)
    run = ev.run(edges=edges[:4])
    for i, u in enumerate(units):
        run = ev.extend(run, at=[u], edges=edges[4:] if i == 5 else ())
    fresh = ev.score(edges=edges, at=units)
    assert run.score == pytest.approx(fresh, abs=1e-5)
    assert ev.rescore(run) == pytest.approx(fresh, abs=1e-5)
    base = ev.run(at=units[:3])
    variants = [([], [], [u]) for u in units[3:7]] + [([ev.senders[2]], [], units[7:])]
    many = ev.extend_many(base, variants)
    for v, r in zip(variants, many):
        assert r.score == pytest.approx(ev.extend(base, *v).score, abs=1e-5)


def test_bad_unit_names_are_rejected(test_model):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=7)
    ev = Evaluator(test_model, task, "mean")
    with pytest.raises(ValueError, match="no slot 'nowhere'"):
        ev.score(at=["a0.0@nowhere"])
    with pytest.raises(ValueError, match="node@slot"):
        ev.score(at=["a0.0"])
    with pytest.raises(ValueError, match="logits"):
        ev.score(at=["logits@0"])
    with pytest.raises(ValueError, match="not in this model|unknown node"):
        ev.score(at=["a99.0@0"])


# ----------------------------------------------------------------------------- the positions phase

from circuitsearch.algorithms.attribution import attribute  # noqa: E402
from circuitsearch.algorithms.iterative import find_circuit  # noqa: E402
from circuitsearch.algorithms.search import Thresholds, phases  # noqa: E402
from circuitsearch.algorithms.target import prune_to_targets  # noqa: E402
from circuitsearch.toys import induction_task, load_induction_model  # noqa: E402


@pytest.fixture(scope="module")
def induction():
    model = load_induction_model()
    task = induction_task(n=24, k=10, seed=0)
    return model, task, Evaluator(model, task, "mean")


def kept_slots(ev, run):
    """node -> slot names it is kept at, for the nodes the circuit keeps."""
    present = run.present_units()
    return {n: [ev.slots.names[q] for q in range(ev.Q) if present[ev.index.node(n), q]]
            for n in ev.senders if n not in run.nodes}


def test_levels_parse_in_phase_order():
    assert phases("both") == ("nodes", "edges")
    assert phases("nodes,positions,edges") == ("nodes", "positions", "edges", "edge-positions")
    assert phases("positions") == ("positions",)
    for bad in ("edges,nodes", "nodes,nodes", "position", "nodes,,edges"):
        with pytest.raises(ValueError, match="nodes,positions,edges"):
            phases(bad)


@pytest.mark.parametrize("order", ["alternate", "reverse", "attribution"])
def test_induction_circuit_at_positions(induction, order):
    """The previous-token head matters only at the first occurrence of the answer token (S9: where the
    induction head's key reads it), the induction head only at the second occurrence (end)."""
    model, task, ev = induction
    result = find_circuit(ev, "nodes,positions", Thresholds(0.8), order, progress=False)
    kept = kept_slots(ev, result.run)
    assert ev.faithfulness(result.final) >= 0.8
    assert kept["a0.2"] == ["S9"]
    assert kept["a1.1"] == ["end"]
    assert set(kept["embed"]) <= {"S8", "S9", "end"} and "end" in kept["embed"]
    assert result.final == pytest.approx(ev.rescore(result.run), abs=1e-6)


def test_positions_phase_resumes_and_batches_to_the_same_decisions(induction):
    model, task, ev = induction
    full = []
    a = find_circuit(ev, "nodes,positions,edges", Thresholds(0.8), "alternate", progress=False,
                     on_decision=full.append, batch=8)
    assert any(d.phase == "positions" and d.removed for d in full)
    one = []
    b = find_circuit(ev, "nodes,positions,edges", Thresholds(0.8), "alternate", progress=False,
                     on_decision=one.append, batch=1)
    assert [d.key() + (d.removed,) for d in one] == [d.key() + (d.removed,) for d in full]
    cut = next(i for i, d in enumerate(full) if d.phase == "positions") + 7  # interrupted inside the phase
    rest = []
    c = find_circuit(ev, "nodes,positions,edges", Thresholds(0.8), "alternate", progress=False,
                     replay=[d.to_json() for d in full[:cut]], on_decision=rest.append)
    assert [d.key() for d in rest] == [d.key() for d in full[cut:]]
    for r in (b, c):
        assert torch.equal(r.run.masks.at, a.run.masks.at) and torch.equal(r.run.masks.ablated, a.run.masks.ablated)
        assert torch.equal(r.run.removed_edges(), a.run.removed_edges())


def test_target_search_with_positions(induction):
    model, task, ev = induction
    logged = []
    steps = prune_to_targets(ev, [0.9], level="nodes,positions", progress=False, on_decision=logged.append)
    run = steps[0].result.run
    assert ev.faithfulness(steps[0].result.final) >= 0.9
    assert len(run.units) > 0  # nodes removed at single slots
    again = prune_to_targets(ev, [0.9], level="nodes,positions", progress=False,
                             replay=[d.to_json() for d in logged[: len(logged) // 2]])
    assert torch.equal(again[0].result.run.masks.at, run.masks.at)


def test_unit_estimates_add_up_to_node_estimates(induction):
    model, task, ev = induction
    run = ev.run(at=["a0.1@S3", "a1.0@end"])
    attr = attribute(ev, run, "eap", units=True)
    for node, est in attr.nodes.items():
        parts = [v for u, v in attr.units.items() if u.split("@")[0] == node]
        assert sum(parts) == pytest.approx(est, rel=1e-4, abs=1e-5), node
    assert "a0.1@S3" not in attr.units and "a0.1@S4" in attr.units
    # the estimate is a first-order one: it tracks the real effect of the biggest units
    top = max(attr.units, key=lambda u: abs(attr.units[u]))
    real = ev.extend(run, at=[top]).score - run.score
    assert real * attr.units[top] > 0


# ----------------------------------------------------------------------------- edges at slots

def edge_units_of(ev, node, slot):
    return [f"{e.split('->')[0]}@{slot}->{e.split('->')[1]}@{slot}" for e in ev.graph.edges
            if e.split("->")[0] == node]


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_a_node_at_a_slot_is_all_its_out_edges_at_that_slot(test_model, ablation):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=8)
    ev = Evaluator(test_model, task, ablation)
    rng = random.Random(4)
    base_edges = rng.sample(ev.graph.edges, 5)
    for node in rng.sample(ev.senders, 3):
        slot = rng.choice(ev.slots.names)
        as_node = ev.score(edges=base_edges, at=[f"{node}@{slot}"])
        as_edges = ev.score(edges=base_edges, edges_at=edge_units_of(ev, node, slot))
        assert as_edges == pytest.approx(as_node, abs=1e-5), (node, slot)


def test_an_edge_at_every_slot_is_the_edge(test_model):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=9)
    ev = Evaluator(test_model, task, "mean")
    for e in random.Random(5).sample(ev.graph.edges, 4):
        s, r = e.split("->")
        units = [f"{s}@{q}->{r}@{q}" for q in ev.slots.names]
        run = ev.run(edges_at=units)
        assert run.score == pytest.approx(ev.score(edges=[e]), abs=1e-6)
        assert bool(run.removed_edges()[ev.index.edge(e)])


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_edges_at_positions_match_hooked_reference(test_model, ablation):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=10)
    ev = Evaluator(test_model, task, ablation)
    rng = random.Random(6)
    changed = 0
    for k in (3, 20, 80):
        picks = [(rng.choice(ev.graph.edges), rng.randrange(task.seq_len)) for _ in range(k)]
        names = [f"{e.split('->')[0]}@{ev.slots.names[p]}->{e.split('->')[1]}@{ev.slots.names[p]}" for e, p in picks]
        ref_names = [f"{e.split('->')[0]}@{p}->{e.split('->')[1]}@{p}" for e, p in picks]
        whole = rng.sample(ev.graph.edges, 3)
        fast = ev.score(edges=whole, edges_at=names, at=[f"{ev.senders[1]}@{ev.slots.names[2]}"])
        ref = hooked_score(test_model, task, ablation, nodes=[f"{ev.senders[1]}@2"], edges=whole + ref_names)
        changed += abs(fast - ev.full) > 1e-3
        assert abs(fast - ref) < TOL, k
    assert changed >= 2


def test_edge_units_extend_incrementally_and_in_batches(test_model):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=11)
    ev = Evaluator(test_model, task, "mean")
    rng = random.Random(7)
    E, Q = ev.index.E, ev.Q
    units = [ev.edge_unit_name(u) for u in rng.sample(range(E * Q), 12)]
    run = ev.run(at=[ev.unit_names[5]])
    for u in units:
        run = ev.extend(run, edges_at=[u])
    fresh = ev.score(at=[ev.unit_names[5]], edges_at=units)
    assert run.score == pytest.approx(fresh, abs=1e-5)
    assert ev.rescore(run) == pytest.approx(fresh, abs=1e-5)
    variants = [([], [], [], [u]) for u in units[:5]] + [([], [ev.graph.edges[3]], [], units[5:])]
    base = ev.run(edges_at=units[:2])
    for v, r in zip(variants, ev.extend_many(base, variants)):
        assert r.score == pytest.approx(ev.extend(base, *v).score, abs=1e-5)


def test_bad_edge_unit_names_are_rejected(test_model):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=12)
    ev = Evaluator(test_model, task, "mean")
    e = ev.graph.edges[-1]
    s, r = e.split("->")
    with pytest.raises(ValueError, match="same position"):
        ev.score(edges_at=[f"{s}@0->{r}@1"])
    with pytest.raises(ValueError, match="sender@slot->receiver@slot"):
        ev.score(edges_at=[e])
    with pytest.raises(ValueError, match="no slot"):
        ev.score(edges_at=[f"{s}@zz->{r}@zz"])


def test_induction_edges_at_positions(induction):
    """Edges at slots recover the induction mechanism position by position: the previous-token head reads
    the previous token's value at S8 and writes at S9 into the induction head's key there (K-composition);
    the induction head's query at end reads the current token, its value at S9 the token to copy."""
    model, task, ev = induction
    decisions = []
    result = find_circuit(ev, "nodes,positions,edges", Thresholds(0.8), "alternate", progress=False,
                          on_decision=decisions.append)
    kept = {ev.edge_unit_name(u) for u in result.run.present_edge_units().flatten().nonzero()[:, 0].tolist()}
    assert ev.faithfulness(result.final) >= 0.8
    assert "a0.2@S9->a1.1.k@S9" in kept  # K-composition, at the first occurrence of the answer token
    assert "a1.1@end->logits@end" in kept and "embed@end->a1.1.q@end" in kept
    assert all(u.split("@")[0] in ("embed", "a0.2", "a1.1") for u in kept)
    assert len(kept) <= 6
    assert {d.phase for d in decisions} == {"nodes", "positions", "edges", "edge-positions"}
    assert result.final == pytest.approx(ev.rescore(result.run), abs=1e-6)


# ----------------------------------------------------------------------------- run directories

import json  # noqa: E402
import signal  # noqa: E402

from circuitsearch.cli import main  # noqa: E402
from circuitsearch.graphs.export import load_circuit  # noqa: E402
from test_rundir import forked_main  # noqa: E402

INDUCTION = ["--model", "induction-2l", "--task", "induction", "--level", "nodes,positions,edges", "--quiet",
             "--order", "alternate"]


def test_position_run_killed_in_each_phase_resumes_to_the_same_circuit(tmp_path):
    whole = tmp_path / "whole"
    assert main(["prune", *INDUCTION, "--out", str(whole)]) == 0
    lines = (whole / "decisions.jsonl").read_text().splitlines()
    phase = [json.loads(x)["phase"] for x in lines]
    c = load_circuit(whole / "circuit.json")
    assert c.positions["nodes"]["a0.2"] == ["S9"] and c.positions["nodes"]["logits"] == ["end"]
    assert c.positions["edges"]["a0.2->a1.2.k" if "a0.2->a1.2.k" in c.edges else "a0.2->a1.1.k"] == ["S9"]
    for name in ("positions", "edge-positions"):
        k = phase.index(name) + 3  # killed three decisions into the phase
        out = tmp_path / name
        p = forked_main(["prune", *INDUCTION, "--out", str(out)], kill_at=k)
        p.join(300)
        assert p.exitcode == -signal.SIGKILL
        assert main(["prune", *INDUCTION, "--out", str(out)]) == 0
        assert (out / "decisions.jsonl").read_text() == (whole / "decisions.jsonl").read_text()
        a, b = (json.loads((d / "circuit.json").read_text()) for d in (whole, out))
        assert (a["nodes"], a["edges"], a["positions"], a["scores"]) == (b["nodes"], b["edges"], b["positions"],
                                                                          b["scores"])
    # the saved circuit scores as its run did, from task.json + circuit.json alone
    ev = Evaluator(load_induction_model(), induction_task(n=24, k=10, seed=0), "mean")
    assert ev.score_circuit(c)["circuit"] == pytest.approx(c.scores["circuit"], abs=1e-5)


def test_position_target_search_from_the_command_line(tmp_path):
    out = tmp_path / "t"
    assert main(["prune", "--model", "induction-2l", "--task", "induction", "--level", "nodes,positions",
                 "--target", "0.9", "--quiet", "--out", str(out)]) == 0
    c = load_circuit(out / "target-0.9" / "circuit.json")
    assert c.scores["faithfulness"] >= 0.9 and c.positions["nodes"]
    assert main(["prune", "--model", "induction-2l", "--task", "induction", "--level", "nodes,positions",
                 "--target", "0.9", "--quiet", "--out", str(out)]) == 0  # finished: resumes to the same
    assert load_circuit(out / "target-0.9" / "circuit.json").positions == c.positions


def test_the_hook_based_path_refuses_position_level_circuits(test_model):
    from circuitsearch.hooked import HookedEvaluator

    task = random_task(test_model.bridge.cfg.d_vocab, seed=13)
    ev = HookedEvaluator(test_model, task, "mean")
    assert ev.score(nodes=[ev.senders[1]]) != ev.full  # it scores node circuits
    with pytest.raises(ValueError, match="fast engine only"):
        ev.score(at=[f"{ev.senders[1]}@{ev.slots.names[0]}"])
    e = ev.graph.edges[-1].split("->")
    with pytest.raises(ValueError, match="fast engine only"):
        ev.score(edges_at=[f"{e[0]}@{ev.slots.names[1]}->{e[1]}@{ev.slots.names[1]}"])


def test_a_position_circuit_scores_only_on_prompts_with_its_slots(induction, tmp_path):
    model, task, ev = induction
    out = tmp_path / "r"
    assert main(["prune", *INDUCTION[:4], "--level", "nodes,positions", "--quiet", "--out", str(out)]) == 0
    c = load_circuit(out / "circuit.json")
    assert ev.score_circuit(c)["circuit"] == pytest.approx(c.scores["circuit"], abs=1e-5)
    other = Evaluator(model, induction_task(n=24, k=8, seed=1), "mean")  # 16 positions, not 20
    with pytest.raises(ValueError, match="slots .* but this task's slots are"):
        other.score_circuit(c)


def test_role_slots_on_prompts_of_several_lengths(test_model):
    """With prompts of two lengths, a slot is a role (its own position in each prompt): a node at every
    slot is the node, and a node at one role changes each prompt at that role's own position."""
    V = test_model.bridge.cfg.d_vocab
    a, b = random_task(V, n=4, seq=6, seed=14), random_task(V, n=4, seq=8, seed=15)
    a.positions, b.positions = {"X": 2, "end": -1}, {"X": 5, "end": -1}
    task = concat_tasks("mixed", [a, b])
    assert test_model.bridge.cfg.attention_dir == "causal"  # bidirectional models refuse padded prompts (test_mixed_tasks)
    ev = Evaluator(test_model, task, "mean")
    assert ev.slots.names == ("X", "end", REST)
    node = ev.senders[2]
    whole = ev.score(nodes=[node])
    assert ev.score(at=[f"{node}@{q}" for q in ev.slots.names]) == pytest.approx(whole, abs=1e-6)
    # at role X only: the same as ablating the node at position 2 of the short prompts and 5 of the long
    # ones, which the per-prompt reference (one length at a time, its own mean) gives
    x = ev.score(at=[f"{node}@X"])
    assert x != pytest.approx(ev.full, abs=1e-6)
    parts = [(Evaluator(test_model, t, "mean"), p) for t, p in ((a, 2), (b, 5))]
    per = [e.score(at=[f"{node}@{e.slots.names[p]}"]) * len(e.task) for e, p in parts]
    assert x == pytest.approx(sum(per) / len(task), abs=1e-5)


@pytest.mark.slow
def test_smollm2_positions_match_hooked_reference(smollm2, smollm2_digits):
    """On the embedded model (grouped-query attention): nodes and edges at positions against the hand-hooked
    forward, k/v edges per query head, and removed for a whole key/value group."""
    from test_evaluator import grouped_uniform

    ev = Evaluator(smollm2, smollm2_digits, "mean")
    rng = random.Random(8)
    P = smollm2_digits.seq_len
    picks = [(rng.choice(ev.senders), rng.randrange(P)) for _ in range(30)]
    fast = ev.score(at=[f"{n}@{ev.slots.names[p]}" for n, p in picks])
    assert abs(fast - ev.full) > 1e-2
    assert abs(fast - hooked_score(smollm2, smollm2_digits, "mean", nodes=[f"{n}@{p}" for n, p in picks])) < TOL
    picks = [(e, rng.randrange(P)) for e in rng.sample(ev.graph.edges, 300)]
    per_head = picks  # an edge into a k/v receiver is one query head's
    grouped = [(g, p) for e, p in picks for g in grouped_uniform([e], smollm2.n_heads, smollm2.n_kv_heads)]
    for edges_at in (per_head, grouped):
        fast = ev.score(edges_at=[f"{e.split('->')[0]}@{ev.slots.names[p]}->{e.split('->')[1]}@{ev.slots.names[p]}"
                                  for e, p in edges_at])
        ref = hooked_score(smollm2, smollm2_digits, "mean",
                           edges=[f"{e.split('->')[0]}@{p}->{e.split('->')[1]}@{p}" for e, p in edges_at])
        assert abs(fast - ev.full) > 1e-3
        assert abs(fast - ref) < TOL
