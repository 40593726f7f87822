"""Circuits over token positions (issue 15), files and pictures side: unit names, circuit.json schema /2
(and /1 unchanged), validation, units(), networkx/GraphML round trips, slot-column diagrams drawn by
Graphviz, and diffs by unit (same slots) or by node (mixed). Circuits are made by hand; no model loads."""
import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest

from circuitsearch.graphs.circuit import SCHEMA, SCHEMA_2, Circuit
from circuitsearch.graphs.diff import diff_circuits, format_table, overlay_dot, render_overlay
from circuitsearch.graphs.export import (CircuitFormatError, dumps_circuit, from_graphml, load_circuit,
                                         save_circuit, to_graphml)
from circuitsearch.graphs.model_graph import (ModelGraph, edge_unit_name, split_edge_unit, split_unit,
                                              unit_name)
from circuitsearch.graphs.render import render, to_dot

GRAPH = ModelGraph(2, 4, attn_only=True)  # the trained induction model's graph (toys.INDUCTION_CONFIG)
SLOTS = ["A", "B", "X", "end"]  # ... A B ... A: the second A ("end") predicts B


def induction(**positions) -> Circuit:
    """The induction circuit at positions: previous-token head a0.1 at B (reading the token A before it),
    induction head a1.2 at the end (its key at B reads a0.1, its value at B the token B)."""
    nodes = {"embed": None, "a0.1": 0.42, "a1.2": 0.9, "logits": None}
    edges = {"embed->a0.1.q": 0.1, "embed->a0.1.k": 0.05, "embed->a0.1.v": 0.3, "embed->a1.2.q": 0.2,
             "a0.1->a1.2.k": 0.6, "embed->a1.2.v": 0.5, "a1.2->logits": 0.9}
    pos = {"slots": list(SLOTS),
           "nodes": {"a0.1": ["B"], "a1.2": ["end"], "logits": ["end"]},
           "edges": {"embed->a0.1.q": ["B"], "embed->a0.1.k": ["A"], "embed->a0.1.v": ["A"],
                     "embed->a1.2.q": ["end"], "a0.1->a1.2.k": ["B"], "embed->a1.2.v": ["B"],
                     "a1.2->logits": ["end"]},
           "effects": {"a0.1@B": 0.4, "a0.1@B->a1.2.k@B": 0.55, "a1.2@end": None}} | positions
    return Circuit("induction-2l", GRAPH.signature(), "induction", nodes, edges,
                   {"full": 3.0, "circuit": 2.7, "faithfulness": 0.9},
                   {"level": "nodes,positions,edges", "ablation": "mean", "metric": "logit_diff"},
                   {"forward_passes": 40}, positions=pos).validate()


# The /1 form of a small circuit, written by hand in the canonical layout (indent 1, forward order).
HAND_V1 = """{
 "schema": "circuitsearch.circuit/1",
 "model": "induction-2l",
 "task": "induction",
 "graph": {
  "n_layers": 2,
  "n_heads": 4,
  "attn_only": true,
  "qkv": true
 },
 "method": {
  "level": "edges"
 },
 "scores": {
  "faithfulness": 0.9
 },
 "nodes": {
  "embed": null,
  "a0.1": 0.42,
  "a1.2": 0.9,
  "logits": null
 },
 "edges": {
  "a0.1->a1.2.k": 0.6,
  "a1.2->logits": 0.9
 },
 "stats": {},
 "version": "0.1.0",
 "meta": {}
}
"""


# ---- names -------------------------------------------------------------------------------------------
def test_unit_names_split_and_join():
    assert split_unit("a9.1@end") == ("a9.1", "end") and unit_name("a9.1", "end") == "a9.1@end"
    assert split_unit("m3@S2") == ("m3", "S2") and split_unit("embed@0") == ("embed", "0")
    assert split_edge_unit("a4.4@S1->a9.1.k@S1") == ("a4.4->a9.1.k", "S1")
    assert edge_unit_name("a4.4->a9.1.k", "S1") == "a4.4@S1->a9.1.k@S1"
    with pytest.raises(ValueError, match="joins slot 'S1' to slot 'S2'.*same slot on both ends"):
        split_edge_unit("a4.4@S1->a9.1.k@S2")
    with pytest.raises(ValueError, match="bad edge unit 'a4.4->a9.1.k@S1'"):
        split_edge_unit("a4.4->a9.1.k@S1")
    with pytest.raises(ValueError, match="bad node unit 'a9.1'.*'node@slot'"):
        split_unit("a9.1")
    with pytest.raises(ValueError, match="unknown node name 'head9'"):
        split_unit("head9@end")
    for bad in ("", "S 1", "a,b", "x@y"):
        with pytest.raises(ValueError, match="bad slot name"):
            unit_name("a9.1", bad)


