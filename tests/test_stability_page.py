"""The stability page (issue 28): the full-data circuit shaded by how many resamples kept each node and edge.
The data a page carries is read back from its HTML and compared with stability.json exactly; the shading
in a browser is in tests/test_page_browser.py. A real stability run of the planted model (every frequency
1) and a copy of it with varied frequencies and resample-only units (tests/conftest.py)."""
import json
import shutil

import pytest
from conftest import VARIED_EDGES, VARIED_NODES, planted_stability, vary_stability
from test_page import page_data

from circuitsearch.cli import main
from circuitsearch.graphs.export import load_circuit
from circuitsearch.graphs.frequency import FREQ_DARK, FREQ_LIGHT, frequency_view, kept_line
from circuitsearch.graphs.page import PageError
from circuitsearch.graphs.render import _blend

B = 4
OUTER = ("embed", "logits")


@pytest.fixture(scope="module")
def stability(tmp_path_factory):
    out = tmp_path_factory.mktemp("stab") / "planted"
    planted_stability(out, B)
    return out


@pytest.fixture(scope="module")
def varied(stability, tmp_path_factory):
    return vary_stability(stability, tmp_path_factory.mktemp("varied") / "planted")


def shaded(page) -> dict:
    return page_data(page)["views"][0]


def frequencies(view) -> tuple[dict, dict]:
    """What the page shades each node and edge by (node name / edge name -> frequency)."""
    return ({n["label"]: n["f"] for n in view["nodes"] if n["label"] not in OUTER},
            {e["e"]: e["f"] for e in view["edges"]})


def test_the_stability_run_writes_the_shaded_page_and_the_reports_link_it(stability, tmp_path, capsys):
    s = json.loads((stability / "stability.json").read_text())
    view = shaded(stability / "stability.html")
    nodes, edges = frequencies(view)
    assert nodes == {n: r["frequency"] for n, r in s["nodes"].items()}
    assert edges == {e: r["frequency"] for e, r in s["edges"].items()}
    assert "[stability.html](stability.html)" in (stability / "report.md").read_text()
    assert "[stability.html](../../../stability.html)" in (stability / "sweep" / "cells" / "full" / "report.md").read_text()
    a12 = next(n for n in view["nodes"] if n["u"] == "a1.2")
    assert a12["info"][1] == f"kept in {B} of {B} resamples (1.00)" and a12["fill"] == FREQ_DARK
    assert not view["circuits"] and not any(n.get("extra") for n in view["nodes"])  # nothing only resamples keep
    names = [v["name"] for v in page_data(stability / "stability.html")["views"]]
    assert names[1:] == ["full"] + [f"boot-{i}" for i in range(1, B + 1)]  # then each cell's own circuit
    assert main(["view", str(stability), "--out", str(tmp_path / "v.html")]) == 0
    assert page_data(tmp_path / "v.html") == page_data(stability / "stability.html")


def test_varied_frequencies_reach_the_page_exactly_and_resample_only_units_are_drawn_apart(varied):
    view = shaded(varied / "stability.html")
    nodes, edges = frequencies(view)
    assert nodes == VARIED_NODES and edges == VARIED_EDGES
    full = load_circuit(varied / "sweep" / "cells" / "full" / "circuit.json")
    for n in view["nodes"]:
        if n["label"] in OUTER:
            continue
        f = VARIED_NODES[n["label"]]
        assert n["fill"] == _blend(FREQ_LIGHT, FREQ_DARK, f)
        assert n["info"][1] == kept_line(f, B) == f"kept in {round(f * B)} of {B} resamples ({f:.2f})"
        assert bool(n.get("extra")) == (n["label"] not in full.nodes) == (n["sets"] == [1])
    assert {n["label"] for n in view["nodes"] if n.get("extra")} == {"a0.0", "m1"}
    assert {e["e"] for e in view["edges"] if e.get("extra")} == {"a0.0->m1", "m1->logits"}
    opacity = {e["e"]: e["o"] for e in view["edges"]}
    assert opacity["a1.2->logits"] > opacity["m0->logits"] > opacity["a0.1->a1.2.v"] > opacity["embed->a0.1.v"] \
        > opacity["embed->m0"] > 0
    assert view["circuits"] == ["the full-data circuit", "kept only by resamples"]
    assert [t for _, t in view["legend"]] == [f"kept in {k} of {B} resamples" for k in range(B, -1, -1)]
    assert any("of the 4 bootstrap resamples" in line for line in view["caption"])


