"""The command drivers: prune, prune to targets, compare orders; each into a run directory.

A driver checks its settings, prepares the directory (store), builds model, task and
evaluator (config.build), runs a search with every decision logged, and writes the circuit,
its diagram and report.md. Started again on the same directory, it resumes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..algorithms.speculation import MAX_K
from ..config import MASKS, PruneConfig, build
from ..features.reading import read_features
from ..io import atomic_write_text
from .reports import comparison_report, prune_report, targets_report
from .store import (DecisionLog, MaskFile, Prepared, RunDirError, open_dir, prepare, read_checkpoint, save_task, saved_config,
                    saved_task)


def circuit_from_result(ev, result, config: PruneConfig, final: float, stats: dict):
    """The Circuit of a finished search: kept nodes and edges with their effects (faithfulness lost
    when each was last tried; attribution estimates where it was never scored alone, listed in
    method.estimated_effects)."""
    from ..algorithms.iterative import edge_candidates
    from ..graphs.circuit import Circuit

    estimated: list[str] = []

    def effect(name):
        if name in result.effects:
            return result.effects[name]
        if name in result.estimates:
            estimated.append(name)
            return result.estimates[name]
        return None

    from ..algorithms.levels import EDGE_POSITIONS, phases
    from ..graphs.circuit import group_units, positions_field

    steps = phases(config.level)
    kept = [n for n in ev.senders if n not in result.ablated] + ["logits"]
    nodes = {n: effect(n) for n in kept}
    edges = {e: effect(e) for e in edge_candidates(ev, result.run)} if "edges" in steps else {}
    positions = {}
    if "positions" in steps:
        run, slots = result.run, list(ev.slots.names)
        units = [ev.unit_names[u] for u in run.present_units().flatten().nonzero()[:, 0].tolist()]
        where = group_units(units, slots)
        where["logits"] = [q for q, r in zip(slots, ev.read_slots.tolist()) if r]  # where the metric reads
        eunits = []
        if EDGE_POSITIONS in steps:  # each kept edge at the slots where it still carries something
            eunits = [ev.edge_unit_name(u)
                      for u in run.present_edge_units(ev.read_slots).flatten().nonzero()[:, 0].tolist()]
        edge_where = group_units(eunits, slots)
        if EDGE_POSITIONS in steps:
            edges = {e: v for e, v in edges.items() if e in edge_where}  # carries nothing at any slot: gone
        unit_effects = {u: result.effects[u] for u in units + eunits if u in result.effects}
        positions = positions_field(slots, where, edge_where, unit_effects)
    method = {"level": config.level, "ablation": config.ablation, "metric": config.metric, "order": config.order,
              "thresholds": {"absolute": config.absolute, "relative": config.relative, "on": config.on},
              "max_passes": config.max_passes, "passes": result.passes, "seed": config.seed,
              "processing": ev.model.processing, "qkv": config.qkv,
              "gqa": (f"{ev.model.n_kv_heads} key/value heads shared by {ev.H // ev.model.n_kv_heads} query heads "
                      "each; every query head has its own k and v receivers" if ev.model.n_kv_heads != ev.H else None),
              "dangling_removed": result.dangling}
    if config.order == "attribution":
        method.update(attribution=config.attribution, steps=config.steps)
    if config.order == MASKS:  # learned masks: how they were learned, and what verification made of them
        method.update(search="masks", masks={"settings": config.mask_settings().to_json(), "phases": result.masks})
    if config.positions != "last" or config.reduce is not None:
        method.update(positions=config.positions, reduce=ev.reduce)
    if config.sae:  # where the dictionaries were read (their digests are in the graph)
        method["sae"] = list(config.sae)
    if estimated:
        method["estimated_effects"] = estimated
    meta = {"n_prompts": len(ev.task), "task_meta": ev.task.meta, "model": ev.model.describe()}
    if ev.index.sites:  # a feature graph: each dictionary's size, and what every kept feature reads and writes
        meta["dictionaries"] = [{"hook": s.hook, "writes": s.writes, "features": s.n_features, "active": len(s.active),
                                 "kept": sum(n in nodes for n in s.nodes[:-1]), "error_kept": s.nodes[-1] in nodes}
                                for s in ev.index.sites]
        meta["features"] = read_features(ev, list(nodes))
    return Circuit(model=ev.model.name, graph=ev.graph.signature(), task=ev.task.name, nodes=nodes, edges=edges,
                   scores=ev.scores(final), method=method, stats=stats, positions=positions, meta=meta)


def _token_lengths(task) -> str:
    """A task's prompt length, or its range when the prompts differ."""
    lo, hi = int(task.lengths.min()), int(task.lengths.max())
    return str(hi) if lo == hi else f"{lo}-{hi}"


