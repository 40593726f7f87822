"""graphs/: Circuit files round-trip exactly, bad files are refused, writes are atomic, diffs obey set
algebra, and diagrams (plain, big, overlay) are drawn with every node visible. No model is loaded."""
import json
import os
import random
import shutil
import stat
import xml.etree.ElementTree as ET

import networkx as nx
import pytest

from circuitsearch.graphs.circuit import Circuit
from circuitsearch.graphs.diff import diff_circuits, format_table, overlay_dot, render_overlay
from circuitsearch.graphs.export import (CircuitFormatError, dumps_circuit, load_circuit, loads_circuit,
                                         save_circuit)
from circuitsearch.graphs.model_graph import ModelGraph, receiver_node, split_edge
from circuitsearch.graphs.render import RenderError, render, to_dot
from circuitsearch.io import atomic_write_bytes, atomic_write_text

AWKWARD_FLOATS = [0.1 + 0.2, 1 / 3, 1e-300, -2.5e-17, 123456789.123456789, 5e-324, 0.0, None]


def make_circuit(n_layers=4, n_heads=3, keep=0.6, edge_p=0.3, seed=0, level="both", model="test:tiny",
                 task="digits", attn_only=False, qkv=True) -> Circuit:
    """A random valid circuit: kept nodes with effects, edges only between kept nodes."""
    g = ModelGraph(n_layers, n_heads, attn_only, qkv)
    rng = random.Random(seed)
    nodes = {n: rng.choice(AWKWARD_FLOATS + [rng.random()] * 4)
             for n in g.nodes if n in ("embed", "logits") or rng.random() < keep}
    edges = {}
    if level != "nodes":
        for e in g.edges:
            s, d = split_edge(e)
            if s in nodes and receiver_node(d)[0] in nodes and rng.random() < edge_p:
                edges[e] = rng.choice(AWKWARD_FLOATS + [rng.random()] * 4)
    return Circuit(model, g.signature(), task, nodes, edges,
                   {"full": 4.0, "circuit": 3.3, "empty": 0.25, "faithfulness": 0.825,
                    "normalized": 0.8133333333333334},
                   {"level": level, "ablation": "mean", "metric": "logit_diff", "order": "reverse",
                    "thresholds": {"absolute": 0.8, "relative": None, "on": "faithfulness"}, "seed": seed},
                   {"forward_passes": 120, "forward_equivalents": 37.5, "seconds": 1.25},
                   meta={"note": "ünïcode ✓", "nested": {"list": [1, 2.5, None, "x"]}})


# ---- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"attn_only": True}, {"qkv": False}, {"level": "nodes"}, {"seed": 7}])
def test_json_round_trip_is_exact(tmp_path, kw):
    c = make_circuit(**kw)
    assert len(c.nodes) > 4 and (c.edges or kw.get("level") == "nodes")
    path = save_circuit(c, tmp_path / "c.json")
    back = load_circuit(path)
    assert back == c
    assert all(type(back.nodes[n]) is type(c.nodes[n]) for n in c.nodes)  # floats stay floats, None stays None
    assert dumps_circuit(back) == path.read_text(encoding="utf-8")  # byte-identical when written again


def test_int_and_numpy_like_effects_are_written_as_floats(tmp_path):
    class Scalar:  # a numpy/torch scalar stand-in: not a float, but convertible
        def __float__(self):
            return 0.25
    c = make_circuit()
    c.nodes["embed"], c.scores["full"] = 2, Scalar()
    back = load_circuit(save_circuit(c, tmp_path / "c.json"))
    assert back.nodes["embed"] == 2.0 and type(back.nodes["embed"]) is float and back.scores["full"] == 0.25


def test_json_key_order_does_not_matter(tmp_path):
    c = make_circuit(seed=3)
    data = json.loads(dumps_circuit(c))
    rng = random.Random(0)
    shuffled = {}
    for k in rng.sample(list(data), len(data)):
        v = data[k]
        shuffled[k] = dict(rng.sample(list(v.items()), len(v))) if k in ("nodes", "edges", "scores") else v
    assert list(shuffled) != list(data)
    assert loads_circuit(json.dumps(shuffled)) == c


@pytest.mark.parametrize("kw", [{}, {"attn_only": True}, {"qkv": False}, {"level": "nodes"}])
def test_graphml_round_trip_is_exact(tmp_path, kw):
    c = make_circuit(**kw)
    back = load_circuit(save_circuit(c, tmp_path / "c.graphml"))
    assert back == c
    assert dumps_circuit(back) == dumps_circuit(c)
    g = nx.read_graphml(tmp_path / "c.graphml")  # a plain GraphML reader sees effects as numbers
    n, eff = next((n, e) for n, e in c.nodes.items() if e)
    assert g.nodes[n]["effect"] == eff and isinstance(g.nodes[n]["effect"], float)
    assert json.loads(g.graph["scores"]) == c.scores


