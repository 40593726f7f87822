"""circuitsearch: find the circuit a transformer uses for a task, by pruning its graph.

The public API is re-exported here lazily, so `import circuitsearch` (and the command line's
listings) stay instant: torch and TransformerLens load on first use of a name that needs them.
"""
__version__ = "0.1.0"

_API = {
    "load_model": "catalogue", "Model": "models", "get_task": "tasks", "load_task": "tasks", "Task": "tasks",
    "Evaluator": "patching",
    "Thresholds": "algorithms.iterative", "prune": "algorithms.iterative", "find_circuit": "algorithms.iterative",
    "attribute": "algorithms.attribution", "prune_to_targets": "algorithms.target",
    "compare_circuits": "algorithms.compare", "faithfulness_curve": "algorithms.curves",
    "Circuit": "graphs.circuit", "load_circuit": "graphs.export", "save_circuit": "graphs.export",
    "render": "graphs.render", "diff_circuits": "graphs.diff",
    "cross_task": "evaluation", "load_run": "evaluation", "score_on": "evaluation",
    "PruneConfig": "config", "run_prune": "runs", "run_targets": "runs", "run_compare": "runs",
}
__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        import importlib
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'circuitsearch' has no attribute {name!r}")
