"""Dictionary features as graph nodes (issue 25): the splice is exact, ablating features means what it says
(checked against an independent forward through features.splice), the search and attribution reach them, and a
planted toy feature is found."""
import pytest
import torch

from circuitsearch import patching
from circuitsearch.algorithms.attribution import attribute
from circuitsearch.algorithms.iterative import prune
from circuitsearch.algorithms.search import Thresholds
from circuitsearch.features.dictionary import Dictionary
from circuitsearch.features.hooks import parse_hook
from circuitsearch.features.splice import _walk, hook_activations
from circuitsearch.models import build_test_model
from circuitsearch.tasks.base import Task
from circuitsearch.toys import planted_model

from conftest import self_task


def rand_dict(d, hook, F=16, out=None, seed=0, kind="relu", **kw):
    g = torch.Generator().manual_seed(seed)
    return Dictionary(torch.randn(d, F, generator=g) * 0.3, torch.randn(F, generator=g) * 0.1,
                      torch.randn(F, d, generator=g) * 0.2, torch.randn(d, generator=g) * 0.05, hook=hook,
                      out_hook=out, kind=kind, **kw)


@pytest.fixture(scope="module")
def llama():
    model = build_test_model("tiny-llama")
    return model, self_task(model)


def llama_dicts(model):
    d, L = model.d_model, model.n_layers
    return [rand_dict(d, "resid_pre.1", seed=1), rand_dict(d, "mlp_out.0", seed=2),
            rand_dict(d, "attn_out.1", seed=3), rand_dict(d, "mlp_in.1", out="mlp_out.1", seed=4),
            rand_dict(d, f"resid_pre.{L}", seed=5, kind="topk", k=4), rand_dict(d, "resid_mid.0", seed=6)]


def feature_nodes(ev):
    return ev.index.senders[ev.index.S0:]


def reference_score(ev, task, dicts, ablated: set[str], ablation: str) -> float:
    """Mean logit difference with the named features/errors ablated, computed without the evaluator: the model
    walked through features.splice with each hook edited by hand, ablation values from hook_activations."""
    eng = ev.engine
    sites = {str(d.writes): (d, s) for d, s in zip(ev.dictionaries, ev.index.sites)}
    # the corrupted run's values at every site (nothing is ablated there)
    values = {}
    for w, (d, site) in sites.items():
        x_in = hook_activations(eng, task.corrupted, d.hook)
        x_out = x_in if d.hook == w else hook_activations(eng, task.corrupted, w)
        f = d.encode(x_in)
        e = x_out - d.decode(f)
        if ablation == "mean":
            values[w] = (f.mean(0, keepdim=True), e.mean(0, keepdim=True))
        elif ablation == "zero":
            values[w] = (torch.zeros_like(f[:1]), torch.zeros_like(e[:1]))
        else:
            values[w] = (f, e)

    def edit(w):
        d, site = sites[w]
        fa, ea = values[w]
        names = site.nodes

        def fn(a, seen):
            x_in = seen[parse_hook(d.hook)] if d.hook != w else a
            f = d.encode(x_in)
            e = a - d.decode(f)
            out = a
            for k, i in enumerate(site.active):
                if names[k] in ablated:
                    out = out + (fa[..., i] - f[..., i])[..., None] * d.W_dec[i]
            if names[-1] in ablated:
                out = out + (ea - e)
            return out
        return fn

    edits = {parse_hook(w): edit(w) for w in sites}
    reads = {parse_hook(d.hook) for d in ev.dictionaries if d.is_transcoder}
    with torch.inference_mode():
        logits = _walk(eng, task.clean, edits, reads)[:, -1]
    ld = logits.gather(1, task.answers[:, None]) - logits.gather(1, task.wrong_answers[:, None])
    return float(ld.mean())


