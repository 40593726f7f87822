"""Circuit diagrams: DOT text laid out by layer (embed at the bottom, logits on top), drawn by Graphviz.

Nodes are pinned to a grid (one row per layer, one column per head index, the MLP just above
the heads on the right), so a 100+ node circuit stays as wide as one layer instead of growing
with its long edges as a free layered layout does. The DOT names its engine (layout=nop2: neato
with positions given), so `dot -Tsvg circuit.dot` draws the same picture.
A circuit over token positions is drawn with one column per slot (in position order) and the same
rows: one box per kept unit (`a9.1@S1`), edges inside a column, key/value inputs dashed.
"""
from __future__ import annotations

import html
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_bytes, atomic_write_text
from .circuit import Circuit, plural  # noqa: F401  (plural: imported from here by page and diff)
from ..features.hooks import parse_feature
from .model_graph import edge_unit_name, parse_node, receiver_node, split_edge, unit_name

INPUT_COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "": "#555555"}
INPUT_NAMES = {"q": "query (q)", "k": "key (k)", "v": "value (v)", "": "MLP / logits input"}
KIND_SHAPE = {"embed": "box", "logits": "box", "head": "ellipse", "mlp": "box", "feature": "box"}
KIND_FILL = {"embed": ("#eeeeee", "#c8c8c8"), "logits": ("#eeeeee", "#c8c8c8"),  # (no effect, largest effect)
             "head": ("#eef5fb", "#8fbde0"), "mlp": ("#fff3e3", "#f5b36b"), "feature": ("#eef8ee", "#86cf86")}
WIDE = ("embed", "logits", "feature")  # drawn 0.8 wide (feature names are longer than a head's)
FEATURE_RISE = {"resid_pre": -0.55, "attn_out": 0.0, "resid_mid": 0.35, "mlp_in": 0.7, "mlp_out": 1.05,
                "transcoder": 1.05}  # inches above its layer's heads where a dictionary's features sit
FEATURE_DX = 0.95  # inches between two features of one dictionary
DX, DY, MLP_RISE = 0.85, 0.75, 0.4  # inches: column and row pitch; MLP sits this far above its heads
ROW_GAP = DY - MLP_RISE  # the least room between one layer's topmost node and the next layer's lowest
EMBED_SHIFT = {"tok": -0.45, "pos": 0.45}  # inches from the centre: the 0.8-wide tok and pos boxes side by side
SWATCH = "\u25ac\u25ac"  # two black rectangles, drawn in the legend colour
_INPUT_RANK = {"q": 0, "k": 1, "v": 2, "": 3}
LABEL_LIMIT = 80  # above this many drawn edges, edges carry no q/k/v text (colours and legend remain)
ROUTE_LIMIT = 6000  # route edges around nodes while nodes × drawn edges stays below this (~1 s; grows fast)
# above it every edge gets a fixed bowed curve (its `pos`), so Graphviz only draws: routing the compare-orders
# union with splines=curved took over 5 minutes, these curves take well under a second
HALF = {"head": (0.31, 0.15), "mlp": (0.31, 0.15), "embed": (0.4, 0.15), "logits": (0.4, 0.15),
        "feature": (0.4, 0.15)}  # node half sizes
INPUT_HANG = {"q": -0.3, "k": 0.0, "v": 0.3}  # where a head's q, k or v input meets it (fraction of its width)
BOW = 0.12  # the curve's bend: its control point sits this fraction of the edge's length off the straight line
ARROW_PT = 4.5  # arrowsize 0.45 × Graphviz's 10 points
FIXED_NOTE = ("edges drawn as fixed curves from sender to receiver, not routed around the nodes "
              "(too many to route quickly)")
SLOT_GAP = 0.55  # inches between the footprints of two slot columns
KV_NOTE = "dashed: key/value input at a position, read by queries at that position and later ones"
GHOST_NOTE = ("dashed outline, white: a head ablated at that position whose key/value input there is kept "
              "(read by its queries at later positions)")
GRAPHVIZ_HINT = ("install Graphviz (Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz; "
                 "conda: conda install graphviz) and render the .dot again")


