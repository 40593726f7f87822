"""The interactive page: one self-contained HTML file (script, style and data inlined; no network).

Python computes everything a view draws: the layout (render's grid: layers as rows, heads by index,
MLPs right; a column per slot for a circuit over positions), each unit's fill, width and hover text
(its effect, or estimate, and the decision that kept it), which circuits of a diff hold it, and the
nested circuits of the run's faithfulness curve. The script (viewer/page.js) only draws and reacts:
hover, click for paths, the curve slider, search, toggles. Every drawn node and edge carries its
unit name in `data-unit`.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..io import atomic_write_text
from .circuit import Circuit
from .diff import SHARED_NODE, Diff, _lighten, subset_colours, union_circuit
from .model_graph import edge_unit_name, parse_node, receiver_node, split_edge, unit_name
from .render import KIND_FILL, _blend, _fmt, _unit_effect, caption, plural, positions, unit_positions

PAGE_SCHEMA = "circuitsearch.page/1"
TEMPLATE_DIR = Path(__file__).with_name("viewer")
PT = 72.0  # the grid is in inches; the page draws in points
MARGIN = 36.0
NODE_SIZE = {"head": (44.0, 22.0), "mlp": (44.0, 22.0), "embed": (56.0, 22.0), "logits": (56.0, 22.0),
             "feature": (56.0, 22.0)}
SHADE_LIGHT, SHADE_DARK = "#f4f4f4", "#2b6cb0"  # compare-orders: kept by one order ... by all
EFFECT_MEANING = "faithfulness lost when it was removed"


class PageError(ValueError):
    """Input the page cannot show (the message names what is missing and what to give instead)."""


# ---- hover text -------------------------------------------------------------------------------------
def effect_line(name: str, effect, estimated: set[str]) -> str:
    """'effect 0.0513 (faithfulness lost when it was removed)', or the estimate, marked as one."""
    if effect is None:
        return "effect: not measured (never tried alone)"
    if name in estimated:
        return f"estimated effect {_fmt(effect)} (an attribution estimate: the search never scored it alone)"
    return f"effect {_fmt(effect)} ({EFFECT_MEANING})"


def _reason(d: dict, thresholds: dict) -> str:
    """Why a removal was refused, from its decision and the run's thresholds."""
    f, target = d.get("faithfulness"), d.get("target")
    if target is not None:
        return f"below the target {target:g}" if isinstance(f, (int, float)) and f < target else "refused"
    a, r, on = thresholds.get("absolute"), thresholds.get("relative"), thresholds.get("on", "faithfulness")
    if on == "faithfulness":
        if a is not None and isinstance(f, (int, float)) and not f >= a:
            return f"below the absolute threshold {a:g}"
        if r is not None:
            return f"it cost more than the relative threshold {r:g}"
        return "refused"
    return (f"the metric went from {_fmt(d.get('before'))} to {_fmt(d.get('score'))}, past the thresholds "
            f"(absolute {a}, relative {r}, on the metric)")


def decision_lines(tries: list[dict], thresholds: dict) -> list[str]:
    """The decision that kept a unit (its last refused removal), and how often it was tried."""
    if not tries:
        return ["decision: never tried alone"]
    last = tries[-1]
    where = f"{last.get('phase')} pass {last.get('pass')}"
    f = last.get("faithfulness")
    gave = f"faithfulness {f:.4f}" if isinstance(f, (int, float)) else "no score"
    if last.get("removed"):
        line = f"decision: removed in {where} ({gave}), restored later"
    else:
        line = f"kept in {where}: removing it gave {gave}, {_reason(last, thresholds)}"
    more = [f"tried {plural(len(tries), 'time')}"] if len(tries) > 1 else []
    return [line] + more


def _tries(decisions: list[dict] | None) -> dict[str, list[dict]]:
    """Decisions of single candidates (not chunks) by candidate name, in log order."""
    out: dict[str, list[dict]] = {}
    for d in decisions or ():
        if d.get("chunk") in (None, 1):
            out.setdefault(d["candidate"], []).append(d)
    return out


# ---- layout -----------------------------------------------------------------------------------------
def _to_page(pos: dict[str, tuple[float, float]]) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Grid inches (y up) to page points (y down) with a margin; also the page's width and height."""
    xs = [x for x, _ in pos.values()]
    ys = [y for _, y in pos.values()]
    x0, y1 = min(xs), max(ys)
    out = {u: (round(MARGIN + 30 + PT * (x - x0), 1), round(MARGIN + PT * (y1 - y), 1)) for u, (x, y) in pos.items()}
    width = MARGIN * 2 + 60 + PT * (max(xs) - x0)
    height = MARGIN * 2 + PT * (y1 - min(ys))
    return out, round(width, 1), round(height, 1)


