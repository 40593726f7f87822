"""`circuitsearch view`: the interactive page of a run directory, a circuit.json, a diff.json, a
comparison.json (with its orders' run directories beside it), a sweep directory or a stability directory
(the full-data circuit shaded by resample frequency; `--frequency` shades any run's circuit so); and the
pages prune, diff, compare-orders and stability write beside their diagrams.

What a page shows comes from the files alone, without the model: effects from circuit.json, the
decision that kept each unit from decisions.jsonl, and the nested circuits of the faithfulness curve
from curves.json with the run's removal ranking rebuilt from its decisions (algorithms.ranking).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..graphs.circuit import Circuit
from ..graphs.diff import Diff, diff_circuits
from ..graphs.export import load_circuit
from ..graphs.frequency import frequency_view
from ..graphs.page import PageError, circuit_view, diff_view, write_page
from .store import read_decisions

KINDS = "a run directory, circuit.json, diff.json, comparison.json, a sweep or a stability directory"
REMOVAL_CURVE = "removal order"  # curves.json names the run's own curve "removal order (ORDER)"
MAX_CELL_VIEWS = 21  # a stability page holds each prune's own circuit too, up to the full one and 20 resamples


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PageError(f"{path} is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise PageError(f"{path} is not a circuitsearch file (a JSON {type(data).__name__}, not an object)")
    return data


def run_decisions(run: Path, circuit: Circuit) -> tuple[list[dict] | None, str | None]:
    """The decisions of the run that found `circuit` (a target's, from its parent's log), or None and why."""
    if (run / "decisions.jsonl").exists():
        return read_decisions(run / "decisions.jsonl"), None
    target = circuit.method.get("target")
    parent = run.parent / "decisions.jsonl"
    if target is not None and parent.exists():
        return [d for d in read_decisions(parent) if d.get("target") == target], None
    return None, f"no decisions.jsonl in {run}: the decision that kept each unit is not shown"


def removal_curve(run: Path, circuit: Circuit, decisions: list[dict] | None) -> tuple[dict | None, str | None]:
    """The run's own faithfulness curve (curves.json) with its ranking rebuilt from the decisions, or None
    and why not."""
    from ..algorithms.ranking import removal_ranking

    path = run / "curves.json"
    if not path.exists():
        return None, f"no curves.json in {run}: no faithfulness curve to slide along"
    if decisions is None:
        return None, "no decisions: the curve's circuits cannot be rebuilt"
    curves = _read_json(path).get("curves") or []
    curve = next((c for c in curves if str(c.get("name", "")).startswith(REMOVAL_CURVE)), None)
    if curve is None:
        return None, f"{path} has no removal-order curve"
    graph = circuit.model_graph
    if curve.get("n_edges") != len(graph.edges):
        return None, (f"{path} counts {curve.get('n_edges')} edges but the circuit's graph has {len(graph.edges)}: "
                      "the curve is not this circuit's")
    removals = [(d["phase"], d["candidate"]) for d in decisions if d.get("removed")]
    best_first = removal_ranking(graph, removals, circuit)[::-1]
    return {**curve, "rank": {e: i for i, e in enumerate(best_first)}}, None


def run_view(circuit: Circuit, run: Path | None, name: str | None = None) -> dict:
    """The page view of one circuit, with its run's decisions and curve where `run` holds them."""
    notes, decisions, curve = [], None, None
    if run is not None:
        decisions, why = run_decisions(run, circuit)
        notes += [why] if why else []
        curve, why = removal_curve(run, circuit, decisions)
        notes += [why] if why else []
    return circuit_view(circuit, decisions, curve, name=name, notes=notes)


def _diff_from_json(data: dict, source: Path) -> Diff:
    """A Diff rebuilt from diff.json (membership only: the circuits' effects are not in it)."""
    names = data.get("names")
    if not isinstance(names, list) or len(names) < 2:
        raise PageError(f"{source}: no 'names' list of two or more circuits")
    sets = {k: {} for k in ("node_names", "edge_names", "node_unit_names", "edge_unit_names")}
    for s in data.get("subsets", []):
        held = frozenset(s["circuits"])
        for key in sets:
            for x in s.get(key, []):
                sets[key][x] = held
    node_level = {c["name"]: c.get("level") in ("nodes", "positions", "nodes,positions") for c in data["circuits"]}
    circuits = []
    for n in names:
        nodes = {x: None for x, s in sets["node_names"].items() if n in s}
        edges = {} if node_level.get(n) else {x: None for x, s in sets["edge_names"].items() if n in s}
        level = next(c.get("level") for c in data["circuits"] if c["name"] == n)
        circuits.append(Circuit(data["model"], data["graph"], n, nodes, edges, method={"level": level}))
    return Diff(names, circuits, sets["node_names"], sets["edge_names"], data.get("level", "nodes"), data.get("note"),
                data.get("slots", []), sets["node_unit_names"], sets["edge_unit_names"])


