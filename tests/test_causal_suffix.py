"""Causal suffix (evaluator.suffix): a change at slots whose positions all lie at or after p recomputes
positions >= p only, and scores exactly what the full recompute scores (to 1e-6)."""
import random

import pytest
import torch

from circuitsearch.algorithms.iterative import find_circuit
from circuitsearch.algorithms.search import Thresholds
from circuitsearch.catalogue import load_model
from circuitsearch.engine import Engine
from circuitsearch.models import Model
from circuitsearch.patching import ABLATIONS, Evaluator
from circuitsearch.tasks import concat_tasks
from circuitsearch.toys import induction_task, load_induction_model
from conftest import random_task, self_task
from test_engine_features import hf_model, native

TOL = 1e-6  # scores, absolute or of their size (float32 rounding of other GEMM shapes); a prompt's own value 1e-5


def pair(model, task, **kw) -> tuple[Evaluator, Evaluator]:
    """(an evaluator with the suffix path, one that always recomputes the whole prompt)."""
    ev, ref = Evaluator(model, task, **kw), Evaluator(model, task, **kw)
    ref.causal_suffix = False
    return ev, ref


def units_from(ev: Evaluator, rng: random.Random, lo: int, k: int = 2) -> list[int]:
    """k random node units at slots >= lo (fixed-length tasks: slot q is position q)."""
    return [rng.randrange(ev.S) * ev.Q + rng.randrange(lo, ev.Q) for _ in range(k)]


def edge_units_from(ev: Evaluator, rng: random.Random, lo: int, k: int = 2) -> list[int]:
    return [rng.randrange(ev.index.E) * ev.Q + rng.randrange(lo, ev.Q) for _ in range(k)]


