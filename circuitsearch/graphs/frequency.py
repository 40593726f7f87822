"""The page view of a stability run (sweeps/stability.py): a circuit with every node and edge shaded by how
many of the B resamples kept it (stability.json), and the units resamples keep that the circuit does not
drawn apart (dashed, behind a toggle) or, for a circuit over positions, listed; none is dropped silently.

Shading: node fill from white (kept by no resample) to dark blue (by all B), edge opacity from faint to
full; edge widths stay |effect| in the circuit. Hover: "kept in k of B resamples (f)" first.
"""
from __future__ import annotations

from .circuit import Circuit
from .page import PageError, circuit_view
from .render import _blend, caption, plural

STABILITY_PREFIX = "circuitsearch.stability/"
FREQ_LIGHT, FREQ_DARK = "#ffffff", "#08519c"  # kept by no resample ... by every one
OUTER = ("embed", "tok", "pos", "logits")  # always kept: stability counts only heads and MLPs among nodes
MAX_NAMED = 8


def freq_fill(f: float) -> str:
    return _blend(FREQ_LIGHT, FREQ_DARK, f)


def edge_opacity(f: float) -> float:
    return round(0.12 + 0.88 * f, 3)


def kept_line(f: float, b: int) -> str:
    """The hover text: 'kept in 3 of 4 resamples (0.75)'."""
    return f"kept in {round(f * b)} of {b} resamples ({f:.2f})"


def _named(xs: list[str]) -> str:
    more = f" and {len(xs) - MAX_NAMED} more" if len(xs) > MAX_NAMED else ""
    return ", ".join(xs[:MAX_NAMED]) + more


def check_frequencies(stability: dict, circuit: Circuit, source: str) -> None:
    """Refuse frequencies that cannot shade `circuit`: not a stability.json, another model, or units outside
    the circuit's model graph (named)."""
    if not str(stability.get("schema", "")).startswith(STABILITY_PREFIX):
        raise PageError(f"{source} is not a stability.json (schema {stability.get('schema')!r}); "
                        "`circuitsearch stability --out DIR` writes DIR/stability.json")
    b = stability.get("bootstrap")
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise PageError(f"{source}: 'bootstrap' is {b!r}, not a number of resamples")
    for key in ("nodes", "edges"):
        rows = stability.get(key)
        if not isinstance(rows, dict) or not all(isinstance(r, dict) and isinstance(r.get("frequency"), (int, float))
                                                 and 0 <= r["frequency"] <= 1 for r in rows.values()):
            raise PageError(f"{source}: '{key}' is not a map of unit -> {{frequency in [0, 1], in_full}}")
    if stability.get("model") != circuit.model:
        raise PageError(f"{source} holds frequencies of circuits on {stability.get('model')!r}, and the circuit shown "
                        f"is on {circuit.model!r}: give a stability run of the same model")
    graph = circuit.model_graph
    nodes, edges = set(graph.nodes), set(graph.edges)
    bad = [n for n in stability["nodes"] if n not in nodes] + [e for e in stability["edges"] if e not in edges]
    if bad:
        raise PageError(f"{source} names {plural(len(bad), 'unit')} that {circuit.model}'s graph "
                        f"({circuit.n_layers} layers) does not have: {_named(bad)}; it is not a stability run of "
                        "this model's graph")


def _union(circuit: Circuit, extra_nodes: list[str], extra_edges: list[str]) -> Circuit:
    """The circuit with the resample-only nodes and edges added (effect unknown), to lay them out with it."""
    return Circuit(circuit.model, circuit.graph, circuit.task, {**circuit.nodes, **dict.fromkeys(extra_nodes)},
                   {**circuit.edges, **dict.fromkeys(extra_edges)}, dict(circuit.scores), dict(circuit.method))


def _legend(b: int) -> list[list[str]]:
    ks = range(b, -1, -1) if b <= 10 else sorted({round(b * q) for q in (1, 0.75, 0.5, 0.25, 0)}, reverse=True)
    return [[freq_fill(k / b), f"kept in {k} of {b} resamples"] for k in ks]


def frequency_view(circuit: Circuit, stability: dict, decisions: list[dict] | None = None, name: str | None = None,
                   notes: list[str] | None = None, label: str = "the full-data circuit",
                   source: str = "stability.json") -> dict:
    """`circuit` shaded by stability.json's frequencies (checked first); units only resamples keep are drawn dashed
    (toggle "kept only by resamples"), or listed in the notes for a circuit over positions."""
    check_frequencies(stability, circuit, source)
    b, fn, fe = stability["bootstrap"], stability["nodes"], stability["edges"]
    extra_n = [n for n in fn if n not in circuit.nodes]
    extra_e = [] if circuit.node_level else [e for e in fe if e not in circuit.edges]
    notes = list(notes or [])
    drawn = not circuit.positions
    if not drawn and (extra_n or extra_e):
        notes.append(f"kept by resamples but not by {label} (not drawn: the circuit is over positions): "
                     + "; ".join(f"{x} {kept_line(f[x]['frequency'], b)}" for f, xs in ((fn, extra_n), (fe, extra_e))
                                 for x in xs))
    shown = _union(circuit, extra_n, extra_e) if drawn else circuit
    view = circuit_view(shown, decisions, None, name=name, notes=notes)
    extra_n, extra_e = (set(extra_n), set(extra_e)) if drawn else (set(), set())
    for n in view["nodes"]:
        if n.get("ghost"):
            continue
        if n["label"] in OUTER:
            n["info"].append("always kept (stability counts heads and MLPs)")
            n["sets"] = [0, 1]
            continue
        f = fn.get(n["label"], {"frequency": 0.0})["frequency"]
        n.update(fill=freq_fill(f), f=f, sets=[1] if n["label"] in extra_n else [0])
        if f > 0.55:
            n["tc"] = "#ffffff"
        if n["label"] in extra_n:
            n.update(extra=True, info=[n["u"], kept_line(f, b), f"not in {label}: only resamples keep it"])
        else:
            n["info"].insert(1, kept_line(f, b))
    for e in view["edges"]:
        f = fe.get(e["e"], {"frequency": 0.0})["frequency"]
        e.update(o=edge_opacity(f), f=f, sets=[1] if e["e"] in extra_e else [0])
        if e["e"] in extra_e:
            e.update(extra=True, info=[e["u"], kept_line(f, b), e["info"][1], f"not in {label}: only resamples keep it"])
        else:
            e["info"].insert(1, kept_line(f, b))
    kind = stability.get("resample", "bootstrap")
    view["caption"] = caption(circuit) + [(f"node fill: how many of the {b} {kind} resamples kept it (white: none, dark blue: all "
                            f"{b}); edge opacity: the same for edges (faint: few); edge width: |effect| in {label}")
                           + ("; dashed: kept by resamples, not by " + label if extra_n or extra_e else "")]
    view["legend"] = _legend(b)
    if extra_n or extra_e:
        view["circuits"] = [label, "kept only by resamples"]
        view["toggle_label"] = "show"
        view["caption"].append(f"kept only by resamples: {len(extra_n)} heads and MLPs, "
                               f"{plural(len(extra_e), 'edge')} (dashed)")
    return view