def comparison_views(out: Path) -> tuple[list[dict], str]:
    """compare-orders' directory: the union shaded by how many orders kept each unit, then each order's run."""
    from ..algorithms.compare import order_dirname

    data = _read_json(out / "comparison.json")
    orders = data.get("orders") or []
    missing = [o for o in orders if not (out / order_dirname(o) / "circuit.json").exists()]
    if missing:
        raise PageError(f"{out}/comparison.json names orders whose runs are not beside it: "
                        + ", ".join(f"{order_dirname(o)}/circuit.json" for o in missing)
                        + "; view the directory compare-orders wrote, with its order directories")
    circuits = [load_circuit(out / order_dirname(o) / "circuit.json") for o in orders]
    diff = diff_circuits(circuits, orders)
    inter, union = data.get("intersection", {}), data.get("union", {})
    notes = [f"intersection: {inter.get('heads')} heads, {inter.get('mlps')} MLPs, {inter.get('edges')} edges, "
             f"faithfulness {_num(inter.get('faithfulness'))}; union: faithfulness {_num(union.get('faithfulness'))}"]
    first = diff_view(diff, name=f"all {len(orders)} orders", shade="count", notes=notes)
    first["caption"][0] = f"{circuits[0].task} on {diff.model}: {len(orders)} removal orders ({', '.join(orders)})"
    views = [first] + [run_view(c, out / order_dirname(o), name=f"order {o}") for o, c in zip(orders, circuits)]
    return views, f"removal orders compared: {circuits[0].task} on {diff.model}"


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "unknown"


def sweep_views(out: Path) -> tuple[list[dict], str]:
    """A sweep directory: one view per finished cell's circuit (a select box picks the cell)."""
    data = _read_json(out / "sweep.json")
    views, skipped = [], []
    for row in data.get("cells", []):
        path = row.get("circuit")
        if row.get("status") not in ("done", "skipped") or not path or not (out / path).exists():
            skipped.append(row.get("name", "?"))
            continue
        views.append(run_view(load_circuit(out / path), (out / path).parent, name=row.get("name")))
    if not views:
        raise PageError(f"{out}/sweep.json has no finished cell with a circuit.json to show")
    if skipped:
        views[0]["notes"].append(f"{len(skipped)} cells without a finished circuit are not shown: {', '.join(skipped)}")
    return views, f"sweep {out.name}: {len(views)} circuits"


def targets_views(out: Path) -> tuple[list[dict], str]:
    """A target run: one view per target's circuit."""
    data = _read_json(out / "targets.json")
    views = []
    for row in data.get("targets", []):
        sub = out / f"target-{row.get('target')}"
        if (sub / "circuit.json").exists():
            views.append(run_view(load_circuit(sub / "circuit.json"), sub, name=f"target {row.get('target')}"))
    if not views:
        raise PageError(f"{out}/targets.json lists no target whose circuit.json is written")
    c = data.get("config", {})
    return views, f"circuits at target performances: {c.get('task')} on {c.get('model')}"


def views_of(path: str | Path) -> tuple[list[dict], str, str]:
    """(views, title, kind) for anything `view` takes; PageError naming what it is not."""
    path = Path(path)
    if not path.exists():
        raise PageError(f"{path}: no such file or directory (view takes {KINDS})")
    if path.is_dir():
        for name, kind in (("stability.json", "stability"), ("comparison.json", "comparison"), ("sweep.json", "sweep"), ("targets.json", "targets"),
                           ("diff.json", "diff"), ("circuit.json", "circuit")):
            if (path / name).exists():
                return _views(path / name, kind)
        if _stability_settings(path) is not None:
            raise PageError(_no_stability(path))
        raise PageError(f"{path} holds none of circuit.json, diff.json, comparison.json, sweep.json, targets.json or "
                        f"stability.json (view takes {KINDS})")
    schema = str(_read_json(path).get("schema", ""))
    for prefix, kind in (("circuitsearch.circuit/", "circuit"), ("circuitsearch.diff/", "diff"),
                         ("circuitsearch.comparison/", "comparison"), ("circuitsearch.sweep", "sweep"),
                         ("circuitsearch.targets/", "targets"), ("circuitsearch.stability/", "stability")):
        if schema.startswith(prefix):
            return _views(path, kind)
    raise PageError(f"{path} is not a file view can show (schema {schema or 'missing'!r}; view takes {KINDS})")