def _kept_note(task) -> str:
    m = task.meta
    if "n_kept" in m and "n_generated" in m:
        return f" (kept {m['n_kept']} of {m['n_generated']} generated: the model answers them correctly)"
    if "n_correct" in m:
        return f" (the model answers {m['n_correct']} of {len(task)} correctly, top-1; every prompt is used)"
    return ""


def _render_or_note(draw, obj, path: Path, log) -> str | None:
    """Draw `obj` to `path` and return its file name, or log why not (no Graphviz) and return None."""
    from ..graphs.render import RenderError

    try:
        draw(obj, path)
        return path.name
    except RenderError as e:
        log(f"note: {e}")
        return None


def write_outputs(circuit, out: Path, log=print, extras=None) -> None:
    """circuit.json and report.md of a finished run first (the result), then the extras: `extras()`
    (returns faithfulness curves, or None), circuit.dot and the diagram, and report.md again with
    them. An extra that cannot be written (no Graphviz, a full disk) is a note, never a lost result."""
    from ..graphs.export import save_circuit
    from ..graphs.page import write_page
    from ..graphs.render import render
    from .view import run_view

    save_circuit(circuit, out / "circuit.json")
    atomic_write_text(out / "report.md", prune_report(circuit, None))
    curves = diagram = None
    try:
        curves = extras() if extras is not None else None
    except OSError as e:
        log(f"note: faithfulness curves not written ({e.strerror or e}); the circuit is in {out / 'circuit.json'}")
    try:
        save_circuit(circuit, out / "circuit.dot")
        diagram = _render_or_note(render, circuit, out / "circuit.svg", log)
    except OSError as e:
        log(f"note: diagram not written ({e.strerror or e}); the circuit is in {out / 'circuit.json'}")
    page = _page_or_note(lambda path: write_page(path, [run_view(circuit, out)], f"circuit: {circuit.task} on "
                                                 f"{circuit.model}", "circuit"), out / "circuit.html", log)
    if curves or diagram or page:
        try:
            atomic_write_text(out / "report.md", prune_report(circuit, diagram, curves, page))
        except OSError as e:
            log(f"note: report.md not updated with the extras ({e.strerror or e})")


def _page_or_note(write, path: Path, log) -> str | None:
    """Write the interactive page to `path` and return its file name, or log why not and return None."""
    from ..graphs.page import PageError

    try:
        write(path)
        return path.name
    except (OSError, PageError) as e:
        log(f"note: {path.name} not written ({getattr(e, 'strerror', None) or e})")
        return None


def _replay(prepared: Prepared, dlog: DecisionLog, log, decisions: list | None = None, first: int = 0):
    """The Replay of a run directory's log: a decision that does not follow from the ones before it
    (under matching settings) marks the log damaged from there; it is cut there and recomputed."""
    from ..algorithms.search import Replay, ResumeError

    decisions = prepared.decisions if decisions is None else decisions
    total = first + len(decisions)

    def mismatch(pos, logged, tried):
        if not prepared.trusted and pos == 0:
            raise ResumeError(f"decisions.jsonl does not belong to these settings: its first decision tried "
                              f"{logged.candidate!r} where this run tries {tried[2]!r}, and checkpoint.json, which "
                              "held its settings, is lost. Run with the original settings, or choose another --out")
        note = (f"decisions.jsonl is damaged at line {pos + 1}: it logs {logged.phase} pass {logged.pass_} "
                f"{logged.candidate!r} where this run, with the same settings, tries {tried[2]!r}; that line and the "
                f"{total - pos - 1} after it were dropped and are recomputed")
        prepared.notes.append(note)
        log(f"warning: {note}")
        dlog.truncate(pos)

    return Replay(decisions, mismatch, first)


def ranking_label(method: str, steps: int) -> str:
    """How a curve of an attribution ranking is named: 'EAP ranking', or 'EAP-IG ranking' with its steps
    where they are not the default 5."""
    if method == "eap":
        return "EAP ranking"
    return "EAP-IG ranking" + (f" ({steps} steps)" if steps != 5 else "")


