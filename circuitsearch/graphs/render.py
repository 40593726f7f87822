"""Circuit diagrams: DOT laid out by layer (embed at the bottom, logits on top), drawn by `dot`."""
from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

from ..io import atomic_write_bytes, atomic_write_text
from .circuit import Circuit
from .model_graph import parse_node, receiver_node, split_edge

INPUT_COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#d62728", "": "#7f7f7f"}
KIND_STYLE = {"embed": 'shape=box, style="rounded,filled", fillcolor="#e8e8e8"',
              "logits": 'shape=box, style="rounded,filled", fillcolor="#e8e8e8"',
              "head": 'shape=ellipse, style=filled, fillcolor="#dbe9f6"',
              "mlp": 'shape=box, style=filled, fillcolor="#fde5c8"'}


class RenderError(RuntimeError):
    """The diagram could not be drawn (usually: Graphviz's `dot` is not installed)."""


def _q(s: str) -> str:
    return '"' + s.replace('"', r'\"') + '"'


def caption(circuit: Circuit) -> str:
    s = circuit.scores
    faith = f"faithfulness {s['faithfulness']:.3f}" if "faithfulness" in s else ""
    head = (f"{circuit.task} on {circuit.model}: {len(circuit.heads())} heads, {len(circuit.mlps())} MLPs, "
            f"{circuit.n_edges} edges; {faith}")
    if not circuit.edges and circuit.method.get("level") == "nodes":
        return head + "\\nnode-level circuit: every edge between these nodes belongs to it (not drawn)"
    return head + "\\nedges into q blue, k green, v red, MLP/logits grey; width = effect"


def to_dot(circuit: Circuit, node_colours: dict | None = None, edge_colours: dict | None = None,
           title: str | None = None, legend: list[tuple[str, str]] | None = None) -> str:
    """The circuit as DOT text. Colour maps override the defaults (used by diff overlays)."""
    L = int(circuit.graph["n_layers"])
    node_level = not circuit.edges and circuit.method.get("level") == "nodes"
    # a node-level circuit keeps every edge between its nodes: drawing them all is a hairball,
    # so it is drawn as layered nodes and the caption says so
    edges = {} if node_level else circuit.effective_edges()
    merged = defaultdict(list)  # (sender, receiver node) -> [(input, effect, edge name)]
    for e, eff in edges.items():
        src, dst = split_edge(e)
        node, inp = receiver_node(dst)
        merged[(src, node)].append((inp or "", eff, e))
    effects = [abs(x) for x in list(circuit.nodes.values()) + list(edges.values()) if x is not None]
    top = max(effects) if effects else 0.0
    lines = ["digraph circuit {", "  rankdir=BT; newrank=true; splines=true; nodesep=0.25; ranksep=0.45;",
             '  node [fontname="Helvetica", fontsize=11, height=0.3, margin="0.05,0.02"];',
             '  edge [arrowsize=0.5, fontname="Helvetica", fontsize=8];',
             f"  labelloc=b; fontname=\"Helvetica\"; fontsize=12; label={_q(title or caption(circuit))};"]
    ranks = defaultdict(list)
    for n in circuit.nodes:
        info = parse_node(n, L)
        ranks[(info.layer, 1 if info.kind == "mlp" else 0)].append(n)
        style = KIND_STYLE[info.kind]
        if node_colours and n in node_colours:
            style = style.split("fillcolor")[0] + f'fillcolor="{node_colours[n]}"'
        lines.append(f"  {_q(n)} [label={_q(n)}, {style}];")
    for key in sorted(ranks):
        lines.append("  { rank=same; " + " ".join(_q(n) for n in ranks[key]) + " }")
    keys = sorted(ranks)
    for lo, hi in zip(keys, keys[1:]):  # invisible spine: layers stay stacked even where no edge joins them
        lines.append(f"  {_q(ranks[lo][0])} -> {_q(ranks[hi][0])} [style=invis];")
    for (src, node), items in merged.items():
        inputs = "".join(sorted(i for i, _, _ in items))
        effs = [abs(x) for _, x, _ in items if x is not None]
        width = 0.6 + 3.0 * (max(effs) / top if effs and top > 0 else 0.0)
        if edge_colours:
            colour = edge_colours.get(items[0][2], "#7f7f7f")
        else:
            colour = ":".join(INPUT_COLOURS[i] for i in sorted(i for i, _, _ in items)) if inputs else "#7f7f7f"
        label = f", xlabel={_q(inputs)}" if inputs else ""
        lines.append(f"  {_q(src)} -> {_q(node)} [color={_q(colour)}, penwidth={width:.2f}{label}];")
    if legend:
        lines.append('  subgraph cluster_legend { label="legend"; fontsize=10; style=dashed;')
        for i, (text, colour) in enumerate(legend):
            lines.append(f'    legend{i} [label={_q(text)}, shape=box, style=filled, fillcolor="{colour}", '
                         "fontsize=9];")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(dot: str, path: str | Path) -> Path:
    """Draw DOT text to .svg, .png or .pdf; writes the .dot beside it first, whatever happens."""
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"cannot render to {path.suffix!r}: use .svg, .png or .pdf")
    atomic_write_text(path.with_suffix(".dot"), dot)
    exe = shutil.which("dot")
    if exe is None:
        raise RenderError(f"Graphviz's `dot` is not installed, so {path.name} was not drawn; "
                          f"{path.with_suffix('.dot').name} was written. Install Graphviz "
                          "(apt-get install graphviz, or brew install graphviz) and run `circuitsearch render`")
    r = subprocess.run([exe, f"-T{fmt}"], input=dot.encode(), capture_output=True, timeout=300)
    if r.returncode != 0:
        raise RenderError(f"dot failed on {path.name}: {r.stderr.decode(errors='replace')[:500]}")
    atomic_write_bytes(path, r.stdout)
    return path


def render(circuit: Circuit, path: str | Path) -> Path:
    """The circuit's diagram as .svg, .png or .pdf (and its .dot beside it)."""
    return render_dot(to_dot(circuit), path)