# ---- files -------------------------------------------------------------------------------------------
def test_json_round_trip_writes_schema_2_and_keeps_positions(tmp_path):
    c = induction()
    path = save_circuit(c, tmp_path / "circuit.json")
    text = path.read_text()
    data = json.loads(text)
    assert data["schema"] == SCHEMA_2 == "circuitsearch.circuit/2"
    assert list(data)[:9] == ["schema", "model", "task", "graph", "method", "scores", "nodes", "edges", "positions"]
    assert data["positions"]["slots"] == SLOTS and data["positions"]["nodes"]["a0.1"] == ["B"]
    back = load_circuit(path)
    assert back == c and back.positions == c.positions
    assert dumps_circuit(back) == text  # byte-identical when written again
    # lists in any slot order are written in position order
    shuffled = induction(nodes={"a0.1": ["B", "A"], "a1.2": ["end"], "logits": ["end"]})
    assert json.loads(dumps_circuit(shuffled))["positions"]["nodes"]["a0.1"] == ["A", "B"]


def test_schema_1_is_unchanged_and_hand_written_files_load(tmp_path):
    p = tmp_path / "v1.json"
    p.write_text(HAND_V1)
    c = load_circuit(p)
    assert c.positions == {} and c.slots == [] and c.nodes["a0.1"] == 0.42
    assert dumps_circuit(c) == HAND_V1  # no positions: today's /1 text, byte for byte
    assert "positions" not in c.to_json() and c.to_json()["schema"] == SCHEMA
    d = json.loads(HAND_V1)  # a /2 file without positions is an ordinary circuit
    d["schema"] = SCHEMA_2
    p.write_text(json.dumps(d))
    assert load_circuit(p) == c
    d = json.loads(HAND_V1)  # positions need /2
    d["positions"] = {"slots": ["A"]}
    p.write_text(json.dumps(d))
    with pytest.raises(CircuitFormatError, match="unknown field\\(s\\) 'positions' for schema "
                                                 "circuitsearch.circuit/1 \\(positions need schema "
                                                 "'circuitsearch.circuit/2'\\)"):
        load_circuit(p)
    d["schema"] = "circuitsearch.circuit/3"
    p.write_text(json.dumps(d))
    with pytest.raises(CircuitFormatError, match="has schema 'circuitsearch.circuit/3'; .* reads "
                                                 "'circuitsearch.circuit/1' and 'circuitsearch.circuit/2' only"):
        load_circuit(p)


def _edit(d, where, value):
    d["positions"][where[0]][where[1]] = value


