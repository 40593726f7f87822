"""Running one cell of a sweep inside a worker: the model from the worker's cache, the run into
DIR/cells/<name>/ through the ordinary drivers (run_prune, run_targets), one CellResult back.

Whatever fails inside a cell (bad settings a check could not see, a run directory of other
settings) comes back as a failed CellResult with its error; it never stops the sweep.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .spec import Cell

_MODELS: dict = {}  # this worker process's loaded models, by name: loaded once per worker, not per cell
LOADS = {"count": 0}


def cell_dir(out: str | Path, cell: Cell) -> Path:
    return Path(out) / (cell.dir or f"cells/{cell.name}")


def log_path(out: str | Path, cell: Cell) -> Path:
    return Path(out) / "logs" / f"{cell.name}.log"


def get_model(name: str, log=None):
    """The worker's model of this name, loaded on first use (its load notes on `log`: the cell that loads it)."""
    if name not in _MODELS:
        from ..config import open_model
        _MODELS[name] = open_model(name, log)
        LOADS["count"] += 1
    return _MODELS[name]


def keep_model(name: str, model) -> None:
    """Hand this process's cells a model loaded already (cells run in this process, --workers 0, then load
    nothing again); a worker process never sees it."""
    _MODELS.setdefault(name, model)


@dataclass
class CellResult:
    """What a sweep knows about one cell after running (or skipping) it: one row of sweep.json."""

    name: str
    settings: dict
    kind: str
    status: str                   # done | skipped (done before this sweep session) | failed
    error: str | None = None
    heads: int | None = None
    mlps: int | None = None
    nodes: int | None = None
    edges: int | None = None
    faithfulness: float | None = None
    normalized: float | None = None
    scores: dict = field(default_factory=dict)
    forward_passes: int | None = None
    forward_equivalents: float | None = None
    seconds: float | None = None   # the run's cost over all its sessions
    replayed: int = 0              # decisions replayed from the log (a resumed cell)
    wall: float = 0.0              # this sweep session's wall time on the cell
    worker: str | None = None      # host:pid that ran it
    model_loads: int = 0           # models the worker had loaded so far (1 per model when the cache works)
    targets: list = field(default_factory=list)  # a target cell: one summary per target
    circuit: str | None = None     # circuit.json relative to the sweep directory
    messages: list = field(default_factory=list)  # the run's notes and warnings, for the driver to pass on

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CellResult":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def circuit_path(out: str | Path, cell: Cell) -> Path:
    """Where a finished cell's circuit is: its circuit.json, or a target cell's last (lowest) target's."""
    d = cell_dir(out, cell)
    return d / f"target-{cell.targets[-1]}" / "circuit.json" if cell.kind == "target" else d / "circuit.json"


def is_done(out: str | Path, cell: Cell) -> bool:
    """The cell's checkpoint says done, under the cell's own settings, and its circuit is there."""
    try:
        ck = json.loads((cell_dir(out, cell) / "checkpoint.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (ck.get("status") == "done" and ck.get("config") == expected_config(cell, ck.get("config"))
            and circuit_path(out, cell).exists())


def expected_config(cell: Cell, saved: dict | None = None) -> dict:
    """The settings the cell's checkpoint.json holds once its driver has run (see runs.commands); `saved`:
    the settings already there (a cell that names no order resumes with the order it started with)."""
    cfg = cell.config().resolve_order(saved if cell.kind == "prune" else None)[0].to_json()
    if cell.kind == "target":
        cfg = {**cfg, "order": "gain", "targets": cell.targets, "patience": cell.settings.get("patience", 30)}
    return cfg


def result_from_dir(out: str | Path, cell: Cell, status: str, wall: float = 0.0) -> CellResult:
    """A finished cell's row, read from its run directory (the same whether it ran now or before)."""
    from ..graphs.export import load_circuit

    path = circuit_path(out, cell)
    c = load_circuit(path)
    cost = c.stats.get("all_sessions") or c.stats
    targets = []
    if cell.kind == "target":
        summary = json.loads((cell_dir(out, cell) / "targets.json").read_text())
        targets = [{k: r.get(k) for k in ("target", "heads", "mlps", "edges", "faithfulness", "forward_passes")}
                   for r in summary["targets"]]
        cost = summary.get("stats", cost)
    return CellResult(name=cell.name, settings=cell.settings, kind=cell.kind, status=status,
                      heads=len(c.heads()), mlps=len(c.mlps()), nodes=c.n_nodes, edges=c.n_edges,
                      faithfulness=c.scores.get("faithfulness"), normalized=c.scores.get("normalized"),
                      scores=dict(c.scores), forward_passes=cost.get("forward_passes"),
                      forward_equivalents=cost.get("forward_equivalents"), seconds=cost.get("seconds"),
                      replayed=int(c.stats.get("replayed", 0) or 0), wall=round(wall, 3), targets=targets,
                      circuit=str(path.relative_to(out)))


def run_cell(out: str, cell: Cell, batch: int = 16) -> CellResult:
    """Run (or resume) one cell into out/cells/<name>/, its log in out/logs/<name>.log; never raises
    for a cell's own failure (the error is in the result)."""
    import socket

    from ..runs import run_prune, run_targets
    from ..runs.commands import MESSAGE_PREFIXES

    t0 = time.time()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    path = log_path(out, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    messages: list[str] = []
    with open(path, "a") as logf:
        def log(*parts):
            text = " ".join(map(str, parts))
            print(text, file=logf, flush=True)
            if text.startswith(MESSAGE_PREFIXES):
                messages.append(text)

        log(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {worker}: cell {cell.name}")
        try:
            if cell.kind == "evaluate":  # a column of evaluate's cross-task matrix
                from .crosstask import run_column
                scores = run_column(out, cell, get_model(cell.settings["model"], log), log)
                return _stamp(CellResult(cell.name, cell.settings, cell.kind, "done", scores={"column": scores}),
                              worker, t0, messages)
            if is_done(out, cell):
                return _stamp(result_from_dir(out, cell, "skipped"), worker, t0, messages)
            model = get_model(cell.settings.get("model", "smollm2-135m"), log)
            if cell.kind == "target":
                run_targets(cell.config(), cell.targets, cell_dir(out, cell), progress=False, log=log,
                            patience=cell.settings.get("patience", 30), model=model)
            else:
                task = None
                if cell.task_file:  # the same prompts for every cell that names this file (compare-orders)
                    from ..tasks.base import Task
                    task = Task.from_json(json.loads((Path(out) / cell.task_file).read_text()))
                run_prune(cell.config(), cell_dir(out, cell), progress=False, log=log, model=model, task=task,
                          curves=cell.settings.get("curves", True), batch=batch)
            return _stamp(result_from_dir(out, cell, "done"), worker, t0, messages)
        except Exception as e:  # a cell's failure is its row, not the sweep's end
            log(traceback.format_exc())
            return _stamp(CellResult(cell.name, cell.settings, cell.kind, "failed",
                                     error=f"{type(e).__name__}: {e}"), worker, t0, messages)


def _stamp(r: CellResult, worker: str, t0: float, messages: list | None = None) -> CellResult:
    r.worker, r.wall, r.model_loads = worker, round(time.time() - t0, 3), LOADS["count"]
    r.messages = list(messages or [])
    return r
