"""`circuitsearch stability`: would other prompts give the same circuit? B prunes on resampled prompt
sets, each a sweep cell (an ordinary, resumable run directory) on the sweep executors, then how often
each node and edge is kept, each resample's Jaccard to the full-data circuit, and every circuit
scored on held-out prompts none of them was pruned on.

OUT/settings.json    what the directory holds (a run of other settings is refused)
OUT/tasks/           pool.json (the prompts made once), train.json, heldout.json, one file per resample
OUT/sweep/           the sweep: cells/full/ (train.json) and cells/boot-I/ (or seed-I/), sweep.json, logs/
OUT/stability.json   frequencies, Jaccard and held-out scores; OUT/report.md and plots/ the same for people
OUT/stability.html   the interactive page: the full-data circuit shaded by node and edge frequency

Resamples: `bootstrap` draws len(train) prompts from train with replacement (draw I seeded by the
task seed and I); `seeds` makes the task anew with seed + I (built-in and toy tasks). Run again, the
finished cells are skipped and interrupted ones resume; a larger --bootstrap adds resamples.
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from ..config import PruneConfig
from ..io import atomic_write_text
from .spec import Cell, SweepSpec

STABILITY_SCHEMA = "circuitsearch.stability/1"
RESAMPLES = ("bootstrap", "seeds")


def check_settings(bootstrap: int, holdout: int | None, resample: str, config: PruneConfig) -> None:
    """Everything stability can refuse before anything loads; each message names the fix."""
    from ..config import task_kind

    for flag, v in (("bootstrap", bootstrap), ("holdout", holdout)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"--{flag} {v!r}: give a whole number of at least 1 (e.g. --{flag} 10)")
    if resample not in RESAMPLES:
        raise ValueError(f"--resample {resample!r}: choose bootstrap (prompts drawn again from the same set) or "
                         "seeds (the task made anew with other seeds)")
    if resample == "seeds" and task_kind(config.task) == "file":
        raise ValueError(f"--resample seeds makes the task anew with other seeds, and the task file {config.task!r} "
                         "holds fixed prompts: use --resample bootstrap")
    if config.order == "target":
        raise ValueError("stability runs iterative prunes; a target search is `prune --target`")


def bootstrap_indices(n: int, draw: int, seed: int) -> list[int]:
    """Draw `draw` of n prompts with replacement, the same for the same (n, draw, seed)."""
    rng = random.Random(f"bootstrap:{seed}:{draw}")
    return [rng.randrange(n) for _ in range(n)]


def held_out(config: PruneConfig, holdout: int | None, n: int) -> int:
    """How many of the pool's n prompts are held out: --holdout, else as many as --n-prompts (a task file:
    a third of it), never more than the pool."""
    from ..config import task_kind

    default = max(1, n // 3) if task_kind(config.task) == "file" else config.n_prompts
    return min(holdout or default, n)


def task_file(name: str) -> str:
    """A cell's prompts, relative to the tasks/ directory: the full-data cell prunes train.json."""
    return "train.json" if name == "full" else f"{name}.json"


def _load_or_write(path: Path, make):
    """The task saved at `path`, else make() saved there (a resumed directory uses the exact prompts)."""
    from ..tasks.base import Task

    if path.exists():
        return Task.from_json(json.loads(path.read_text()))
    task = make()
    atomic_write_text(path, json.dumps(task.to_json()))
    return task