@pytest.mark.parametrize("mutate, message", [
    (lambda d: _edit(d, ("nodes", "a0.1"), ["B", "Q"]), r"positions\['nodes'\]\['a0.1'\]: unknown slot 'Q'; "
                                                        r"the slots are \['A', 'B', 'X', 'end'\]"),
    (lambda d: _edit(d, ("nodes", "a1.0"), ["end"]), r"node 'a1.0' is not in the circuit's nodes"),
    (lambda d: _edit(d, ("edges", "embed->a1.0.q"), ["end"]), r"edge 'embed->a1.0.q' is not in the circuit's "
                                                              r"edges"),
    (lambda d: _edit(d, ("nodes", "a0.1"), list(SLOTS)), r"lists every slot: leave it out \(absent means kept at "
                                                         r"every slot\)"),
    (lambda d: _edit(d, ("nodes", "a0.1"), []), r"must be a non-empty list of slots"),
    (lambda d: _edit(d, ("nodes", "a0.1"), ["B", "B"]), r"lists a slot twice"),
    (lambda d: d["positions"].update(slots=["A", "B", "A", "end", "X"]), r"names slot\(s\) 'A' more than once"),
    (lambda d: d["positions"].update(slots=[]), r"positions\['slots'\] must be a non-empty list"),
    (lambda d: d["positions"].update(slots=["A", "B@1", "X", "end"]), r"bad slot name 'B@1'"),
    (lambda d: d["positions"].update(order=1), r"positions: unknown key\(s\) 'order'"),
    (lambda d: _edit(d, ("effects", "a0.1@B->a1.2.k@end"), 0.1), r"edge unit 'a0.1@B->a1.2.k@end' joins slot 'B' "
                                                                  r"to slot 'end'"),
    (lambda d: _edit(d, ("effects", "a0.1@end"), 0.1), r"has 'a0.1@end', which the circuit does not keep "
                                                       r"\(a0.1 is kept at \['B'\]\)"),
    (lambda d: _edit(d, ("effects", "a0.1@Z"), 0.1), r"unknown slot 'Z'"),
    (lambda d: _edit(d, ("effects", "a0.1@B"), "big"), r"effect of unit 'a0.1@B' must be a number or null"),
    # an edge at a slot where its sender is ablated carries nothing
    (lambda d: _edit(d, ("edges", "a0.1->a1.2.k"), ["A", "B"]), r"edge 'a0.1->a1.2.k' is kept at slot\(s\) 'A', "
                                                                r"where it carries nothing"),
    # a query read at a slot where its head is ablated carries nothing (a key or value there would)
    (lambda d: _edit(d, ("edges", "embed->a1.2.q"), ["X", "end"]), r"'embed->a1.2.q' is kept at slot\(s\) 'X'"),
])
def test_bad_positions_are_refused_with_the_problem_named(tmp_path, mutate, message):
    d = json.loads(dumps_circuit(induction()))
    mutate(d)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    with pytest.raises(CircuitFormatError, match=message):
        load_circuit(p)


def test_invalid_position_circuits_are_never_written(tmp_path):
    c = induction()
    c.positions["nodes"]["a0.1"] = ["B", "nowhere", "A"]
    for suffix in (".json", ".graphml"):
        with pytest.raises(CircuitFormatError, match="refusing to write an invalid circuit: .*unknown slot 'nowhere'"):
            save_circuit(c, tmp_path / f"bad{suffix}")
        assert not (tmp_path / f"bad{suffix}").exists()


# ---- units -------------------------------------------------------------------------------------------
def test_kept_slots_and_units():
    c = induction()
    assert c.slots == SLOTS
    assert c.kept_slots("a0.1") == ["B"] and c.kept_slots("embed") == SLOTS  # absent from positions: every slot
    assert c.kept_slots("a0.0") == [] and c.kept_slots("a0.1->a1.0.q") == []
    assert c.kept_slots("embed->a0.1.k") == ["A"]
    assert c.units("nodes") == {"embed@A", "embed@B", "embed@X", "embed@end", "a0.1@B", "a1.2@end", "logits@end"}
    assert c.units("edges") == {"embed@B->a0.1.q@B", "embed@A->a0.1.k@A", "embed@A->a0.1.v@A",
                                "embed@end->a1.2.q@end", "a0.1@B->a1.2.k@B", "embed@B->a1.2.v@B",
                                "a1.2@end->logits@end"}
    s = c.summary()
    assert (s["nodes"], s["edges"], s["slots"], s["units"], s["edge_units"]) == (4, 7, 4, 7, 7)
    with pytest.raises(ValueError, match="slots .* are not this circuit's slots"):
        c.units("nodes", slots=["A", "B"])


