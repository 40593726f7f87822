"""Pruning the trained induction model recovers a previous-token head feeding an induction head."""
import pytest
import torch

from circuitsearch.algorithms.iterative import Thresholds, edge_candidates, find_circuit
from circuitsearch.catalogue import load_model
from circuitsearch.patching import Evaluator
from circuitsearch.toys import induction_task

PREV_TOKEN_HEAD = "a0.2"  # attends to the previous token (0.88 on average, scripts/train_induction.py)


@pytest.fixture(scope="module")
def setup():
    model = load_model("induction-2l")
    task = induction_task(n=24, k=10, seed=0)
    _, cache = model.bridge.run_with_cache(task.clean)
    return model, task, cache, Evaluator(model, task, "mean")


def prev_token_attention(cache, head):
    p = cache["blocks.0.attn.hook_pattern"][:, head]  # [batch, query, key]
    return torch.stack([p[:, i, i - 1] for i in range(1, p.shape[1])]).mean().item()


@pytest.mark.parametrize("order", ["forward", "reverse", "alternate", "random:1", "random:2", "attribution"])
def test_induction_circuit_recovered(setup, order):
    model, task, cache, ev = setup
    assert ev.full > 5 and ev.faithfulness(ev.corrupted) < 0.1  # the model does induction; corruption kills it
    result = find_circuit(ev, "both", Thresholds(0.8), order, progress=False)
    kept = [n for n in ev.senders if n not in result.ablated]
    edges = edge_candidates(ev, result.run)
    assert PREV_TOKEN_HEAD in kept and prev_token_attention(cache, 2) > 0.5
    induction = [n for n in kept if n.startswith("a1.")]
    assert induction, "an induction head in layer 1 must survive"
    target = task.positions["S9"]  # first occurrence of the answer token: where induction attends
    for head in induction:
        h = int(head.split(".")[1])
        assert cache["blocks.1.attn.hook_pattern"][:, h, -1, target].mean() > 0.7, head
        assert f"{PREV_TOKEN_HEAD}->{head}.k" in edges  # K-composition: the induction mechanism
        assert f"{head}->logits" in edges
    heads = [n for n in kept if n.startswith("a")]
    assert len(heads) <= 4  # of 8: most heads dropped
    assert ev.faithfulness(ev.score(nodes=result.ablated, edges=result.removed_edges)) >= 0.8