def test_nothing_ablated_is_the_model_and_feature_names_parse(llama):
    model, task = llama
    plain = patching.Evaluator(model, task)
    ev = patching.Evaluator(model, task, dictionaries=llama_dicts(model))
    assert abs(ev.full - plain.full) < 1e-5
    assert ev.index.nodes[: plain.index.S] == plain.index.senders  # ordinary nodes keep their ids
    # decomposed nodes (m0, layer 1's heads, m1) send through their features; every other edge is as it was
    decomposed = {"m0", "m1"} | {f"a1.{h}" for h in range(model.n_heads)}
    assert [e for e in plain.index.edges if e.split("->")[0] not in decomposed] == \
        [e for e in ev.index.edges if e.split("->")[0] in plain.index.node_id]
    assert "m0.err->a1.0.q" in ev.index.edge_id and "t1.err->logits" in ev.index.edge_id
    assert not any(e.startswith(("r1.", "rm0.", "r3.")) for e in ev.index.edges)  # residual sites: no edges yet
    names = feature_nodes(ev)
    assert "r1.err" in names and "t1.err" in names and "rm0.err" in names and any(n.startswith("a1.f") for n in names)
    for n in names[:5]:
        assert ev.index.node(n) == ev.index.node_id[n]
    with pytest.raises(ValueError, match="only features active on the task's prompts"):
        ev.index.node("r1.f999")
    # only active features are nodes, and their count is what the dictionary's encoder lights up
    for d, site in zip(ev.dictionaries, ev.index.sites):
        f = d.encode(hook_activations(ev.engine, torch.cat([task.clean, task.corrupted]), d.hook))
        assert list(site.active) == (f != 0).flatten(0, 1).any(0).nonzero()[:, 0].tolist()


@pytest.mark.parametrize("ablation", ["mean", "zero", "resample"])
def test_ablating_features_matches_a_hand_made_forward(llama, ablation):
    model, task = llama
    dicts = llama_dicts(model)
    ev = patching.Evaluator(model, task, ablation=ablation, dictionaries=dicts)
    g = torch.Generator().manual_seed(3)
    names = feature_nodes(ev)
    run = ev.run()
    picked: set[str] = set()
    for step in range(4):
        new = [names[i] for i in torch.randperm(len(names), generator=g)[:6].tolist()]
        picked |= set(new)
        run = ev.extend(run, nodes=new)
        ref = reference_score(ev, task, dicts, picked, ablation)
        assert abs(run.score - ref) < 1e-4, (step, run.score, ref)
        assert abs(ev.rescore(run) - run.score) < 1e-5
    # stacked variants are what each alone gives
    singles = [ev.extend(run, nodes=[n]).score for n in names[:8]]
    many = [r.score for r in ev.extend_many(run, [([n], ()) for n in names[:8]])]
    assert max(abs(a - b) for a, b in zip(singles, many)) < 1e-5


def test_a_site_wholly_ablated_is_its_node_ablated(llama):
    """Mean ablation is linear: every feature and the error of mlp_out.0 ablated = m0 ablated; of attn_out.1 =
    layer 1's heads ablated."""
    model, task = llama
    d = model.d_model
    plain = patching.Evaluator(model, task)
    ev = patching.Evaluator(model, task, dictionaries=[rand_dict(d, "mlp_out.0"), rand_dict(d, "attn_out.1", seed=3)])
    m0 = [n for n in feature_nodes(ev) if n.startswith("m0.")]
    a1 = [n for n in feature_nodes(ev) if n.startswith("a1.")]
    assert abs(ev.score(nodes=m0) - plain.score(nodes=["m0"])) < 1e-5
    heads = [f"a1.{h}" for h in range(model.n_heads)]
    assert abs(ev.score(nodes=a1) - plain.score(nodes=heads)) < 1e-5
    assert "m0" not in prune_candidates(ev) and "a1.0" not in prune_candidates(ev)  # decomposed: not candidates


def prune_candidates(ev):
    from circuitsearch.algorithms.iterative import node_candidates
    return node_candidates(ev, ev.run())


def test_error_node_alone_is_what_the_reconstruction_loses(llama):
    """Zero ablation of the error leaves the reconstruction: the model run on x̂ at that hook."""
    model, task = llama
    d = rand_dict(model.d_model, "resid_pre.1", seed=1)
    ev = patching.Evaluator(model, task, ablation="zero", dictionaries=[d])
    ref = reference_score(ev, task, [d], {"r1.err"}, "zero")
    with torch.inference_mode():
        logits = _walk(ev.engine, task.clean, {parse_hook("resid_pre.1"): lambda a, s: d.reconstruct(a)}, set())[:, -1]
    recon = float((logits.gather(1, task.answers[:, None]) - logits.gather(1, task.wrong_answers[:, None])).mean())
    assert abs(ev.score(nodes=["r1.err"]) - recon) < 1e-4 and abs(ref - recon) < 1e-4
    assert abs(recon - ev.full) > 1e-3  # the reconstruction does lose something here