class RenderError(RuntimeError):
    """The diagram could not be drawn (usually: Graphviz's `dot` is not installed)."""


@dataclass
class Look:
    """Per-element overrides for to_dot; diff overlays colour by circuit subset through this."""

    node_fill: dict[str, str] = field(default_factory=dict)
    node_pen: dict[str, float] = field(default_factory=dict)
    edge_colour: dict[str, str] = field(default_factory=dict)
    edge_width: dict[str, float] = field(default_factory=dict)
    legend: list[tuple[str, str]] | None = None  # (colour, text); None: the q/k/v legend
    title: str | None = None  # replaces the first caption line
    note: str | None = None  # an extra caption line
    sizes_prefix: str | None = None  # e.g. "union: " before "N heads, M MLPs, E edges"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', r'\"') + '"'


def _blend(a: str, b: str, t: float) -> str:
    """Colour a + t·(b − a) for #rrggbb strings, t in [0, 1]."""
    ca, cb = (tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in (a, b))
    return "#" + "".join(f"{round(x + t * (y - x)):02x}" for x, y in zip(ca, cb))


def _fmt(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.4g}"


def edge_pos(a: tuple[float, float], b: tuple[float, float], kind_a: str, kind_b: str, inp: str | None) -> str:
    """A DOT edge `pos` (points): a bowed cubic Bézier from the top of node a to the bottom of node b (at its
    q, k or v input), ending in an arrow; with layout=nop2 Graphviz draws it as given, without routing."""
    ha, (wb, hb) = HALF[kind_a][1], HALF[kind_b]
    x0, y0 = 72 * a[0], 72 * (a[1] + ha)
    tx, ty = 72 * (b[0] + 2 * wb * INPUT_HANG.get(inp or "", 0.0)), 72 * (b[1] - hb)
    dx, dy = tx - x0, ty - y0
    length = max((dx * dx + dy * dy) ** 0.5, 1e-6)
    cx, cy = (x0 + tx) / 2 - dy / length * BOW * length, (y0 + ty) / 2 + dx / length * BOW * length
    ux, uy = tx - cx, ty - cy  # the curve's direction where it meets the receiver
    norm = max((ux * ux + uy * uy) ** 0.5, 1e-6)
    ex, ey = tx - ux / norm * ARROW_PT, ty - uy / norm * ARROW_PT
    pts = [(x0, y0), (x0 + 2 / 3 * (cx - x0), y0 + 2 / 3 * (cy - y0)), (ex + 2 / 3 * (cx - ex), ey + 2 / 3 * (cy - ey)),
           (ex, ey)]
    return f"e,{tx:.1f},{ty:.1f} " + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)


def positions(nodes: list[str], n_layers: int) -> dict[str, tuple[float, float]]:
    """Grid positions in inches: rows = layers present, columns = head indices present, MLPs right; a
    dictionary's features in a line right of them, at their hook point's height in their layer's row."""
    infos = {n: parse_node(n, n_layers) for n in nodes}
    layers = sorted({i.layer for i in infos.values() if i.kind in ("head", "mlp", "feature")})
    cols = sorted({i.head for i in infos.values() if i.kind == "head"})
    col = {h: c for c, h in enumerate(cols)}
    has_mlp = any(i.kind == "mlp" for i in infos.values())
    width = (len(cols) - 1 + (1.15 if has_mlp else 0)) * DX if cols else 0.0
    feats = feature_places([n for n, i in infos.items() if i.kind == "feature"], width + (DX if cols or has_mlp else 0))
    base, bottom, top = row_heights(layers, {n: (infos[n].layer, y) for n, (_, y) in feats.items()}, has_mlp)
    out = {}
    for n, i in infos.items():
        if i.kind == "head":
            out[n] = (col[i.head] * DX, base[i.layer])
        elif i.kind == "mlp":
            out[n] = ((len(cols) - 1 + 1.15) * DX if cols else 0.0, base[i.layer] + MLP_RISE)
        elif i.kind == "feature":
            out[n] = (feats[n][0], base[i.layer] + feats[n][1])
        elif i.kind == "embed":  # a split embedding side by side: tok left, pos right
            out[n] = (width / 2 + EMBED_SHIFT.get(n, 0.0), bottom)
        else:
            out[n] = (width / 2, top)
    return out