def test_networkx_round_trip_is_exact_with_parallel_qkv_edges():
    c = make_circuit(n_layers=3, n_heads=2, keep=1.0, edge_p=0.0)
    for x in "qkv":
        c.edges[f"a0.1->a2.0.{x}"] = 0.1 * len(c.edges)
    c.edges["a1.0->m1"] = None
    c.edges["m2->logits"] = 0.5
    g = c.to_networkx()
    assert isinstance(g, nx.MultiDiGraph) and g.number_of_edges() == len(c.edges)
    assert g.number_of_edges("a0.1", "a2.0") == 3
    assert {d["input"] for _, _, d in g.edges("a0.1", data=True)} == {"q", "k", "v"}
    assert g.nodes["embed"]["layer"] == -1 and g.nodes["logits"]["layer"] == 3
    assert g.nodes["a2.0"] == {"layer": 2, "head": 0, "kind": "head", "effect": c.nodes["a2.0"]}
    assert g.nodes["m1"]["kind"] == "mlp" and g.nodes["m1"]["head"] == -1
    assert g.graph["model"] == "test:tiny" and g.graph["graph"] == c.graph
    assert Circuit.from_networkx(g) == c


def test_node_level_circuit_means_every_edge_between_kept_nodes():
    c = make_circuit(n_layers=5, n_heads=3, level="nodes")
    graph = ModelGraph(5, 3)
    expected = [e for e in graph.edges if split_edge(e)[0] in c.nodes
                and receiver_node(split_edge(e)[1])[0] in c.nodes]
    assert list(c.effective_edges(graph)) == expected and c.n_edges == len(expected) > 0
    assert list(c.effective_edges()) == expected  # the graph rebuilt from the circuit's signature
    with pytest.raises(ValueError, match="not this circuit's graph"):
        c.effective_edges(ModelGraph(5, 4))
    edge_level = make_circuit(n_layers=5, n_heads=3)
    assert edge_level.effective_edges() == edge_level.edges
    assert edge_level.n_edges == len(edge_level.edges) == edge_level.summary()["edges"] != edge_level.n_nodes


def test_heads_and_mlps_sort_by_layer_numerically():
    c = Circuit("m", ModelGraph(12, 12).signature(), "t",
                {"a10.0": 1.0, "a9.11": 1.0, "a9.2": 1.0, "m10": None, "m9": None, "embed": None, "logits": None})
    assert c.heads() == ["a9.2", "a9.11", "a10.0"] and c.mlps() == ["m9", "m10"]
    assert c.summary()["heads"] == 3 and c.summary()["mlps"] == 2 and c.n_nodes == 7


# ---- atomic writes -----------------------------------------------------------------------------
def test_atomic_write_leaves_no_temp_file_and_normal_permissions(tmp_path):
    p = atomic_write_text(tmp_path / "sub" / "a.txt", "hello ✓")
    assert p.read_text(encoding="utf-8") == "hello ✓"
    assert os.listdir(tmp_path / "sub") == ["a.txt"]
    assert stat.S_IMODE(p.stat().st_mode) & 0o044  # not mkstemp's private 0600


@pytest.mark.parametrize("fail", ["os.replace", "os.fsync"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, fail):
    path = save_circuit(make_circuit(seed=1), tmp_path / "c.json")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(fail, boom)
    with pytest.raises(OSError, match="disk full"):
        save_circuit(make_circuit(seed=2), path)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "other.bin", b"x")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.json"]  # no temporary file, no half-written new file
    assert load_circuit(path) == make_circuit(seed=1)


# ---- refusing bad files ------------------------------------------------------------------------
def _write_json(tmp_path, data) -> str:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    return p