def _views(path: Path, kind: str) -> tuple[list[dict], str, str]:
    if kind == "circuit":
        circuit = load_circuit(path)
        run = path.parent if path.name == "circuit.json" else None
        return [run_view(circuit, run)], f"circuit: {circuit.task} on {circuit.model}", kind
    if kind == "diff":
        diff = _diff_from_json(_read_json(path), path)
        view = diff_view(diff, notes=["from diff.json: which circuits hold each unit; their effects are in the "
                                      "circuits (the page `diff` writes shows them)"])
        return [view], f"diff: {' vs '.join(diff.names)}", kind
    views, title = {"comparison": comparison_views, "sweep": sweep_views, "targets": targets_views,
                    "stability": stability_views}[kind](path.parent)
    return views, title, kind


def write_view(path: str | Path, out: str | Path, frequency: str | Path | None = None) -> Path:
    """The page of `path` (see views_of) written to `out` (.html); with `frequency` (a stability directory or its
    stability.json), the circuit of `path` shaded by its resample frequencies, then the plain view."""
    if frequency is None:
        views, title, kind = views_of(path)
        return write_page(out, views, title, kind)
    views, title, kind = views_of(path)
    if kind != "circuit":
        raise PageError(f"--frequency shades one circuit: give a run directory or a circuit.json, not a {kind}")
    p = Path(path)
    circuit = load_circuit(p / "circuit.json" if p.is_dir() else p)
    stability, source = load_stability(frequency)
    run = p if p.is_dir() else (p.parent if p.name == "circuit.json" else None)
    decisions = run_decisions(run, circuit)[0] if run is not None else None
    note = ([f"the frequencies are of {stability.get('task')!r}, this circuit's task is {circuit.task!r}"]
            if stability.get("task") != circuit.task else [])
    shaded = frequency_view(circuit, stability, decisions, name="shaded by resample frequency", notes=note,
                            label="this circuit", source=str(source))
    views[0]["name"] = views[0].get("name") or "effects"
    return write_page(out, [shaded] + views, f"{title}, shaded by {source.parent.name}'s resample frequency", kind)


def write_diff_page(diff: Diff, out: str | Path) -> Path:
    """The page `diff` writes beside its overlay: the union with each circuit's effects."""
    return write_page(out, [diff_view(diff)], f"diff: {' vs '.join(diff.names)}", "diff")


# ---- stability directories --------------------------------------------------------------------------
def _stability_settings(out: Path) -> dict | None:
    """settings.json of a stability directory (its resample key marks it), else None."""
    path = out / "settings.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and "resample" in data else None


def _no_stability(out: Path) -> str:
    s = _stability_settings(out) or {}
    how = (f"circuitsearch stability --model {s['model']} --task {s['task']} --bootstrap B --out {out}"
           if s.get("model") and s.get("task") else f"circuitsearch stability --task T --bootstrap B --out {out}")
    return (f"{out} has no stability.json (the stability run there has not finished): make it with `{how}` "
            "(finished prunes are kept; it resumes)")


def load_stability(path: str | Path) -> tuple[dict, Path]:
    """stability.json of a stability directory (or the file itself) and its path; PageError saying how to make it."""
    path = Path(path)
    file = path / "stability.json" if path.is_dir() else path
    if not file.exists():
        raise PageError(_no_stability(path) if path.is_dir() else
                        f"{path}: no such file (give a stability directory, made by `circuitsearch stability --out DIR`)")
    return _read_json(file), file


def stability_views(out: Path) -> tuple[list[dict], str]:
    """A stability directory: the full-data circuit shaded by stability.json's frequencies, then each cell's circuit."""
    stability, source = load_stability(out)
    full = out / "sweep" / "cells" / "full"
    if not (full / "circuit.json").exists():
        raise PageError(f"{out}/stability.json is there but not its full-data circuit {full}/circuit.json: "
                        "run the stability command again")
    circuit = load_circuit(full / "circuit.json")
    in_full = {n for n, r in (stability.get("nodes") or {}).items() if isinstance(r, dict) and r.get("in_full")}
    inner = set(circuit.heads() + circuit.mlps())
    if stability.get("nodes") is not None and in_full != inner:
        raise PageError(f"{source} is not of {full}/circuit.json: they differ on {', '.join(sorted(in_full ^ inner))}; "
                        "run the stability command again")
    b, kind = stability.get("bootstrap"), stability.get("resample", "bootstrap")
    shaded = frequency_view(circuit, stability, run_decisions(full, circuit)[0],
                            name=f"full-data circuit, shaded by frequency over {b} resamples", source=str(source))
    views = [shaded]
    if len(stability.get("circuits") or ()) > MAX_CELL_VIEWS:
        shaded["notes"].append(f"each prune's own circuit is not in this page (over {MAX_CELL_VIEWS} "
                               "circuits): "
                               f"`circuitsearch view {out}/sweep` gives them")
    elif (out / "sweep" / "sweep.json").exists():
        views += sweep_views(out / "sweep")[0]
    return views, f"stability: {circuit.task} on {circuit.model}, {b} {kind} resamples"
