"""A prune run and its directory: task.json, decisions.jsonl, checkpoint.json, circuit.*, report.md.

Every decision is appended to decisions.jsonl as it is made and checkpoint.json is replaced
atomically as the run goes, so a killed run started again with the same --out replays its
decisions (removals applied without scoring, one forward pass per pass of the log) and ends in the
same circuit.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .io import atomic_write_text


CHECKPOINT_EVERY = 25


class RunDirError(ValueError):
    """The run directory cannot be used as asked (another run's settings, damaged files)."""


@dataclass
class PruneConfig:
    """Everything that determines a prune run's result."""

    model: str = "smollm2-135m"
    task: str = "digits"
    level: str = "both"
    ablation: str = "mean"
    metric: str = "logit_diff"
    absolute: float | None = 0.8
    relative: float | None = None
    on: str = "faithfulness"
    order: str = "alternate"
    max_passes: int = 10
    n_prompts: int = 24
    seed: int = 0
    template: int = 0
    corruption: str = "random"
    qkv: bool = True

    def to_json(self) -> dict:
        return dict(self.__dict__)


def read_decisions(path: Path) -> list[dict]:
    """Complete lines of a decision log; a line cut short by a kill is dropped (and rewritten)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


@dataclass
class DecisionLog:
    """Appends decisions to decisions.jsonl and refreshes checkpoint.json every few decisions."""

    out: Path
    config: dict
    n: int = 0
    phase: str = ""
    started: float = field(default_factory=time.time)
    meter: Callable[[], dict] | None = None  # this session's cost so far (forward passes, seconds)
    earlier: dict = field(default_factory=dict)  # cost of earlier sessions of this run, from the checkpoint

    def __post_init__(self):
        self._f = open(self.out / "decisions.jsonl", "a")

    def __call__(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        self.n += 1
        self.phase = record["phase"]
        if self.n % CHECKPOINT_EVERY == 0:
            os.fsync(self._f.fileno())
            self.checkpoint("running")

    def spent(self) -> dict:
        """Cost of the run over all its sessions: earlier ones (as last checkpointed) plus this one."""
        now = self.meter() if self.meter is not None else {}
        return {k: round(self.earlier.get(k, 0) + now.get(k, 0), 3) for k in {**self.earlier, **now}}

    def checkpoint(self, status: str, extra: dict | None = None) -> None:
        atomic_write_text(self.out / "checkpoint.json", json.dumps(
            {"schema": "circuitsearch.checkpoint/1", "status": status, "config": self.config,
             "decisions": self.n, "phase": self.phase, "version": __version__, "spent": self.spent(),
             **(extra or {})}, indent=1))

    def close(self) -> None:
        os.fsync(self._f.fileno())
        self._f.close()


def prepare(out: Path, config: PruneConfig) -> tuple[list[dict], bool, dict]:
    """Check `out` against `config`; return the decisions to replay, whether task.json exists and
    what earlier sessions spent."""
    out.mkdir(parents=True, exist_ok=True)
    ck = out / "checkpoint.json"
    old = {}
    if ck.exists():
        try:
            old = json.loads(ck.read_text())
        except json.JSONDecodeError:
            raise RunDirError(f"{ck} is damaged; remove the directory or choose another --out") from None
        if old.get("config") != config.to_json():
            diff = {k: (old.get("config", {}).get(k), v) for k, v in config.to_json().items()
                    if old.get("config", {}).get(k) != v}
            raise RunDirError(f"{out} holds a run with other settings ({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}); "
                              "choose another --out, or remove the directory to start again")
    elif (out / "decisions.jsonl").exists() or (out / "circuit.json").exists():
        raise RunDirError(f"{out} holds files of a run without a checkpoint; choose another --out or empty it")
    decisions = read_decisions(out / "decisions.jsonl")
    # keep only the complete prefix on disk, so the appended log stays one line per decision
    atomic_write_text(out / "decisions.jsonl", "".join(json.dumps(d) + "\n" for d in decisions))
    return decisions, (out / "task.json").exists(), dict(old.get("spent", {})) if decisions else {}


def resolve_task(config: PruneConfig, model, out: Path | None = None, task_file_exists: bool = False):
    """The task of a run: task.json of a resumed run, else a built-in, a JSONL file or a test task."""
    from .tasks.base import Task, TaskError

    if out is not None and task_file_exists:
        return Task.from_json(json.loads((out / "task.json").read_text()))
    name = config.task
    if name.endswith(".jsonl"):
        from .tasks.base import load_task
        if model.tokenizer is None:
            raise TaskError(f"model {model.name!r} has no tokenizer, so it cannot read text task files")
        return load_task(name, model.tokenizer)
    if name in ("planted", "induction"):
        from . import testing
        builder = testing.planted_task if name == "planted" else testing.induction_task
        return builder(n=config.n_prompts, seed=config.seed)
    if model.tokenizer is None:
        raise TaskError(f"task {name!r} is made of text, but model {model.name!r} has no tokenizer: "
                        "use --task planted or induction with test models")
    from .tasks import get_task
    return get_task(name, model.tokenizer, n=config.n_prompts, seed=config.seed, template=config.template,
                    corruption=config.corruption, model=model)


def circuit_from_result(ev, result, config: PruneConfig, final: float, stats: dict):
    """The Circuit of a finished prune: kept nodes and edges with the effects measured on them."""
    from .algorithms.iterative import edge_candidates
    from .graphs.circuit import Circuit

    kept = [n for n in ev.senders if n not in result.ablated] + ["logits"]
    nodes = {n: result.effects.get(n) for n in kept}
    edges = {} if config.level == "nodes" else {e: result.effects.get(e) for e in edge_candidates(ev, result.run)}
    method = {"level": config.level, "ablation": config.ablation, "metric": config.metric, "order": config.order,
              "thresholds": {"absolute": config.absolute, "relative": config.relative, "on": config.on},
              "max_passes": config.max_passes, "passes": result.passes, "seed": config.seed,
              "processing": ev.model.processing, "qkv": config.qkv,
              "gqa": (f"{ev.model.n_kv_heads} key/value heads shared by {ev.H // ev.model.n_kv_heads} query heads "
                      "each; every query head has its own k and v receivers" if ev.model.n_kv_heads != ev.H else None),
              "dangling_removed": result.dangling}
    return Circuit(model=ev.model.name, graph=ev.graph.signature(), task=ev.task.name, nodes=nodes, edges=edges,
                   scores=ev.scores(final), method=method, stats=stats,
                   meta={"n_prompts": len(ev.task), "task_meta": ev.task.meta, "model": ev.model.describe()})


def run_prune(config: PruneConfig, out: str | Path, progress: bool = True, log=print, stop_after: int | None = None,
              model=None, curves: bool = True):
    """Run (or resume) a prune into `out` and write the run directory; returns the Circuit.

    stop_after: stop after that many new decisions, as a kill would (used by the resume test).
    model: an already loaded model of config.model (saves the load when running several prunes).
    curves: also write faithfulness curves (removal order and EAP-IG rankings) into the report.
    """
    from .algorithms.iterative import Thresholds, find_circuit
    from .models import load_model
    from .patching import Evaluator

    thresholds = Thresholds(config.absolute, config.relative, config.on)  # reject bad thresholds before loading
    out = Path(out)
    decisions, have_task, earlier = prepare(out, config)
    t0 = time.time()
    model = model if model is not None else load_model(config.model)
    task = resolve_task(config, model, out, have_task)
    if not have_task:
        atomic_write_text(out / "task.json", json.dumps(task.to_json()))
    ev = Evaluator(model, task, config.ablation, config.metric, qkv=config.qkv)
    log(f"{model.name}: {model.n_layers} layers x {model.n_heads} heads; task {task.name}: {len(task)} prompts "
        f"of {task.seq_len} tokens{_kept_note(task)}; full {config.metric} {ev.full:.3f}, corrupted "
        f"{ev.corrupted:.3f}, empty circuit {ev.empty:.3f}")
    if decisions:
        log(f"resuming {out}: replaying {len(decisions)} decisions")
    dlog = DecisionLog(out, config.to_json(), n=len(decisions), earlier=earlier,
                       meter=lambda: {**ev.stats(), "seconds": time.time() - t0})
    hook = dlog
    if stop_after is not None:
        def hook(record, _n=[0]):
            dlog(record)
            _n[0] += 1
            if _n[0] >= stop_after:
                raise KeyboardInterrupt("stop_after")
    try:
        result = find_circuit(ev, config.level, thresholds, config.order, config.max_passes, decisions, hook,
                              progress=progress)
    except KeyboardInterrupt:
        dlog.checkpoint("interrupted")
        dlog.close()
        raise
    dlog.close()
    final = ev.score(nodes=result.ablated, edges=result.removed_edges)  # fresh re-score, no cached state
    stats = {**ev.stats(), "seconds": round(time.time() - t0, 2), "decisions": len(result.decisions),
             "replayed": len(decisions)}
    if decisions:  # a resumed run: what this session spent, and the whole run's cost as far as checkpointed
        stats["all_sessions"] = dlog.spent()
    circuit = circuit_from_result(ev, result, config, final, stats)
    made = write_curves(ev, result, circuit, out, log) if curves else None
    write_outputs(circuit, out, log, made)
    dlog.checkpoint("done", {"faithfulness": circuit.scores["faithfulness"]})
    return circuit


def write_curves(ev, result, circuit, out: Path, log=print) -> list | None:
    """curves.json and curves.png: faithfulness against % of edges kept, for the run's removal order
    and for the EAP-IG ranking of the full model (MIB's CPR and CMD)."""
    from .algorithms.attribution import attribute
    from .algorithms.curves import curves_json, faithfulness_curve, plot_curves, removal_ranking

    ranked = [(f"removal order ({circuit.method['order']})", removal_ranking(ev, result.decisions, circuit)),
              ("EAP-IG ranking", attribute(ev, method="eap-ig", steps=5).ranking("edges"))]
    made = [faithfulness_curve(ev, r, name) for name, r in ranked]
    atomic_write_text(out / "curves.json", json.dumps(curves_json(made), indent=1))
    try:
        plot_curves(made, out / "curves.png", f"{circuit.task} on {circuit.model}, {circuit.method['ablation']} ablation")
    except ImportError as e:  # matplotlib is a dependency; a broken install still leaves curves.json
        log(f"note: curves.png not drawn ({e})")
    return made


def _kept_note(task) -> str:
    m = task.meta
    return f" (kept {m['n_kept']} of {m['n_generated']} generated: the model answers them correctly)" \
        if "n_kept" in m and "n_generated" in m else ""


def _render_or_note(draw, obj, path: Path, log) -> str | None:
    """Draw `obj` to `path` and return its file name, or log why not (no Graphviz) and return None."""
    from .graphs.render import RenderError

    try:
        draw(obj, path)
        return path.name
    except RenderError as e:
        log(f"note: {e}")
        return None


def write_outputs(circuit, out: Path, log=print, curves: list | None = None) -> None:
    """circuit.json, circuit.dot, the diagram and report.md of a finished run."""
    from .graphs.export import save_circuit
    from .graphs.render import render

    save_circuit(circuit, out / "circuit.json")
    save_circuit(circuit, out / "circuit.dot")
    diagram = _render_or_note(render, circuit, out / "circuit.svg", log)
    atomic_write_text(out / "report.md", report(circuit, diagram, curves))


def report(circuit, diagram: str | None, curves: list | None = None) -> str:
    """report.md: what a person reads first."""
    s, m, st = circuit.scores, circuit.method, circuit.stats
    heads, mlps = circuit.heads(), circuit.mlps()
    lines = [f"# Circuit: {circuit.task} on {circuit.model}", "",
             f"{len(heads)} heads, {len(mlps)} MLPs, {circuit.n_edges} edges "
             f"(level {m['level']}, {m['ablation']} ablation, metric {m['metric']}, order {m['order']}, "
             f"thresholds {m['thresholds']}).", "",
             "| score | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in s.items()]
    lines += ["", f"Forward passes: {st.get('forward_passes')} ({st.get('forward_equivalents')} full-forward "
              f"equivalents), {st.get('seconds')} s, {st.get('decisions')} decisions.", ""]
    if st.get("all_sessions"):
        a = st["all_sessions"]
        lines[-1:-1] = [f"Resumed run: {st.get('replayed')} decisions replayed. Over all its sessions (as far as "
                        f"checkpointed): {a.get('forward_passes')} forward passes ({a.get('forward_equivalents')} "
                        f"full-forward equivalents), {round(a.get('seconds', 0), 1)} s."]
    if diagram:
        lines += [f"![circuit]({diagram})", ""]
    if curves:
        lines += ["## Faithfulness curves", "",
                  "Normalized faithfulness (MIB) when only the top k % of the model's "
                  f"{curves[0].n_edges} edges by a ranking are kept; CPR = area under the curve (higher is "
                  "better), CMD = area under |1 − f| (lower is better).", "",
                  "| ranking | " + " | ".join(f"{p:g} %" for p in curves[0].percentages) + " | CPR | CMD |",
                  "|---|" + "---|" * (len(curves[0].percentages) + 2)]
        lines += [f"| {c.name} | " + " | ".join(f"{f:.3f}" for f in c.faithfulness) + f" | {c.cpr:.3f} | {c.cmd:.3f} |"
                  for c in curves]
        lines += ["", "![faithfulness curves](curves.png)", ""]
    ranked = sorted(((n, e) for n, e in circuit.nodes.items() if e is not None), key=lambda x: -x[1])
    if ranked:
        lines += ["## Most important nodes", "", "Faithfulness lost when the node was last tried for removal.", "",
                  "| node | effect |", "|---|---|"] + [f"| {n} | {e:.4f} |" for n, e in ranked[:15]] + [""]
    lines += ["## Nodes", "", ", ".join(circuit.nodes), "",
              "Files: task.json (prompts), circuit.json (the circuit, schema circuitsearch.circuit/1), "
              "decisions.jsonl (every candidate tried), circuit.dot / circuit.svg (diagram)"
              + (", curves.json / curves.png (faithfulness curves)" if curves else "") + ".", ""]
    return "\n".join(lines)


def run_targets(config: PruneConfig, targets, out: str | Path, method: str = "eap-ig", steps: int = 5,
                progress: bool = True, log=print, patience: int | None = 30) -> list:
    """Nested circuits for each target into out/target-T/ (a run directory each) plus targets.json.

    A killed run resumes after the last target whose circuit.json was written.
    """
    from .algorithms.iterative import PruneResult
    from .algorithms.target import parse_targets, prune_to_targets
    from .evaluation import circuit_state
    from .graphs.export import load_circuit
    from .models import load_model
    from .patching import Evaluator

    targets = parse_targets(targets)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**config.to_json(), "order": "attribution", "targets": targets, "attribution": method, "steps": steps,
           "patience": patience}
    ck = out / "checkpoint.json"
    if ck.exists():
        try:
            old = json.loads(ck.read_text()).get("config")
        except json.JSONDecodeError:
            raise RunDirError(f"{ck} is damaged; remove the directory or choose another --out") from None
        if old != cfg:
            raise RunDirError(f"{out} holds a run with other settings; choose another --out, or remove it to start again")
    elif any(out.iterdir()):
        raise RunDirError(f"{out} is not empty and holds no target run; choose another --out or empty it")
    atomic_write_text(ck, json.dumps({"schema": "circuitsearch.checkpoint/1", "status": "running", "config": cfg}))
    t0 = time.time()
    model = load_model(config.model)
    have_task = (out / "task.json").exists()
    task = resolve_task(config, model, out, have_task)
    if not have_task:
        atomic_write_text(out / "task.json", json.dumps(task.to_json()))
    ev = Evaluator(model, task, config.ablation, config.metric, qkv=config.qkv)
    log(f"{model.name}: {model.n_layers} layers x {model.n_heads} heads; task {task.name}: {len(task)} prompts; "
        f"full {config.metric} {ev.full:.3f}, empty circuit {ev.empty:.3f}; targets {', '.join(map(str, targets))}")
    rows, start, todo = [], None, list(targets)
    for t in targets:
        path = out / f"target-{t}" / "circuit.json"
        if not path.exists():
            break
        c = load_circuit(path)
        nodes, edges = circuit_state(ev, c)
        start = ev.run(nodes, edges)
        rows.append({**c.method.get("target_search", {}), "resumed": True})
        todo.remove(t)
        log(f"target {t}: resumed from {path}")
    tconf = PruneConfig(**{**config.to_json(), "order": "attribution"})

    def write(step):
        sub = out / f"target-{step.target}"
        sub.mkdir(exist_ok=True)
        atomic_write_text(sub / "task.json", (out / "task.json").read_text())
        final = ev.score(nodes=step.result.run.nodes, edges=step.result.run.edges)
        stats = {**ev.stats(), "seconds": round(time.time() - t0, 2), "target_forward_passes": step.forward_passes,
                 "target_backward_passes": step.backward_passes}
        c = circuit_from_result(ev, step.result, tconf, final, stats)
        summary = step.summary(ev)
        c.method.update(target=step.target, attribution=method, steps=steps, target_search=summary)
        write_outputs(c, sub, log)
        rows.append(summary)

    if todo:
        prune_to_targets(ev, todo, config.level, method, steps, progress=progress, start=start, patience=patience,
                         on_target=write)
    summary = {"schema": "circuitsearch.targets/1", "config": cfg, "targets": rows,
               "stats": {**ev.stats(), "seconds": round(time.time() - t0, 2)}}
    atomic_write_text(out / "targets.json", json.dumps(summary, indent=1))
    atomic_write_text(out / "report.md", targets_report(summary))
    atomic_write_text(ck, json.dumps({"schema": "circuitsearch.checkpoint/1", "status": "done", "config": cfg}))
    return rows


def targets_report(summary: dict) -> str:
    """report.md of a target run: one row per target, links to each circuit's own report."""
    c = summary["config"]
    lines = [f"# Circuits at target performances: {c['task']} on {c['model']}", "",
             f"Nested: each circuit is pruned from the one above it. Level {c['level']}, {c['ablation']} ablation, "
             f"metric {c['metric']}; search: {c['attribution']} ranking, bisection rounds (re-attributing each "
             f"smaller circuit), then one galloping refinement pass that stops after {c.get('patience') or 'no'} "
             "candidates kept in a row. Effects of candidates the refinement never scored alone are "
             "attribution estimates.", "",
             "| target | heads | MLPs | edges | verified faithfulness | forward passes | backward passes | circuit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["targets"]:
        t = r.get("target")
        lines.append(f"| {t} | {r.get('heads')} | {r.get('mlps')} | {r.get('edges')} | "
                     f"{r.get('faithfulness', float('nan')):.4f} | {r.get('forward_passes')} | "
                     f"{r.get('backward_passes')} | [target-{t}](target-{t}/report.md) |")
    st = summary["stats"]
    lines += ["", f"All targets: {st.get('forward_passes')} forward passes, {st.get('backward_passes', 0)} backward "
              f"passes, {st.get('seconds')} s.", ""]
    return "\n".join(lines)


def run_compare(config: PruneConfig, orders: list[str], out: str | Path, progress: bool = True, log=print):
    """Prune with each order into out/<order>/ (each a resumable run directory, all on the same
    prompts), then compare: comparison.json, comparison.svg and report.md in `out`."""
    from .algorithms.compare import compare_circuits, order_dirname, render_comparison
    from .algorithms.iterative import Thresholds
    from .algorithms.orders import check_order
    from .models import load_model
    from .patching import Evaluator

    Thresholds(config.absolute, config.relative, config.on)  # reject bad thresholds before loading
    orders = [check_order(o) for o in orders]
    if len(orders) < 2 or len(set(orders)) != len(orders):
        raise ValueError(f"compare-orders needs at least two distinct orders, got {orders}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(config.model)
    have_task = (out / "task.json").exists()
    task = resolve_task(config, model, out, have_task)
    task_text = json.dumps(task.to_json())
    if not have_task:
        atomic_write_text(out / "task.json", task_text)
    circuits = []
    for i, order in enumerate(orders):
        sub = out / order_dirname(order)
        sub.mkdir(exist_ok=True)
        if not (sub / "task.json").exists():
            atomic_write_text(sub / "task.json", task_text)
        log(f"[{i + 1}/{len(orders)}] order {order} -> {sub}")
        cfg = PruneConfig(**{**config.to_json(), "order": order})
        circuits.append(run_prune(cfg, sub, progress=progress, log=lambda *a: None, model=model))
        c = circuits[-1]
        log(f"  {len(c.heads())} heads, {len(c.mlps())} MLPs, {c.n_edges} edges, faithfulness "
            f"{c.scores['faithfulness']:.3f}, {c.stats.get('forward_passes')} forward passes")
    ev = Evaluator(model, task, config.ablation, config.metric, qkv=config.qkv)
    cmp = compare_circuits(ev, circuits, orders)
    atomic_write_text(out / "comparison.json", json.dumps(cmp.to_json(), indent=1))
    diagram = _render_or_note(render_comparison, cmp, out / "comparison.svg", log)
    atomic_write_text(out / "report.md", comparison_report(cmp, diagram))
    return cmp


def comparison_report(cmp, diagram: str | None) -> str:
    """report.md of compare-orders: the terminal table, the shaded diagram, links to each order's run."""
    from .algorithms.compare import format_comparison, order_dirname

    lines = [f"# Removal orders compared: {cmp.circuits[0].task} on {cmp.diff.model}", "", "```",
             format_comparison(cmp).rstrip(), "```", ""]
    if diagram:
        lines += [f"![orders]({diagram})", ""]
    lines += ["Each order's run: " + ", ".join(f"[{o}]({order_dirname(o)}/report.md)" for o in cmp.orders), "",
              "comparison.json holds per-node and per-edge counts, the Jaccard matrices, and the intersection "
              "and union circuits with their verified scores.", ""]
    return "\n".join(lines)
