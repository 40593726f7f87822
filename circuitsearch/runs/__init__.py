"""Run directories: persistence (store), the command drivers (commands) and their reports.

Only the command line imports this package; everything it needs lies below it.
"""
from ..config import PruneConfig
from .commands import circuit_from_result, run_compare, run_prune, run_targets, write_outputs
from .store import DecisionLog, RunDirError, read_decisions

__all__ = ["PruneConfig", "circuit_from_result", "run_compare", "run_prune", "run_targets", "write_outputs",
           "DecisionLog", "RunDirError", "read_decisions"]