def same(a, b) -> None:
    for x, y in zip(a, b):
        assert x.score == pytest.approx(y.score, rel=TOL, abs=TOL)
        assert torch.allclose(x.per_prompt, y.per_prompt, atol=1e-5)


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_nodes_at_late_slots_score_as_the_full_recompute(test_model, ablation):
    task = self_task(test_model, n=6, seq=8, seed=1)
    ev, ref = pair(test_model, task, ablation=ablation)
    rng = random.Random(0)
    a, b = ev.run(), ref.run()
    for lo in (5, 3, 6, 1, 7):  # a chain: each step extends the suffix-extended run, at earlier slots too
        u = units_from(ev, rng, lo)
        a, b = ev.extend(a, at=u), ref.extend(b, at=u)
        same([a], [b])
        assert a.score == pytest.approx(ref.rescore(a), rel=TOL, abs=TOL)
    assert abs(a.score - ev.full) > 1e-4  # the units changed something
    assert ev.forward_equivalents < ref.forward_equivalents - 1  # and the suffix path did it for less


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_edges_at_late_slots_score_as_the_full_recompute(test_model, ablation):
    task = self_task(test_model, n=6, seq=8, seed=2)
    ev, ref = pair(test_model, task, ablation=ablation)
    rng = random.Random(1)
    e = ev.index.edges
    base_edges = rng.sample(range(len(e)), len(e) // 4)
    nodes = rng.sample(ev.senders, 2)
    a, b = ev.run(nodes=nodes, edges=base_edges), ref.run(nodes=nodes, edges=base_edges)  # as edge-positions starts
    for lo in (6, 2, 4, 7, 5):
        eu, u = edge_units_from(ev, rng, lo, 3), units_from(ev, rng, lo, 1)
        a, b = ev.extend(a, edges_at=eu), ref.extend(b, edges_at=eu)
        same([a], [b])
        eu = edge_units_from(ev, rng, lo, 1)
        a, b = ev.extend(a, at=u, edges_at=eu), ref.extend(b, at=u, edges_at=eu)
        same([a], [b])
        assert a.score == pytest.approx(ref.rescore(a), rel=TOL, abs=TOL)
    assert a.edge_units == b.edge_units
    assert ev.forward_equivalents < ref.forward_equivalents - 1


def test_stacked_circuits_at_different_slots(test_model):
    """K circuits in one pass recompute from the earliest slot any of them touches; each scores as alone."""
    task = self_task(test_model, n=6, seq=8, seed=3)
    ev, ref = pair(test_model, task, ablation="resample")
    rng = random.Random(2)
    a = b = None
    for step in range(4):
        variants = [((), (), units_from(ev, rng, lo, 1), edge_units_from(ev, rng, lo, 1)) for lo in (7, 4, 6, 5)]
        ra, rb = ev.extend_many(a or ev.run(), variants), ref.extend_many(b or ref.run(), variants)
        same(ra, rb)
        for r, v in zip(ra, variants):
            assert r.score == pytest.approx(ev.extend(a or ev.run(), *v).score, rel=TOL, abs=TOL)
        a, b = ra[step % 4], rb[step % 4]
    assert ev.forward_equivalents < ref.forward_equivalents


def test_a_change_at_the_first_position_is_the_full_recompute(test_model):
    task = self_task(test_model, n=6, seq=8, seed=4)
    ev, ref = pair(test_model, task)
    rng = random.Random(3)
    u = units_from(ev, rng, 4, 2) + [1 * ev.Q]  # sender 1 at slot 0
    a, b = ev.run(at=u), ref.run(at=u)
    same([a], [b])
    assert ev.forward_equivalents == pytest.approx(ref.forward_equivalents)  # nothing saved, nothing filled
    assert ev.stats()["forward_passes"] == ref.stats()["forward_passes"]


def test_the_earliest_row_decides_on_prompts_of_several_lengths():
    """Role slots sit at different positions in different prompts: the suffix starts at the earliest."""
    model = load_model("test:tiny-llama")
    V = model.bridge.cfg.d_vocab
    a, b = random_task(V, n=4, seq=6, seed=14), random_task(V, n=4, seq=9, seed=15)
    a.positions, b.positions = {"X": 2, "Y": 4, "end": -1}, {"X": 5, "Y": 7, "end": -1}
    task = concat_tasks("mixed", [a, b])
    ev, ref = pair(model, task, ablation="mean")
    assert ev._suffix.first_read < 8  # the short prompts are read before the last position
    for slot in ("Y", "X", "end", "rest"):
        units = [f"{n}@{slot}" for n in ev.senders[1:4]]
        ra, rb = ev.run(at=units), ref.run(at=units)
        same([ra], [rb])
    again = ev.extend(ev.run(at=[f"{ev.senders[2]}@Y"]), at=[f"{ev.senders[5]}@X"])
    assert again.score == pytest.approx(ref.extend(ref.run(at=[f"{ev.senders[2]}@Y"]),
                                                   at=[f"{ev.senders[5]}@X"]).score, rel=TOL, abs=TOL)
    assert ev.forward_equivalents < ref.forward_equivalents


def test_split_embed_units_of_tok_and_pos():
    model = load_model("test:tiny-gpt")
    task = self_task(model, n=6, seq=8, seed=5)
    ev, ref = pair(model, task, ablation="mean", split_embed=True)
    run_a, run_b = ev.run(), ref.run()
    for units in (["tok@6", "pos@7"], ["pos@4", "a0.1@5"], ["tok@3"]):
        run_a, run_b = ev.extend(run_a, at=units), ref.extend(run_b, at=units)
        same([run_a], [run_b])
    eu = [ev.edge_unit(f"tok@5->{r}@5") for r in ("a1.2.v", "m0")]
    same([ev.extend(run_a, edges_at=eu)], [ref.extend(run_b, edges_at=eu)])
    assert ev.forward_equivalents < ref.forward_equivalents


@pytest.mark.parametrize("kind", ["mistral-window", "qwen3-qk-norm", "neox-parallel", "gptj"])
def test_other_architectures(kind):
    """Sliding windows, q/k norms, partial rotary and parallel blocks through the suffix."""
    model = Model.from_hf(hf_model(kind), name=f"tiny-{kind}")
    task = self_task(model, n=5, seq=8, seed=6)
    ev, ref = pair(model, task, ablation="mean")
    rng = random.Random(4)
    edges = rng.sample(range(ev.index.E), 10)
    a, b = ev.run(edges=edges), ref.run(edges=edges)
    for lo in (5, 3, 7):
        u, eu = units_from(ev, rng, lo), edge_units_from(ev, rng, lo)
        a, b = ev.extend(a, at=u, edges_at=eu), ref.extend(b, at=u, edges_at=eu)
        same([a], [b])
    assert ev.forward_equivalents < ref.forward_equivalents


def test_bidirectional_models_and_readouts_before_the_change_recompute_everything():
    bi = native(attention_dir="bidirectional")
    task = random_task(64, n=5, seq=7, seed=7)
    ev, ref = pair(bi, task)
    assert not ev._suffix.causal
    same([ev.run(at=["a1.0@6", "m0@5"])], [ref.run(at=["a1.0@6", "m0@5"])])
    assert ev.forward_equivalents == pytest.approx(ref.forward_equivalents)
    model = load_model("test:tiny-llama")
    t = random_task(model.bridge.cfg.d_vocab, n=5, seq=7, seed=8)
    ev, ref = pair(model, t, metric="kl", positions="all")  # reads every position: nothing to keep
    assert ev._suffix.first_read == 0
    same([ev.run(at=["a1.0@6", "m0@5"])], [ref.run(at=["a1.0@6", "m0@5"])])
    assert ev.forward_equivalents == pytest.approx(ref.forward_equivalents)


def test_kl_metric_and_keys_kept_only_once_asked_for():
    model = load_model("test:tiny-llama")
    task = self_task(model, n=6, seq=8, seed=9)
    ev, ref = pair(model, task, metric="kl")
    node_run = ev.run(nodes=ev.senders[2:4])
    assert node_run.kv is None and ev.clean_run.kv is None  # node-level work keeps no keys or values
    a, b = ev.extend(node_run, at=["a2.1@6"]), ref.extend(ref.run(nodes=ev.senders[2:4]), at=["a2.1@6"])
    same([a], [b])
    assert node_run.kv is not None and a.kv is not None  # the base got them from one full forward
    c = ev.extend(a, at=["m1@7", "a0.3@5"])
    same([c], [ref.extend(b, at=["m1@7", "a0.3@5"])])


@pytest.fixture(scope="module")
def induction():
    model = load_induction_model()
    return model, induction_task(n=24, k=10, seed=0)


@pytest.mark.parametrize("order", ["alternate", "attribution"])
def test_position_searches_decide_the_same_with_and_without_the_suffix(induction, order):
    model, task = induction
    logs, results, evs = [], [], []
    for on in (True, False):
        ev = Evaluator(model, task, "mean")
        ev.causal_suffix = on
        log = []
        results.append(find_circuit(ev, "nodes,positions,edges", Thresholds(0.8), order, progress=False,
                                    on_decision=log.append, batch=4))
        logs.append(log)
        evs.append(ev)
    (a, b), (la, lb) = results, logs
    assert [d.key() + (d.removed,) for d in la] == [d.key() + (d.removed,) for d in lb]
    assert all(x.score == pytest.approx(y.score, rel=TOL, abs=TOL) for x, y in zip(la, lb))
    assert torch.equal(a.run.masks.at, b.run.masks.at) and a.run.edge_units == b.run.edge_units
    assert evs[0].forward_equivalents < evs[1].forward_equivalents


def test_circuits_are_grouped_by_where_their_change_begins():
    """A stacked pass splits into passes by offset where that is cheaper; every split scores the same."""
    model = load_model("test:tiny-llama")
    task = self_task(model, n=6, seq=8, seed=10)
    ev, ref = pair(model, task, ablation="mean")
    sfx = ev._suffix
    sfx.pass_cost = 1.4
    assert sfx.groups([0, 6, 6, 6, 6], 8) == [(6, [1, 2, 3, 4]), (0, [0])]
    assert sfx.groups([5, 5, 4], 8) == [(4, [0, 1, 2])]  # one more pass would save 2/8 only
    assert sfx.groups([3, 3, 3], 8) == [(3, [0, 1, 2])]
    variants = [((), (), [f"{n}@{q}"], ()) for n, q in (("a0.1", "0"), ("m1", "6"), ("a2.3", "6"), ("a1.0", "5"),
                                                        ("m0", "7"), ("embed", "4"))]
    want = [r.score for r in ref.extend_many(ref.run(), variants)]
    for cost in (0.0, 1.4, 1e9):  # every circuit its own pass, the default split, one pass
        sfx.pass_cost = cost
        got = ev.extend_many(ev.run(), variants)
        assert [r.score for r in got] == pytest.approx(want, rel=TOL, abs=TOL)


def test_in_float64_the_suffix_is_the_full_recompute_to_1e12(test_model):
    """The same arithmetic, not an approximation: in float64 the two paths agree to rounding of 1e-15."""
    task = self_task(test_model, n=6, seq=8, seed=2)
    ev, ref = (Evaluator(test_model, task, "mean", engine=Engine(test_model, dtype=torch.float64)) for _ in "ab")
    ref.causal_suffix = False
    rng = random.Random(1)
    edges = rng.sample(range(ev.index.E), ev.index.E // 4)
    a, b = ev.run(edges=edges), ref.run(edges=edges)
    for lo in (6, 2, 4, 7, 5, 1, 3):
        u, eu = units_from(ev, rng, lo, 2), edge_units_from(ev, rng, lo, 3)
        variants = [((), (), u, ()), ((), (), (), eu), ((), (), u[:1], eu[:1])]
        ra, rb = ev.extend_many(a, variants), ref.extend_many(b, variants)
        for x, y in zip(ra, rb):
            assert abs(x.score - y.score) < 1e-12
        a, b = ra[2], rb[2]
    assert abs(a.score - ev.full) > 1e-3 and ev.forward_equivalents < 0.8 * ref.forward_equivalents


def test_a_last_slot_that_makes_the_node_whole_recomputes_everything():
    """A node ablated at its last remaining slot is the node ablated (every position): no suffix."""
    model = load_model("test:tiny-gpt")
    task = self_task(model, n=6, seq=8, seed=11)
    ev, ref = pair(model, task, ablation="mean")
    node = "a1.2"
    a, b = ev.run(at=[f"{node}@{q}" for q in range(7)]), ref.run(at=[f"{node}@{q}" for q in range(7)])
    before = ev.forward_equivalents
    a, b = ev.extend(a, at=[f"{node}@7"]), ref.extend(b, at=[f"{node}@7"])  # slot 7 alone would start at 7
    assert bool(a.masks.ablated[ev.index.node(node)])
    same([a], [b])
    assert ev.forward_equivalents - before == pytest.approx(ev.layout.cost(ev.index.node_stage[ev.index.node(node)]))
    assert ev.extend(a, at=["m2@7"]).score == pytest.approx(ref.extend(b, at=["m2@7"]).score, rel=TOL, abs=TOL)


def test_feature_graphs_recompute_everything():
    """Dictionaries spliced in at hook points are not cut to a suffix: their circuits take the full path."""
    from test_feature_graph import rand_dict

    model = load_model("test:tiny-llama")
    task = self_task(model, n=6, seq=8, seed=12)
    dicts = [rand_dict(model.d_model, "resid_pre.1", seed=1), rand_dict(model.d_model, "mlp_out.0", seed=2)]
    ev, ref = pair(model, task, dictionaries=dicts)
    f = ev.index.senders[ev.index.S0 + 2]
    units = [f"{f}@6", "a1.0@5", "m2@7"]
    same([ev.run(at=units)], [ref.run(at=units)])
    assert ev._suffix.offsets(ev.clean_run, [ev.run(at=units).masks], ev.source, ev.batch) == [0]
    assert ev.forward_equivalents == pytest.approx(ref.forward_equivalents + ev.layout.cost(
        min(ev.index.node_stage[ev.index.node(u.split("@")[0])] for u in units)))