def write_curves(ev, result, circuit, out: Path, log=print, method: str = "eap-ig", steps: int = 5) -> list:
    """curves.json and curves.png: faithfulness against % of edges kept, for the run's removal order
    and for the attribution ranking of the full model by the run's `method` and `steps` (MIB's CPR and CMD;
    not for a metric without a gradient)."""
    from ..algorithms.attribution import attribute
    from ..algorithms.curves import curves_json, faithfulness_curve, plot_curves, removal_ranking

    if result.mask_logits.get("edges"):  # learned masks: the edges by final logit, least needed first
        logits = result.mask_logits["edges"]
        ranked = [("learned masks", sorted(logits, key=logits.get))]
    else:
        ranked = [(f"removal order ({circuit.method['order']})", removal_ranking(ev, result.decisions, circuit))]
    if ev.metric.gradient:
        ranked.append((ranking_label(method, steps), attribute(ev, method=method, steps=steps).ranking("edges")))
    else:
        log(f"note: no EAP-IG curve: the {ev.metric.name} metric has no gradient (the removal order's curve is drawn)")
    made = [faithfulness_curve(ev, r, name) for name, r in ranked]
    atomic_write_text(out / "curves.json", json.dumps(curves_json(made), indent=1))
    try:
        plot_curves(made, out / "curves.png", f"{circuit.task} on {circuit.model}, {circuit.method['ablation']} ablation")
    except ImportError as e:  # matplotlib is a dependency; a broken install still leaves curves.json
        log(f"note: curves.png not drawn ({e})")
    return made


def run_prune(config: PruneConfig, out: str | Path, progress: bool = True, log=print, model=None,
              curves: bool = True, task=None, force: bool = False, batch: int = MAX_K):
    """Run (or resume) a prune into `out` and write the run directory; returns the Circuit.

    An order not chosen (config.order None) is the one `out` was started with when it is resumed, else
    the default for the metric (config.PruneConfig.resolve_order); the run records the order it used.

    model: an already loaded model of config.model (saves the load when running several prunes).
    task: the Task to use for a new run (a resumed run uses its own task.json).
    curves: also write faithfulness curves (removal order and EAP-IG rankings) into the report.
    force: run a task that looks too large for this machine's memory anyway.
    batch: the most candidates scored per forward pass (speculation; the result is the same for any).
    """
    from ..algorithms.iterative import Thresholds, find_circuit
    from ..algorithms.orders import parse_order

    config.check()  # every setting and file before anything is loaded or written
    thresholds = Thresholds(config.absolute, config.relative, config.on)
    out = Path(out)
    with open_dir(out):
        config, note = config.resolve_order(saved_config(out))  # recorded as resolved: the run is reproducible
        if note:
            log(f"note: {note}")
        masks = config.order == MASKS
        order = None if masks else parse_order(config.order, config.attribution, config.steps)
        prepared = prepare(out, config.to_json())
        for note in prepared.notes:
            log(f"warning: {note}")
        t0 = time.time()
        if task is not None and saved_task(out) is None:
            save_task(out, task)
        model, task, ev = build(config, model, saved_task(out), log, force)
        save_task(out, task)
        log(f"{model.name}: {model.n_layers} layers x {model.n_heads} heads; task {task.name}: {len(task)} prompts "
            f"of {_token_lengths(task)} tokens{_kept_note(task)}; full {config.metric} {ev.full:.3f}, corrupted "
            f"{ev.corrupted:.3f}, empty circuit {ev.empty:.3f}")
        decisions = prepared.decisions
        if decisions:
            log(f"resuming {out}: replaying {len(decisions)} decisions")
        with DecisionLog(out, config.to_json(), n=len(decisions), earlier=prepared.earlier,
                         meter=lambda: {**ev.stats(), "seconds": time.time() - t0}) as dlog:
            dlog.checkpoint("running")
            replay = _replay(prepared, dlog, log)
            t1 = time.time()
            if masks:
                from ..algorithms.masks import find_circuit_masks

                result = find_circuit_masks(ev, config.level, thresholds, config.mask_settings(), config.max_passes,
                                            replay, dlog.record, MaskFile(out, log), progress, batch)
            else:
                result = find_circuit(ev, config.level, thresholds, order, config.max_passes, replay, dlog.record,
                                      progress=progress, batch=batch)
        stats = {**ev.stats(), "engine": getattr(ev, "path", "fast"), "seconds": round(time.time() - t0, 2),
                 "search_seconds": round(time.time() - t1, 2),
                 "decisions": len(result.decisions), "replayed": len(decisions) - replay.dropped,
                 "skipped": result.skipped, "speculation": result.speculation}
        if decisions:  # a resumed run: what this session spent, and the whole run's cost as far as checkpointed
            stats["all_sessions"] = dlog.spent()
        if prepared.notes:
            stats["recovered"] = prepared.notes
        circuit = circuit_from_result(ev, result, config, result.final, stats)
        # faithfulness curves keep the top edges; a feature graph's features have no edges, so it has none
        extras = (lambda: write_curves(ev, result, circuit, out, log, config.attribution, config.steps)) \
            if curves and not ev.index.sites else None
        write_outputs(circuit, out, log, extras)
        dlog.checkpoint("done", {"faithfulness": circuit.scores["faithfulness"]})
    return circuit


