"""The sweep driver: check the spec, skip finished cells, run the rest on an executor, keep
DIR/sweep.json current (one row per cell, replaced atomically as each cell ends), then the
report and, given a known circuit, the ROC.

The sweep directory is locked like a run directory (one sweep at a time on it); each cell's
run directory has its own lock, so a cell never runs twice at once.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..io import atomic_write_text
from ..runs.store import RunDirError, RunLock
from .cells import CellResult, cell_dir, is_done, result_from_dir
from .spec import SweepSpec

SWEEP_SCHEMA = "circuitsearch.sweep/1"


def _counts(rows: list[dict]) -> dict:
    out: dict[str, int] = {}
    for r in rows:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


def _summary(spec: SweepSpec, rows: dict, executor, t0: float, roc=None) -> dict:
    cells = [rows[c.name] for c in spec.cells]
    out = {"schema": SWEEP_SCHEMA, "spec": spec.to_json(), "executor": executor.describe(),
           "counts": _counts(cells), "wall_seconds": round(time.time() - t0, 2), "cells": cells}
    if roc is not None:
        out["roc"] = roc
    return out


def load_circuits(out: Path, rows: list[dict]) -> dict:
    from ..graphs.export import load_circuit

    return {r["name"]: load_circuit(out / r["circuit"]) for r in rows
            if r["status"] in ("done", "skipped") and r.get("circuit")}


EVAL_KEYS = ("model", "task", "n_prompts", "seed", "template", "corruption", "ablation", "metric", "qkv", "split_embed",
             "attribution", "steps", "positions", "reduce", "sae")  # what an attribution ranking depends on


def ranking_curves(truth, cells, circuits: dict, log=print) -> list:
    """One ROC per kind for the attribution ranking (the cells' `attribution` method, EAP-IG by default)
    of each distinct model/task/ablation/metric among the finished cells: a ranking's ROC needs no threshold."""
    from ..algorithms.attribution import attribute
    from ..config import build
    from .roc import ranking_curve

    seen, out = set(), []
    for cell in cells:
        cfg = cell.config()
        key = tuple(getattr(cfg, k) for k in EVAL_KEYS)
        if key in seen:
            continue
        seen.add(key)
        _, _, ev = build(cfg)
        a = attribute(ev, method=cfg.attribution, steps=cfg.steps)
        graph = circuits[cell.name].model_graph
        for kind in ("nodes", "edges"):
            curve = ranking_curve(truth, a.ranking(kind)[::-1], kind, graph)
            if curve is not None:
                curve.series = f"{cfg.attribution} ranking: {cfg.model}, {cfg.task}, {cfg.ablation}, {cfg.metric}"
                out.append(curve)
        log(f"ROC of the {cfg.attribution} ranking on {cfg.task} ({cfg.model}) computed")
    return out


def run_sweep(spec: SweepSpec, out: str | Path, executor=None, truth: str | Path | None = None, log=print,
              ranking: bool = True) -> dict:
    """Run every cell of `spec` not finished yet into out/cells/<name>/; returns the summary (sweep.json).

    A finished cell (checkpoint done, same settings) is skipped and counted; an interrupted one resumes
    from its decision log; a failing one is a row with its error. truth: a known circuit for the ROC (of
    each threshold series, and with `ranking` of each model and task's attribution ranking too).
    """
    from .executors import LocalExecutor
    from .roc import load_truth, plot_roc, roc_curves  # noqa: F401  (truth checked before anything runs)

    executor = executor or LocalExecutor()
    known = load_truth(truth) if truth is not None else None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a directory: give a directory for the sweep")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with RunLock(out):
        atomic_write_text(out / "spec.json", json.dumps(spec.to_json(), indent=1))
        rows: dict[str, dict] = {}
        todo = []
        for cell in spec.cells:
            if is_done(out, cell):
                rows[cell.name] = result_from_dir(out, cell, "skipped").to_json()
            else:
                todo.append(cell)
                rows[cell.name] = CellResult(cell.name, cell.settings, cell.kind, "pending").to_json()
        log(f"sweep of {len(spec.cells)} cells into {out}: {len(spec.cells) - len(todo)} finished before (skipped), "
            f"{len(todo)} to run on {executor.name}")

        def write():
            atomic_write_text(out / "sweep.json", json.dumps(_summary(spec, rows, executor, t0), indent=1))

        def on_result(r: CellResult):
            rows[r.name] = r.to_json()
            for m in r.messages:  # the cell's own notes and warnings
                log(f"  [{r.name}] {m}")
            done = sum(1 for x in rows.values() if x["status"] != "pending")
            what = (f"{r.heads} heads, {r.mlps} MLPs, {r.edges} edges, faithfulness {r.faithfulness:.3f}"
                    if r.status != "failed" else f"FAILED: {r.error}")
            log(f"[{done}/{len(rows)}] {r.name}: {what} ({r.wall:.1f} s)")
            write()

        write()
        if todo:
            executor.run(out, todo, on_result, log=log)
        roc = None
        circuits = load_circuits(out, list(rows.values()))
        if known is not None:
            ordered = [(c.name, c.settings, circuits[c.name]) for c in spec.cells if c.name in circuits]
            per_cell, curves = roc_curves(known, ordered)
            for name, r in per_cell.items():
                rows[name]["truth"] = r
            if ranking:
                curves += ranking_curves(known, [c for c in spec.cells if c.name in circuits], circuits, log)
            roc = {"truth": known.source, "curves": [c.to_json() for c in curves]}
        summary = _summary(spec, rows, executor, t0, roc)
        atomic_write_text(out / "sweep.json", json.dumps(summary, indent=1))
        from .report import write_report
        write_report(out, summary, circuits, roc, log)
    return summary


def cell_dirs(out: str | Path, spec: SweepSpec) -> list[Path]:
    """The run directories of a sweep's cells (for diff, evaluate, render)."""
    return [cell_dir(out, c) for c in spec.cells]