def _node(unit: str, label: str, kind: str, xy, fill: str, pen: float, info: list[str], **more) -> dict:
    w, h = NODE_SIZE[kind]
    return {"u": unit, "label": label, "k": kind, "x": xy[0], "y": xy[1], "w": w, "h": h, "fill": fill,
            "pen": pen, "info": info, **more}


def _shade(kind: str, effect, top: float) -> str:
    light, dark = KIND_FILL[kind]
    return _blend(light, dark, abs(effect) / top if effect is not None and top > 0 else 0.0)


def _drawn_edges(circuit: Circuit) -> list[tuple[str, str, str, str, str]]:
    """(unit, edge, sender unit, receiver node unit, input) for every edge (unit) the page draws."""
    if circuit.node_level:
        return []
    out = []
    for e in circuit.edges:
        src, dst = split_edge(e)
        node, inp = receiver_node(dst)
        if circuit.positions:
            out += [(edge_unit_name(e, s), e, unit_name(src, s), unit_name(node, s), inp or "")
                    for s in circuit.kept_slots(e)]
        else:
            out.append((e, e, src, node, inp or ""))
    return out


def _grid(circuit: Circuit, edges) -> tuple[dict, list[str], list, float, float, dict]:
    """Page points of every drawn node unit, the ghost units (k/v receivers of heads not kept at a slot),
    the slot headers ([name, x, y] in position order), the page size, and the node unit -> node name map."""
    if circuit.positions:
        kept = circuit.units("nodes")
        ghosts = sorted({dst for *_, dst, _ in edges} - kept)
        pos, centre, top = unit_positions(circuit, set(ghosts))
        heads = [(c, top + 0.55) for c in centre.values()]
        page, w, h = _to_page({**pos, **{f"slot {s}": xy for s, xy in zip(centre, heads)}})
        slots = [[s, *page.pop(f"slot {s}")] for s in centre]  # column headers above the logits, in slot order
        return page, ghosts, slots, w, h, {u: u.split("@")[0] for u in page}
    pos = positions(list(circuit.nodes), circuit.n_layers)
    page, w, h = _to_page(pos)
    return page, [], [], w, h, {n: n for n in pos}


def _edge_entry(unit: str, edge: str, s: int, t: int, inp: str, width: float, info: list[str], **more) -> dict:
    return {"u": unit, "e": edge, "s": s, "t": t, "i": inp, "w": round(width, 2), "info": info, **more}


def circuit_view(circuit: Circuit, decisions: list[dict] | None = None, curve: dict | None = None,
                 name: str | None = None, notes: list[str] | None = None) -> dict:
    """One circuit: nodes shaded by |effect|, edges by q/k/v and |effect|, each with its effect and the
    decision that kept it (from the run's decisions, when given), and the curve's nested circuits."""
    edges = _drawn_edges(circuit)
    page, ghosts, slots, width, height, names = _grid(circuit, edges)
    estimated = set(circuit.method.get("estimated_effects", ()))
    tries = _tries(decisions)
    th = circuit.method.get("thresholds", {})
    effects = {u: _unit_effect(circuit, u, names[u]) if circuit.positions else circuit.nodes[u]
               for u in page if u not in ghosts}
    top = max((abs(x) for x in effects.values() if x is not None), default=0.0)
    nodes, index = [], {}
    for u, xy in page.items():
        n = names[u]
        kind = parse_node(n, circuit.n_layers).kind
        index[u] = len(nodes)
        if u in ghosts:
            nodes.append(_node(u, n, kind, xy, "#ffffff", 1.0, [u, "ablated at this position; its key/value input "
                               "here is kept (read by its queries at later positions)"], ghost=True))
            continue
        info = [u, effect_line(u, effects[u], estimated)]
        if u != n:
            info.append(f"{n} over all positions: {effect_line(n, circuit.nodes[n], estimated)}")
        info += _node_decisions(u, n, tries, th, kind)
        if n in circuit.features:  # a dictionary feature: what it reads and writes (runs/features_read)
            info += circuit.features[n].get("lines", [])
        nodes.append(_node(u, n, kind, xy, _shade(kind, effects[u], top), 1.0, info))
    eff = {u: _unit_effect(circuit, u, e) if circuit.positions else circuit.edges[e] for u, e, *_ in edges}
    top_e = max((abs(x) for x in eff.values() if x is not None), default=0.0)
    many = len(edges) > 80
    out_edges = []
    for u, e, src, dst, inp in edges:
        t = abs(eff[u]) / top_e if eff[u] is not None and top_e > 0 else (0.4 if top_e == 0 else 0.0)
        info = [u, f"input: {INPUT_WORDS[inp]}", effect_line(u, eff[u], estimated)]
        info += decision_lines(tries.get(u, []) + (tries.get(e, []) if u != e else []), th)
        out_edges.append(_edge_entry(u, e, index[src], index[dst], inp, (0.4 + 3.0 * t) if many else (0.6 + 3.4 * t),
                                     info, o=round(0.2 + 0.8 * t, 2) if many else 0.9))
    lines = caption(circuit)
    lines.append(("edge width, " if edges else "") + f"fill shade: |effect| ({EFFECT_MEANING})")
    legend = [[KIND_FILL["head"][1], "attention head"], [KIND_FILL["mlp"][1], "MLP"]]
    if any(n["k"] == "feature" for n in nodes):
        legend.append([KIND_FILL["feature"][1], "dictionary feature or error"])
    view = {"name": name or f"{circuit.task} on {circuit.model}", "caption": lines, "notes": list(notes or []),
            "width": width, "height": height, "nodes": nodes, "edges": out_edges, "slots": slots, "legend": legend,
            "circuits": [], "scores": dict(circuit.scores)}
    if curve is not None:
        view["curve"] = _curve_view(curve, circuit, nodes, out_edges, names)
    return view