# settings of iterative pruning the target search has no use for, with why (refused, not ignored)
TARGET_UNUSED = {
    "relative": "bisection and refinement remove many candidates at a time, so a cost per removal has no meaning "
                "there; for a relative threshold use iterative pruning",
    "max_passes": "it has no passes: it bisects, then refines once (patience bounds the refinement)",
    "order": "it ranks candidates by their estimated gain (recorded as order gain); attribution and steps "
             "choose that ranking",
}


def check_target_config(config: PruneConfig) -> None:
    """ValueError for a setting the target search would ignore: given, or not at its default."""
    default = PruneConfig()
    for key, why in TARGET_UNUSED.items():
        if key in config.given or getattr(config, key) != getattr(default, key):
            raise ValueError(f"{key} {getattr(config, key)!r} does not apply to the target search: {why}")


def run_targets(config: PruneConfig, targets, out: str | Path, progress: bool = True, log=print,
                patience: int | None = 30, model=None, force: bool = False, batch: int = MAX_K) -> list:
    """Nested circuits for each target into out/target-T/ (a run directory each) plus targets.json.

    Every scored circuit is logged to out/decisions.jsonl: a killed run loads the targets whose
    circuit.json was written and replays the logged decisions of the rest (resumes mid-target).
    The ranking is config.attribution with config.steps; `batch`: the most refinement tries scored per
    forward pass (speculation along the failure path; the decisions are the same for any).
    """
    from ..algorithms.target import parse_targets, prune_to_targets
    from ..graphs.export import load_circuit

    from ..metrics import get_metric

    targets = parse_targets(targets)
    config.check()
    check_target_config(config)
    if not get_metric(config.metric).gradient:  # before anything loads
        raise ValueError(f"the target search ranks candidates by attribution gradients, and the {config.metric} "
                         "metric has none: prune to targets with logit_diff, prob, kl, l2 or logprob, or use "
                         "iterative pruning (--absolute) with accuracy")
    if patience is not None and patience < 1:
        raise ValueError(f"patience {patience} must be at least 1 (or None to try every candidate)")
    out = Path(out)
    cfg = {**config.to_json(), "order": "gain", "targets": targets, "patience": patience}
    with open_dir(out):
        try:
            ck = read_checkpoint(out)
        except RunDirError:
            ck = {}
        if ck is None and any(p.name != ".lock" for p in out.iterdir()):
            raise RunDirError(f"{out} is not empty and holds no target run; choose another --out or empty it")
        prepared = prepare(out, cfg, holds=("targets.json",))
        for note in prepared.notes:
            log(f"warning: {note}")
        t0 = time.time()
        model, task, ev = build(config, model, saved_task(out), log, force)
        save_task(out, task)
        log(f"{model.name}: {model.n_layers} layers x {model.n_heads} heads; task {task.name}: {len(task)} prompts; "
            f"full {config.metric} {ev.full:.3f}, empty circuit {ev.empty:.3f}; targets {', '.join(map(str, targets))}")
        rows, start, todo = [], None, list(targets)
        for t in targets:
            path = out / f"target-{t}" / "circuit.json"
            if not path.exists():
                break
            c = load_circuit(path)
            start = ev.circuit_run(c)
            rows.append({**c.method.get("target_search", {}), "resumed": True})
            todo.remove(t)
            log(f"target {t}: resumed from {path}")
        decisions = prepared.decisions
        first = next((i for i, d in enumerate(decisions) if d.get("target") in todo), len(decisions))
        if decisions[first:]:
            log(f"resuming {out}: replaying {len(decisions) - first} decisions")
        def write(step):
            # what this target's search used: the target as its absolute threshold, no relative one
            tconf = PruneConfig(**{**config.to_json(), "order": "gain", "absolute": step.target, "relative": None})
            sub = out / f"target-{step.target}"
            sub.mkdir(exist_ok=True)
            save_task(sub, task)
            stats = {**ev.stats(), "engine": getattr(ev, "path", "fast"), "seconds": round(time.time() - t0, 2),
                     "target_forward_passes": step.forward_passes,
                     "target_backward_passes": step.backward_passes}
            c = circuit_from_result(ev, step.result, tconf, step.result.final, stats)
            del c.method["max_passes"]  # it has none (check_target_config)
            summary = step.summary(ev)
            c.method.update(target=step.target, attribution=config.attribution, steps=config.steps,
                            target_search=summary)
            write_outputs(c, sub, log)
            rows.append(summary)

        with DecisionLog(out, cfg, n=len(decisions), earlier=prepared.earlier,
                         meter=lambda: {**ev.stats(), "seconds": time.time() - t0}) as dlog:
            dlog.checkpoint("running")
            if todo:
                replay = _replay(prepared, dlog, log, decisions[first:], first)
                prune_to_targets(ev, todo, config.level, config.attribution, config.steps, progress=progress,
                                 start=start, patience=patience, on_target=write, replay=replay,
                                 on_decision=dlog.record, batch=batch)
        summary = {"schema": "circuitsearch.targets/1", "config": cfg, "targets": rows,
                   "stats": {**ev.stats(), "seconds": round(time.time() - t0, 2)}}
        if prepared.notes:
            summary["recovered"] = prepared.notes
        atomic_write_text(out / "targets.json", json.dumps(summary, indent=1))
        atomic_write_text(out / "report.md", targets_report(summary))
        dlog.checkpoint("done")
    return rows