def test_truncated_json_is_refused(tmp_path):
    p = save_circuit(make_circuit(), tmp_path / "c.json")
    text = p.read_text()
    for cut in (len(text) // 2, len(text) - 3, 1):
        p.write_text(text[:cut])
        with pytest.raises(CircuitFormatError, match=r"c\.json is damaged or not JSON"):
            load_circuit(p)


def test_other_schema_version_is_refused(tmp_path):
    d = json.loads(dumps_circuit(make_circuit()))
    d["schema"] = "circuitsearch.circuit/3"
    with pytest.raises(CircuitFormatError, match=r"c\.json has schema 'circuitsearch.circuit/3'.*reads "
                                                 r"'circuitsearch.circuit/1' and 'circuitsearch.circuit/2'"):
        load_circuit(_write_json(tmp_path, d))


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "damaged or not JSON"),
    (b"[1, 2, 3]", "not a circuitsearch circuit \\(a JSON list"),
    (b'{"name": "digits", "clean": []}', "no 'schema' field"),
    (b'{"schema": "circuitsearch.task/1", "name": "digits"}', "is not a circuit: its schema is 'circuitsearch.task/1'"),
])
def test_wrong_kind_of_file_is_refused(tmp_path, content, message):
    p = tmp_path / "c.json"
    p.write_bytes(content)
    with pytest.raises(CircuitFormatError, match=message):
        load_circuit(p)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("nodes"), "required field\\(s\\) 'nodes' missing"),
    (lambda d: d.update(extra=1), "unknown field\\(s\\) 'extra'"),
    (lambda d: d.update(edges=[]), "'edges' is missing or not a dict"),
    (lambda d: d.update(nodes=[1, 2]), "'nodes' is missing or not a dict"),
    (lambda d: d["graph"].update(n_layers="4"), "'n_layers' must be int, got '4'"),
    (lambda d: d["graph"].update(qkv=1), "'qkv' must be bool, got 1"),
    (lambda d: d["graph"].update(colour="red"), "'colour' must be absent"),
    (lambda d: d["graph"].pop("n_heads"), "graph signature .* is not valid \\(KeyError"),
    (lambda d: d["nodes"].update({"head7": 0.1}), "unknown node name 'head7'"),
    (lambda d: d["nodes"].update({"a9.0": 0.1}), "'a9.0' is not in this model"),
    (lambda d: d["edges"].update({"a0.0->a9.9.q": None}), "not in this model"),
    (lambda d: d["nodes"].update({"embed": "big"}), "effect of node 'embed' must be a number"),
    (lambda d: d["edges"].update({"a3.0->a1.0.q": None}), "a3.0 does not feed a1.0.q"),
    (lambda d: d["edges"].update({"embed->a1.0.x": None}), "unknown node name 'a1.0.x'"),
    (lambda d: d["scores"].update(faithfulness=True), "score 'faithfulness' must be a number"),
])
def test_broken_content_is_refused(tmp_path, mutate, message):
    d = json.loads(dumps_circuit(make_circuit(keep=1.0)))
    mutate(d)
    with pytest.raises(CircuitFormatError, match=message):
        load_circuit(_write_json(tmp_path, d))


def test_edge_to_a_node_outside_the_circuit_is_refused(tmp_path):
    c = make_circuit()
    missing = next(n for n in ModelGraph(4, 3).nodes if n not in c.nodes and n.startswith("a"))
    d = json.loads(dumps_circuit(c))
    d["edges"][f"embed->{missing}.q"] = 0.5
    with pytest.raises(CircuitFormatError, match=f"joins node '{missing}', which is not in the circuit"):
        load_circuit(_write_json(tmp_path, d))
    c.edges[f"embed->{missing}.q"] = 0.5  # and such a circuit is never written
    for suffix in (".json", ".graphml"):
        with pytest.raises(CircuitFormatError, match="refusing to write an invalid circuit"):
            save_circuit(c, tmp_path / f"bad{suffix}")
        assert not (tmp_path / f"bad{suffix}").exists()


def test_damaged_or_foreign_graphml_is_refused(tmp_path):
    p = save_circuit(make_circuit(), tmp_path / "c.graphml")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CircuitFormatError, match="damaged or not a circuitsearch GraphML circuit"):
        load_circuit(p)
    nx.write_graphml(nx.path_graph(3), tmp_path / "plain.graphml")
    with pytest.raises(CircuitFormatError, match="no 'schema' graph attribute"):
        load_circuit(tmp_path / "plain.graphml")
    text = data.decode().replace("circuitsearch.circuit/1", "circuitsearch.circuit/3")
    (tmp_path / "v3.graphml").write_text(text)
    with pytest.raises(CircuitFormatError, match="circuit/3"):
        load_circuit(tmp_path / "v3.graphml")


def test_drawings_cannot_be_loaded(tmp_path):
    p = save_circuit(make_circuit(), tmp_path / "c.dot")
    assert p.read_text() == to_dot(make_circuit())  # one DOT path: save_circuit uses render.to_dot
    with pytest.raises(CircuitFormatError, match="is a drawing"):
        load_circuit(p)


