"""The interactive page (issue 24), data side: what `view` writes for each kind of input, read back from
the HTML without a browser (tests/test_page_browser.py drives it in Chromium). Runs are made on the
planted and induction test models."""
import json
import re
from pathlib import Path

import pytest

from circuitsearch.cli import main
from circuitsearch.config import PruneConfig
from circuitsearch.graphs.circuit import Circuit
from circuitsearch.graphs.diff import diff_circuits
from circuitsearch.graphs.export import load_circuit
from circuitsearch.graphs.page import PageError, page_html, write_page
from circuitsearch.runs import run_prune
from circuitsearch.runs.view import views_of, write_diff_page, write_view

QUIET = dict(progress=False, log=lambda *a: None)


def page_data(path: Path) -> dict:
    """The data a page carries (its <script id="page-data">)."""
    m = re.search(r'<script id="page-data" type="application/json">(.*?)</script>', path.read_text(), re.S)
    assert m, "no page data"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted")
    run_prune(PruneConfig(model="test:planted", task="planted", n_prompts=12), out, **QUIET)
    return out


@pytest.fixture(scope="module")
def induction_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("induction")
    run_prune(PruneConfig(model="induction-2l", task="induction", level="nodes,positions,edges"), out, **QUIET)
    return out


def test_prune_writes_a_self_contained_page_that_report_links(planted_run):
    page = planted_run / "circuit.html"
    text = page.read_text()
    assert "[circuit.html](circuit.html)" in (planted_run / "report.md").read_text()
    # nothing fetched at view time: no external script, style, image or link (the SVG namespace is a name)
    assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)=', text)
    assert re.findall(r"https?://[^\s\"'<>)]+", text) == ["http://www.w3.org/2000/svg"] * 2
    assert "@import" not in text and "url(" not in text
    data = page_data(page)
    circuit = json.loads((planted_run / "circuit.json").read_text())
    view = data["views"][0]
    assert sorted(n["u"] for n in view["nodes"]) == sorted(circuit["nodes"])
    assert sorted(e["u"] for e in view["edges"]) == sorted(circuit["edges"])


def test_hover_text_holds_the_effect_and_the_decision_that_kept_it(planted_run):
    circuit = load_circuit(planted_run / "circuit.json")
    decisions = [json.loads(x) for x in (planted_run / "decisions.jsonl").read_text().splitlines()]
    view = page_data(planted_run / "circuit.html")["views"][0]
    node = next(n for n in view["nodes"] if n["u"] == "a1.2")
    assert f"effect {circuit.nodes['a1.2']:.4g} (faithfulness lost when it was removed)" in node["info"]
    last = [d for d in decisions if d["candidate"] == "a1.2"][-1]
    assert not last["removed"]
    kept = next(x for x in node["info"] if x.startswith("kept in"))
    assert f"{last['phase']} pass {last['pass']}" in kept and f"{last['faithfulness']:.4f}" in kept
    assert "below the absolute threshold 0.8" in kept
    logits = next(n for n in view["nodes"] if n["u"] == "logits")
    assert "decision: the logits are always kept" in logits["info"]


def test_the_slider_holds_the_curve_and_its_nested_circuits(planted_run):
    circuit = load_circuit(planted_run / "circuit.json")
    curves = json.loads((planted_run / "curves.json").read_text())["curves"][0]
    view = page_data(planted_run / "circuit.html")["views"][0]
    curve = view["curve"]
    assert curve["name"] == curves["name"] and curve["n_edges"] == curves["n_edges"]
    assert [p["k"] for p in curve["points"] if not p.get("own")] == curves["kept"]
    own = next(p for p in curve["points"] if p.get("own"))
    assert own["k"] == len(circuit.edges) and own["r"] == circuit.scores["faithfulness"]
    # the top k of the removal ranking are the circuit's k edges of largest |effect|
    by_effect = sorted(circuit.edges, key=lambda e: -abs(circuit.edges[e]))
    for k in range(len(circuit.edges) + 1):
        shown = {e["u"] for e, at in zip(view["edges"], curve["edge_at"]) if at < k}
        assert len(shown) == k
        assert {abs(circuit.edges[e]) for e in shown} <= {abs(circuit.edges[e]) for e in by_effect[:k]}


def test_the_rebuilt_ranking_is_the_one_the_curve_scored(planted_run):
    """Scoring the top k edges of the page's ranking gives curves.json's faithfulness at k."""
    from circuitsearch.algorithms.curves import circuit_of_top
    from circuitsearch.patching import Evaluator
    from circuitsearch.tasks.base import Task
    from circuitsearch.toys import planted_model

    ev = Evaluator(planted_model(), Task.from_json(json.loads((planted_run / "task.json").read_text())), "mean")
    circuit = load_circuit(planted_run / "circuit.json")
    from circuitsearch.runs.view import removal_curve, run_decisions
    curve, why = removal_curve(planted_run, circuit, run_decisions(planted_run, circuit)[0])
    assert why is None
    best_first = sorted(curve["rank"], key=curve["rank"].get)
    for k, f in zip(curve["kept"], curve["faithfulness"]):
        nodes, edges = circuit_of_top(ev, set(best_first[:k]))
        assert ev.normalized(ev.score(nodes=nodes, edges=edges)) == pytest.approx(f, abs=1e-5)