# the lines of a run's log that a driver running several runs (compare-orders, sweeps) passes on to the user:
# notes, warnings, resumes; the model-and-task line each run starts with is said once by the driver
MESSAGE_PREFIXES = ("note:", "warning:", "resuming ")


def _order_log(order: str, log):
    """The log of one order's prune in compare-orders: its messages (MESSAGE_PREFIXES), prefixed with the order."""
    def out(*parts):
        text = " ".join(map(str, parts))
        if text.startswith(MESSAGE_PREFIXES):
            log(f"  [{order}] {text}")
    return out


def run_compare(config: PruneConfig, orders: list[str], out: str | Path, progress: bool = True, log=print,
                model=None, force: bool = False, batch: int = MAX_K):
    """Prune with each order into out/<order>/ (each a resumable run directory, all on the same
    prompts), then compare: comparison.json, comparison.svg and report.md in `out`."""
    from ..algorithms.compare import compare_circuits, order_dirname
    from ..algorithms.orders import check_order
    from ..config import check_fits, evaluator, open_model, resolve_task

    config.check()  # bad settings fail before loading, every order's with the metric
    orders = [PruneConfig(**{**config.to_json(), "order": check_order(o)}).check().order for o in orders]
    if len(orders) < 2 or len(set(orders)) != len(orders):
        raise ValueError(f"compare-orders needs at least two distinct orders, got {orders}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else open_model(config.model, log)
    task = resolve_task(config, model, saved_task(out))
    check_fits(model, task, log, force)
    save_task(out, task)
    circuits = []
    for i, order in enumerate(orders):
        sub = out / order_dirname(order)
        log(f"[{i + 1}/{len(orders)}] order {order} -> {sub}")
        cfg = PruneConfig(**{**config.to_json(), "order": order})
        circuits.append(run_prune(cfg, sub, progress=progress, log=_order_log(order, log), model=model, task=task,
                                  force=force, batch=batch))
        c = circuits[-1]
        log(f"  {c.sizes()}, faithfulness "
            f"{c.scores['faithfulness']:.3f}, {c.stats.get('forward_passes')} forward passes")
    cmp = compare_circuits(evaluator(config, model, task), circuits, orders)
    write_comparison(cmp, out, log)
    return cmp


def write_comparison(cmp, out: Path, log=print) -> None:
    """compare-orders' files: comparison.json and report.md first, then comparison.html (the page) and
    comparison.svg (the diagram), and report.md again with them; an extra that cannot be made is a note."""
    from ..algorithms.compare import render_comparison
    from .view import write_view

    atomic_write_text(out / "comparison.json", json.dumps(cmp.to_json(), indent=1))
    atomic_write_text(out / "report.md", comparison_report(cmp, None))
    page = _page_or_note(lambda path: write_view(out, path), out / "comparison.html", log)
    diagram = _render_or_note(render_comparison, cmp, out / "comparison.svg", log)
    atomic_write_text(out / "report.md", comparison_report(cmp, diagram, page))
