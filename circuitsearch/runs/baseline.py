"""`circuitsearch baseline RUN`: the run's circuit against random circuits of its exact sizes, scored on
the run's own prompts with its ablation and metric; baseline.json, baseline.png and a section of
report.md in the run directory (sampling and statistics: circuitsearch.baselines).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .. import __version__
from ..baselines import (BaselineError, as_circuit, distribution, format_table, on_paths, random_circuits,
                         score_draws, sizes_of)
from ..io import atomic_write_bytes, atomic_write_text
from .reports import baseline_section, with_section

BASELINE_SCHEMA = "circuitsearch.baseline/1"
MISMATCH = 1e-4  # the run's circuit re-scored here differs from its circuit.json by more: said


def finished_run(path: str | Path) -> Path:
    """The run directory `path` names (or holds circuit.json), when it holds a finished circuit; else a
    BaselineError naming the fix."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise BaselineError(f"{path}: no such run directory; give the --out directory of a finished "
                            "`circuitsearch prune`")
    if not (path / "circuit.json").exists():
        ck = path / "checkpoint.json"
        if ck.exists():
            raise BaselineError(f"{path} holds a prune that has not finished (no circuit.json yet): run its prune "
                                f"command again with --out {path} to finish it, then run baseline on it")
        raise BaselineError(f"{path} holds no circuit.json: give the directory of a finished prune run "
                            f"(`circuitsearch prune ... --out {path}`)")
    if not (path / "task.json").exists():
        raise BaselineError(f"{path} holds no task.json, so the run's own prompts are unknown; prune again into a "
                            "fresh --out")
    return path


def run_baseline(run_dir: str | Path, n: int = 200, connected: bool = False, seed: int = 0, batch: int = 1,
                 log=print, model=None) -> dict:
    """Score `n` random circuits of the run's sizes (connected: every node on a path from the embedding to the
    logits) and the run's own circuit on its prompts, `batch` random circuits per extend_many pass (1 by default:
    stacking circuits that differ everywhere costs more than it saves on a CPU); write baseline.json, baseline.png and the report
    section; return baseline.json's content. Everything that can be refused is refused before the model loads."""
    from ..config import open_model
    from ..engine import choose_threads
    from ..evaluation import load_run, own_evaluator

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise BaselineError(f"--batch {batch!r}: give the number of circuits per forward pass, at least 1")
    path = finished_run(run_dir)
    run = load_run(path)
    circuit = run.circuit
    sizes = sizes_of(circuit)
    t0 = time.time()
    draws = random_circuits(circuit.model_graph, sizes, n, seed, connected)
    graph = circuit.model_graph
    if connected:  # never silently wrong: the construction is checked on every draw
        for d in draws:
            if on_paths(graph, d.nodes, d.edges) != set(d.nodes):
                raise RuntimeError(f"a connected random circuit has nodes off every path: {d} (a bug: report it)")
    drawn = time.time() - t0
    model = model if model is not None else open_model(circuit.model, log)
    choose_threads(model, None)
    ev = own_evaluator(run, model, log)
    before = ev.forward_passes, ev.batched_passes
    t1 = time.time()
    own = ev.score_circuit(circuit)
    recorded = circuit.scores.get("faithfulness")
    if isinstance(recorded, (int, float)) and abs(own["faithfulness"] - recorded) > MISMATCH:
        log(f"warning: the run's circuit scores faithfulness {own['faithfulness']:.5f} here, {recorded:.5f} in its "
            "circuit.json; the baseline compares with the score computed here")
    randoms = [as_circuit(d, circuit, f"random:{seed}:{i}") for i, d in enumerate(draws)]
    scores = score_draws(ev, randoms, batch)
    seconds = time.time() - t1
    faith = [ev.faithfulness(s) for s in scores]
    norm = [ev.normalized(s) for s in scores]
    summary = {
        "schema": BASELINE_SCHEMA, "run": str(path), "model": circuit.model, "task": circuit.task,
        "prompts": len(run.task), "ablation": circuit.method.get("ablation"), "metric": circuit.method.get("metric"),
        "sizes": {"heads": sizes.heads, "mlps": sizes.mlps, "edges": sizes.edges, "embed": list(sizes.embed)},
        "settings": {"random": n, "connected": connected, "seed": seed, "batch": batch},
        "run_scores": {**own, "recorded_faithfulness": recorded, "empty_faithfulness": ev.faithfulness(ev.empty),
                       "on_paths": on_paths(graph, circuit.nodes, circuit.effective_edges()) == set(circuit.nodes)},
        "faithfulness": distribution(faith, own["faithfulness"]),
        "normalized": distribution(norm, own["normalized"]),
        "stats": {"forward_passes": ev.forward_passes - before[0], "batched_passes": ev.batched_passes - before[1],
                  "scoring_seconds": round(seconds, 2),
                  "drawing_seconds": round(drawn, 2), "engine": getattr(ev, "path", "fast")},
        "circuits": [{"nodes": list(d.nodes), "edges": None if d.edges is None else list(d.edges), "score": s,
                      "faithfulness": f, "normalized": m} for d, s, f, m in zip(draws, scores, faith, norm)],
        "version": __version__,
    }
    atomic_write_text(path / "baseline.json", json.dumps(summary, indent=1))
    image = None
    try:
        image = plot_baseline(summary, path / "baseline.png").name
    except (ImportError, OSError) as e:
        log(f"note: baseline.png not drawn ({e}); the figures are in {path / 'baseline.json'}")
    report = path / "report.md"
    old = report.read_text() if report.exists() else ""
    atomic_write_text(report, with_section(old, "baseline", baseline_section(summary, image)))
    return summary


def describe(summary: dict) -> str:
    """The first line of the terminal table: what was drawn and scored on what."""
    s, st = summary["settings"], summary["sizes"]
    edges = "every edge among them" if st["edges"] is None else f"{st['edges']} edges"
    return (f"{s['random']} random{' connected' if s['connected'] else ''} circuits of {st['heads']} heads, "
            f"{st['mlps']} MLPs, {edges} (seed {s['seed']}), on the run's {summary['prompts']} prompts "
            f"({summary['ablation']} ablation, {summary['metric']})")


def table(summary: dict) -> str:
    return describe(summary) + "\n" + format_table({k: summary[k] for k in ("faithfulness", "normalized")})


def plot_baseline(summary: dict, path: Path) -> Path:
    """Histogram of the random circuits' faithfulness with the run's marked (PNG, written atomically)."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = summary["faithfulness"]
    values = [c["faithfulness"] for c in summary["circuits"]]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.hist(values, bins=min(40, max(5, len(values) // 5)), color="#8aa9c8", edgecolor="#4a6f94")
    z = "" if d["z"] is None else f", z = {d['z']:.1f}"
    ax.axvline(d["run"], color="#c0392b", lw=2, label=f"the run: {d['run']:.3f} (percentile {d['percentile']:.1f}{z})")
    empty = summary["run_scores"].get("empty_faithfulness")
    if empty is not None:
        ax.axvline(empty, color="#555555", lw=1, ls=":", label=f"the empty circuit: {empty:.3f}")
    lo, hi = min(values + [d["run"]] + ([empty] if empty is not None else [])), max(values + [d["run"]])
    pad = 0.05 * (hi - lo or 1.0)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("faithfulness (circuit / full)")
    ax.set_ylabel("random circuits")
    ax.set_title(f"{summary['task']} on {summary['model']}: " + describe(summary).split(" (seed")[0], fontsize=8)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
