"""The interactive page in a real browser: headless Chromium driven by Selenium, asserting on the DOM.

Needs Debian's `chromium` and `chromium-driver` (make setup installs them as root, like Graphviz) and
the `selenium` package (a test dependency). Where Chromium is absent these tests skip and say why;
under CI (CI set) they fail instead, since CI installs it. Runs come from the planted and induction
test models; a synthetic circuit of 300 nodes and 2,000 edges checks the page stays responsive.
"""
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from circuitsearch.config import PruneConfig
from circuitsearch.graphs.circuit import Circuit
from circuitsearch.graphs.diff import diff_circuits
from circuitsearch.graphs.export import load_circuit
from circuitsearch.graphs.model_graph import ModelGraph, receiver_node, split_edge, split_edge_unit
from circuitsearch.graphs.page import circuit_view, write_page
from circuitsearch.graphs.render import _fmt, _unit_effect
from circuitsearch.runs import run_prune
from circuitsearch.runs.view import write_diff_page

INSTALL = ("install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
           "`make setup` does it as root)")


def _chromium() -> tuple[str, str]:
    """Paths of the browser and its driver; a skip (a failure under CI) naming what is missing."""
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    missing = [name for name, p in (("chromium", browser), ("chromedriver", driver)) if p is None]
    if missing:
        why = f"no {' or '.join(missing)} on PATH: {INSTALL}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {why}")
        pytest.skip(why)
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install selenium (it is in the test extras; make setup "
                    "installs it)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = binary
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as e:  # noqa: BLE001  (the browser is there but does not start: say why, never skip)
        pytest.fail(f"headless Chromium ({binary}, driver {driver_path}) did not start: {e}")
    yield driver
    driver.quit()


def open_page(driver, path: Path):
    driver.get(path.resolve().as_uri())
    for _ in range(100):
        if driver.execute_script("return document.body.dataset.ready") == "1":
            break
        time.sleep(0.05)
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"
    assert driver.execute_script("return document.body.dataset.ready") == "1", "the page script did not finish"


def shown(driver, selector: str = "[data-unit]") -> list[str]:
    """Unit names of the elements displayed (not hidden by a toggle, the slider or a filter)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].filter(e => getComputedStyle(e).display !== 'none')"
        ".map(e => e.dataset.unit || e.dataset.ghost)", selector)


POINT = """
    const el = document.querySelector(`[data-unit="${arguments[0]}"]`);
    el.scrollIntoView({block: "center", inline: "center"});
    if (el.tagName === "path") {  // the middle of the curve itself, where the pointer meets its stroke
        const p = el.getPointAtLength(el.getTotalLength() / 2), m = el.getScreenCTM();
        return [m.a * p.x + m.c * p.y + m.e, m.b * p.x + m.d * p.y + m.f];
    }
    const r = el.getBoundingClientRect();
    return [r.left + r.width / 2, r.top + r.height / 2];"""


def hover(driver, unit: str):
    """Move the real pointer onto a unit (a node's middle, a point on an edge's stroke); the tooltip's text."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    x, y = driver.execute_script(POINT, unit)
    actions = ActionBuilder(driver)
    actions.pointer_action.move_to_location(0, 0)
    actions.pointer_action.move_to_location(round(x), round(y))
    actions.perform()
    tip = driver.find_element("id", "tip")
    assert tip.is_displayed(), f"no tooltip on {unit}"
    return tip.text


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("planted")
    run_prune(PruneConfig(model="test:planted", task="planted", n_prompts=12), out, progress=False,
              log=lambda *a: None)
    return out


def test_the_page_loads_with_one_element_per_unit(browser, planted_run):
    open_page(browser, planted_run / "circuit.html")
    circuit = json.loads((planted_run / "circuit.json").read_text())
    units = browser.execute_script("return [...document.querySelectorAll('[data-unit]')].map(e => e.dataset.unit)")
    assert sorted(units) == sorted(list(circuit["nodes"]) + list(circuit["edges"]))
    assert len(units) == len(circuit["nodes"]) + len(circuit["edges"])
    assert "showing 5 of 5 nodes and 5 of 5 edges" in browser.find_element("id", "shown").text


def test_hover_shows_the_effect_and_the_decision(browser, planted_run):
    open_page(browser, planted_run / "circuit.html")
    circuit = load_circuit(planted_run / "circuit.json")
    text = hover(browser, "a1.2")
    assert f"effect {_fmt(circuit.nodes['a1.2'])} (faithfulness lost when it was removed)" in text
    assert "kept in nodes pass" in text and "below the absolute threshold 0.8" in text
    edge = max(circuit.edges, key=lambda e: abs(circuit.edges[e]))  # the widest line
    text = hover(browser, edge)
    assert text.splitlines()[0] == edge and f"effect {_fmt(circuit.edges[edge])}" in text


def paths_through(nodes: set[str], edges: list[str], node: str) -> tuple[set[str], set[str]]:
    """Nodes and edges on the paths embed -> node -> logits (the expected highlight)."""
    pairs = [(split_edge(e)[0], receiver_node(split_edge(e)[1])[0], e) for e in edges]

    def reach(start, forward):
        seen, todo = {start}, [start]
        while todo:
            n = todo.pop()
            for s, t, _ in pairs:
                a, b = (s, t) if forward else (t, s)
                if a == n and b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    from_embed, to_logits = reach("embed", True), reach("logits", False)
    before = reach(node, False) & from_embed | {node}
    after = reach(node, True) & to_logits | {node}
    on = {e for s, t, e in pairs if (s in before and t in before) or (s in after and t in after)}
    return before | after, on


def test_click_highlights_the_paths_through_a_node_and_dims_the_rest(browser, planted_run):
    open_page(browser, planted_run / "circuit.html")
    circuit = load_circuit(planted_run / "circuit.json")
    for node in ("a0.1", "m0"):
        browser.find_element("css selector", f'[data-unit="{node}"]').click()
        on = set(browser.execute_script("return [...document.querySelectorAll('.on')].map(e => e.dataset.unit)"))
        want_nodes, want_edges = paths_through(set(circuit.nodes), list(circuit.edges), node)
        assert on == want_nodes | want_edges
        assert on != set(circuit.nodes) | set(circuit.edges)  # something is dimmed
        dim = browser.execute_script("return [...document.querySelectorAll('[data-unit]:not(.on)')]"
                                     ".map(e => getComputedStyle(e).opacity)")
        assert dim and all(float(x) < 0.5 for x in dim)
        assert f"{len(want_nodes)} nodes and {len(want_edges)} edges" in browser.find_element("id", "selection").text
    browser.execute_script("document.getElementById('graph').dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    # a click on the background (the svg itself) clears the selection
    assert not browser.find_elements("css selector", ".on")


def test_the_slider_shows_the_curve_circuit_at_each_point(browser, planted_run):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, planted_run / "circuit.html")
    curve = json.loads((planted_run / "curves.json").read_text())["curves"][0]
    circuit = load_circuit(planted_run / "circuit.json")
    slider = browser.find_element("id", "slider")
    assert slider.is_displayed() and browser.find_element("id", "curve-own").text == "(this circuit)"
    assert int(browser.find_element("id", "curve-k").text) == len(circuit.edges)
    slider.send_keys(Keys.HOME)
    seen = []
    for i, (k, f) in enumerate(zip(curve["kept"], curve["faithfulness"])):
        if i:
            slider.send_keys(Keys.RIGHT)
            if browser.find_element("id", "curve-own").text == "(this circuit)":  # the circuit's own point
                slider.send_keys(Keys.RIGHT)
        assert int(browser.find_element("id", "curve-k").text) == k
        assert browser.find_element("id", "curve-f").text == f"{f:.3f}"
        edges = [u for u in shown(browser, ".edge")]
        assert len(edges) == min(k, len(circuit.edges))
        seen.append(len(edges))
    assert seen[0] < seen[-1]  # the slider changed what is shown


def test_search_and_input_toggles(browser, planted_run):
    open_page(browser, planted_run / "circuit.html")
    circuit = load_circuit(planted_run / "circuit.json")
    box = browser.find_element("id", "search")
    box.send_keys("a1.2")
    found = browser.execute_script("return [...document.querySelectorAll('.found')].map(e => e.dataset.unit)")
    assert found == ["a1.2"] and browser.find_element("id", "found").text == "1 found"
    v_edges = {e for e in circuit.edges if e.endswith(".v")}
    assert v_edges
    browser.find_element("css selector", '#input-toggles input[data-input="v"]').click()
    assert set(shown(browser, ".edge")) == set(circuit.edges) - v_edges


def test_toggling_a_circuit_of_a_diff_hides_its_units(browser, planted_run, tmp_path):
    a = load_circuit(planted_run / "circuit.json")
    b = Circuit(a.model, a.graph, a.task, {n: e for n, e in a.nodes.items() if n != "m0"},
                {e: x for e, x in a.edges.items() if "m0" not in e}, dict(a.scores), dict(a.method))
    d = diff_circuits([a, b], ["A", "B"])
    open_page(browser, write_diff_page(d, tmp_path / "diff.html"))
    every = set(d.node_sets) | set(d.edge_sets)
    assert set(shown(browser)) == every
    assert not browser.find_element("id", "curve").is_displayed()  # a diff has no curve to slide along
    browser.find_element("css selector", '#circuit-toggles input[data-circuit="A"]').click()
    assert set(shown(browser)) == d.members("B", "nodes") | d.members("B", "edges")
    assert "m0" not in shown(browser)
    assert "held by 2 of 2: A, B" in hover(browser, "a1.2")
    browser.find_element("css selector", '#circuit-toggles input[data-circuit="A"]').click()
    browser.find_element("css selector", '#circuit-toggles input[data-circuit="B"]').click()
    assert set(shown(browser)) == every  # m0 and its edges are A's, the rest both's
    assert "held by 1 of 2: A" in hover(browser, "m0")


def test_a_circuit_over_positions(browser, tmp_path):
    run_prune(PruneConfig(model="induction-2l", task="induction", level="nodes,positions,edges"), tmp_path,
              progress=False, log=lambda *a: None)
    open_page(browser, tmp_path / "circuit.html")
    c = load_circuit(tmp_path / "circuit.json")
    assert sorted(shown(browser)) == sorted(c.units("nodes") | c.units("edges"))
    slots = browser.execute_script("return [...document.querySelectorAll('.slot')].map(e => e.textContent)")
    assert slots == c.slots
    unit = max(c.units("edges"), key=lambda u: abs(_unit_effect(c, u, split_edge_unit(u)[0]) or 0))  # widest
    assert hover(browser, unit).splitlines()[0] == unit
    node = next(u for u in c.units("nodes") if u.startswith("a1."))
    assert hover(browser, node).splitlines()[0] == node


def big_circuit(n_nodes: int = 300, n_edges: int = 2000, seed: int = 0) -> Circuit:
    """A circuit on SmolLM2's graph (30 layers x 9 heads): every node, 2,000 random edges."""
    g = ModelGraph(30, 9)
    rng = random.Random(seed)
    nodes = g.nodes[:n_nodes - 1] + ["logits"]
    edges = rng.sample([e for e in g.edges if split_edge(e)[0] in nodes and
                        receiver_node(split_edge(e)[1])[0] in nodes], n_edges)
    return Circuit("big", g.signature(), "synthetic", {n: rng.random() for n in nodes},
                   {e: rng.random() for e in edges}, {"faithfulness": 0.8}, {"level": "both"})


def test_the_page_stays_responsive_with_300_nodes_and_2000_edges(browser, tmp_path):
    c = big_circuit()
    page = write_page(tmp_path / "big.html", [circuit_view(c)], "big", "circuit")
    t = time.time()
    open_page(browser, page)
    load = time.time() - t
    assert len(shown(browser)) == len(c.nodes) + len(c.edges) == 300 + 2000
    ms = browser.execute_script("""
        const t = performance.now();
        document.querySelector('[data-unit="a15.4"]').dispatchEvent(new MouseEvent('click', {bubbles: true}));
        const click = performance.now() - t;
        const box = document.getElementById('search'); box.value = 'a20.1';
        box.dispatchEvent(new Event('input'));
        const t2 = performance.now();
        document.querySelector('#input-toggles input[data-input="q"]').click();
        return [click, performance.now() - t2];""")
    assert load < 10 and max(ms) < 1000, f"load {load:.1f} s, click {ms[0]:.0f} ms, toggle {ms[1]:.0f} ms"
    assert browser.find_elements("css selector", ".on")


# ---- the stability page: shading by resample frequency (issue 28) ------------------------------------
SHAPE_STYLE = """return [...document.querySelectorAll('.node[data-unit]')].map(g => {
    const s = getComputedStyle(g.querySelector('ellipse, rect'));
    return [g.dataset.unit, s.fill, s.strokeDasharray, g.classList.contains('extra')]; });"""


def lightness(rgb: str) -> float:
    r, g, b = (int(x) for x in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


@pytest.fixture(scope="module")
def varied_stability(tmp_path_factory) -> Path:
    from conftest import planted_stability, vary_stability

    out = tmp_path_factory.mktemp("stability") / "planted"
    planted_stability(out, 4)
    return vary_stability(out, tmp_path_factory.mktemp("varied") / "planted")


def test_stability_page_shades_nodes_and_edges_by_frequency(browser, varied_stability):
    from conftest import VARIED_EDGES, VARIED_NODES

    open_page(browser, varied_stability / "stability.html")
    style = {u: (fill, dash, extra) for u, fill, dash, extra in browser.execute_script(SHAPE_STYLE)}
    assert set(VARIED_NODES) <= set(style)
    light = {u: lightness(style[u][0]) for u in VARIED_NODES}
    for a, fa in VARIED_NODES.items():  # darker fill exactly when more resamples kept it
        for b, fb in VARIED_NODES.items():
            assert (light[a] < light[b]) == (fa > fb) and (light[a] == light[b]) == (fa == fb), (a, b, light)
    # resample-only nodes are drawn apart: dashed outline; the full circuit's are solid
    for u, (fill, dash, extra) in style.items():
        assert extra == (u in ("a0.0", "m1")) and (dash not in ("none", "")) == extra, (u, dash)
    opacity = dict(browser.execute_script("return [...document.querySelectorAll('.edge')].map(e => "
                                          "[e.dataset.unit, +getComputedStyle(e).strokeOpacity]);"))
    for a, fa in VARIED_EDGES.items():
        for b, fb in VARIED_EDGES.items():
            assert (opacity[a] < opacity[b]) == (fa < fb), (a, b, opacity)
    legend = browser.find_element("id", "legend").text
    assert "kept in 4 of 4 resamples" in legend and "kept in 0 of 4 resamples" in legend


def test_stability_page_hover_says_k_of_b_and_the_toggle_hides_resample_only_units(browser, varied_stability):
    open_page(browser, varied_stability / "stability.html")
    assert hover(browser, "a0.1").splitlines()[:2] == ["a0.1", "kept in 2 of 4 resamples (0.50)"]
    assert hover(browser, "m0").splitlines()[1] == "kept in 3 of 4 resamples (0.75)"
    text = hover(browser, "a0.0").splitlines()
    assert text[1] == "kept in 1 of 4 resamples (0.25)" and "only resamples keep it" in text[2]
    assert hover(browser, "m0->logits").splitlines()[1] == "kept in 3 of 4 resamples (0.75)"
    assert {"a0.0", "m1", "a0.0->m1"} <= set(shown(browser))
    browser.find_element("css selector", '#circuit-toggles input[data-circuit="kept only by resamples"]').click()
    left = set(shown(browser))
    assert not left & {"a0.0", "m1", "a0.0->m1", "m1->logits"} and {"a0.1", "m0", "a1.2", "embed", "logits"} <= left
    assert not browser.find_element("id", "colour-pick").is_displayed()  # no "by circuits" colour to offer
