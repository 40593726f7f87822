"""The hook-based evaluation path (circuitsearch.hooked): the fast evaluator's scores through the bridge's
own hook points, for the models the fast engine refuses; models it cannot express refused by name."""
import json
import random

import pytest
import torch

from circuitsearch.algorithms.iterative import prune
from circuitsearch.algorithms.search import Thresholds
from circuitsearch.catalogue import load_model
from circuitsearch.cli import main
from circuitsearch.config import PruneConfig
from circuitsearch.hooked import HookedEvaluator, check_structure, make_evaluator
from circuitsearch.models import TEST_CONFIGS, Model, ModelError, build_test_model
from circuitsearch.patching import ABLATIONS, Evaluator
from circuitsearch.reference import hooked_score
from conftest import random_task, self_task
from test_engine_features import hf_model, native
from test_evaluator import grouped_uniform

REL = 1e-5  # hooked = fast within 1e-5 of the score's scale


def close(a, b):
    return abs(a - b) <= REL * max(1.0, abs(a))


MODELS = {
    "llama-gqa": lambda: native(),                  # RMS, rotary, grouped-query, gated MLP, every bias live
    "gpt": lambda: load_model("test:tiny-gpt"),     # LayerNorm, learned positions
    "attn-only": lambda: load_model("test:tiny-attn"),
    "neox-parallel": lambda: Model.from_hf(hf_model("neox-parallel"), name="tiny-neox"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_hooked_equals_fast(model, ablation):
    """Nothing ablated, nodes ablated, edges removed (q/k/v, MLP and logits inputs alike; on grouped-query
    models k/v edges differ between query heads of one group), both together."""
    task = random_task(model.bridge.cfg.d_vocab, seed=3)
    fast, hooked = Evaluator(model, task, ablation), HookedEvaluator(model, task, ablation)
    assert hooked.path == "hooked" and hooked.engine is None
    for what in ("full", "empty", "corrupted"):
        assert close(getattr(fast, what), getattr(hooked, what)), what
    assert hooked.graph == fast.graph
    rng = random.Random(0)
    moved = 0
    for k in (1, 3):
        nodes = rng.sample(fast.senders, k)
        assert close(fast.score(nodes=nodes), hooked.score(nodes=nodes)), nodes
    for frac in (0.05, 0.3):
        edges = rng.sample(fast.graph.edges, int(frac * len(fast.graph.edges)))
        f = fast.score(edges=edges)
        moved += abs(f - fast.full) > 1e-3
        assert close(f, hooked.score(edges=edges))
        nodes = rng.sample(fast.senders, 2)
        assert close(fast.score(nodes=nodes, edges=edges), hooked.score(nodes=nodes, edges=edges))
    assert moved  # the edge sets really change the score
    qkv = [e for e in fast.graph.edges if e[-2:] in (".q", ".k", ".v")]
    edges = rng.sample(qkv, len(qkv) // 5)
    assert close(fast.score(edges=edges), hooked.score(edges=edges))


@pytest.mark.parametrize("metric", ["prob", "kl", "accuracy"])
def test_hooked_equals_fast_on_other_metrics(metric):
    m = native()
    task = self_task(m, seed=1)
    fast, hooked = Evaluator(m, task, metric=metric), HookedEvaluator(m, task, metric=metric)
    edges = random.Random(1).sample(fast.graph.edges, 40)
    for nodes, e in (([], []), (["a1.2", "m0"], []), ([], edges)):
        assert close(fast.score(nodes=nodes, edges=e), hooked.score(nodes=nodes, edges=e))


def test_node_ablation_equals_removing_its_out_edges_on_the_hooked_path(model):
    task = random_task(model.bridge.cfg.d_vocab, seed=4)
    ev = HookedEvaluator(model, task)
    moved = 0
    for node in ("embed", "a0.1", "a1.3", "m0" if not model.attn_only else "a1.0"):
        edges = [e for e in ev.graph.edges if e.split("->")[0] == node]
        by_node, by_edges = ev.score(nodes=[node]), ev.score(edges=edges)
        moved += abs(by_node - ev.full) > 1e-3
        assert abs(by_node - by_edges) <= REL * max(1.0, abs(by_node)), node
    assert moved >= 3


def test_grouped_query_heads_read_their_own_k_and_v():
    """On a grouped-query model the bridge has one key/value projection per group; the hooked path still
    gives each query head its own k/v input (the evaluator's semantics), not the group's."""
    m = load_model("test:tiny-llama")
    assert m.n_kv_heads < m.n_heads
    task = random_task(m.bridge.cfg.d_vocab, seed=3)
    fast, hooked = Evaluator(m, task), HookedEvaluator(m, task)
    one_k = [e for e in fast.graph.edges if e.endswith("a1.0.k")]
    one_v = [e for e in fast.graph.edges if e.endswith("a2.1.v")][:2]
    for edges in (one_k, one_v, one_k + one_v):
        h = hooked.score(edges=edges)
        assert close(fast.score(edges=edges), h)
        assert close(h, hooked_score(m, task, edges=edges))  # the reference: one copy per query head
        grouped = grouped_uniform(edges, m.n_heads, m.n_kv_heads)
        assert abs(h - hooked.score(edges=grouped)) > 1e-6  # the group-wide removal is another circuit
        assert close(hooked.score(edges=grouped), hooked_score(m, task, edges=grouped))  # the reference agrees


def test_batched_extension_and_rescore_on_the_hooked_path():
    m = native()
    ev = HookedEvaluator(m, self_task(m, seed=2))
    rng = random.Random(3)
    base = ev.run(edges=rng.sample(range(len(ev.graph.edges)), len(ev.graph.edges) // 4))
    variants = [([], rng.sample(range(len(ev.graph.edges)), 2)), (["m0"], []), (["a1.0"], []), ([], [])]
    before = ev.forward_passes
    runs = ev.extend_many(base, variants)
    assert ev.forward_passes - before == 3 and runs[-1] is base  # one full forward per changed circuit
    for (n, e), r in zip(variants, runs):
        assert r.score == ev.extend(base, nodes=n, edges=e).score
    assert ev.rescore(runs[1]) == runs[1].score
    assert runs[1].nodes == frozenset({"m0"}) and len(runs[1].edges) == len(base.edges)


# ----------------------------------------------------------------- models the fast engine refuses

def test_a_model_the_engine_refuses_is_pruned_on_the_hooked_path():
    """GPT-Neo (local attention layers; not an engine architecture): auto picks the hooked path with a
    note naming why, scores the bridge's own forward, and a prune runs end to end; fast refuses it."""
    m = Model.from_hf(hf_model("gpt-neo"), name="tiny-neo")
    task = self_task(m, n=6, seed=2)
    notes = []
    ev = make_evaluator(m, task, log=notes.append)
    assert isinstance(ev, HookedEvaluator) and len(notes) == 1
    assert "hook-based path" in notes[0] and "architecture GPTNeoForCausalLM" in notes[0]
    with torch.no_grad():
        logits = m.bridge(task.clean)[:, -1]
    plain = float((logits.gather(1, task.answers[:, None]) - logits.gather(1, task.wrong_answers[:, None])).mean())
    assert abs(ev.full - plain) < 1e-5
    assert abs(ev.score(nodes=["a1.0", "m0"]) - hooked_score(m, task, nodes=["a1.0", "m0"])) < 1e-5
    nodes = prune(ev, "nodes", Thresholds(0.8), "reverse", progress=False)
    edges = prune(ev, "edges", Thresholds(0.8), "reverse", run=nodes.run, progress=False, max_passes=1)
    run = edges.run
    assert 0 < len(run.nodes) < len(ev.senders) and run.edges and ev.faithfulness(run.score) >= 0.8
    assert close(ev.rescore(run), run.score)
    with pytest.raises(ModelError, match="does not implement architecture GPTNeoForCausalLM"):
        make_evaluator(m, task, engine="fast")


def test_native_config_flags_the_model_ignores_run_as_the_model_computes():
    """TransformerLens 4's native model ignores parallel_attn_mlp (the engine refuses the config): the hooked
    path checks which input the MLPs really read (the residual after attention) and scores exactly what the
    fast engine scores on the same weights without the flag."""
    flagged = build_test_model(dict(TEST_CONFIGS["tiny-llama"], parallel_attn_mlp=True), seed=0)
    plain = build_test_model(TEST_CONFIGS["tiny-llama"], seed=0)
    task = random_task(64, seed=5)
    ev = make_evaluator(flagged, task)
    assert isinstance(ev, HookedEvaluator) and not ev.graph.parallel and "a0.1->m0" in ev.graph.edges
    fast = Evaluator(plain, task)
    edges = random.Random(2).sample(fast.graph.edges, 60)
    for nodes, e in (([], []), (["a0.1", "m1"], []), ([], edges)):
        assert close(fast.score(nodes=nodes, edges=e), ev.score(nodes=nodes, edges=e))


def test_an_mlp_the_engine_cannot_compute_runs_hooked():
    """solu_ln (a LayerNorm inside the MLP) is refused by the engine; the hooked path runs the MLP as the
    model does, and agrees with the independent hooked reference."""
    m = build_test_model(dict(TEST_CONFIGS["tiny-llama"], act_fn="solu_ln", gated_mlp=False), seed=1)
    task = random_task(64, seed=6)
    ev = make_evaluator(m, task)
    assert isinstance(ev, HookedEvaluator)
    for nodes in ([], ["m1"], ["a2.3", "embed"]):
        assert abs(ev.score(nodes=nodes) - hooked_score(m, task, nodes=nodes)) < 1e-5


def test_the_check_falls_back_to_hooked_when_the_engine_differs(monkeypatch):
    """A model the engine claims but does not reproduce (its load check fails): auto takes the hooked path
    naming the difference; fast raises the check's error."""
    import circuitsearch.engine as engine

    m = native(attention_dir="bidirectional")
    real = engine.extract_weights

    def causal(model):  # the pre-#13 bug: bidirectional scored with a causal mask
        w = real(model)
        w.causal = True
        return w

    monkeypatch.setattr(engine, "extract_weights", causal)
    task = random_task(64, seed=8)
    notes = []
    ev = make_evaluator(m, task, log=notes.append)
    assert isinstance(ev, HookedEvaluator) and "load check failed" in notes[0] and "differ" in notes[0]
    with torch.no_grad():
        logits = m.bridge(task.clean)[:, -1]
    assert abs(ev.full - float((logits.gather(1, task.answers[:, None])
                                - logits.gather(1, task.wrong_answers[:, None])).mean())) < 1e-5
    with pytest.raises(ModelError, match="differ from the bridge's forward"):
        make_evaluator(m, task, engine="fast")


# ----------------------------------------------------------------- refused on every path

def test_post_norms_are_refused_by_name_and_by_the_structure_check():
    m = Model.from_hf(hf_model("gemma2"), name="tiny-gemma2")
    task = random_task(64, seed=1)
    with pytest.raises(ModelError, match="hook-based path either: .*post-attention/post-MLP norms"):
        make_evaluator(m, task)
    # the structure check finds it on its own, from the hook values
    with pytest.raises(ModelError, match=r"blocks\.\d\.(hook_resid_pre|ln2\.hook_in).*departs .* by up to"):
        check_structure(m, task.clean)


def test_a_model_without_heads_is_refused_on_every_path():
    import transformers as tf

    torch.manual_seed(0)
    hf = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4)).eval()
    m = Model.from_hf(hf)
    for engine in ("auto", "hooked", "fast"):
        with pytest.raises(ModelError, match=r"\(MambaForCausalLM\) has no attention heads"):
            make_evaluator(m, random_task(64), engine=engine)


def test_mixture_of_experts_is_refused_by_name():
    m = native()
    m.bridge.cfg.num_experts = 4
    try:
        with pytest.raises(ModelError, match="num_experts=4 .*mixture-of-experts"):
            HookedEvaluator(m, random_task(64))
    finally:
        m.bridge.cfg.num_experts = None


@pytest.mark.parametrize("metric", ["logit_diff", "kl"])
def test_gradients_and_attribution_equal_the_fast_evaluators(model, metric):
    """receiver_gradients (every receiver's own input, on grouped-query models each query head's k/v too),
    sender_diffs and EAP-IG estimates through the bridge equal the fast evaluator's, in a pruned circuit
    halfway along the integration path."""
    from circuitsearch.algorithms.attribution import attribute

    task = self_task(model, seed=2)
    fast, hooked = Evaluator(model, task, metric=metric), HookedEvaluator(model, task, metric=metric)
    rng = random.Random(0)
    nodes, edges = rng.sample(fast.senders, 2), rng.sample(fast.graph.edges, len(fast.graph.edges) // 5)
    r1, r2 = fast.run(nodes, edges), hooked.run(nodes, edges)
    g1, g2 = fast.receiver_gradients(r1, 0.5), hooked.receiver_gradients(r2, 0.5)
    scale = max(float(a.abs().max()) for a in g1["attn"])
    assert scale > 1e-4
    pairs = list(zip(g1["attn"], g2["attn"])) + [(g1["logits"], g2["logits"])]
    pairs += [] if model.attn_only else list(zip(g1["mlp"], g2["mlp"]))
    for a, b in pairs:
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-5 * max(1.0, scale)
    d1, d2 = fast.sender_diffs(r1), hooked.sender_diffs(r2)
    assert float((d1 - d2).abs().max()) <= 1e-5 * max(1.0, float(d1.abs().max()))
    a1, a2 = attribute(fast, r1, "eap-ig", 2), attribute(hooked, r2, "eap-ig", 2)
    assert a1.edges.keys() == a2.edges.keys()
    top = max(abs(v) for v in a1.edges.values())
    assert max(abs(a1.edges[e] - a2.edges[e]) for e in a1.edges) <= 1e-5 * max(1.0, top)
    assert hooked.backward_passes == 3


# ----------------------------------------------------------------- the --engine option

def test_engine_option_is_checked():
    with pytest.raises(ValueError, match="--engine 'slow' is not one of auto, fast, hooked"):
        PruneConfig(model="test:tiny-gpt", task="planted", engine="slow").check()
    assert "engine" not in PruneConfig(engine="hooked").to_json()  # same scores on both paths


def test_engine_choice_on_a_supported_model():
    m = native()
    task = random_task(64)
    assert type(make_evaluator(m, task)) is Evaluator
    assert type(make_evaluator(m, task, engine="hooked")) is HookedEvaluator
    with pytest.raises(ValueError, match="--dtype bfloat16 set the fast engine"):
        make_evaluator(m, task, engine="hooked", dtype="bfloat16")


@pytest.fixture(scope="module")
def neo_dir(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("neo")
    torch.manual_seed(0)
    neo = tf.GPTNeoForCausalLM(tf.GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                               attention_types=[[["global", "local"], 1]], window_size=3,
                                               max_position_embeddings=64)).eval()
    neo.save_pretrained(root / "neo")
    g = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(0, 64, (2, 6, 6), generator=g)
    with torch.no_grad():  # answers the model's own top choices, wrong answers its last: a task it does
        logits = neo(clean).logits[:, -1]
    with open(root / "ids.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"clean": clean[i].tolist(), "corrupted": corrupted[i].tolist(),
                                "answer": int(logits[i].argmax()), "wrong_answer": int(logits[i].argmin())}) + "\n")
    return root


def test_cli_prunes_a_refused_model_on_the_hooked_path(neo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--model", str(neo_dir / "neo"), "--task", str(neo_dir / "ids.jsonl")]
    assert main(["prune", *args, "--level", "nodes", "--out", str(out), "--quiet", "--absolute", "0.5"]) == 0
    said = capsys.readouterr()
    said = said.out + said.err
    assert "runs on the hook-based path" in said and "GPTNeoForCausalLM" in said
    circuit = json.loads((out / "circuit.json").read_text())
    assert circuit["stats"]["engine"] == "hooked" and circuit["scores"]["faithfulness"] >= 0.5
    assert main(["score", *args, "--engine", "fast"]) == 2
    err = capsys.readouterr().err
    assert "does not implement architecture GPTNeoForCausalLM" in err and "--engine auto or hooked" in err


def test_what_the_hooked_path_does_not_do_is_refused_by_name():
    """Split embeddings, tasks of several lengths/templates and readouts other than the last position are
    refused on the hook-based path (not scored some other way); the l2 metric, read at the last
    position, scores as on the fast engine."""
    from circuitsearch.tasks.base import concat_tasks

    gpt = load_model("test:tiny-gpt")
    task = random_task(gpt.bridge.cfg.d_vocab, seed=4)
    with pytest.raises(ModelError, match="--split-embed runs on the fast engine only"):
        make_evaluator(gpt, task, engine="hooked", split_embed=True)
    with pytest.raises(ValueError, match="reads the last position only"):
        make_evaluator(gpt, task, engine="hooked", positions="all")
    mixed = concat_tasks("mixed", [task, random_task(gpt.bridge.cfg.d_vocab, seq=5, seed=5)], {})
    with pytest.raises(ValueError, match="several templates or token lengths"):
        make_evaluator(gpt, mixed, engine="hooked")
    fast, hooked = (make_evaluator(gpt, task, metric="l2", engine=e) for e in ("fast", "hooked"))
    assert hooked.path == "hooked" and close(fast.empty, hooked.empty) and fast.empty > 1e-3
    node = fast.senders[3]
    assert close(fast.score(nodes=[node]), hooked.score(nodes=[node]))
