"""circuitsearch: find the circuit a transformer uses for a task, by pruning its graph."""
__version__ = "0.1.0"
