"""The model's graph and circuits on it: Circuit, its files, diagrams and diffs (no torch needed)."""
from .circuit import Circuit, CircuitFormatError
from .diff import Diff, diff_circuits, format_table, render_overlay
from .export import load_circuit, save_circuit
from .model_graph import ModelGraph
from .render import RenderError, render

__all__ = ["Circuit", "CircuitFormatError", "Diff", "diff_circuits", "format_table", "render_overlay",
           "load_circuit", "save_circuit", "ModelGraph", "RenderError", "render"]
