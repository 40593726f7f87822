"""Score saved circuits on any task's data: a run's own prompts (reproduces its score) or another task's.

A circuit is scored as its run scored it: same ablation and metric, everything outside it
ablated. On its own task the run directory's task.json is used, so the score is the run's own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import PruneConfig, evaluator, resolve_task
from .graphs.circuit import Circuit
from .metrics import score_problem

MATRIX_SCHEMA = "circuitsearch.crosstask/1"


@dataclass
class SavedRun:
    """A finished run directory: its circuit and the exact task it was found on."""

    path: Path
    circuit: Circuit
    task: object  # tasks.base.Task

    @property
    def name(self) -> str:
        return self.circuit.task


def load_run(path: str | Path) -> SavedRun:
    """circuit.json + task.json of a run directory (or of the directory holding a given circuit.json)."""
    from .graphs.export import load_circuit
    from .tasks.base import Task

    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / "circuit.json").exists():
        raise FileNotFoundError(f"{path} holds no circuit.json: give the directory of a finished prune run")
    if not (path / "task.json").exists():
        raise FileNotFoundError(f"{path} holds no task.json, so the circuit's own prompts are unknown")
    try:
        task = Task.from_json(json.loads((path / "task.json").read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'task.json'} is damaged ({e}); re-run the prune into a fresh --out") from None
    return SavedRun(path, load_circuit(path / "circuit.json"), task)


def score_on(ev, circuit: Circuit) -> dict:
    """full, circuit, empty, faithfulness and normalized of `circuit` on the evaluator's task."""
    return ev.score_circuit(circuit)


@dataclass
class CrossTask:
    """Circuit i (found on its task) scored on task j: the matrix of scores dicts, rows = circuits."""

    circuits: list[str]
    tasks: list[str]
    scores: list[list[dict]]
    paths: list[str] = field(default_factory=list)
    model: str = ""
    prompts: dict = field(default_factory=dict)

    def matrix(self, key: str = "faithfulness") -> list[list[float]]:
        return [[s[key] for s in row] for row in self.scores]

    def to_json(self) -> dict:
        return {"schema": MATRIX_SCHEMA, "model": self.model, "circuits": self.circuits, "runs": self.paths,
                "tasks": self.tasks, "prompts": self.prompts, "faithfulness": self.matrix("faithfulness"),
                "normalized": self.matrix("normalized"), "scores": self.scores}


def format_matrix(ct: CrossTask, key: str = "faithfulness") -> str:
    """Rows: circuits (by the task they were found on); columns: the task they are scored on."""
    corner = "circuit \\ task"
    rw = max(len(corner), *(len(c) for c in ct.circuits))
    cw = max(7, *(len(t) for t in ct.tasks))
    out = [f"{key} of each circuit (row) on each task's prompts (column), {ct.model}",
           f"{corner:<{rw}}" + "".join(f"  {t:>{cw}}" for t in ct.tasks)]
    for c, row, scores in zip(ct.circuits, ct.matrix(key), ct.scores):
        out.append(f"{c:<{rw}}" + "".join(f"  {x:>{cw - 1}.3f}{'*' if s.get('meaningless') else ' '}"
                                          for x, s in zip(row, scores)))
    if any(s.get("meaningless") for row in ct.scores for s in row):
        out.append("* the model fails that task (its full score is at or below 0, or no better than the empty "
                   "circuit's), so this score means nothing")
    return "\n".join(out) + "\n"


def _config(run: SavedRun, task: str, model) -> PruneConfig:
    """The settings `run`'s circuit was found with, for task `task`: builds other tasks' prompts alike
    (prompt count, seed, template, corruption) and scores with the run's ablation, metric and graph."""
    m = run.circuit.method
    meta = run.circuit.meta if isinstance(run.circuit.meta, dict) else {}
    tm = meta.get("task_meta", {})
    template = tm.get("template", 0)
    return PruneConfig(model=model.name, task=task, ablation=m["ablation"], metric=m["metric"],
                       qkv=run.circuit.graph.get("qkv", True),
                       split_embed=bool(run.circuit.graph.get("split_embed", False)),
                       n_prompts=int(meta.get("n_prompts", 24)),
                       seed=int(tm.get("seed", m.get("seed", 0))), template=template if template == "all" else int(template),
                       corruption=tm.get("corruption", "random"), positions=m.get("positions", "last"),
                       reduce=m.get("reduce"), sae=tuple(m.get("sae", ())), level="nodes" if m.get("sae") else "both")


