"""The evaluator on an engine whose tensors live on another device than the CPU masks.

No GPU here, so the engine runs on torch's `meta` device: it computes shapes only and, like a GPU,
refuses most operations that mix its tensors with CPU ones ("Tensor on device meta is not on the
expected device cpu"), which is what broke the evaluator on cuda. Scores cannot be read from meta
tensors, so the two places that turn tensors into Python numbers (the engine's check against the
bridge, and the score's `float`) are stubbed; every tensor operation of the forward passes, edge sums,
slot masks, relaxed forward and attribution runs for real. (einsum does not check devices on meta:
benchmarks/gpu_check.py on a CUDA machine stays the full check.)
"""
import pytest
import torch

from circuitsearch import patching
from circuitsearch.algorithms.attribution import edge_estimates
from circuitsearch.engine import Engine
from circuitsearch.evaluator import readout_scores, stacked
from circuitsearch.evaluator.relaxed import keep_tensors, relaxed_score
from circuitsearch.models import build_test_model

from conftest import self_task


@pytest.fixture
def on_meta(monkeypatch):
    def finish(metric, run, batch):  # all of finish's tensor arithmetic, then a stand-in for float(score)
        run.per_prompt = readout_scores.per_prompt(metric, run.logits, batch)
        assert readout_scores.weighted_mean(run.per_prompt, batch).device.type == "meta"
        run.score = 0.5
    monkeypatch.setattr(Engine, "check", lambda self, *a, **k: 0.0)
    for mod in (stacked, readout_scores, patching):
        monkeypatch.setattr(mod, "finish", finish)

    def make(name, **kw):
        model = build_test_model(name)
        return patching.Evaluator(model, self_task(model), engine=Engine(model, device="meta"), **kw)
    return make


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt"])
@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
def test_nodes_and_edges_extend_on_another_device(on_meta, name, ablation):
    ev = on_meta(name, ablation=ablation)
    assert ev.clean_run.final.device.type == "meta" and ev.source.z[0].device.type == "meta"
    e = ev.index.edges
    runs = ev.extend_many(ev.run(), [([ev.senders[3]], ()), ([ev.senders[5]], ())])
    runs = ev.extend_many(runs[0], [((), [e[10]]), ((), [e[40], e[50]])])
    run = ev.extend(runs[1], edges=[e[60]], nodes=[ev.senders[-1]])
    assert run.logits.device.type == "meta" and run.masks.ablated.device.type == "cpu"


def test_slots_edges_at_slots_and_split_embed_on_another_device(on_meta):
    ev = on_meta("tiny-gpt", positions="all")
    run = ev.extend_many(ev.run(), [((), (), [ev.unit_names[7]]), ((), (), [ev.unit_names[30]])])[1]
    run = ev.extend(run, edges_at=[ev.edge_unit_name(100), ev.edge_unit_name(205)], edges=[ev.index.edges[7]])
    run = ev.extend_many(run, [((), (), (), [ev.edge_unit_name(300)]), ([ev.senders[2]], ())])[0]
    nodes, edges, at = keep_tensors(ev, run)
    score = relaxed_score(ev, nodes.requires_grad_(), edges, at, {})
    assert score.device.type == "meta"
    split = on_meta("tiny-gpt", split_embed=True)
    assert split.extend(split.run(), nodes=["pos"]).final.device.type == "meta"


def test_gradients_and_attribution_on_another_device(on_meta):
    ev = on_meta("tiny-llama")
    grads = ev.receiver_gradients(ev.run(), alpha=[0.5, 1.0])
    assert grads["attn"][0].device.type == "meta" and grads["logits"].device.type == "meta"
    # every estimate is computed on the device; only the final copy to the CPU (for the CPU masks)
    # cannot run on meta, which holds no data
    with pytest.raises(NotImplementedError, match="meta tensor"):
        edge_estimates(ev, ev.run(), "eap-ig", 2, by_slot=True)