def prepare_tasks(out: Path, config: PruneConfig, bootstrap: int, holdout: int | None, resample: str, model,
                  log=print) -> tuple[list[str], dict]:
    """tasks/*.json of the directory: pool (made once: the task with --n-prompts + held-out prompts, or the
    task file), train (its first prompts), heldout (its last) and one per resample; returns the cell names
    (full first) and what the split holds."""
    from ..config import check_fits, resolve_task, task_kind

    tasks = out / "tasks"
    tasks.mkdir(exist_ok=True)
    extra = 0 if task_kind(config.task) == "file" else (holdout or config.n_prompts)
    pool = _load_or_write(tasks / "pool.json",
                          lambda: resolve_task(replace(config, n_prompts=config.n_prompts + extra), model))
    h = held_out(config, holdout, len(pool))
    n_train = len(pool) - h
    if n_train < 2:
        raise ValueError(f"the task has {len(pool)} prompts, {h} of them held out, which leaves {n_train} to prune "
                         "on: give more prompts (--n-prompts, a longer task file) or a smaller --holdout")
    train = _load_or_write(tasks / "train.json", lambda: pool.subset(range(n_train)))
    held = _load_or_write(tasks / "heldout.json", lambda: pool.subset(range(n_train, len(pool))))
    check_fits(model, train, log)
    names = ["full"]
    for i in range(1, bootstrap + 1):
        name = f"{'boot' if resample == 'bootstrap' else 'seed'}-{i}"
        if resample == "bootstrap":
            def make(i=i):
                idx = bootstrap_indices(len(train), i, config.seed)
                t = train.subset(idx)
                t.meta = {**t.meta, "resample": {"kind": "bootstrap", "draw": i, "prompts": idx}}
                return t
        else:
            def make(i=i):
                t = resolve_task(replace(config, seed=config.seed + i, n_prompts=len(train)), model)
                t.meta = {**t.meta, "resample": {"kind": "seeds", "seed": config.seed + i}}
                return t
        _load_or_write(tasks / task_file(name), make)
        names.append(name)
    seen = {tuple(r) for r in train.clean.tolist()}
    return names, {"pool": len(pool), "train": len(train), "heldout": len(held),
                   "heldout_seen_in_train": sum(tuple(r) in seen for r in held.clean.tolist())}


def stability_cells(config: PruneConfig, names: list[str], resample: str) -> list[Cell]:
    """A sweep cell per prune: settings the config's (a seeds resample its own seed), prompts its task file."""
    cells = []
    for name in names:
        settings = {**config.to_json(), "curves": False}
        if resample == "seeds" and name != "full":
            settings["seed"] = config.seed + int(name.split("-")[1])
        cells.append(Cell(name, settings, task_file=f"../tasks/{task_file(name)}", derived=True))
    return cells


def _settings(config: PruneConfig, holdout: int | None, resample: str) -> dict:
    """What a stability directory holds, and must hold when resumed (the number of resamples may change)."""
    return {**config.to_json(), "holdout": holdout, "resample": resample}


def _claim(out: Path, settings: dict) -> None:
    """settings.json of `out` (locked): a directory of other settings is refused once a prune has started in it;
    before that (a start that failed while making its prompts) it holds nothing of value and is cleared."""
    import shutil

    from ..runs.store import check_settings as same_settings

    path = out / "settings.json"
    old = json.loads(path.read_text()) if path.exists() else None
    started = (out / "sweep").exists()
    if old is None and (started or any(p.name not in (".lock", "tasks") for p in out.iterdir())):
        raise ValueError(f"{out} is not empty and holds no stability run; choose another --out or empty it")
    if old != settings:
        if started:
            same_settings(out, settings, {"config": old})
        shutil.rmtree(out / "tasks", ignore_errors=True)
    atomic_write_text(path, json.dumps(settings, indent=1))