def test_a_node_kept_at_every_slot_is_the_node():
    """A circuit whose positions keep everything everywhere has the node circuit's units."""
    c = induction()
    everywhere = Circuit(c.model, c.graph, c.task, dict(c.nodes), dict(c.edges), method=dict(c.method),
                         positions={"slots": SLOTS})
    everywhere.validate()
    plain = Circuit(c.model, c.graph, c.task, dict(c.nodes), dict(c.edges), method=dict(c.method))
    for kind in ("nodes", "edges"):
        assert everywhere.units(kind) == plain.units(kind, slots=SLOTS)
        assert len(plain.units(kind, slots=SLOTS)) == len(SLOTS) * len(c.nodes if kind == "nodes" else c.edges)
    with pytest.raises(ValueError, match="no positions: give slots="):
        plain.units("nodes")
    with pytest.raises(ValueError, match="this circuit has no positions"):
        plain.kept_slots("a0.1")


def test_node_level_position_circuit_means_the_edges_some_slot_carries():
    """No edge phase: every graph edge between kept units; a q input needs its head kept at that slot,
    a k or v input does not (later queries read it)."""
    c = Circuit("induction-2l", GRAPH.signature(), "induction", {"embed": None, "a0.1": 0.4, "a1.2": 0.9,
                                                               "logits": None},
                method={"level": "positions"},
                positions={"slots": SLOTS, "nodes": {"a0.1": ["B"], "a1.2": ["end"], "logits": ["end"]}}).validate()
    assert c.node_level
    assert c.kept_slots("a0.1->a1.2.k") == ["B"] and c.kept_slots("a0.1->a1.2.q") == []
    assert c.kept_slots("embed->a0.1.q") == ["B"] and c.kept_slots("embed->a0.1.v") == SLOTS
    assert "a0.1->a1.2.q" not in c.effective_edges() and "a0.1->a1.2.k" in c.effective_edges()
    assert c.units("edges") == {f"embed@{s}->a0.1.{x}@{s}" for s in SLOTS for x in "kv"} | {
        "embed@B->a0.1.q@B", "embed@end->a1.2.q@end", "a0.1@B->a1.2.k@B", "a0.1@B->a1.2.v@B",
        "a1.2@end->logits@end", "embed@end->logits@end"} | {f"embed@{s}->a1.2.{x}@{s}" for s in SLOTS for x in "kv"}
    assert "a0.1->logits" not in c.effective_edges()  # a0.1 is kept at B only, the logits at the end only
    assert c.n_edges == len(c.effective_edges()) == 10


# ---- networkx and GraphML ----------------------------------------------------------------------------
def test_networkx_round_trip_keeps_positions():
    c = induction()
    g = c.to_networkx()
    assert g.graph["schema"] == SCHEMA_2 and g.graph["slots"] == SLOTS
    assert g.nodes["a0.1"]["slots"] == ["B"] and g.nodes["embed"]["slots"] == SLOTS
    assert g.edges["a0.1", "a1.2", "k"]["slots"] == ["B"]
    assert g.graph["unit_effects"] == c.positions["effects"]
    assert Circuit.from_networkx(g) == c
    g.nodes["a0.1"]["slots"] = ["B", "X"]  # an edit in networkx shows up in the circuit
    assert Circuit.from_networkx(g).kept_slots("a0.1") == ["B", "X"]
    del g.nodes["a0.1"]["slots"]
    with pytest.raises(CircuitFormatError, match="node 'a0.1' has no 'slots' list"):
        Circuit.from_networkx(g)
    plain = Circuit(c.model, c.graph, c.task, dict(c.nodes), dict(c.edges), method=dict(c.method))
    pg = plain.to_networkx()
    assert "slots" not in pg.graph and "slots" not in pg.nodes["a0.1"] and pg.graph["schema"] == SCHEMA


def test_graphml_round_trip_keeps_positions(tmp_path):
    c = induction(slots=["0", "B", "X", "end"], nodes={"a0.1": ["B"], "a1.2": ["end"], "logits": ["end"]},
                  edges={"embed->a0.1.q": ["B"], "embed->a0.1.k": ["0"], "embed->a0.1.v": ["0"],
                         "embed->a1.2.q": ["end"], "a0.1->a1.2.k": ["B"], "embed->a1.2.v": ["B"],
                         "a1.2->logits": ["end"]})  # a numbered slot stays text
    data = to_graphml(c)
    assert b"0,B,X,end" in data  # GraphML has no lists: slots are joined with commas
    assert from_graphml(data) == c
    assert load_circuit(save_circuit(c, tmp_path / "c.graphml")) == c