def row_heights(layers: list, rises: dict, has_mlp: bool) -> tuple[dict, float, float]:
    """(y of each layer's heads, y of the embedding, y of the logits): rows DY apart, and further where a layer's
    features sit above its MLP or below its heads (`rises`: feature -> (layer, its height above the heads))."""
    lo, hi = defaultdict(float), defaultdict(lambda: MLP_RISE if has_mlp else 0.0)
    for layer, y in rises.values():
        lo[layer], hi[layer] = min(lo[layer], y), max(hi[layer], y)
    base, prev = {}, None
    for layer in layers:
        base[layer] = 0.0 if prev is None else max(base[prev] + DY, base[prev] + hi[prev] + ROW_GAP - lo[layer])
        prev = layer
    if not layers:
        return base, -DY, DY
    return base, base[layers[0]] + lo[layers[0]] - DY, base[prev] + hi[prev] + DY


def feature_places(names: list[str], x0: float) -> dict[str, tuple[float, float]]:
    """(x, height above its layer's row) of each feature node: one dictionary's features in a line from x0, in
    index order, its error last; the height says the hook point (FEATURE_RISE)."""
    by_site: dict = defaultdict(list)
    for n in names:
        f = parse_feature(n)
        by_site[(f.layer, f.site, n.split(".")[0])].append((f.index is None, f.index or 0, n))
    out = {}
    for (_, site, _), items in by_site.items():
        for k, (_, _, n) in enumerate(sorted(items)):
            out[n] = (x0 + k * FEATURE_DX, FEATURE_RISE[site])
    return out


def caption(circuit: Circuit, look: Look | None = None) -> list[str]:
    """Caption lines: task and model with scores; sizes and method; node-level note."""
    s, m = circuit.scores, circuit.method
    scores = ", ".join(f"{k} {s[k]:.3f}" for k in ("faithfulness", "normalized") if isinstance(s.get(k), (int, float)))
    first = (look.title if look and look.title else
             f"{circuit.task} on {circuit.model}" + (f": {scores}" if scores else ""))
    sizes = circuit.sizes()
    how = ", ".join(fmt.format(m[k]) for k, fmt in (("level", "level {}"), ("ablation", "{} ablation"),
                                                    ("metric", "metric {}")) if m.get(k))
    lines = [(look.sizes_prefix if look and look.sizes_prefix else "") + sizes + (f" ({how})" if how else "")]
    lines.insert(0, first)
    if circuit.positions:
        lines.append(f"over {plural(len(circuit.slots), 'position slot')} (columns, in position order): "
                     f"{plural(len(circuit.units('nodes')), 'node unit')}, "
                     f"{plural(len(circuit.units('edges')), 'edge unit')}")
    if circuit.node_level:
        lines.append("node-level circuit: every edge between these nodes belongs to it (edges not drawn)")
    if look and look.note:
        lines.append(look.note)
    return lines


def _label(lines: list[str], legend: list[tuple[str, str]], row_chars: int = 110) -> str:
    """HTML-like graph label: caption lines, then colour swatches with their meaning, wrapped into rows."""
    rows_of: list[list[tuple[str, str]]] = [[]]
    one_per_row = any(len(t) > 40 for _, t in legend)  # long entries read best as a list
    for entry in legend:
        if rows_of[-1] and (one_per_row or sum(len(t) + 6 for _, t in rows_of[-1]) + len(entry[1]) > row_chars):
            rows_of.append([])
        rows_of[-1].append(entry)
    rows = [f'<tr><td align="left">{html.escape(t)}</td></tr>' for t in lines]
    for r in rows_of:
        if r:  # one text cell per row: table cells would be stretched to the longest caption line
            text = "     ".join(f'<font color="{c}">{SWATCH}</font> {html.escape(t)}' for c, t in r)
            rows.append(f'<tr><td align="left">{text}</td></tr>')
    return '<<table border="0" cellspacing="3" cellpadding="1">' + "".join(rows) + "</table>>"