# ---- diffs -------------------------------------------------------------------------------------
def _three(seed=0):
    """Three circuits around a common core (so every subset, shared by all included, is populated)."""
    core = make_circuit(n_layers=6, n_heads=4, keep=0.2, edge_p=0.3, seed=100 + seed)
    out = []
    for i, t in enumerate(("digits", "words", "months")):
        c = make_circuit(n_layers=6, n_heads=4, keep=0.4, edge_p=0.15, seed=seed + i, task=t)
        c.nodes, c.edges = {**core.nodes, **c.nodes}, {**core.edges, **c.edges}
        out.append(c.validate())
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["nodes", "edges"])
def test_diff_set_algebra(seed, kind):
    cs = _three(seed)
    d = diff_circuits(cs)
    assert d.names == ["digits", "words", "months"]
    members = {n: (set(c.nodes) if kind == "nodes" else set(c.edges)) for n, c in zip(d.names, cs)}
    for a in d.names:
        assert d.members(a, kind) == members[a]
        for b in d.names:
            inter, union = d.common([a, b], kind), d.either([a, b], kind)
            assert inter <= d.members(a, kind) and inter <= d.members(b, kind)
            assert inter == members[a] & members[b] and union == members[a] | members[b]
            assert len(union) == len(d.members(a, kind)) + len(d.members(b, kind)) - len(inter)
    # the exact subsets partition the union, and their counts add up
    parts = [d.only(s, kind) for s in d.subsets()]
    assert sum(len(p) for p in parts) == len(set().union(*members.values())) == len(set().union(*parts))
    total = sum(d.counts(s)["edges" if kind == "edges" else "heads"] for s in d.subsets())
    assert total == (len(d.edge_sets) if kind == "edges" else sum(1 for n in d.node_sets if n.startswith("a")))
    assert d.shared(kind) == set.intersection(*members.values())
    assert d.unique("digits", kind) == members["digits"] - members["words"] - members["months"]


def test_diff_of_a_circuit_with_itself_is_all_shared():
    c = make_circuit(seed=4)
    d = diff_circuits([c, make_circuit(seed=4)], names=["a", "b"])
    assert all(s == {"a", "b"} for s in list(d.node_sets.values()) + list(d.edge_sets.values()))
    assert d.unique("a") == d.unique("b", "edges") == set()
    assert d.jaccard("nodes") == [[1.0, 1.0], [1.0, 1.0]] == d.jaccard("edges")
    assert d.shared("edges") == set(c.edges) and len(d.shared("edges")) > 0


def test_jaccard_values_and_default_names():
    a = Circuit("m", ModelGraph(2, 2).signature(), "t", {"embed": None, "a0.0": 1.0, "a0.1": 1.0, "logits": None},
                {"embed->a0.0.q": 1.0, "a0.0->logits": 1.0})
    b = Circuit("m", ModelGraph(2, 2).signature(), "t", {"embed": None, "a0.0": 1.0, "m1": 1.0, "logits": None},
                {"embed->a0.0.q": 1.0, "a0.0->m1": 1.0, "m1->logits": 1.0})
    d = diff_circuits([a, b])
    assert d.names == ["A", "B"]  # the same task twice: letters
    assert d.jaccard("nodes")[0][1] == pytest.approx(1 / 3)  # heads and MLPs: {a0.0} of {a0.0, a0.1, m1}
    assert d.jaccard("edges")[1][0] == pytest.approx(1 / 4)
    assert d.counts(frozenset({"A", "B"})) == {"heads": 1, "mlps": 0, "io": 2, "edges": 1}
    bare = [Circuit("m", ModelGraph(2, 2).signature(), t, {"embed": None, "logits": None}, {"embed->logits": 0.5})
            for t in ("x", "y")]
    assert diff_circuits(bare).jaccard("nodes") == [[1.0, 1.0], [1.0, 1.0]]  # no heads or MLPs in either: same


def test_diff_refuses_other_models_and_graphs():
    a = make_circuit()
    with pytest.raises(ValueError, match="different models: digits is on 'test:tiny', words on 'gpt2'"):
        diff_circuits([a, make_circuit(model="gpt2", task="words")])
    with pytest.raises(ValueError, match="differ in qkv: True vs False"):
        diff_circuits([a, make_circuit(qkv=False, task="words")])
    with pytest.raises(ValueError, match="differ in n_heads"):
        diff_circuits([a, make_circuit(n_heads=4, task="words")])
    with pytest.raises(ValueError, match="at least 2"):
        diff_circuits([a])
    with pytest.raises(ValueError, match="distinct"):
        diff_circuits([a, make_circuit(seed=1)], names=["x", "x"])


def test_node_level_circuits_diff_through_their_effective_edges():
    nodes_only = make_circuit(n_layers=4, n_heads=3, level="nodes", task="words")
    d = diff_circuits([make_circuit(), nodes_only])
    assert d.members("words", "edges") == set(nodes_only.effective_edges()) != set()
    assert "edges not drawn" in overlay_dot(d)