def test_a_feature_at_every_slot_is_the_feature():
    model = build_test_model("tiny-gpt")
    task = self_task(model)
    ev = patching.Evaluator(model, task, positions="all", dictionaries=[rand_dict(model.d_model, "resid_pre.1")])
    f = feature_nodes(ev)[2]
    units = [f"{f}@{q}" for q in ev.slots.names]
    at = ev.run(at=units)
    assert abs(at.score - ev.score(nodes=[f])) < 1e-5 and f in at.nodes
    part = ev.run(at=units[:2])
    assert abs(part.score - ev.rescore(part)) < 1e-5


@pytest.mark.parametrize("kind", ["mlp_out.0", "attn_out.1"])
def test_eap_of_a_sites_features_sums_to_its_nodes(llama, kind):
    """EAP is linear in what a sender writes: a site's feature and error estimates sum to the estimate of the
    node(s) it decomposes, in the plain graph."""
    model, task = llama
    plain = patching.Evaluator(model, task)
    ev = patching.Evaluator(model, task, dictionaries=[rand_dict(model.d_model, kind)])
    fa = attribute(ev, method="eap").nodes
    pa = attribute(plain, method="eap").nodes
    prefix = kind[0] + kind.split(".")[1] + "."
    parents = ["m0"] if kind.startswith("mlp") else [f"a1.{h}" for h in range(model.n_heads)]
    total = sum(v for n, v in fa.items() if n.startswith(prefix))
    assert abs(total - sum(pa[p] for p in parents)) < 1e-4 * max(1.0, abs(total))
    assert all(p not in fa for p in parents)  # decomposed nodes are not candidates
    for n in ("a0.1", "m1"):  # ordinary nodes' estimates are unchanged by the splice
        assert abs(fa[n] - pa[n]) < 1e-5


def test_eap_of_a_feature_is_its_first_order_effect(llama):
    """With small decoder rows each feature's ablation is a small change, and its EAP estimate (one gradient at
    the circuit) is its exact effect to first order."""
    model, task = llama
    d = rand_dict(model.d_model, "resid_pre.2", seed=7)
    d = Dictionary(d.W_enc, d.b_enc, d.W_dec * 0.01, d.b_dec, hook=d.hook)
    ev = patching.Evaluator(model, task, dictionaries=[d])
    est = attribute(ev, method="eap").nodes
    feats = [n for n in feature_nodes(ev) if not n.endswith(".err")]
    exact = torch.tensor([ev.score(nodes=[n]) - ev.full for n in feats])
    approx = torch.tensor([est[n] for n in feats])
    assert exact.abs().max() > 1e-3
    assert (exact - approx).abs().max() < 0.05 * exact.abs().max()


def test_edge_phases_are_refused_with_features(llama):
    model, task = llama
    ev = patching.Evaluator(model, task, dictionaries=[rand_dict(model.d_model, "resid_pre.1")])
    with pytest.raises(ValueError, match="node level"):
        prune(ev, "edges", Thresholds(absolute=0.8))


def test_dictionaries_that_do_not_fit_are_refused(llama):
    model, task = llama
    d = model.d_model
    with pytest.raises(ValueError, match="two dictionaries write mlp_out.0"):
        patching.Evaluator(model, task, dictionaries=[rand_dict(d, "mlp_out.0"), rand_dict(d, "mlp_in.0", out="mlp_out.0")])
    with pytest.raises(ValueError, match="d_model"):
        patching.Evaluator(model, task, dictionaries=[rand_dict(d + 1, "resid_pre.1")])


# ---- ground truth: a toy whose task reads one known feature -----------------------------------------------

