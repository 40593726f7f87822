"""evaluate's cross-task matrix on a sweep executor: one cell per column (task), whose worker builds that
task's evaluators once and scores every circuit on them; finished columns are kept in
WORKDIR/columns/ and read back when the command is run again.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..evaluation import SavedRun, load_run, score_column
from ..io import atomic_write_text
from .spec import Cell


def columns_on(executor, workdir: str | Path):
    """The `columns` argument of evaluation.cross_task that computes them on `executor` in `workdir`."""
    return lambda runs, tasks, log: _columns_on(executor, runs, tasks, Path(workdir), log)


def column_cells(runs: list[SavedRun], tasks: list[str]) -> list:
    """One sweep cell per column: settings name the model, the run directories and the task."""
    paths = [str(r.path.resolve()) for r in runs]
    return [Cell(f"column={j}-{_safe(t)}", {"model": runs[0].circuit.model,
                                             "evaluate": {"runs": paths, "task": t}}) for j, t in enumerate(tasks)]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)[:60]


def column_path(out: str | Path, cell) -> Path:
    return Path(out) / "columns" / f"{cell.name}.json"


def run_column(out: str | Path, cell, model, log=print) -> list[dict]:
    """A column cell in a worker: its scores, from columns/<name>.json when an earlier session wrote
    them for the same settings, else computed and written (atomically)."""
    path = column_path(out, cell)
    try:
        saved = json.loads(path.read_text())
        if saved.get("settings") == cell.settings:
            return saved["scores"]
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    spec = cell.settings["evaluate"]
    scores = score_column([load_run(p) for p in spec["runs"]], spec["task"], model, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"settings": cell.settings, "scores": scores}, indent=1))
    return scores


def _columns_on(executor, runs: list[SavedRun], tasks: list[str], workdir: Path, log) -> list[list[dict]]:
    cells = column_cells(runs, tasks)
    got: dict = {}

    def on_result(r):
        if r.status == "failed":
            got[r.name] = r.error
            log(f"  column {r.name}: FAILED: {r.error}")
        else:
            got[r.name] = r.scores["column"]
            log(f"  column {r.name}: done")

    workdir.mkdir(parents=True, exist_ok=True)
    executor.run(workdir, cells, on_result, log=log)
    failed = [f"{c.name}: {got.get(c.name, 'not run')}" for c in cells if not isinstance(got.get(c.name), list)]
    if failed:
        raise RuntimeError("; ".join(failed) + f" (see {workdir}/logs/); finished columns are kept: run the "
                           "command again to retry the others")
    return [got[c.name] for c in cells]
