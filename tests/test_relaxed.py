"""The relaxed forward (circuitsearch.relaxed) at binary masks is the evaluator, and its gradient is right.

Learned-mask search optimises through relaxed_score, then verifies with the evaluator: the two must
agree exactly on every circuit the masks can express, or the optimisation aims at the wrong thing.
"""
import random

import pytest
import torch

from circuitsearch.catalogue import load_model
from circuitsearch.patching import ABLATIONS, Evaluator
from circuitsearch.evaluator.relaxed import faithfulness_map, keep_tensors, relaxed_score
from circuitsearch.tasks import concat_tasks
from conftest import random_task, self_task
from test_mixed_tasks import mixed_parts

TOL = 1e-5


def circuits(ev, rng):
    """Nothing removed; nodes ablated; edges removed; nodes and edges; units at slots and edges at slots."""
    S = ev.senders
    edges = ev.graph.edges
    slots = ev.slots.names
    out = [{}, {"nodes": rng.sample(S, 3)}, {"edges": rng.sample(edges, 12)},
           {"nodes": rng.sample(S, 2), "edges": rng.sample(edges, 20)}]
    if len(slots) > 1:
        units = [f"{n}@{rng.choice(slots)}" for n in rng.sample(S, 4)]
        eu = []
        for e in rng.sample(edges, 10):
            s, r = e.split("->")
            q = rng.choice(slots)
            eu.append(f"{s}@{q}->{r}@{q}")
        out += [{"at": units}, {"edges_at": eu, "edges": rng.sample(edges, 4)},
                {"at": units[:2], "edges_at": eu[:5], "nodes": rng.sample(S, 1)}]
    return out


def check_binary(ev, seed=0):
    rng = random.Random(seed)
    changed = 0
    for c in circuits(ev, rng):
        run = ev.run(**c)
        with torch.no_grad():
            got = float(relaxed_score(ev, *keep_tensors(ev, run)))
        assert abs(got - run.score) < TOL * max(1.0, abs(run.score)), (c, got, run.score)
        changed += abs(run.score - ev.full) > 1e-4
    assert changed >= 2  # the circuits really change the score, so agreement means something


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_binary_masks_score_as_the_evaluator(test_model, ablation):
    task = random_task(test_model.bridge.cfg.d_vocab, seed=5)
    check_binary(Evaluator(test_model, task, ablation))


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_binary_masks_on_mixed_lengths(ablation):
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, concat_tasks("mixed", mixed_parts(model.bridge.cfg.d_vocab)), ablation)
    assert ev.run_task.mixed
    check_binary(ev, seed=1)


@pytest.mark.parametrize("metric", ["kl", "prob", "logprob"])
def test_binary_masks_for_other_metrics(metric):
    model = load_model("test:tiny-gpt")
    check_binary(Evaluator(model, self_task(model, seed=2), "mean", metric=metric), seed=2)


def test_binary_masks_with_split_embed():
    model = load_model("test:tiny-gpt")
    ev = Evaluator(model, random_task(model.bridge.cfg.d_vocab, seed=6), "mean", split_embed=True)
    assert ev.senders[:2] == ["tok", "pos"]
    check_binary(ev, seed=3)


def test_masks_between_zero_and_one_interpolate_a_node():
    """keep 0.5 on one node moves its output half way: the score lies strictly between the two circuits'
    for some node (the map is smooth, not a step)."""
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, self_task(model, seed=1), "mean")
    nodes, _, _ = keep_tensors(ev)
    s = ev.index.node(ev.senders[-1])
    half = nodes.clone()
    half[s] = 0.5
    with torch.no_grad():
        mid = float(relaxed_score(ev, half))
    lo, hi = sorted([ev.full, ev.score(nodes=[ev.senders[-1]])])
    assert lo < mid < hi


@pytest.mark.parametrize("edges_level", [False, True])
def test_gradient_matches_finite_differences(edges_level):
    model = load_model("test:tiny-llama")
    ev = Evaluator(model, self_task(model, seed=3), "mean")
    g = torch.Generator().manual_seed(0)
    nodes, edges, _ = keep_tensors(ev)
    nodes = (0.3 + 0.6 * torch.rand(nodes.shape, generator=g)).requires_grad_()
    edges = (0.3 + 0.6 * torch.rand(edges.shape, generator=g)).requires_grad_() if edges_level else None
    score = relaxed_score(ev, nodes, edges)
    params = [nodes] + ([edges] if edges_level else [])
    grads = torch.autograd.grad(score, params)
    direction = [torch.randn(p.shape, generator=g) for p in params]
    eps = 1e-3
    with torch.no_grad():
        plus = relaxed_score(ev, *[p + eps * d for p, d in zip(params, direction)])
        minus = relaxed_score(ev, *[p - eps * d for p, d in zip(params, direction)])
    fd = float(plus - minus) / (2 * eps)
    an = float(sum((gr * d).sum() for gr, d in zip(grads, direction)))
    assert abs(an) > 1e-3
    assert fd == pytest.approx(an, rel=2e-2, abs=1e-4)


def test_faithfulness_map_is_the_evaluators():
    model = load_model("test:tiny-gpt")
    for metric in ("logit_diff", "kl", "logprob"):
        ev = Evaluator(model, self_task(model, seed=4), "mean", metric=metric)
        f0, f1 = faithfulness_map(ev)
        for s in (ev.full, ev.empty, 0.37):
            assert f0 + f1 * s == pytest.approx(ev.faithfulness(s), abs=1e-9)