def run_stability(config: PruneConfig, out: str | Path, bootstrap: int = 10, executor=None, holdout: int | None = None,
                  resample: str = "bootstrap", log=print, model=None) -> dict:
    """Prune the full prompt set and `bootstrap` resamples of it on `executor` (default: local workers), score
    every circuit on the held-out prompts, and write stability.json, report.md and plots/; returns the summary."""
    from ..config import open_model
    from ..engine import choose_threads
    from ..runs.store import open_dir
    from .cells import keep_model
    from .executors import LocalExecutor
    from .run import run_sweep

    config.check()
    check_settings(bootstrap, holdout, resample, config)
    config = config.resolve_order()[0]  # every cell the same order, recorded
    out = Path(out)
    with open_dir(out):
        settings = _settings(config, holdout, resample)
        _claim(out, settings)
        model = model if model is not None else open_model(config.model, log)
        choose_threads(model, config.threads)
        names, split = prepare_tasks(out, config, bootstrap, holdout, resample, model, log)
        cells = stability_cells(config, names, resample)
        spec = SweepSpec({**settings, "bootstrap": bootstrap}, {}, [], cells,
                         source=f"stability of {config.task} on {config.model}")
        keep_model(config.model, model)  # cells run in this process (--workers 0) use it
        sweep = run_sweep(spec, out / "sweep", executor or LocalExecutor(), log=log, ranking=False)
        failed = [r for r in sweep["cells"] if r["status"] == "failed"]
        if failed:
            raise RuntimeError("; ".join(f"{r['name']}: {r['error']}" for r in failed) + f" (see {out}/sweep/logs/); "
                               "the finished prunes are kept: run the command again to retry the others")
        summary = summarize(out, names, split, settings, bootstrap, model, log)
        summary["sweep"] = {"wall_seconds": sweep["wall_seconds"], "counts": sweep["counts"],
                            "executor": sweep["executor"]}
        atomic_write_text(out / "stability.json", json.dumps(summary, indent=1))
        write_reports(out, summary, log)
    return summary


def summarize(out: Path, names: list[str], split: dict, settings: dict, bootstrap: int, model, log=print) -> dict:
    """Frequencies, Jaccard to the full-data circuit and held-out scores of the finished cells."""
    from ..evaluation import cross_task
    from ..graphs.diff import diff_circuits
    from ..graphs.export import load_circuit

    dirs = [out / "sweep" / "cells" / n for n in names]
    circuits = [load_circuit(d / "circuit.json") for d in dirs]
    diff = diff_circuits(circuits, names)
    jac_nodes, jac_edges = diff.jaccard("nodes")[0], diff.jaccard("edges")[0]
    held = cross_task(dirs, [str((out / "tasks" / "heldout.json").resolve())], model=model, log=lambda *a: None)
    resamples = names[1:]

    def frequency(sets: dict, inner: bool) -> dict:
        rows = {}
        for x, holders in sets.items():
            if inner and x in ("embed", "tok", "pos", "logits"):
                continue
            rows[x] = {"frequency": sum(n in holders for n in resamples) / len(resamples), "in_full": "full" in holders}
        return dict(sorted(rows.items(), key=lambda kv: (-kv[1]["frequency"], not kv[1]["in_full"])))

    rows = []
    for i, (name, c) in enumerate(zip(names, circuits)):
        h = held.scores[i][0]
        rows.append({"name": name, "heads": len(c.heads()), "mlps": len(c.mlps()), "edges": c.n_edges,
                     "faithfulness": c.scores.get("faithfulness"), "heldout_faithfulness": h["faithfulness"],
                     "heldout_normalized": h["normalized"], "jaccard_nodes": jac_nodes[i], "jaccard_edges": jac_edges[i],
                     **_prompt_counts(out / "tasks" / task_file(name)),
                     **({"meaningless": h["meaningless"]} if h.get("meaningless") else {})})
    nodes, edges = frequency(diff.node_sets, True), frequency(diff.edge_sets, False)
    full = set(circuits[0].heads() + circuits[0].mlps())
    mean = lambda xs: sum(xs) / len(xs)
    return {"schema": STABILITY_SCHEMA, "settings": settings, "resample": settings["resample"],
            "bootstrap": bootstrap, "model": circuits[0].model, "task": circuits[0].task, "split": split,
            "circuits": rows, "nodes": nodes, "edges": edges,
            "kept_in_every_resample": {"nodes": [n for n, r in nodes.items() if r["frequency"] == 1],
                                       "edges": [e for e, r in edges.items() if r["frequency"] == 1]},
            "full_nodes_in_every_resample": sorted(n for n in full if nodes[n]["frequency"] == 1),
            "mean": {k: mean([r[k] for r in rows[1:]]) for k in
                     ("jaccard_nodes", "jaccard_edges", "faithfulness", "heldout_faithfulness")}}