def test_view_of_a_run_with_frequency_shades_that_runs_circuit(varied, tmp_path, capsys):
    run = varied / "sweep" / "cells" / "boot-1"
    assert main(["view", str(run), "--frequency", str(varied), "--out", str(tmp_path / "f.html")]) == 0
    views = page_data(tmp_path / "f.html")["views"]
    assert frequencies(views[0]) == (VARIED_NODES, VARIED_EDGES)
    assert views[0]["circuits"] == ["this circuit", "kept only by resamples"]
    assert "f" not in views[1]["nodes"][1]  # then the run's own view, by effect


def test_a_circuit_over_positions_lists_what_it_cannot_draw(tmp_path):
    from circuitsearch.config import PruneConfig
    from circuitsearch.runs import run_prune

    run_prune(PruneConfig(model="induction-2l", task="induction", level="nodes,positions,edges"), tmp_path,
              progress=False, log=lambda *a: None)
    c = load_circuit(tmp_path / "circuit.json")
    extra = next(n for n in c.model_graph.nodes if n not in c.nodes and n not in OUTER)  # attention-only model
    s = {"schema": "circuitsearch.stability/1", "bootstrap": 2, "model": c.model, "resample": "bootstrap",
         "nodes": {"a0.2": {"frequency": 1.0, "in_full": True}, "a1.1": {"frequency": 0.5, "in_full": True},
                   extra: {"frequency": 0.5, "in_full": False}}, "edges": {}}
    view = frequency_view(c, s)
    kept = {n["u"]: n for n in view["nodes"] if not n.get("ghost") and n["label"] not in OUTER}
    assert {"a0.2", "a1.1"} <= {n["label"] for n in kept.values()} and "@" in next(iter(kept))
    assert all(n["f"] == s["nodes"].get(n["label"], {"frequency": 0.0})["frequency"] for n in kept.values())
    assert any(u.startswith("a1.1@") and n["info"][1] == "kept in 1 of 2 resamples (0.50)" for u, n in kept.items())
    assert any(f"{extra} kept in 1 of 2 resamples (0.50)" in x and "not drawn" in x for x in view["notes"])
    assert not any(n.get("extra") for n in view["nodes"])


def test_bad_frequency_input_is_refused_naming_it(stability, tmp_path, capsys):
    def refused(args, *words):
        assert main(["view", *map(str, args), "--out", str(tmp_path / "p.html")]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err

    unfinished = tmp_path / "unfinished"
    shutil.copytree(stability, unfinished)
    (unfinished / "stability.json").unlink()
    how = "circuitsearch stability --model test:planted --task planted --bootstrap B --out"
    refused([unfinished], "has no stability.json", how)
    run = stability / "sweep" / "cells" / "full"
    refused([run, "--frequency", unfinished], "has no stability.json", how)
    other = tmp_path / "other"
    shutil.copytree(stability, other)
    s = json.loads((other / "stability.json").read_text())
    s["nodes"]["a7.3"] = {"frequency": 0.5, "in_full": False}
    s["edges"]["a7.3->logits"] = {"frequency": 0.5, "in_full": False}
    (other / "stability.json").write_text(json.dumps(s))
    refused([run, "--frequency", other], "names 2 units", "does not have: a7.3, a7.3->logits")
    s["model"] = "induction-2l"
    (other / "stability.json").write_text(json.dumps(s))
    refused([run, "--frequency", other / "stability.json"], "on 'induction-2l'", "same model")
    refused([run, "--frequency", run / "circuit.json"], "is not a stability.json")
    refused([stability / "sweep", "--frequency", stability], "shades one circuit")
    with pytest.raises(PageError, match="bootstrap"):
        frequency_view(load_circuit(run / "circuit.json"), {**s, "model": "test:planted:0", "bootstrap": 0})