def _merged_edges(circuit: Circuit, look: Look | None) -> dict[tuple, list[tuple[str, str, float | None]]]:
    """Edges to draw, merged per (sender, receiver node[, overlay colour]): one line for q, k and v."""
    merged = defaultdict(list)
    if circuit.node_level:
        return merged
    for e, eff in circuit.edges.items():
        src, dst = split_edge(e)
        node, inp = receiver_node(dst)
        colour = look.edge_colour.get(e) if look and look.edge_colour else None
        merged[(src, node, colour)].append((inp or "", e, eff))
    return merged


def to_dot(circuit: Circuit, look: Look | None = None) -> str:
    """The circuit as DOT text (pinned grid layout, q/k/v colours, width by |effect|, caption, legend)."""
    if circuit.positions:
        return positions_dot(circuit, look)
    L = circuit.n_layers
    pos = positions(list(circuit.nodes), L)
    merged = _merged_edges(circuit, look)
    effects = [abs(x) for x in circuit.edges.values() if x is not None] if merged else []
    top_edge = max(effects) if effects else 0.0
    node_effects = [abs(x) for x in circuit.nodes.values() if x is not None]
    top_node = max(node_effects) if node_effects else 0.0
    big = len(merged) > LABEL_LIMIT
    fixed = len(merged) * len(pos) > ROUTE_LIMIT
    lines = ["digraph circuit {",
             "  // nodes are pinned (pos in points) to a grid: one row per layer, embed at the bottom, logits on top;",
             "  // layout=nop2 (neato -n2) keeps them there and routes the edges, or draws the curves given as their pos",
             "  layout=nop2; splines=true; overlap=true; outputorder=edgesfirst; pad=0.3; bgcolor=white;",
             '  fontname="Helvetica"; fontsize=12; labelloc=b; labeljust=l;',
             '  node [fontname="Helvetica", fontsize=11, width=0.62, height=0.3, fixedsize=true, style=filled,'
             ' penwidth=1];',
             '  edge [arrowsize=0.45, fontname="Helvetica", fontsize=8, fontcolor="#444444"];']
    for n, eff in circuit.nodes.items():
        info = parse_node(n, L)
        x, y = pos[n]
        light, dark = KIND_FILL[info.kind]
        t = abs(eff) / top_node if eff is not None and top_node > 0 else 0.0
        fill = look.node_fill.get(n) if look and n in look.node_fill else _blend(light, dark, t)
        pen = look.node_pen.get(n, 1.0) if look else 1.0
        width = ', width=0.8' if info.kind in WIDE else ""
        rounded = ', style="rounded,filled"' if info.kind in ("embed", "logits") else ""
        tip = f"{n}: effect {_fmt(eff)}" + (f"; {circuit.features[n]['summary']}" if n in circuit.features else "")
        lines.append(f"  {_q(n)} [label={_q(n)}, pos=\"{72 * x:.1f},{72 * y:.1f}!\", shape={KIND_SHAPE[info.kind]}"
                     f"{width}{rounded}, fillcolor=\"{fill}\", penwidth={pen:g}, "
                     f"tooltip={_q(tip)}];")
    drawn = []
    for (src, node, colour), items in merged.items():
        inputs = "".join(sorted({i for i, _, _ in items}, key=_INPUT_RANK.get)) if any(i for i, _, _ in items) else ""
        effs = [abs(x) for _, _, x in items if x is not None]
        t = max(effs) / top_edge if effs and top_edge > 0 else (0.4 if not effects else 0.0)
        width = (max(look.edge_width.get(e, 1.0) for _, e, _ in items) if look and look.edge_width
                 else (0.4 + 3.0 * t if big else 0.6 + 3.4 * t))
        alpha = f"{round(255 * (0.2 + 0.8 * t)):02x}" if big else "e6"  # many edges: weak ones fade
        if colour is None:
            colour = ":".join(INPUT_COLOURS[i] + alpha for i in sorted({i for i, _, _ in items}, key=_INPUT_RANK.get))
        label = f", label={_q(inputs)}" if inputs and not big else ""
        tip = "; ".join(f"{e}: effect {_fmt(x)}" for _, e, x in items)
        kinds = [parse_node(n, L).kind for n in (src, node)]
        where = f", pos=\"{edge_pos(pos[src], pos[node], *kinds, inputs if len(inputs) == 1 else None)}\"" if fixed else ""
        drawn.append((width, f"  {_q(src)} -> {_q(node)} [color={_q(colour)}, penwidth={width:.2f}{label}, "
                             f"tooltip={_q(tip)}{where}];"))
    lines += [line for _, line in sorted(drawn, key=lambda d: d[0])]  # strongest edges drawn last, on top
    return _close(lines, circuit, look, bool(merged), [FIXED_NOTE] if fixed else [],
                  "faithfulness lost on removal")


