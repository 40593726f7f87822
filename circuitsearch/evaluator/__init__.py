"""The evaluator's rooms: state, layout, ablation sources, the stacked forward, edge sums, readout, the relaxed forward."""