# ---- diagrams ----------------------------------------------------------------------------------------
def _pos(dot: str, node: str) -> tuple[float, float]:
    m = re.search(rf'^  "{re.escape(node)}" \[.*?pos="([-\d.]+),([-\d.]+)!"', dot, re.M)
    assert m, f"{node} not in the DOT text"
    return float(m.group(1)), float(m.group(2))


def test_diagram_lays_slots_out_as_columns_and_layers_as_rows(tmp_path):
    c = induction()
    dot = to_dot(c)
    heads = [_pos(dot, f"slot {s}")[0] for s in SLOTS]
    assert heads == sorted(heads) and len(set(heads)) == len(SLOTS)  # one column per slot, in position order
    for unit in c.units("nodes"):  # each unit sits in its slot's column
        x = _pos(dot, unit)[0]
        slot = split_unit(unit)[1]
        assert min(heads, key=lambda h: abs(h - x)) == heads[SLOTS.index(slot)], unit
    assert _pos(dot, "embed@B")[1] < _pos(dot, "a0.1@B")[1] < _pos(dot, "a1.2@end")[1] < _pos(dot, "logits@end")[1]
    assert _pos(dot, "embed@A")[1] == _pos(dot, "embed@end")[1]  # one row per layer across columns
    assert '"a0.1@B" -> "a1.2@B"' in dot  # the induction head's key at B reads the previous-token head there
    k_edge = next(line for line in dot.splitlines() if '"a0.1@B" -> "a1.2@B"' in line)
    assert "style=dashed" in k_edge and 'label="k"' in k_edge and "#2ca02c" in k_edge
    q_edge = next(line for line in dot.splitlines() if '"embed@end" -> "a1.2@end"' in line)
    assert "dashed" not in q_edge and 'label="q"' in q_edge
    ghost = next(line for line in dot.splitlines() if line.startswith('  "a1.2@B" ['))  # ablated at B, k/v kept
    assert 'style="dashed,filled"' in ghost and '"a1.2@X" [' not in dot
    assert '"a0.1@A" [' in dot and '"a0.1@X" [' not in dot and '"logits@A" [' not in dot
    assert "over 4 position slots" in dot and "7 node units, 7 edge units" in dot


def _svg_texts(path) -> list[str]:
    return [t.text or "" for t in ET.parse(path).getroot().iter() if t.tag.endswith("text")]


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_diagram_renders_with_graphviz(tmp_path):
    c = induction()
    svg = render(c, tmp_path / "c.svg")
    texts = _svg_texts(svg)
    assert set(SLOTS) <= set(texts) and {"a0.1", "a1.2", "embed", "logits"} <= set(texts)
    assert (tmp_path / "c.dot").read_text() == to_dot(c)
    assert save_circuit(c, tmp_path / "d.dot").read_text() == to_dot(c)
    node_level = Circuit(c.model, c.graph, c.task, dict(c.nodes), method={"level": "positions"},
                         positions={"slots": SLOTS, "nodes": {"a0.1": ["B"], "a1.2": ["end"]}})
    assert render(node_level.validate(), tmp_path / "n.png").read_bytes()[:4] == b"\x89PNG"


# ---- comparisons -------------------------------------------------------------------------------------
def _variant() -> Circuit:
    """The induction circuit with the previous-token head also kept at X (one more node unit, same edges)."""
    c = induction()
    c.positions["nodes"]["a0.1"] = ["B", "X"]
    c.task = "induction-b"
    return c.validate()