def planted_feature_setup(ablation):
    """The planted model (toys.py) on prompts of one token, 3, repeated (answer 3, wrong 4). Its final residual
    stream carries the answer as e19 + e27 (m0 and a1.2). The dictionary at resid_pre.2 holds that direction as
    feature 0, twelve decoys in superposition in the junk dims 32-39, and the token-5 direction (active on
    corrupted prompts only). The search must keep feature 0 and no other feature; under zero ablation the error
    carries nothing the logits read, so it goes too."""
    model = planted_model()
    g = torch.Generator().manual_seed(0)
    n, seq = 16, 6
    clean = torch.full((n, seq), 3)
    corrupted = torch.randint(0, 8, (n, seq), generator=g)
    corrupted[:, -1] = torch.tensor([0, 1, 2, 5, 6, 7] * 3)[:n]
    task = Task("planted-3", clean, corrupted, torch.full((n,), 3), torch.full((n,), 4),
                ["3 " * seq] * n, [" ".join(map(str, r.tolist())) for r in corrupted], ["3"] * n, ["4"] * n)
    u = torch.zeros(40)
    u[19] = u[27] = 2 ** -0.5
    v = torch.zeros(40)
    v[21] = v[29] = 2 ** -0.5
    decoys = torch.zeros(12, 40)
    decoys[:, 32:] = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    W_dec = torch.cat([u[None], decoys, v[None]])
    d = Dictionary(W_dec.T.clone(), torch.full((14,), -0.05), W_dec, torch.zeros(40), hook="resid_pre.2")
    ev = patching.Evaluator(model, task, ablation=ablation, dictionaries=[d])
    return ev


@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("order", ["forward", "reverse", "attribution"])
def test_the_search_keeps_exactly_the_planted_feature(ablation, order):
    ev = planted_feature_setup(ablation)
    feats = feature_nodes(ev)
    assert "r2.f0" in feats and "r2.f13" in feats and len(feats) >= 10
    result = prune(ev, "nodes", Thresholds(absolute=0.8), order=order, progress=False)
    kept = [n for n in feats if n not in result.run.nodes]
    if ablation == "zero":
        assert kept == ["r2.f0"]
    else:  # under mean ablation the error's mean holds other tokens' directions: it may carry signal
        assert [n for n in kept if n != "r2.err"] == ["r2.f0"]
    assert ev.faithfulness(ev.rescore(result.run)) >= 0.8


@pytest.mark.slow
def test_smollm2_with_dictionaries_is_the_model_and_ablates_as_by_hand(smollm2, smollm2_digits):
    """On the embedded model: random dictionaries at resid_pre.6, attn_out.10 and a transcoder at layer 20 leave
    the full score as it is (1e-5 of its scale), and ablating features there matches the hand-made forward."""
    d = smollm2.d_model
    dicts = [rand_dict(d, "resid_pre.6", F=64, seed=1), rand_dict(d, "attn_out.10", F=64, seed=2),
             rand_dict(d, "mlp_in.20", F=64, out="mlp_out.20", seed=3)]
    plain = patching.Evaluator(smollm2, smollm2_digits)
    ev = patching.Evaluator(smollm2, smollm2_digits, dictionaries=dicts)
    assert abs(ev.full - plain.full) < 1e-5 * max(1.0, abs(plain.full))
    names = feature_nodes(ev)
    picked = {names[i] for i in range(0, len(names), 7)}
    ref = reference_score(ev, smollm2_digits, dicts, picked, "mean")
    assert abs(ev.score(nodes=sorted(picked)) - ref) < 1e-4 * max(1.0, abs(ref))


# ---- run directories ----------------------------------------------------------------------------------------

def saved_planted_dictionary(directory, shift: float = 0.0):
    from circuitsearch.features.saelens import save_dictionary
    g = torch.Generator().manual_seed(0)
    W = torch.nn.functional.normalize(torch.randn(24, 40, generator=g), dim=1)
    b = torch.full((24,), -0.1)
    b[0] += shift
    save_dictionary(Dictionary(W.T.clone(), b, W, torch.zeros(40), hook="resid_pre.1"), directory)
    return str(directory)