def own_evaluator(run: SavedRun, model, log=None):
    """The evaluator of `run`'s own prompts (its task.json) with its ablation, metric, graph and readout:
    scores its circuit as the run scored it."""
    return evaluator(_config(run, run.task.name, model), model, run.task, log)


def _task_for(name: str, runs: list[SavedRun], model, like: SavedRun):
    """Prompts of task `name`: a given run's task.json if one was found on it, else built with like's settings."""
    for r in runs:
        if r.task.name == name:
            return r.task
    return resolve_task(_config(like, name, model), model)


def score_column(runs: list[SavedRun], task: str, model, log=print) -> list[dict]:
    """Every run's circuit scored on task `task`: one column of the cross-task matrix.

    A circuit on its own task uses its run's task.json (the diagonal reproduces the run's score);
    other prompts are those of a run found on `task`, else built with the first such run's settings.
    """
    shared, evs, column = None, {}, []
    for r in runs:
        m = r.circuit.method
        # circuits of another graph (qkv, split_embed) or read at other positions need their own evaluator
        how = (m["ablation"], m["metric"], m.get("positions"), m.get("reduce"), tuple(sorted(r.circuit.graph.items())))
        if task == r.task.name:
            t, key = r.task, (str(r.path), *how)
        else:
            shared = shared or _task_for(task, runs, model, r)
            t, key = shared, (task, *how)
        if key not in evs:
            evs[key] = ev = evaluator(_config(r, task, model), model, t)
            if score_problem(ev.metric, ev.full, ev.empty):
                log(f"warning: on task {task!r} ({m['ablation']} ablation, {m['metric']}): "
                    f"{score_problem(ev.metric, ev.full, ev.empty)}; its faithfulness scores are marked * and "
                    "mean nothing")
        ev = evs[key]
        s = ev.score_circuit(r.circuit)
        s["prompts"] = len(t)
        why = score_problem(ev.metric, ev.full, ev.empty)
        if why:
            s["meaningless"] = why
        column.append(s)
        log(f"  {r.name} circuit on {task}: faithfulness {s['faithfulness']:.3f}{' *' if why else ''}")
    return column


def cross_task(run_dirs: list, tasks: list[str] | None = None, model=None, log=print, columns=None) -> CrossTask:
    """Score every run's circuit on every task (default: the runs' own tasks).

    In this process (one model load in all), or by `columns(runs, tasks, log)`, which returns the
    columns computed elsewhere (sweeps.crosstask: one cell per task on a sweep executor).
    """
    runs = [r if isinstance(r, SavedRun) else load_run(r) for r in run_dirs]
    if not runs:
        raise ValueError("give at least one run directory")
    models = {r.circuit.model for r in runs}
    if len(models) > 1:
        raise ValueError(f"the circuits are of different models ({', '.join(sorted(models))}); "
                         "cross-task scores compare circuits of one model")
    tasks = list(tasks) if tasks else list(dict.fromkeys(r.task.name for r in runs))
    if columns is None:
        from .config import open_model

        model = model or open_model(runs[0].circuit.model, log)
        columns = [score_column(runs, t, model, log) for t in tasks]
    else:
        columns = columns(runs, tasks, log)
    scores = [[columns[j][i] for j in range(len(tasks))] for i in range(len(runs))]
    prompts = {t: col[0].pop("prompts") for t, col in zip(tasks, columns)}
    for col in columns:
        for s in col:
            s.pop("prompts", None)
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # several circuits of one task: name them by their run directories
        names = [r.path.name for r in runs]
    return CrossTask(names, tasks, scores, [str(r.path) for r in runs], runs[0].circuit.model,
                     prompts)