def test_diff_json_and_table():
    d = diff_circuits(_three())
    j = json.loads(json.dumps(d.to_json()))
    assert j["schema"] == "circuitsearch.diff/1" and j["names"] == d.names
    assert j["shared"]["nodes"] == [n for n in d.node_sets if n in d.shared()]
    assert sum(s["edges"] for s in j["subsets"]) == len(d.edge_sets)
    assert j["jaccard"]["edges"] == d.jaccard("edges")
    table = format_table(d)
    assert "shared by all 3" in table and "digits & words only" in table and "Jaccard, edges" in table
    k = d.counts(frozenset(d.names))
    row = next(line for line in table.splitlines() if "shared by all" in line)
    assert row.split()[-3:] == [str(k["heads"]), str(k["mlps"]), str(k["edges"])]


# ---- drawings ----------------------------------------------------------------------------------
def _svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()
    return [t.text or "" for t in root.iter() if t.tag.endswith("text")]


def test_svg_parses_and_shows_every_node_and_caption(tmp_path):
    c = make_circuit(seed=2)
    svg = render(c, tmp_path / "c.svg")
    texts = _svg_texts(svg)
    assert set(c.nodes) <= set(texts)
    caption = " ".join(texts)
    assert len(c.heads()) > 1 and len(c.mlps()) > 1
    assert "faithfulness 0.825" in caption and f"{len(c.heads())} heads, {len(c.mlps())} MLPs" in caption
    assert "query (q)" in caption and "value (v)" in caption
    assert (tmp_path / "c.dot").read_text() == to_dot(c)
    png = render(c, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parallel_qkv_edges_are_drawn_once():
    c = make_circuit(n_layers=3, n_heads=2, keep=1.0, edge_p=0.0)
    c.edges.update({"a0.1->a2.0.q": 0.2, "a0.1->a2.0.k": 0.1, "a0.1->a2.0.v": None, "a1.0->a2.0.v": 0.05})
    dot = to_dot(c)
    assert dot.count('"a0.1" -> "a2.0"') == 1 and 'label="qkv"' in dot
    assert dot.count('"a1.0" -> "a2.0"') == 1 and 'label="v"' in dot


def test_missing_dot_program_writes_dot_and_raises_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(RenderError, match="apt-get install graphviz") as err:
        render(make_circuit(), tmp_path / "c.svg")
    assert "brew install graphviz" in str(err.value)
    assert (tmp_path / "c.dot").read_text().startswith("digraph")
    assert not (tmp_path / "c.svg").exists()


def test_big_circuit_renders_to_svg(tmp_path):
    c = make_circuit(n_layers=30, n_heads=9, keep=0.45, edge_p=0.006, seed=5)
    assert len(c.nodes) >= 100 and len(c.edges) > 100
    texts = set(_svg_texts(render(c, tmp_path / "big.svg")))
    assert set(c.nodes) <= texts
    root = ET.parse(tmp_path / "big.svg").getroot()
    width_pt = float(root.get("width").removesuffix("pt"))
    assert width_pt < 1200  # as wide as one layer of 9 heads and an MLP, not as wide as its edges


def test_big_node_level_circuit_renders_every_node(tmp_path):
    c = make_circuit(n_layers=30, n_heads=9, keep=0.45, seed=5, level="nodes")
    assert len(c.nodes) >= 100
    assert set(c.nodes) <= set(_svg_texts(render(c, tmp_path / "c.svg")))
    assert (tmp_path / "c.dot").exists()


def test_overlay_renders_every_node_with_a_legend(tmp_path):
    d = diff_circuits(_three())
    svg = render_overlay(d, tmp_path / "overlay.svg")
    texts = _svg_texts(svg)
    assert set(d.node_sets) <= set(texts)
    legend = " ".join(texts)
    assert "shared by all 3" in legend and "digits only" in legend and "words & months only" in legend
    dot = (tmp_path / "overlay.dot").read_text()
    assert d.shared("edges")
    for edge in d.shared("edges"):  # shared edges are drawn black and heavy
        src, dst = split_edge(edge)
        line = next(x for x in dot.splitlines() if f'"{src}" -> "{receiver_node(dst)[0]}"' in x and "#111111" in x)
        assert "penwidth=2.60" in line
    for node in d.shared("nodes"):  # shared nodes: gold with a heavy border
        line = next(x for x in dot.splitlines() if x.startswith(f'  "{node}" ['))
        assert 'fillcolor="#ffd21f", penwidth=2.5' in line
