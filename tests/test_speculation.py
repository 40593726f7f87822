"""Speculative batching scores several candidates in one pass and still makes the sequential
search's decisions: the same candidates tried in the same order with the same verdicts, on
every order and both levels; node-level scores are bit-identical."""
import pytest

from circuitsearch.algorithms.iterative import Thresholds, find_circuit
from circuitsearch.algorithms.speculation import Speculation, block_size
from circuitsearch.patching import Evaluator
from conftest import self_task

ORDERS = ["forward", "reverse", "alternate", "random:1", "attribution"]


@pytest.fixture(scope="module")
def evaluators(request):
    return {}


def graded(test_model, cache):
    """An evaluator on a graded task (the full model is best, ablations cost), one per model."""
    key = test_model.name
    if key not in cache:
        cache[key] = Evaluator(test_model, self_task(test_model, n=6, seed=3), "mean")
    return cache[key]


def trace(result):
    return [(d.phase, d.pass_, d.candidate, d.removed) for d in result.decisions]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("level", ["nodes", "both"])
def test_batched_search_makes_the_sequential_decisions(test_model, evaluators, order, level):
    ev = graded(test_model, evaluators)
    thresholds = Thresholds(0.6, 0.1)
    one = find_circuit(ev, level, thresholds, order, progress=False, batch=1)
    many = find_circuit(ev, level, thresholds, order, progress=False, batch=8)
    assert trace(many) == trace(one)
    assert many.ablated == one.ablated and many.removed_edges == one.removed_edges
    removed = sum(d.removed for d in one.decisions)
    assert 0 < removed < len(one.decisions)  # a search with both verdicts, not a trivial one
    assert many.speculation["nodes"]["blocks"] < one.speculation["nodes"]["blocks"]
    for a, b in zip(one.decisions, many.decisions):
        if a.phase == "nodes":
            assert (a.before, a.score) == (b.before, b.score)  # bit-identical
        else:
            assert b.score == pytest.approx(a.score, abs=1e-5) and b.before == pytest.approx(a.before, abs=1e-5)
    assert many.final == pytest.approx(one.final, abs=1e-5)


def test_extend_many_equals_extend(test_model, evaluators):
    """Each circuit of a batched pass scores as its own pass, also when later extended."""
    import random
    ev = graded(test_model, evaluators)
    rng = random.Random(2)
    E = list(range(len(ev.graph.edges)))
    base = ev.run(nodes=[ev.senders[-1]], edges=rng.sample(E, len(E) // 4))
    variants = [([], rng.sample(E, 2)), ([rng.choice(ev.senders[1:])], []), ([], []),
                ([ev.senders[1]], rng.sample(E, 1))]
    runs = ev.extend_many(base, variants)
    assert runs[2] is base  # removes nothing new
    for (n, e), r in zip(variants, runs):
        one = ev.extend(base, nodes=n, edges=e)
        assert r.score == pytest.approx(one.score, abs=1e-5)
        more = rng.sample(E, 3)
        assert ev.extend(r, edges=more).score == pytest.approx(ev.rescore(ev.extend(one, edges=more)), abs=1e-5)


def test_block_size_rule():
    """Large blocks when guesses are reliable, one candidate at a time when they are a coin toss."""
    assert block_size(0.5) <= 2 and block_size(0.2) == 1
    assert 3 <= block_size(0.9) <= 6
    assert block_size(0.999) == 16 and block_size(1.0) == 16
    sizes = [block_size(q / 100) for q in range(0, 100, 5)]
    assert sizes == sorted(sizes)
    with pytest.raises(ValueError, match="at least 1"):
        Speculation(0)


def test_block_stops_before_a_candidate_that_would_make_every_row_start_early():
    """Candidates of the last layers, then one of the first: the block leaves that one out, because
    with it every row would recompute the whole model; in layer order nothing changes."""
    late = [0.1] * 6
    assert block_size(0.99, spans=late + [1.0] + late) == 6
    assert block_size(0.99, spans=[0.1] * 16) == block_size(0.99) == 16
    assert block_size(0.99, spans=[1.0] + late) == 7  # the early one first costs nothing extra
    assert block_size(0.99, spans=[0.3, 0.3]) == 2  # no more than there are candidates


def test_skipped_tries_on_an_unchanged_circuit(test_model, evaluators):
    """A try on the circuit an earlier try already saw is not run again, and the search still ends
    in the same circuit as when every try runs (reverse order: the previous pass's last tries
    come first in the next)."""
    ev = graded(test_model, evaluators)
    before = ev.forward_passes
    res = find_circuit(ev, "nodes", Thresholds(0.6, 0.1), "alternate", progress=False, batch=1)
    passes = ev.forward_passes - before
    assert res.skipped > 0
    assert passes == len(res.decisions) - res.skipped + 1  # + the final re-score