def test_diff_of_position_circuits_compares_units():
    a, b = induction(), _variant()
    d = diff_circuits([a, b])
    assert d.level == "units" and d.slots == SLOTS
    assert d.jaccard("nodes") == [[1.0, 1.0], [1.0, 1.0]]  # at node level they are the same circuit
    assert d.jaccard("node_units")[0][1] == pytest.approx(2 / 3)  # heads' units: {a0.1@B, a1.2@end} of 3
    assert d.jaccard("edge_units")[0][1] == 1.0
    assert d.unique("induction-b", "node_units") == {"a0.1@X"} and d.unique("induction", "node_units") == set()
    assert d.counts(frozenset({"induction-b"}))["units"] == 1
    j = json.loads(json.dumps(d.to_json()))
    assert j["level"] == "units" and j["slots"] == SLOTS and j["jaccard"]["node_units"] == d.jaccard("node_units")
    assert j["shared"]["node_units"] == ["embed@A", "embed@B", "embed@X", "embed@end", "a0.1@B", "a1.2@end",
                                         "logits@end"]
    table = format_table(d)
    assert "compared by unit over slots A B X end" in table and "Jaccard, head and MLP units" in table
    assert "0.67" in table.split("Jaccard, head and MLP units")[1]
    dot = overlay_dot(d)  # drawn by unit: the unit only induction-b holds is coloured as its own
    assert '"a0.1@X" [' in dot and '"slot end"' in dot
    x_line = next(line for line in dot.splitlines() if line.startswith('  "a0.1@X" ['))
    assert 'fillcolor="#ffd21f"' not in x_line
    b_line = next(line for line in dot.splitlines() if line.startswith('  "a0.1@B" ['))
    assert 'fillcolor="#ffd21f", penwidth=2.5' in b_line


def test_diff_of_a_position_circuit_with_a_node_circuit_is_at_node_level(tmp_path):
    a = induction()
    nodes = Circuit(a.model, a.graph, "nodes-only", {"embed": None, "a0.1": 0.5, "a1.3": 0.2, "logits": None},
                    {"a0.1->a1.3.k": 0.3, "a1.3->logits": 0.2}, method={"level": "edges"})
    d = diff_circuits([a, nodes])
    assert d.level == "nodes" and "induction has positions, nodes-only has none" in d.note
    assert d.jaccard("nodes")[0][1] == pytest.approx(1 / 3)  # {a0.1} of {a0.1, a1.2, a1.3}: kept at any slot
    assert d.members("induction", "edges") == set(a.edges)
    with pytest.raises(ValueError, match="compares at node level, so it has no node_units"):
        d.jaccard("node_units")
    j = d.to_json()
    assert j["level"] == "nodes" and j["note"] == d.note and "node_units" not in j["jaccard"]
    assert d.note in format_table(d)
    dot = overlay_dot(d)
    assert '"a0.1" [' in dot and "@" not in "".join(re.findall(r'^  "([^"]+)" \[', dot, re.M))
    assert "has positions, nodes-only has none" in dot
    texts = _svg_texts(render_overlay(d, tmp_path / "overlay.svg"))
    assert {"embed", "a0.1", "a1.2", "a1.3", "logits"} <= set(texts) and not any("@" in t for t in texts)
    assert "has positions, nodes-only has none" in " ".join(texts)


def test_diff_of_position_circuits_with_other_slots_is_at_node_level():
    a = induction()
    b = Circuit(a.model, a.graph, "other", dict(a.nodes), method={"level": "positions"},
                positions={"slots": ["S0", "end"], "nodes": {"a0.1": ["S0"]}}).validate()
    d = diff_circuits([a, b])
    assert d.level == "nodes" and "different slots (induction: A B X end; other: S0 end)" in d.note
    assert d.jaccard("nodes")[0][1] == 1.0


def test_prune_report_says_where_nodes_are_kept():
    from circuitsearch.runs.reports import prune_report

    c = induction()
    c.method.update(order="forward", thresholds={"absolute": 0.8, "relative": None})
    text = prune_report(c, "circuit.svg")
    assert "Over 4 position slots (A, B, X, end): 7 node units, 7 edge units" in text
    assert "Kept at some positions only: a0.1 at B; a1.2 at end; logits at end." in text
    assert "schema circuitsearch.circuit/2" in text
    plain = Circuit(c.model, c.graph, c.task, dict(c.nodes), dict(c.edges), dict(c.scores), dict(c.method))
    text = prune_report(plain, None)
    assert "position slots" not in text and "schema circuitsearch.circuit/1" in text