def test_a_feature_run_directory_reads_its_features_resumes_and_refuses_a_changed_dictionary(tmp_path):
    from circuitsearch.config import PruneConfig
    from circuitsearch.features.saelens import load_spec
    from circuitsearch.graphs.export import load_circuit
    from circuitsearch.runs import run_prune
    sae = saved_planted_dictionary(tmp_path / "sae")
    cfg = PruneConfig(model="test:planted", task="planted", n_prompts=12, sae=(sae,), order="forward")
    assert cfg.level == "nodes"  # the default level of a feature graph
    assert cfg.to_json()["sae"][0]["digest"] == load_spec(sae).digest()
    out = tmp_path / "run"
    c = run_prune(cfg, out, progress=False, log=lambda *a: None)
    feats = c.feature_nodes()
    assert feats and set(c.meta["features"]) == set(feats)
    one = next(n for n in feats if not n.endswith(".err"))
    reading = c.meta["features"][one]
    assert reading["top"] and reading["promotes"] and reading["site"] == "resid_pre.1"
    report = (out / "report.md").read_text()
    assert "## Dictionary features" in report and one in report
    assert one in (out / "circuit.dot").read_text() and reading["summary"].split(";")[0][:20] in (out / "circuit.dot").read_text()
    again = run_prune(cfg, out, progress=False, log=lambda *a: None)  # resumes: the same circuit
    assert again.nodes == c.nodes and load_circuit(out / "circuit.json").nodes == c.nodes
    from circuitsearch.evaluation import load_run, own_evaluator
    from circuitsearch.catalogue import load_model
    saved = load_run(out)  # re-scored from task.json + circuit.json, the dictionaries read again from their paths
    ev = own_evaluator(saved, load_model("test:planted"))
    assert abs(ev.score_circuit(saved.circuit)["faithfulness"] - c.scores["faithfulness"]) < 1e-6
    other = patching.Evaluator(load_model("test:planted"), saved.task, dictionaries=[rand_dict(40, "resid_pre.1")])
    with pytest.raises(ValueError, match="feature graph is not this evaluator's"):
        other.score_circuit(saved.circuit)
    changed = saved_planted_dictionary(tmp_path / "sae", shift=0.05)  # the same path, other weights
    with pytest.raises(Exception, match="other settings"):
        run_prune(PruneConfig(model="test:planted", task="planted", n_prompts=12, sae=(changed,), order="forward"),
                  out, progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="node level"):
        PruneConfig(model="test:planted", task="planted", sae=(sae,), level="both",
                    given=frozenset({"level"})).check()


def test_feature_nodes_are_drawn_without_overlap():
    """Features of several hook points of the same layers, beside heads and MLPs: no two boxes overlap."""
    from circuitsearch.graphs.render import HALF, positions
    names = ["embed", "a0.0", "a0.3", "m0", "a1.1", "m1", "a2.0", "m2", "logits", "r1.f3", "r1.f7", "r1.err",
             "a1.f2", "rm1.f5", "mi1.f9", "m1.f4", "m1.err", "t2.f1", "t2.err", "r3.f0", "r3.err"]
    pos = positions(names, 3)
    from circuitsearch.graphs.model_graph import parse_node
    kind = lambda n: parse_node(n, 3).kind
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (xa, ya), (xb, yb) = pos[a], pos[b]
            wa, ha = HALF[kind(a)]
            wb, hb = HALF[kind(b)]
            assert abs(xa - xb) >= wa + wb - 1e-9 or abs(ya - yb) >= ha + hb - 1e-9, (a, b, pos[a], pos[b])
    # at their hook points' heights: the residual stream below the layer's heads, the MLP's output above its MLP
    assert pos["r1.f3"][1] < pos["a1.1"][1] == pos["a1.f2"][1] < pos["rm1.f5"][1] < pos["mi1.f9"][1] < pos["m1.f4"][1]
    assert pos["m1"][1] < pos["m1.f4"][1] < pos["r3.f0"][1] and pos["m0"][1] < pos["r1.f3"][1]
    assert pos["logits"][1] > max(y for n, (_, y) in pos.items() if n != "logits")


def test_sweeps_take_dictionaries_as_a_setting(tmp_path):
    from circuitsearch.sweeps.spec import SpecError, parse_spec
    sae = saved_planted_dictionary(tmp_path / "sae")
    spec = parse_spec({"fixed": {"model": "test:planted", "task": "planted", "sae": sae},
                       "axes": {"order": ["forward", "reverse"]}})
    cfgs = [c.config() for c in spec.cells]
    assert all(c.sae == (sae,) and c.level == "nodes" for c in cfgs)
    with pytest.raises(SpecError, match="dictionary path"):
        parse_spec({"fixed": {"model": "test:planted", "task": "planted", "sae": [3]}})


# ---- edges out of features (dictionaries that decompose a node) ----------------------------------------------

