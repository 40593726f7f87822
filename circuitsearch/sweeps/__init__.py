"""Sweeps over settings (models x tasks x orders x thresholds x ablations ...), each cell an
ordinary run directory, on this machine's cores or a Ray cluster; summary, report and ROC.

spec.py (the TOML file, cells), cells.py (one cell in a worker), executors.py (local, Ray),
run.py (the driver), report.py (report.md and plots), roc.py (against a known circuit).
"""
from .cells import CellResult, run_cell
from .executors import InlineExecutor, LocalExecutor, RayExecutor, plan_workers
from .run import run_sweep
from .spec import Cell, SpecError, SweepSpec, load_spec, parse_spec

__all__ = ["Cell", "CellResult", "InlineExecutor", "LocalExecutor", "RayExecutor", "SpecError", "SweepSpec", "load_spec",
           "parse_spec", "plan_workers", "run_cell", "run_sweep"]