@pytest.mark.parametrize("graph", [ModelGraph(2, 4, qkv=False), ModelGraph(2, 4, split_embed=True)])
def test_other_graphs_round_trip_and_draw(tmp_path, graph):
    """One receiver per head (qkv=False: q, k and v together, so any slot) and split embeddings."""
    emb = graph.embed_nodes[0]
    recv = "a1.2" if not graph.qkv else "a1.2.k"
    c = Circuit("m", graph.signature(), "t", {**{e: None for e in graph.embed_nodes}, "a0.1": 0.4, "a1.2": 0.9,
                                              "m1": 0.2, "logits": None},
                {f"{emb}->a0.1" + ("" if not graph.qkv else ".q"): 0.1, f"a0.1->{recv}": 0.6, "a1.2->m1": 0.3,
                 "m1->logits": 0.2},
                method={"level": "edges"},
                positions={"slots": SLOTS, "nodes": {"a0.1": ["B"], "a1.2": ["end"]},
                           "edges": {f"{emb}->a0.1" + ("" if not graph.qkv else ".q"): ["B"],
                                     f"a0.1->{recv}": ["B"], "a1.2->m1": ["end"], "m1->logits": ["end"]}})
    c.validate()
    assert c.units("edges") == {f"{emb}@B->a0.1{'' if not graph.qkv else '.q'}@B", f"a0.1@B->{recv}@B",
                                "a1.2@end->m1@end", "m1@end->logits@end"}
    assert load_circuit(save_circuit(c, tmp_path / "c.json")) == c
    assert load_circuit(save_circuit(c, tmp_path / "c.graphml")) == c
    dot = to_dot(c)
    assert '"a0.1@B" -> "a1.2@B"' in dot and '"a1.2@B" [' in dot  # drawn into the head's k/v input at B
    if shutil.which("dot"):
        texts = set(_svg_texts(render(c, tmp_path / "c.svg")))
        assert set(SLOTS) <= texts and set(c.nodes) <= texts  # every slot column and node drawn
        assert (tmp_path / "c.dot").read_text() == dot
    c.positions["edges"]["a1.2->m1"] = ["B", "end"]  # an MLP input at B, where a1.2 is ablated: nothing
    with pytest.raises(ValueError, match=r"'a1.2->m1' is kept at slot\(s\) 'B', where it carries nothing"):
        c.validate()


def test_positions_field_from_kept_units():
    """What a search holds (the kept units) becomes Circuit.nodes/edges and positions."""
    from circuitsearch.graphs.circuit import group_units, positions_field

    c = induction()
    nodes, edges = group_units(c.units("nodes"), SLOTS), group_units(c.units("edges"), SLOTS)
    assert nodes["a0.1"] == ["B"] and nodes["embed"] == SLOTS and edges["a0.1->a1.2.k"] == ["B"]
    rebuilt = Circuit(c.model, c.graph, c.task, {n: c.nodes[n] for n in nodes}, {e: c.edges[e] for e in edges},
                      dict(c.scores), dict(c.method), dict(c.stats),
                      positions=positions_field(SLOTS, nodes, edges, c.positions["effects"])).validate()
    assert rebuilt == c
    with pytest.raises(ValueError, match="unit 'a0.1@Q' is at slot 'Q', which is not one of the slots"):
        group_units(["a0.1@Q"], SLOTS)


def test_intersection_and_union_of_position_circuits_are_kept_by_unit():
    a, b = induction(), _variant()
    d = diff_circuits([a, b])
    inter, union = d.combined("intersection").validate(), d.combined("union").validate()
    assert inter.units("nodes") == a.units("nodes") and inter.units("edges") == a.units("edges")
    assert union.units("nodes") == b.units("nodes") == a.units("nodes") | {"a0.1@X"}
    assert inter.method["order"] == "intersection" and inter.slots == SLOTS
    nodes = Circuit(a.model, a.graph, "nodes-only", {"embed": None, "a0.1": 0.5, "logits": None},
                    {"a0.1->logits": 0.2}, method={"level": "edges"})
    mixed = diff_circuits([a, nodes]).combined("intersection").validate()
    assert mixed.positions == {} and set(mixed.nodes) == {"embed", "a0.1", "logits"}
