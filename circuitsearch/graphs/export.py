"""Circuit files: JSON (schema circuitsearch.circuit/1), GraphML and DOT, written atomically."""
from __future__ import annotations

import io
import json
from pathlib import Path

import networkx as nx

from ..io import atomic_write_bytes, atomic_write_text
from .circuit import SCHEMA, Circuit
from .model_graph import ModelGraph, receiver_node, split_edge


class CircuitFormatError(ValueError):
    """A file that is not a readable circuit of this schema; nothing half-loaded is returned."""


def from_json(data, source: str = "<data>") -> Circuit:
    """Validate and build a Circuit from its JSON form."""
    if not isinstance(data, dict) or "schema" not in data:
        raise CircuitFormatError(f"{source} is not a circuitsearch circuit (no 'schema' field)")
    if data["schema"] != SCHEMA:
        raise CircuitFormatError(f"{source} has schema {data['schema']!r}; this version of circuitsearch "
                                 f"reads {SCHEMA!r}")
    need = {"model": str, "graph": dict, "task": str, "nodes": dict, "edges": dict, "scores": dict,
            "method": dict, "stats": dict}
    for k, t in need.items():
        if not isinstance(data.get(k), t):
            raise CircuitFormatError(f"{source}: field {k!r} is missing or not a {t.__name__}")
    try:
        graph = ModelGraph.from_signature(data["graph"])
        for n in data["nodes"]:
            graph.check_node(n)
        for e in data["edges"]:
            graph.check_edge(e)
            src, dst = split_edge(e)
            if src not in data["nodes"] or receiver_node(dst)[0] not in data["nodes"]:
                raise CircuitFormatError(f"{source}: edge {e!r} joins a node that is not in the circuit")
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CircuitFormatError):
            raise
        raise CircuitFormatError(f"{source}: {err}") from None
    return Circuit(data["model"], data["graph"], data["task"], data["nodes"], data["edges"], data["scores"],
                   data["method"], data["stats"], data.get("version", "?"), data.get("meta", {}))


def to_graphml(circuit: Circuit) -> bytes:
    g = circuit.to_networkx()
    for n, d in g.nodes(data=True):
        d["effect"] = json.dumps(d["effect"])
    for _, _, d in g.edges(data=True):
        d["effect"] = json.dumps(d["effect"])
    g.graph = {k: json.dumps(v) for k, v in g.graph.items()}
    buf = io.BytesIO()
    nx.write_graphml(g, buf)
    return buf.getvalue()


def from_graphml(data: bytes, source: str = "<graphml>") -> Circuit:
    try:
        g = nx.read_graphml(io.BytesIO(data), force_multigraph=True)
        for n, d in g.nodes(data=True):
            d["effect"] = json.loads(d["effect"])
        for _, _, d in g.edges(data=True):
            d["effect"] = json.loads(d["effect"])
        g.graph = {k: json.loads(v) for k, v in g.graph.items() if isinstance(v, str)}
        circuit = Circuit.from_networkx(g)
    except Exception as err:
        raise CircuitFormatError(f"{source} is not a circuitsearch GraphML circuit: {err}") from None
    return from_json(circuit.to_json(), source)


def save_circuit(circuit: Circuit, path: str | Path) -> Path:
    """Write by suffix: .json, .graphml or .dot."""
    path = Path(path)
    if path.suffix == ".json":
        atomic_write_text(path, circuit.dumps())
    elif path.suffix == ".graphml":
        atomic_write_bytes(path, to_graphml(circuit))
    elif path.suffix == ".dot":
        from .render import to_dot
        atomic_write_text(path, to_dot(circuit))
    else:
        raise ValueError(f"cannot save a circuit as {path.suffix!r}: use .json, .graphml or .dot")
    return path


def load_circuit(path: str | Path) -> Circuit:
    """Read a .json or .graphml circuit, refusing damaged or foreign files."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no circuit file at {path}")
    raw = path.read_bytes()
    if path.suffix == ".graphml":
        return from_graphml(raw, str(path))
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CircuitFormatError(f"{path} is damaged or not JSON ({err})") from None
    return from_json(data, str(path))