INPUT_WORDS = {"q": "query (q)", "k": "key (k)", "v": "value (v)", "": "MLP / logits input"}


def _node_decisions(unit: str, node: str, tries: dict, th: dict, kind: str) -> list[str]:
    if kind == "logits":
        return ["decision: the logits are always kept"]
    lines = decision_lines(tries.get(node, []), th)
    if unit != node and unit in tries:
        lines = decision_lines(tries[unit], th) + [f"as a node: {lines[0]}"]
    return lines


def _curve_view(curve: dict, circuit: Circuit, nodes: list[dict], edges: list[dict], names: dict) -> dict:
    """The slider's data: each curve point (edges kept, faithfulness) plus the circuit itself, and for every
    drawn node and edge the first k at which the curve's top-k circuit holds it."""
    rank: dict = curve["rank"]  # edge -> place in the ranking, best first
    n_edges = curve["n_edges"]
    node_rank: dict[str, int] = {}
    for e, r in rank.items():
        src, dst = split_edge(e)
        for n in (src, receiver_node(dst)[0]):
            if r < node_rank.get(n, n_edges):
                node_rank[n] = r
    own = circuit.n_edges
    points = [{"k": k, "pct": p, "f": f, "r": r} for k, p, f, r in
              zip(curve["kept"], curve["percentages"], curve["faithfulness"], curve["ratio"])]
    points.append({"k": own, "pct": round(100 * own / n_edges, 3) if n_edges else 0.0,
                   "f": circuit.scores.get("normalized"), "r": circuit.scores.get("faithfulness"), "own": True})
    points.sort(key=lambda p: (p["k"], not p.get("own")))
    return {"name": curve["name"], "n_edges": n_edges, "points": points,
            "node_at": [node_rank.get(names.get(n["u"], n["u"]), n_edges) for n in nodes],
            "edge_at": [rank.get(e["e"], n_edges) for e in edges]}


