"""Circuit files: JSON (schema circuitsearch.circuit/1; /2 with positions), GraphML and DOT, written atomically.

Loading validates everything before returning, so a damaged, truncated, foreign or newer file
raises CircuitFormatError naming the file and the problem instead of giving half a circuit.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import networkx as nx

from ..io import atomic_write_bytes, atomic_write_text
from .circuit import FIELDS, SCHEMA, SCHEMA_2, Circuit, CircuitFormatError

__all__ = ["CircuitFormatError", "SCHEMA", "SCHEMA_2", "dumps_circuit", "loads_circuit", "from_json", "to_graphml",
           "from_graphml", "save_circuit", "load_circuit"]

_GRAPH_JSON_ATTRS = ("graph", "scores", "method", "stats", "meta", "unit_effects")  # dicts: as JSON strings
_POSITION_ATTRS = ("slots", "unit_effects")  # graph attributes of a circuit with positions


def from_json(data, source: str = "<data>") -> Circuit:
    """Validate and build a Circuit from its JSON form (a parsed dict)."""
    return Circuit.from_json(data, source)


def dumps_circuit(circuit: Circuit) -> str:
    """The circuit as JSON text, after checking that the text reads back as a valid circuit."""
    text = circuit.dumps()
    try:
        Circuit.from_json(json.loads(text), f"circuit of {circuit.task!r} on {circuit.model!r}")
    except CircuitFormatError as err:
        raise CircuitFormatError(f"refusing to write an invalid circuit: {err}") from None
    return text


def loads_circuit(text: str | bytes, source: str = "<text>") -> Circuit:
    """Parse JSON text into a validated Circuit."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CircuitFormatError(f"{source} is damaged or not JSON ({err}); it may have been cut short "
                                 "or be another kind of file") from None
    return Circuit.from_json(data, source)


def to_graphml(circuit: Circuit) -> bytes:
    """GraphML via networkx: effects as doubles (absent when unknown), dict attributes as JSON strings."""
    dumps_circuit(circuit)  # same checks as JSON: never write what cannot be read back
    g = circuit.to_networkx()
    for _, d in g.nodes(data=True):
        _float_or_drop(d)
        _join_slots(d)
    for _, _, d in g.edges(data=True):
        _float_or_drop(d)
        _join_slots(d)
    _join_slots(g.graph)
    g.graph = {k: json.dumps(v, ensure_ascii=False) if k in _GRAPH_JSON_ATTRS else v for k, v in g.graph.items()}
    buf = io.BytesIO()
    nx.write_graphml(g, buf)
    return buf.getvalue()


def _join_slots(d: dict) -> None:
    """GraphML holds no lists: a `slots` list is written as one comma-joined string (slot names hold no commas)."""
    if "slots" in d:
        d["slots"] = ",".join(d["slots"])


def _split_slots(d: dict) -> None:
    if "slots" in d:
        d["slots"] = str(d["slots"]).split(",")


def _float_or_drop(d: dict) -> None:
    if d.get("effect") is None:
        d.pop("effect", None)
    else:
        d["effect"] = float(d["effect"])


def from_graphml(data: bytes, source: str = "<graphml>") -> Circuit:
    """Read GraphML written by to_graphml back into an identical, validated Circuit."""
    try:
        g = nx.read_graphml(io.BytesIO(data), force_multigraph=True)
    except Exception as err:  # parsing only: any failure means the file is unusable
        raise CircuitFormatError(f"{source} is damaged or not a circuitsearch GraphML circuit "
                                 f"({type(err).__name__}: {err})") from None
    attrs = g.graph
    if "schema" not in attrs:
        raise CircuitFormatError(f"{source} is not a circuitsearch GraphML circuit (no 'schema' graph attribute)")
    for k in _GRAPH_JSON_ATTRS:
        if isinstance(attrs.get(k), str):
            try:
                attrs[k] = json.loads(attrs[k])
            except json.JSONDecodeError as err:
                raise CircuitFormatError(f"{source}: graph attribute {k!r} is not valid JSON ({err})") from None
    for k in ("model", "task", "version"):  # networkx types numeric-looking strings: give them back as text
        if k in attrs and not isinstance(attrs[k], str):
            attrs[k] = str(attrs[k])
    keep = set(FIELDS) | {"schema"} | (set(_POSITION_ATTRS) if attrs.get("schema") == SCHEMA_2 else set())
    g.graph = {k: v for k, v in attrs.items() if k in keep}
    if "slots" in g.graph:
        _split_slots(g.graph)
        for _, d in g.nodes(data=True):
            _split_slots(d)
        for _, _, d in g.edges(data=True):
            _split_slots(d)
    return Circuit.from_networkx(g, source)


def save_circuit(circuit: Circuit, path: str | Path) -> Path:
    """Write by suffix (.json, .graphml or .dot), atomically; returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return atomic_write_text(path, dumps_circuit(circuit))
    if suffix == ".graphml":
        return atomic_write_bytes(path, to_graphml(circuit))
    if suffix in (".dot", ".gv"):
        from .render import to_dot
        return atomic_write_text(path, to_dot(circuit))
    raise ValueError(f"cannot save a circuit as {path.suffix or 'a file without suffix'!r}: use .json, .graphml "
                     "or .dot (or graphs.render.render for .svg/.png/.pdf)")


def load_circuit(path: str | Path) -> Circuit:
    """Read a .json or .graphml circuit, refusing damaged, foreign or other-version files."""
    path = Path(path)
    if path.is_dir():
        raise CircuitFormatError(f"{path} is a directory; give the circuit file (e.g. {path / 'circuit.json'})")
    if not path.exists():
        raise FileNotFoundError(f"no circuit file at {path}")
    suffix = path.suffix.lower()
    if suffix in (".dot", ".gv", ".svg", ".png", ".pdf"):
        raise CircuitFormatError(f"{path} is a drawing ({suffix}); drawings cannot be read back: load the "
                                 "circuit's .json (or .graphml) file")
    raw = path.read_bytes()
    if suffix in (".graphml", ".xml") or raw.lstrip()[:1] == b"<":
        return from_graphml(raw, str(path))
    return loads_circuit(raw, str(path))
