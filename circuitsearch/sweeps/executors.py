"""Where a sweep's cells run: worker processes on this machine (default) or a Ray cluster.

Both call the same cells.run_cell, so a cell's run directory is the same on either. A worker
keeps its loaded models between cells. A worker killed mid-cell costs only that cell's replay:
the cell is run again and resumes from its decision log (its run lock dies with the process).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cells import CellResult, log_path, run_cell
from .spec import Cell

GIB = 2 ** 30
TOY_MEMORY = GIB // 4     # a worker searching a toy model (test:*, induction-2l): measured well under this
MODEL_MEMORY = 3 * GIB    # any other model: SmolLM2-135M dequantised plus a search's caches, rounded up
MAX_CRASHES = 3           # a cell whose worker dies this often is reported failed, not retried forever

OnResult = Callable[[CellResult], None]


def worker_memory(model: str) -> int:
    """Rough peak bytes of one worker running cells of `model` (config.memory_needed needs the model loaded)."""
    return TOY_MEMORY if model.startswith("test:") or model == "induction-2l" else MODEL_MEMORY


@dataclass
class Plan:
    """How many worker processes and torch threads each, and why."""

    workers: int
    threads: int
    reason: str


def plan_workers(cells: list[Cell], workers: int | None = None, cores: int | None = None,
                 memory: int | None = None) -> Plan:
    """Workers = min(cores, cells, available memory / one worker's need); threads = cores // workers."""
    from ..config import available_memory

    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    need = max((worker_memory(c.settings.get("model", "smollm2-135m")) for c in cells), default=TOY_MEMORY)
    memory = memory if memory is not None else available_memory()
    by_memory = max(1, memory // need) if memory else cores
    if workers is None:
        workers = max(1, min(cores, len(cells) or 1, by_memory))
        reason = (f"{cores} cores, {len(cells)} cells to run, memory for {by_memory} workers "
                  f"({need / GIB:.2g} GiB each)")
    else:
        reason = "--workers"
    return Plan(workers, max(1, cores // workers), reason)


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """A daemon thread that ends this worker once the sweep process that started it is gone.

    A pool's workers outlive a parent killed by a signal it cannot catch (SIGTERM, SIGKILL); left
    running they would go on writing into their cells and hold the cells' run locks against the
    sweep run again."""
    import threading

    def watch():
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


CELL_CODE = ("circuitsearch.runs.commands", "circuitsearch.runs.reports", "circuitsearch.config",
             "circuitsearch.catalogue", "circuitsearch.hooked", "circuitsearch.patching", "circuitsearch.engine",
             "circuitsearch.reference", "circuitsearch.evaluation", "circuitsearch.algorithms.iterative",
             "circuitsearch.algorithms.target", "circuitsearch.algorithms.attribution",
             "circuitsearch.algorithms.curves", "circuitsearch.algorithms.compare", "circuitsearch.graphs.render",
             "circuitsearch.graphs.diff", "circuitsearch.graphs.export", "circuitsearch.tasks",
             "circuitsearch.sweeps.crosstask", "circuitsearch.sweeps.compare")


def load_cell_code() -> None:
    """Import everything a cell runs, once, when a worker starts. The package imports lazily (so `--help`
    is instant); a worker that did so mid-sweep would read a module as the tree holds it then, and an edit
    under a running sweep would mix two versions in one cell (it happened: 'Run' object has no attribute)."""
    import importlib

    for name in CELL_CODE:
        importlib.import_module(name)


def _init_worker(threads: int, setup) -> None:
    """Each worker process: torch threads sized to its share of the cores, the cells' code loaded, then the
    caller's setup."""
    _exit_with_parent(os.getppid())
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    load_cell_code()
    if setup is not None:
        setup()


def _failed(cell: Cell, error: str) -> CellResult:
    return CellResult(cell.name, cell.settings, cell.kind, "failed", error=error)


class InlineExecutor:
    """Every cell in this process, one after another (--workers 0): for a debugger, or where starting
    worker processes costs more than the cells (a few cells of a toy model). No isolation: a cell
    that kills its process ends the sweep, which resumes when run again."""

    name = "inline"

    def __init__(self, batch: int = 16):
        self.batch = batch

    def describe(self) -> dict:
        return {"executor": self.name, "workers": 0}

    def run(self, out: str | Path, cells: list[Cell], on_result: OnResult, log=print) -> None:
        load_cell_code()
        for cell in cells:
            on_result(run_cell(str(out), cell, self.batch))


class LocalExecutor:
    """Worker processes on this machine (concurrent.futures, spawn): no dependency beyond the package.

    workers/threads: default from plan_workers. setup: a picklable callable every worker runs once
    at start (tests use it to slow cells down). A worker that dies takes the pool with it: finished
    cells are kept, the pool is rebuilt and the unfinished cells run again (each resumes from its
    log); a cell that was running in MAX_CRASHES dead pools is reported failed.
    """

    name = "local"

    def __init__(self, workers: int | None = None, threads: int | None = None, setup=None, batch: int = 16):
        self.workers, self.threads, self.setup, self.batch = workers, threads, setup, batch
        self.plan: Plan | None = None
        self.restarts = 0

    def describe(self) -> dict:
        p = self.plan
        return {"executor": self.name, "workers": p and p.workers, "threads_per_worker": p and p.threads,
                "why": p and p.reason, "pool_restarts": self.restarts}

    def run(self, out: str | Path, cells: list[Cell], on_result: OnResult, log=print) -> None:
        self.plan = plan_workers(cells, self.workers)
        if self.threads:
            self.plan.threads = self.threads
        pending = list(cells)
        crashes: dict[str, int] = {}
        ctx = multiprocessing.get_context("spawn")
        while pending:
            n = min(self.plan.workers, len(pending))
            started = time.time()
            broken = False
            pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker,
                                       initargs=(self.plan.threads, self.setup))
            try:
                futures = {pool.submit(run_cell, str(out), c, self.batch): c for c in pending}
                for f in as_completed(futures):
                    cell = futures[f]
                    try:
                        result = f.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except Exception as e:  # the call itself failed (e.g. a result that cannot be pickled)
                        result = _failed(cell, f"{type(e).__name__}: {e}")
                    pending.remove(cell)
                    on_result(result)
            except BaseException:  # Ctrl-C or a failing callback: queued cells must not start after it
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
            if broken:
                self.restarts += 1
                # the cells that had started in the dead pool: their log was written to after it started
                hit = [c for c in pending if _touched_since(log_path(out, c), started)]
                if not hit:  # workers died before any cell started (a broken worker set-up): count it for all
                    hit = list(pending)
                for c in hit:
                    crashes[c.name] = crashes.get(c.name, 0) + 1
                for c in [c for c in pending if crashes.get(c.name, 0) >= MAX_CRASHES]:
                    pending.remove(c)
                    on_result(_failed(c, f"its worker process died {MAX_CRASHES} times while running it or "
                                         "before it started (killed, out of memory, or a worker that cannot "
                                         "start: see the output above); run the sweep again to retry it"))
                log(f"a worker process died (cells running: {', '.join(c.name for c in hit) or 'unknown'}); "
                    f"restarting the pool for the {len(pending)} unfinished cells: they resume from their logs")


def _touched_since(path: Path, t: float) -> bool:
    try:
        return path.stat().st_mtime >= t - 1e-3
    except OSError:
        return False


# ---------------------------------------------------------------------------------------- Ray

def _ray_cell(out: str, cell: Cell, threads: int, batch: int) -> CellResult:
    """A Ray task: one cell in a Ray worker (which keeps its models between tasks, like a local worker)."""
    import torch
    torch.set_num_threads(threads)
    load_cell_code()
    return run_cell(out, cell, batch)


class RayExecutor:
    """Ray tasks, one per cell (`--ray auto`: the running cluster; `--ray local`: start one here;
    `--ray ADDRESS`: that cluster). Ray is optional: `pip install circuitsearch[ray]`. A task whose
    worker dies is retried by Ray (max_retries) and the cell resumes from its decision log. The
    sweep directory must be on storage every node shares."""

    name = "ray"

    def __init__(self, address: str | None = "auto", threads: int = 1, max_retries: int = MAX_CRASHES,
                 batch: int = 16):
        self.address, self.threads, self.max_retries, self.batch = address, threads, max_retries, batch
        self.resources: dict = {}

    def describe(self) -> dict:
        return {"executor": self.name, "address": self.address, "threads_per_task": self.threads,
                "max_retries": self.max_retries, "cluster": self.resources}

    def _connect(self):
        try:
            import ray
        except ImportError:
            raise RuntimeError("--ray needs Ray, an optional dependency: pip install 'circuitsearch[ray]' "
                               "(or run without --ray on this machine's cores)") from None
        if not ray.is_initialized():
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
            if self.address in (None, "local"):
                ray.init(include_dashboard=False, runtime_env=env, log_to_driver=False)
            else:
                ray.init(address=self.address, runtime_env=env, log_to_driver=False)
        return ray

    def run(self, out: str | Path, cells: list[Cell], on_result: OnResult, log=print) -> None:
        ray = self._connect()
        self.resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "memory")}
        task = ray.remote(num_cpus=self.threads, max_retries=self.max_retries)(_ray_cell)
        refs = {task.remote(str(Path(out).resolve()), c, self.threads, self.batch): c for c in cells}
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1)
                cell = refs.pop(done[0])
                try:
                    result = ray.get(done[0])
                except Exception as e:  # the worker died more often than Ray retries, or the task could not run
                    result = _failed(cell, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                on_result(result)
        except BaseException:  # Ctrl-C: cancel what has not run (running cells keep their logs and resume)
            for ref in refs:
                ray.cancel(ref)
            raise
