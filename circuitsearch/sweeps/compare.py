"""compare-orders on an executor: every order is a cell (its own run directory, out/<order>/, all
on the same prompts), run on local workers or Ray, then compared exactly as `compare-orders`
compares them in one process (comparison.json, comparison.html, comparison.svg, report.md).
"""
from __future__ import annotations

from pathlib import Path

from ..config import PruneConfig
from .spec import Cell


def order_cells(config: PruneConfig, orders: list[str]) -> list[Cell]:
    """One cell per order, in out/<order dir>/ as run_compare lays them out, on out/task.json."""
    from ..algorithms.compare import order_dirname

    return [Cell(f"order={order_dirname(o)}", {**config.to_json(), "order": o, "curves": True},
                 dir=order_dirname(o), task_file="task.json", derived=True) for o in orders]


def compare_orders(config: PruneConfig, orders: list[str], out: str | Path, executor, log=print, force: bool = False):
    """run_compare with the orders' prunes spread over `executor`; returns the Comparison."""
    from ..algorithms.compare import compare_circuits
    from ..algorithms.orders import check_order
    from ..config import check_fits, evaluator, open_model, resolve_task
    from ..graphs.export import load_circuit
    from ..runs.commands import write_comparison
    from ..runs.store import saved_task, save_task

    config.check()
    orders = [PruneConfig(**{**config.to_json(), "order": check_order(o)}).check().order for o in orders]
    if len(orders) < 2 or len(set(orders)) != len(orders):
        raise ValueError(f"compare-orders needs at least two distinct orders, got {orders}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = open_model(config.model, log)
    task = resolve_task(config, model, saved_task(out))
    check_fits(model, task, log, force)
    save_task(out, task)
    cells = order_cells(config, orders)
    results = {}

    def on_result(r):
        results[r.name] = r
        for m in r.messages:  # the order's own notes and warnings
            log(f"  [{r.name}] {m}")
        what = (f"{r.heads} heads, {r.mlps} MLPs, {r.edges} edges, faithfulness {r.faithfulness:.3f}, "
                f"{r.forward_passes} forward passes" if r.status != "failed" else f"FAILED: {r.error}")
        log(f"  {r.name}: {what}")

    executor.run(out, cells, on_result, log=log)
    failed = [r for r in results.values() if r.status == "failed"]
    if failed:
        raise RuntimeError("; ".join(f"{r.name}: {r.error}" for r in failed) + f" (see {out}/logs/); the orders that "
                           "finished are kept: run the command again to retry the others")
    circuits = [load_circuit(out / c.dir / "circuit.json") for c in cells]
    cmp = compare_circuits(evaluator(config, model, task), circuits, orders)
    write_comparison(cmp, out, log)
    return cmp
