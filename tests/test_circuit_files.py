"""Circuit files round-trip exactly, damaged or foreign files are refused, diagrams hold every node."""
import json
import random
import xml.etree.ElementTree as ET

import pytest

from circuitsearch.graphs.circuit import Circuit
from circuitsearch.graphs.export import CircuitFormatError, load_circuit, save_circuit
from circuitsearch.graphs.model_graph import ModelGraph, receiver_node, split_edge
from circuitsearch.graphs.render import RenderError, render


def random_circuit(n_layers=4, n_heads=3, keep=0.6, seed=0, level="both", edge_p=0.3) -> Circuit:
    g = ModelGraph(n_layers, n_heads)
    rng = random.Random(seed)
    nodes = {n: round(rng.random(), 6) for n in g.nodes if n in ("embed", "logits") or rng.random() < keep}
    edges = {}
    if level != "nodes":
        for e in g.edges:
            s, d = split_edge(e)
            if s in nodes and receiver_node(d)[0] in nodes and rng.random() < edge_p:
                edges[e] = rng.choice([None, round(rng.random(), 6)])
    return Circuit("test:tiny", g.signature(), "digits", nodes, edges,
                   {"full": 4.0, "circuit": 3.3, "faithfulness": 0.825, "normalized": 0.8},
                   {"level": level, "ablation": "mean", "thresholds": {"absolute": 0.8, "relative": None}},
                   {"forward_passes": 12, "seconds": 1.5}, meta={"note": "ünïcode"})


@pytest.mark.parametrize("suffix", [".json", ".graphml"])
def test_round_trip_is_exact(tmp_path, suffix):
    c = random_circuit()
    assert c.edges and len(c.nodes) > 4
    back = load_circuit(save_circuit(c, tmp_path / f"c{suffix}"))
    assert back.to_json() == c.to_json()


def test_networkx_round_trip_is_exact():
    c = random_circuit(seed=3)
    g = c.to_networkx()
    assert g.nodes["a1.2" if "a1.2" in c.nodes else "embed"]["layer"] in (1, -1)
    assert g.number_of_edges() == len(c.edges)
    assert Circuit.from_networkx(g).to_json() == c.to_json()


def test_node_level_circuit_means_all_edges_between_its_nodes():
    c = random_circuit(level="nodes")
    eff = c.effective_edges()
    assert eff and all(split_edge(e)[0] in c.nodes and receiver_node(split_edge(e)[1])[0] in c.nodes for e in eff)
    assert len(eff) == len([e for e in ModelGraph(4, 3).edges if split_edge(e)[0] in c.nodes
                            and receiver_node(split_edge(e)[1])[0] in c.nodes])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema="circuitsearch.circuit/2"), "circuitsearch.circuit/2"),
    (lambda d: d.pop("schema"), "no 'schema'"),
    (lambda d: d.update(nodes=[1, 2]), "'nodes' is missing or not a dict"),
    (lambda d: d["edges"].update({"a0.0->a9.9.q": None}), "not in this model"),
    (lambda d: d["nodes"].update({"head7": 0.1}), "unknown node name 'head7'"),
])
def test_foreign_or_broken_content_is_refused(tmp_path, mutate, message):
    d = random_circuit().to_json()
    mutate(d)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    with pytest.raises(CircuitFormatError, match=message):
        load_circuit(p)


def test_edge_to_a_node_outside_the_circuit_is_refused(tmp_path):
    c = random_circuit()
    missing = next(n for n in ModelGraph(4, 3).nodes if n not in c.nodes)
    d = c.to_json()
    d["edges"][f"embed->{missing}" + (".q" if missing.startswith("a") else "")] = None
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(CircuitFormatError, match="not in the circuit"):
        load_circuit(tmp_path / "c.json")


def test_damaged_file_is_refused(tmp_path):
    p = save_circuit(random_circuit(), tmp_path / "c.json")
    p.write_text(p.read_text()[: len(p.read_text()) // 2])
    with pytest.raises(CircuitFormatError, match="damaged or not JSON"):
        load_circuit(p)
    (tmp_path / "x.graphml").write_text("<graphml><broken")
    with pytest.raises(CircuitFormatError, match="not a circuitsearch GraphML circuit"):
        load_circuit(tmp_path / "x.graphml")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = save_circuit(random_circuit(seed=1), tmp_path / "c.json")
    before = p.read_text()
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_circuit(random_circuit(seed=2), p)
    assert p.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["c.json"]  # no temporary file left behind


@pytest.mark.parametrize("level", ["both", "nodes"])
def test_svg_parses_and_shows_every_node(tmp_path, level):
    c = random_circuit(n_layers=30, n_heads=9, keep=0.45, seed=5, level=level, edge_p=0.006)
    assert len(c.nodes) >= 100 and (level == "nodes" or 100 < len(c.edges) < 800)
    svg = render(c, tmp_path / "c.svg")
    root = ET.parse(svg)
    texts = {t.text for t in root.iter() if t.tag.endswith("text")}
    assert set(c.nodes) <= texts
    assert (tmp_path / "c.dot").exists()


def test_missing_dot_still_writes_the_dot_file(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RenderError, match="apt-get install graphviz"):
        render(random_circuit(), tmp_path / "c.svg")
    assert (tmp_path / "c.dot").read_text().startswith("digraph")
    assert not (tmp_path / "c.svg").exists()