def edge_dicts(model):
    d = model.d_model
    return [rand_dict(d, "mlp_out.0", seed=2), rand_dict(d, "attn_out.1", seed=3),
            rand_dict(d, "mlp_in.1", out="mlp_out.1", seed=4)]


@pytest.mark.parametrize("ablation", ["mean", "resample", "zero"])
def test_a_feature_ablated_is_all_its_out_edges_removed(llama, ablation):
    model, task = llama
    ev = patching.Evaluator(model, task, ablation=ablation, dictionaries=edge_dicts(model))
    ix = ev.index
    base = ev.run(nodes=["a0.2"])
    for n in ["m0.f3", "m0.err", "a1.f5", "a1.err", "t1.f2", "t1.err"]:
        if n not in ix.node_id:
            continue
        out = [e for e in ix.edges if e.startswith(n + "->")]
        assert out
        by_edges = ev.extend(base, edges=out)
        assert abs(by_edges.score - ev.extend(base, nodes=[n]).score) < 1e-5, n
        assert abs(ev.rescore(by_edges) - by_edges.score) < 1e-5
    picks = [e for e in ix.edges if e.split("->")[0] in ix.node_id and ix.node_kind[ix.node_id[e.split("->")[0]]] == 4][::37]
    singles = [ev.extend(base, edges=[e]).score for e in picks[:8]]
    many = [r.score for r in ev.extend_many(base, [((), [e]) for e in picks[:8]])]
    assert max(abs(a - b) for a, b in zip(singles, many)) < 1e-5


def test_relaxed_forward_with_feature_edges_is_the_circuit(llama):
    from circuitsearch.evaluator.relaxed import keep_tensors, relaxed_score
    model, task = llama
    ev = patching.Evaluator(model, task, dictionaries=edge_dicts(model))
    feat_edges = [e for e in ev.index.edges if ".f" in e.split("->")[0] or ".err" in e.split("->")[0]]
    run = ev.run(nodes=["a2.1", "m0.f1"], edges=feat_edges[::5] + ev.index.edges[3:40:4])
    nodes, edges, at = keep_tensors(ev, run)
    assert abs(float(relaxed_score(ev, nodes, edges, at)) - run.score) < 1e-4


def test_eap_of_a_features_out_edges_sums_to_its_node_estimate(llama):
    model, task = llama
    ev = patching.Evaluator(model, task, dictionaries=edge_dicts(model))
    a = attribute(ev, method="eap")
    for n in ["m0.err", "t1.err", "a1.err"] + [f for f in feature_nodes(ev) if f.endswith(".f2")]:
        total = sum(v for e, v in a.edges.items() if e.startswith(n + "->"))
        assert abs(total - a.nodes[n]) < 1e-4 * max(1.0, abs(total)), n


def test_the_planted_circuit_with_its_mlp_split_into_features(tmp_path):
    """The planted model's m0 (the token copy) under an SAE whose feature 0..7 are its eight output directions:
    the edge search keeps the answer's feature path into the logits and the embedding's edge into m0."""
    model = planted_model()
    from circuitsearch.toys import planted_task
    task = planted_task()
    W = torch.zeros(8, 40)
    W[:, 16:24] = torch.eye(8)
    d = Dictionary(W.T.clone(), torch.zeros(8), W, torch.zeros(40), hook="mlp_out.0")
    ev = patching.Evaluator(model, task, dictionaries=[d])
    assert abs(ev.score(nodes=["m0.err"]) - ev.full) < 1e-5  # the SAE is exact on m0's output: its error is 0
    from circuitsearch.algorithms.iterative import find_circuit
    result = find_circuit(ev, "both", Thresholds(absolute=0.8), order="reverse", progress=False)
    kept = [e for e in ev.index.edges if e in set(ev.index.edges) - set(result.run.edges)
            and result.run.present_edges()[ev.index.edge_id[e]]]
    assert "embed->m0" in kept and "a1.2->logits" in kept
    feats_to_logits = {e.split("->")[0] for e in kept if e.endswith("->logits") and e.startswith("m0.f")}
    assert feats_to_logits and feats_to_logits <= {f"m0.f{i}" for i in range(8)}
    assert ev.faithfulness(ev.rescore(result.run)) >= 0.8