def _prompt_counts(path: Path) -> dict:
    """How many prompts a cell pruned on, and how many of them differ (a bootstrap draw repeats some)."""
    rows = json.loads(path.read_text())["clean"]
    return {"prompts": len(rows), "distinct": len({tuple(r) for r in rows})}


def format_stability(summary: dict) -> str:
    """The terminal table: one row per circuit, then what every resample keeps and the frequencies."""
    s = summary["split"]
    out = [f"stability of {summary['task']} on {summary['model']}: the full prompt set ({s['train']} prompts) and "
           f"{summary['bootstrap']} {summary['resample']} resamples; held out: {s['heldout']} prompts"
           + (f" ({s['heldout_seen_in_train']} of them repeat a training prompt)" if s["heldout_seen_in_train"]
              else ""),
           f"{'circuit':>8} {'heads':>5} {'MLPs':>4} {'edges':>5} {'faithfulness':>12} {'held-out':>8} "
           f"{'Jaccard nodes':>13} {'Jaccard edges':>13}"]
    for r in summary["circuits"]:
        out.append(f"{r['name']:>8} {r['heads']:>5} {r['mlps']:>4} {r['edges']:>5} {r['faithfulness']:>12.3f} "
                   f"{r['heldout_faithfulness']:>8.3f}{'*' if r.get('meaningless') else ' '}"
                   f"{r['jaccard_nodes']:>12.3f} {r['jaccard_edges']:>13.3f}")
    m = summary["mean"]
    out.append(f"{'mean':>8} {'':>5} {'':>4} {'':>5} {m['faithfulness']:>12.3f} {m['heldout_faithfulness']:>8.3f} "
               f"{m['jaccard_nodes']:>12.3f} {m['jaccard_edges']:>13.3f}  (over the resamples)")
    k = summary["kept_in_every_resample"]
    out.append(f"kept in every resample: {len(k['nodes'])} heads and MLPs ({', '.join(k['nodes']) or 'none'}), "
               f"{len(k['edges'])} edges")
    freq = [f"{n} {r['frequency']:.2f}{'' if r['in_full'] else ' (not in full)'}"
            for n, r in list(summary["nodes"].items())[:25]]
    out.append("node frequency over the resamples: " + ", ".join(freq))
    return "\n".join(out) + "\n"


def write_reports(out: Path, summary: dict, log=print) -> None:
    """OUT/report.md and plots/frequency.png, and a section in the full-data run's own report.md."""
    from ..runs.reports import stability_section, with_section
    from .report import plot_frequency

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    image = None
    counts = {n: round(r["frequency"] * summary["bootstrap"]) for n, r in summary["nodes"].items()}
    try:
        if plot_frequency(counts, summary["bootstrap"], plots / "frequency.png"):
            image = "plots/frequency.png"
    except (ImportError, OSError) as e:
        log(f"note: plots/frequency.png not drawn ({e})")
    page = write_stability_page(out, log)
    atomic_write_text(out / "report.md", f"# Stability: {summary['task']} on {summary['model']}\n\n"
                      + stability_section(summary, image, "sweep/cells/", page))
    full = out / "sweep" / "cells" / "full" / "report.md"
    if full.exists():
        section = stability_section(summary, f"../../../{image}" if image else None, "../",
                                    f"../../../{page}" if page else None)
        atomic_write_text(full, with_section(full.read_text(), "stability", section))


def write_stability_page(out: Path, log=print) -> str | None:
    """OUT/stability.html (the full-data circuit shaded by frequency, then every cell's circuit); its name relative
    to OUT, or None, said, where it cannot be made."""
    from ..graphs.page import PageError
    from ..runs.view import write_view

    try:
        write_view(out, out / "stability.html")
    except (PageError, OSError) as e:
        log(f"note: stability.html not written ({e})")
        return None
    return "stability.html"