def _close(lines: list, circuit: Circuit, look: Look | None, edges: bool, notes: list, effect: str) -> str:
    """The diagram's label (caption, notes, legend) and closing brace, as DOT text."""
    if look and look.legend is not None:
        legend = look.legend
    else:
        legend = [(INPUT_COLOURS[i], INPUT_NAMES[i]) for i in ("q", "k", "v", "")] if edges else []
    text = caption(circuit, look) + notes
    if not look:
        kinds = "ellipse = head, box = MLP" + (", green = dictionary feature or error" if circuit.graph.get("features")
                                                 else "")
        text.append(("edge width, " if edges else "") + f"fill shade: |effect| ({effect}); {kinds}")
    lines.append(f"  label={_label(text, legend)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(dot: str, path: str | Path) -> Path:
    """Draw DOT text to .svg, .png or .pdf; the .dot is written beside it first, whatever happens next."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"cannot render to {path.suffix or 'a file without suffix'!r}: use .svg, .png or .pdf")
    dot_path = path.with_suffix(".dot")
    atomic_write_text(dot_path, dot)
    exe = shutil.which("dot")
    if exe is None:
        raise RenderError(f"Graphviz's `dot` program was not found, so {path.name} was not drawn "
                          f"({dot_path} was written): {GRAPHVIZ_HINT}, e.g. `dot -T{fmt} {dot_path} -o {path}`")
    try:
        r = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise RenderError(f"dot took over 10 minutes on {path.name}; {dot_path} was written") from None
    if r.returncode != 0 or not r.stdout:
        raise RenderError(f"dot failed on {path.name} (exit {r.returncode}): "
                          f"{r.stderr.decode(errors='replace')[:500]}")
    return atomic_write_bytes(path, r.stdout)


def render(circuit: Circuit, path: str | Path) -> Path:
    """The circuit's diagram as .svg, .png or .pdf, with its .dot beside it."""
    return render_dot(to_dot(circuit), path)


# ---- circuits over token positions: slots as columns, layers as rows ---------------------------------
def unit_positions(circuit: Circuit, extra: set[str] = frozenset()) -> tuple[dict[str, tuple[float, float]],
                                                                              dict[str, float], float]:
    """Inches for every kept unit (and the `extra` units): a column per slot (its heads by index, its MLPs
    right), a row per layer present, embed below, logits above. Also each slot column's centre, and the
    height of the top."""
    L, slots = circuit.n_layers, circuit.slots
    units = {(n, s): parse_node(n, L) for n in circuit.nodes for s in circuit.kept_slots(n)}
    units |= {tuple(u.split("@")): parse_node(u.split("@")[0], L) for u in extra}
    layers = sorted({i.layer for i in units.values() if i.kind in ("head", "mlp", "feature")})
    has_mlp = any(i.kind == "mlp" for i in units.values())
    rises = {n: (i.layer, FEATURE_RISE[parse_feature(n).site]) for (n, _), i in units.items() if i.kind == "feature"}
    base, bottom, top = row_heights(layers, rises, has_mlp)
    split = any(n in EMBED_SHIFT for n in circuit.nodes)
    out, centre, left = {}, {}, 0.0
    for s in slots:
        mine = {n: i for (n, t), i in units.items() if t == s}
        cols = sorted({i.head for i in mine.values() if i.kind == "head"})
        col = {h: c for c, h in enumerate(cols)}
        mlp = any(i.kind == "mlp" for i in mine.values())
        width = (len(cols) - 1 + (1.15 if mlp and cols else 0)) * DX if cols or mlp else 0.0
        gap = DX if cols or mlp else 0.0
        feats = feature_places([n for n, i in mine.items() if i.kind == "feature"], width + gap)
        if feats:
            width = max(x for x, _ in feats.values())
        half = max(width / 2 + 0.4, 0.85 if split else 0.4)  # half the footprint: boxes are up to 0.8 wide
        x0 = left + half - width / 2  # x of the column's first head
        centre[s] = left + half
        for n, i in mine.items():
            if i.kind == "feature":
                xy = (x0 + feats[n][0], base[i.layer] + feats[n][1])
            elif i.kind == "head":
                xy = (x0 + col[i.head] * DX, base[i.layer])
            elif i.kind == "mlp":
                xy = (x0 + ((len(cols) - 1 + 1.15) * DX if cols else 0.0), base[i.layer] + MLP_RISE)
            elif i.kind == "embed":
                xy = (centre[s] + EMBED_SHIFT.get(n, 0.0), bottom)
            else:
                xy = (centre[s], top)
            out[unit_name(n, s)] = xy
        left += 2 * half + SLOT_GAP
    return out, centre, top


def _unit_effect(circuit: Circuit, unit: str, name: str):
    """A unit's own effect when recorded, else its node's (or edge's) effect."""
    eff = circuit.positions.get("effects", {}).get(unit)
    if eff is not None:
        return eff
    return circuit.nodes.get(name) if "->" not in name else circuit.edges.get(name)


def positions_dot(circuit: Circuit, look: Look | None = None) -> str:
    """DOT text of a circuit over positions: slot columns left to right, layer rows, one node per kept unit,
    edges sender@slot -> receiver@slot coloured by q/k/v as in to_dot, key/value inputs dashed."""
    L, slots = circuit.n_layers, circuit.slots
    merged: dict[tuple, list] = defaultdict(list)
    if not circuit.node_level:
        for e in circuit.edges:
            src, dst = split_edge(e)
            node, inp = receiver_node(dst)
            group = "kv" if inp in ("k", "v") else inp or ""
            for s in circuit.kept_slots(e):
                u = edge_unit_name(e, s)
                colour = (look.edge_colour.get(u, look.edge_colour.get(e)) if look and look.edge_colour else None)
                merged[(unit_name(src, s), unit_name(node, s), group, colour)].append(
                    (inp or "", u, e, _unit_effect(circuit, u, e)))
    kept = circuit.units("nodes")
    ghosts = {dst for _, dst, _, _ in merged} - kept  # k/v receivers of heads not kept at that slot
    pos, centre, top = unit_positions(circuit, ghosts)
    effects = [abs(x[3]) for items in merged.values() for x in items if x[3] is not None]
    top_edge = max(effects) if effects else 0.0
    node_eff = {u: _unit_effect(circuit, u, u.split("@")[0]) for u in pos if u not in ghosts}
    top_node = max((abs(x) for x in node_eff.values() if x is not None), default=0.0)
    big = len(merged) > LABEL_LIMIT
    fixed = len(merged) * (len(pos) + len(slots)) > ROUTE_LIMIT
    lines = ["digraph circuit {",
             "  // a circuit over token positions: one column per slot (position order, left to right), one row per",
             "  // layer (embed at the bottom, logits on top); nodes are units node@slot, pinned (pos in points);",
             "  // layout=nop2 (neato -n2) keeps them there and routes the edges, or draws the curves given as their pos",
             "  layout=nop2; splines=true; overlap=true; outputorder=edgesfirst; pad=0.3; bgcolor=white;",
             '  fontname="Helvetica"; fontsize=12; labelloc=b; labeljust=l;',
             '  node [fontname="Helvetica", fontsize=11, width=0.62, height=0.3, fixedsize=true, style=filled,'
             ' penwidth=1];',
             '  edge [arrowsize=0.45, fontname="Helvetica", fontsize=8, fontcolor="#444444"];']
    for s in slots:  # column headers: the slot names, above the logits
        lines.append(f"  {_q('slot ' + s)} [label={_q(s)}, pos=\"{72 * centre[s]:.1f},{72 * (top + 0.7 * DY):.1f}!\", "
                     f'shape=plaintext, style="", fixedsize=false, fontsize=13, fontcolor="#333333", '
                     f"tooltip={_q('slot ' + s)}];")
    for u, (x, y) in pos.items():
        n = u.split("@")[0]
        info = parse_node(n, L)
        if u in ghosts:
            lines.append(f"  {_q(u)} [label={_q(n)}, pos=\"{72 * x:.1f},{72 * y:.1f}!\", shape={KIND_SHAPE[info.kind]}, "
                         f'style="dashed,filled", fillcolor="#ffffff", color="#888888", fontcolor="#888888", '
                         f"tooltip={_q(f'{u}: ablated here; its key/value input here is kept')}];")
            continue
        eff = node_eff[u]
        light, dark = KIND_FILL[info.kind]
        t = abs(eff) / top_node if eff is not None and top_node > 0 else 0.0
        fill = (look.node_fill.get(u, look.node_fill.get(n)) if look and (u in look.node_fill or n in look.node_fill)
                else _blend(light, dark, t))
        pen = look.node_pen.get(u, look.node_pen.get(n, 1.0)) if look else 1.0
        width = ', width=0.8' if info.kind in ("embed", "logits") else ""
        rounded = ', style="rounded,filled"' if info.kind in ("embed", "logits") else ""
        tip = f"{u}: effect {_fmt(eff)}" + (f" ({n}: {_fmt(circuit.nodes[n])})" if eff != circuit.nodes[n] else "")
        lines.append(f"  {_q(u)} [label={_q(n)}, pos=\"{72 * x:.1f},{72 * y:.1f}!\", shape={KIND_SHAPE[info.kind]}"
                     f"{width}{rounded}, fillcolor=\"{fill}\", penwidth={pen:g}, tooltip={_q(tip)}];")
    drawn = []
    for (src, node, group, colour), items in merged.items():
        inputs = "".join(sorted({i for i, *_ in items}, key=_INPUT_RANK.get))
        effs = [abs(x[3]) for x in items if x[3] is not None]
        t = max(effs) / top_edge if effs and top_edge > 0 else (0.4 if not effects else 0.0)
        width = (max(look.edge_width.get(u, look.edge_width.get(e, 1.0)) for _, u, e, _ in items)
                 if look and look.edge_width else (0.4 + 3.0 * t if big else 0.6 + 3.4 * t))
        alpha = f"{round(255 * (0.2 + 0.8 * t)):02x}" if big else "e6"
        if colour is None:
            colour = ":".join(INPUT_COLOURS[i] + alpha for i in sorted({i for i, *_ in items}, key=_INPUT_RANK.get))
        style = ", style=dashed" if group == "kv" else ""
        label = f", label={_q(inputs)}" if inputs and not big else ""
        tip = "; ".join(f"{u}: effect {_fmt(x)}" for _, u, _, x in items)
        kinds = [parse_node(u.split("@")[0], L).kind for u in (src, node)]
        where = f", pos=\"{edge_pos(pos[src], pos[node], *kinds, inputs if len(inputs) == 1 else None)}\"" if fixed else ""
        drawn.append((width, f"  {_q(src)} -> {_q(node)} [color={_q(colour)}, penwidth={width:.2f}{style}{label}, "
                             f"tooltip={_q(tip)}{where}];"))
    lines += [line for _, line in sorted(drawn, key=lambda d: d[0])]
    notes = ([KV_NOTE] if any(g == "kv" for _, _, g, _ in merged) else []) + ([GHOST_NOTE] if ghosts else [])
    notes += [FIXED_NOTE] if fixed else []
    return _close(lines, circuit, look, bool(merged), notes, "faithfulness lost on removal; the unit's own when recorded")
