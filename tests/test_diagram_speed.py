"""Diagrams in seconds (issue 24): past ROUTE_LIMIT every edge carries a fixed curve (its DOT `pos`), so
Graphviz draws without routing. The compare-orders union of the digits run in docs/speed.md (70 nodes, 542 edges)
took over 5 minutes with splines=curved; these circuits are of that size and larger, on SmolLM2's graph."""
import random
import re
import shutil
import subprocess
import time

import pytest

from circuitsearch.algorithms.compare import Comparison, comparison_dot
from circuitsearch.graphs.circuit import Circuit
from circuitsearch.graphs.diff import diff_circuits
from circuitsearch.graphs.model_graph import ModelGraph, receiver_node, split_edge
from circuitsearch.graphs.render import FIXED_NOTE, ROUTE_LIMIT, edge_pos, positions, to_dot

GRAPH = ModelGraph(30, 9)


def circuit(n_nodes: int, n_edges: int, seed: int) -> Circuit:
    rng = random.Random(seed)
    nodes = ["embed"] + sorted(rng.sample(GRAPH.nodes[1:-1], n_nodes - 2), key=GRAPH.nodes.index) + ["logits"]
    kept = set(nodes)
    edges = [e for e in GRAPH.edges if split_edge(e)[0] in kept and receiver_node(split_edge(e)[1])[0] in kept]
    return Circuit("smollm2-135m", GRAPH.signature(), "digits", {n: rng.random() for n in nodes},
                   {e: rng.random() for e in rng.sample(edges, min(n_edges, len(edges)))},
                   {"faithfulness": 0.8, "normalized": 0.8}, {"level": "both", "order": f"random:{seed}"})


def union_of_orders() -> Comparison:
    """Six overlapping circuits of the demo's size (about 35 nodes, 200 edges each) and their union."""
    rng = random.Random(0)
    core = circuit(45, 700, 0)
    circuits = []
    for i in range(6):
        nodes = {n: e for n, e in core.nodes.items() if n in ("embed", "logits") or rng.random() < 0.75}
        edges = [e for e in core.edges if split_edge(e)[0] in nodes and receiver_node(split_edge(e)[1])[0] in nodes]
        circuits.append(Circuit(core.model, core.graph, core.task, nodes,
                                {e: core.edges[e] for e in rng.sample(edges, min(200, len(edges)))},
                                {"faithfulness": 0.8}, {"level": "both", "order": f"o{i}"}))
    orders = [f"o{i}" for i in range(6)]
    d = diff_circuits(circuits, orders)
    inter, union = d.combined("intersection"), d.combined("union")
    inter.scores = union.scores = {"faithfulness": 0.8}
    return Comparison(orders, circuits, d, inter, union)


def draw(dot: str) -> float:
    t = time.time()
    r = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(b"<?xml"), r.stderr.decode()[:300]
    return time.time() - t


def test_a_small_circuit_is_routed_and_a_large_one_gets_fixed_curves():
    small = circuit(8, 12, 1)
    text = to_dot(small)
    assert "splines=true" in text and 'pos="e,' not in text and FIXED_NOTE not in text
    big = circuit(60, 600, 2)
    text = to_dot(big)
    drawn = re.findall(r'^  "[^"]+" -> "[^"]+" \[.*\];$', text, re.M)
    assert len(drawn) * len(big.nodes) > ROUTE_LIMIT
    assert all('pos="e,' in line for line in drawn)
    assert FIXED_NOTE in text


def test_a_fixed_curve_runs_from_the_senders_top_to_the_receivers_input():
    a, b = (0.0, 0.0), (1.7, 3.0)
    pts = [tuple(map(float, p.split(","))) for p in edge_pos(a, b, "head", "head", "q")[2:].split()]
    tip, start, end = pts[0], pts[1], pts[-1]
    assert start == pytest.approx((0.0, 72 * 0.15), abs=0.1)  # the top of the sender
    assert tip == pytest.approx((72 * (1.7 - 0.3 * 0.62), 72 * (3.0 - 0.15)), abs=0.1)  # its q, left of centre
    assert 4.0 < ((tip[0] - end[0]) ** 2 + (tip[1] - end[1]) ** 2) ** 0.5 < 5.0  # room for the arrowhead
    v_tip = edge_pos(a, b, "head", "head", "v")[2:].split()[0]
    assert float(v_tip.split(",")[0]) > tip[0]  # v meets the head right of q


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_the_compare_orders_union_and_an_acdc_sized_circuit_draw_in_seconds():
    cmp = union_of_orders()
    dot = comparison_dot(cmp)
    assert len(cmp.union.edges) > 500 and 'pos="e,' in dot
    assert draw(dot) < 10
    acdc = circuit(300, 2000, 3)  # every node of the model, 2,000 edges
    assert draw(to_dot(acdc)) < 10
    pos = positions(list(acdc.nodes), acdc.n_layers)
    assert len(pos) == 300