def test_a_circuit_over_positions_draws_one_element_per_unit(induction_run):
    circuit = load_circuit(induction_run / "circuit.json")
    view = page_data(induction_run / "circuit.html")["views"][0]
    kept = [n["u"] for n in view["nodes"] if not n.get("ghost")]
    assert sorted(kept) == sorted(circuit.units("nodes"))
    assert sorted(e["u"] for e in view["edges"]) == sorted(circuit.units("edges"))
    assert [s[0] for s in view["slots"]] == circuit.slots
    ghosts = {n["u"] for n in view["nodes"] if n.get("ghost")}
    assert ghosts == {view["nodes"][e["t"]]["u"] for e in view["edges"]} - set(kept)


def test_diff_pages_from_the_command_and_from_diff_json(planted_run, tmp_path, capsys):
    other = smaller(load_circuit(planted_run / "circuit.json"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "circuit.json").write_text(other.dumps())
    assert main(["diff", str(planted_run), str(tmp_path / "b"), "--names", "A,B", "--out", str(tmp_path / "d")]) == 0
    for page in (tmp_path / "d" / "overlay.html", write_view(tmp_path / "d" / "diff.json", tmp_path / "v.html")):
        view = page_data(page)["views"][0]
        assert view["circuits"] == ["A", "B"]
        d = json.loads((tmp_path / "d" / "diff.json").read_text())
        only_a = next(s for s in d["subsets"] if s["circuits"] == ["A"])
        assert {n["u"] for n in view["nodes"] if n["sets"] == [0]} == set(only_a["node_names"])
        assert {e["u"] for e in view["edges"] if e["sets"] == [0]} == set(only_a["edge_names"])
    effects = next(n for n in page_data(tmp_path / "d" / "overlay.html")["views"][0]["nodes"] if n["u"] == "a1.2")
    assert any(x.startswith("A: effect ") for x in effects["info"])


def smaller(c: Circuit) -> Circuit:
    """The circuit without m0 (and its edges): a second circuit to diff against."""
    return Circuit(c.model, c.graph, c.task, {n: e for n, e in c.nodes.items() if n != "m0"},
                   {e: x for e, x in c.edges.items() if "m0" not in e}, dict(c.scores), dict(c.method))


def test_compare_orders_writes_its_page_with_one_view_per_order(tmp_path, capsys):
    out = tmp_path / "orders"
    assert main(["compare-orders", "--model", "test:planted", "--task", "planted", "--n-prompts", "10",
                 "--orders", "forward,reverse", "--out", str(out), "--quiet"]) == 0
    assert "[comparison.html](comparison.html)" in (out / "report.md").read_text()
    data = page_data(out / "comparison.html")
    assert [v["name"] for v in data["views"]] == ["all 2 orders", "order forward", "order reverse"]
    union = data["views"][0]
    cmp = json.loads((out / "comparison.json").read_text())
    assert sorted(n["u"] for n in union["nodes"]) == sorted(cmp["union"]["nodes"])
    assert sorted(e["u"] for e in union["edges"]) == sorted(cmp["kept_by"]["edges"])
    assert union["circuits"] == ["forward", "reverse"]
    # view of the directory gives the same page data
    assert main(["view", str(out), "--out", str(tmp_path / "again.html")]) == 0
    assert page_data(tmp_path / "again.html") == data


def test_targets_and_sweep_directories_give_one_view_per_circuit(tmp_path, capsys):
    from circuitsearch.sweeps import InlineExecutor, load_spec, run_sweep

    assert main(["prune", "--model", "test:planted", "--task", "planted", "--n-prompts", "10", "--target", "0.9,0.8",
                 "--out", str(tmp_path / "t"), "--quiet"]) == 0
    views, title, kind = views_of(tmp_path / "t")
    assert kind == "targets" and [v["name"] for v in views] == ["target 0.9", "target 0.8"]
    spec = tmp_path / "s.toml"
    spec.write_text("[fixed]\nmodel = 'test:planted'\ntask = 'planted'\nn_prompts = 10\n\n[axes]\n"
                    "order = ['forward', 'reverse']\n")
    run_sweep(load_spec(spec), tmp_path / "sw", InlineExecutor(), log=lambda *a: None)
    views, title, kind = views_of(tmp_path / "sw")
    assert kind == "sweep" and len(views) == 2 and all("curve" in v for v in views)


def test_view_names_what_it_cannot_show(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"schema": "something/1"}')
    for target, words in ((tmp_path / "nope", "no such file or directory"), (tmp_path, "holds none of"),
                          (tmp_path / "x.json", "is not a file view can show")):
        assert main(["view", str(target), "--out", str(tmp_path / "p.html")]) == 2
        assert words in capsys.readouterr().err
    with pytest.raises(PageError, match="give --out a .html file"):
        write_page(tmp_path / "p.svg", [{}], "t", "circuit")


def test_names_in_the_data_cannot_end_the_script(planted_run, tmp_path):
    circuit = load_circuit(planted_run / "circuit.json")
    circuit.task = "</script><script>alert(1)</script><!--"
    view = views_of(planted_run)[0][0] | {"caption": [circuit.task]}
    text = page_html([view], circuit.task, "circuit")
    assert text.count("</script>") == 2  # the data's and the script's own
    assert page_data(write_page(tmp_path / "p.html", [view], circuit.task, "circuit"))["views"][0]["caption"] == \
        [circuit.task]


def test_diff_page_of_circuits_over_positions(induction_run, tmp_path):
    c = load_circuit(induction_run / "circuit.json")
    d = diff_circuits([c, c], ["one", "two"])
    view = page_data(write_diff_page(d, tmp_path / "p.html"))["views"][0]
    assert sorted(n["u"] for n in view["nodes"] if not n.get("ghost")) == sorted(c.units("nodes"))
    assert all(n["sets"] == [0, 1] for n in view["nodes"] if not n.get("ghost"))