# ---- diffs and comparisons --------------------------------------------------------------------------
def diff_view(diff: Diff, name: str | None = None, shade: str = "subset", notes: list[str] | None = None,
              scores: dict | None = None) -> dict:
    """The union of a diff's circuits, every unit with the circuits that hold it (toggles hide a circuit's
    units) and its effect in each; nodes coloured by subset (shade "subset") or by how many hold it ("count")."""
    union = union_circuit(diff)
    units = diff.level == "units"
    node_sets, edge_sets = (diff.unit_node_sets, diff.unit_edge_sets) if units else (diff.node_sets, diff.edge_sets)
    edges = _drawn_edges(union)
    page, ghosts, slots, width, height, names = _grid(union, edges)
    k = len(diff.names)
    colours = subset_colours(diff)
    order = {n: i for i, n in enumerate(diff.names)}

    def held(s) -> tuple[list[int], str]:
        who = [n for n in diff.names if n in s]
        return [order[n] for n in who], f"held by {len(who)} of {k}: {', '.join(who)}"

    def effects_in(u: str, base: str, s) -> list[str]:
        out = []
        for n, c in zip(diff.names, diff.circuits):
            if n in s:
                x = _unit_effect(c, u, base) if c.positions else (c.nodes.get(base) if "->" not in base
                                                                    else c.edges.get(base))
                if x is not None:
                    est = " (estimate)" if base in c.method.get("estimated_effects", ()) else ""
                    out.append(f"{n}: effect {_fmt(x)}{est}")
        return out

    def fill(s) -> str:
        if shade == "count":
            return _blend(SHADE_LIGHT, SHADE_DARK, (len(s) - 1) / max(k - 1, 1) * 0.85 + 0.15)
        return SHARED_NODE if len(s) == k else _lighten(colours[s])

    nodes, index = [], {}
    for u, xy in page.items():
        n = names[u]
        kind = parse_node(n, union.n_layers).kind
        index[u] = len(nodes)
        if u in ghosts:
            nodes.append(_node(u, n, kind, xy, "#ffffff", 1.0, [u, "a key/value receiver at a position where no "
                               "circuit keeps the head"], ghost=True, sets=[]))
            continue
        s = node_sets[u]
        idx, text = held(s)
        nodes.append(_node(u, n, kind, xy, fill(s), 2.5 if len(s) == k else 1.0, [u, text] + effects_in(u, n, s),
                           sets=idx))
    out_edges = []
    for u, e, src, dst, inp in edges:
        s = edge_sets[u]
        idx, text = held(s)
        out_edges.append(_edge_entry(u, e, index[src], index[dst], inp, 2.6 if len(s) == k else 0.9 + 0.5 * (len(s) - 1),
                                     [u, f"input: {INPUT_WORDS[inp]}", text] + effects_in(u, e, s), sets=idx,
                                     c=colours[s] if shade == "subset" else
                                     _blend("#dddddd", "#111111", (len(s) - 1) / max(k - 1, 1)),
                                     o=0.85))
    legend = _diff_legend(diff, colours, shade)
    lines = [f"{k} circuits on {diff.model}: {', '.join(diff.names)}",
             f"all together: {plural(len(union.heads()), 'head')}, {plural(len(union.mlps()), 'MLP')}, "
             f"{plural(len(diff.edge_sets), 'edge')}"]
    if diff.note:
        lines.append(diff.note)
    if not union.edges and diff.edge_sets:
        lines.append("edges not drawn: a node-level circuit holds every edge between its nodes")
    return {"name": name or " vs ".join(diff.names), "caption": lines, "notes": list(notes or []), "width": width,
            "height": height, "nodes": nodes, "edges": out_edges, "slots": slots, "legend": legend,
            "circuits": list(diff.names), "scores": dict(scores or {})}


def _diff_legend(diff: Diff, colours: dict, shade: str) -> list[list[str]]:
    k = len(diff.names)
    if shade == "count":
        counts: dict[int, int] = {}
        for n, s in diff.node_sets.items():
            if parse_node(n).kind in ("head", "mlp"):
                counts[len(s)] = counts.get(len(s), 0) + 1
        return [[_blend(SHADE_LIGHT, SHADE_DARK, (j - 1) / max(k - 1, 1) * 0.85 + 0.15),
                 f"kept by {j} of {k}: {plural(counts[j], 'node')}"] for j in sorted(counts, reverse=True)]
    out = []
    for s in diff.subsets(all_=False):
        c = diff.counts(s)
        fill = SHARED_NODE if len(s) == k else colours[s]
        out.append([fill, f"{diff.label(s)}: {plural(c['heads'], 'head')}, {plural(c['mlps'], 'MLP')}, "
                          f"{plural(c['edges'], 'edge')}"])
    return out


# ---- the file ---------------------------------------------------------------------------------------
def _template(name: str) -> str:
    path = TEMPLATE_DIR / name
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise PageError(f"the page template {path} cannot be read ({e.strerror or e}); reinstall circuitsearch "
                        "(the template is package data)") from None


def _script_json(data) -> str:
    """JSON safe inside <script>: every '<' (only ever inside a string) as \\u003c, so no '</script>' or '<!--'
    in a name can end or comment out the element."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def page_html(views: list[dict], title: str, kind: str) -> str:
    """The whole page as one HTML string: template, style, script and data inlined."""
    if not views:
        raise PageError("nothing to show: a page needs at least one circuit")
    data = {"schema": PAGE_SCHEMA, "title": title, "kind": kind, "views": views}
    text = _template("page.html")
    for key, value in (("{{TITLE}}", html.escape(title)), ("/*STYLE*/", _template("page.css")),
                       ("/*SCRIPT*/", _template("page.js")), ("/*DATA*/", _script_json(data))):
        if key not in text:
            raise PageError(f"the page template has no {key} placeholder; reinstall circuitsearch")
        text = text.replace(key, value)
    return text


def write_page(path: str | Path, views: list[dict], title: str, kind: str) -> Path:
    """Write the page atomically; returns its path."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise PageError(f"the page is HTML: give --out a .html file, not {path.name!r}")
    return atomic_write_text(path, page_html(views, title, kind))
