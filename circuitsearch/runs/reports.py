"""report.md of each command: what a person reads first. Plain text builders, no I/O."""
from __future__ import annotations


ABOVE_ONE = ("Faithfulness above 1: the circuit scores higher than the full model. Some of the components it "
             "ablates were working against the answer (writing towards the wrong answer or damping the right "
             "one), so removing them raises the metric. The thresholds are met all the same; normalized "
             "faithfulness puts the empty circuit at 0 and the full model at 1 on the same scale.")


def thresholds_text(t: dict) -> str:
    """'absolute 0.8, relative off (on faithfulness)' from a circuit's method.thresholds."""
    f = lambda v: "off" if v is None else f"{v:g}"
    return f"absolute {f(t.get('absolute'))}, relative {f(t.get('relative'))} (on {t.get('on', 'faithfulness')})"


# what a "full-forward equivalent" is: a cost model, not a measurement (benchmarks/cost_model.py measures it)
EQUIVALENTS_NOTE = (": a fixed cost model, each pass counted as the fraction of the layers it recomputes, a layer's "
                    "attention taken as 0.30-0.35 of it; benchmarks/cost_model.py measures those fractions")


def prompts_text(task_meta: dict, n: int | None) -> str | None:
    """How many of the task's prompts the model answers correctly, where that was counted: a built-in task
    keeps only answered prompts (unless --keep-all); a task file is used whole, so its count is said."""
    if "n_kept" in task_meta and "n_generated" in task_meta:
        return (f"Prompts: {task_meta['n_kept']} kept of {task_meta['n_generated']} generated, those the model "
                "answers correctly (top-1).")
    if "n_correct" in task_meta and n:
        wrong = task_meta.get("wrong_prompts") or []
        listed = ", ".join(map(str, wrong[:10])) + (" ..." if len(wrong) > 10 else "")
        return (f"Prompts: the model answers {task_meta['n_correct']} of the {n} correctly (top-1)"
                + (f"; prompts {listed} (0-based) it answers otherwise, and they are scored as they are."
                   if wrong else "."))
    return None


def masks_text(method: dict, stats: dict) -> list[str]:
    """The learned-mask section of a report: settings, and per phase what optimisation reached and what exact
    verification did with it (removed at discretisation, put back by repair, removed by the polish)."""
    mk = method.get("masks")
    if not mk:
        return []
    st = mk["settings"]
    lines = ["", "## Learned masks", "",
             f"sigmoid masks (temperature {st['temperature']:g}), {st['steps']} Adam steps per phase at lr "
             f"{st['lr']:g}, aimed at faithfulness absolute + {st['margin']:g}; {stats.get('backward_passes')} "
             "backward passes in all (each counted as 2 forward-equivalents). Then verified exactly: units with "
             "logit <= 0 removed in one scored step, put back by bisection in mask order if that missed the "
             "absolute threshold, then one iterative polish in mask order under both thresholds.", "",
             "| phase | units | expected kept | relaxed faithfulness | removed by masks | put back | "
             "faithfulness then | removed by polish |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    for p, d in mk["phases"].items():
        lines.append(f"| {p} | {d['units']} | {f(d['expected_kept'])} | {f(d['relaxed_faithfulness'])} | "
                     f"{d['discretised_removed']} | {d['repaired']} | {f(d['faithfulness_after_repair'])} | "
                     f"{d['polish_removed']} |")
    return lines


PAGE_TEXT = ("Interactive page: [{0}]({0}) (opens offline in a browser: hover a unit for its effect and the "
             "decision that kept it, click it for its paths, slide along the faithfulness curve).")


def prune_report(circuit, diagram: str | None, curves: list | None = None, page: str | None = None) -> str:
    """report.md of a prune run: sizes, scores, cost, diagram, curves, the most important nodes."""
    s, m, st = circuit.scores, circuit.method, circuit.stats
    lines = [f"# Circuit: {circuit.task} on {circuit.model}", "",
             f"{circuit.sizes()} "
             f"(level {m['level']}, {m['ablation']} ablation, metric {m['metric']}, order {m['order']}; "
             f"thresholds {thresholds_text(m['thresholds'])}).", "",
             "| score | value |", "|---|---|"]
    if circuit.positions:
        lines[3:3] = ["", *positions_text(circuit)]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, (int, float)) else f"| {k} | {v} |" for k, v in s.items()]
    if isinstance(s.get("faithfulness"), (int, float)) and s["faithfulness"] > 1:
        lines += ["", ABOVE_ONE]
    if st.get("recovered"):
        lines += ["", "**Recovered from a damaged run directory:**", ""] + [f"- {n}" for n in st["recovered"]]
    answered = prompts_text(circuit.meta.get("task_meta", {}), circuit.meta.get("n_prompts"))
    if answered:
        lines += ["", answered]
    lines += ["", f"Forward passes: {st.get('forward_passes')} ({st.get('forward_equivalents')} full-forward "
              f"equivalents{EQUIVALENTS_NOTE}), {st.get('seconds')} s, {st.get('decisions')} decisions."]
    if st.get("batched_passes") or st.get("skipped"):
        lines += [f"Speculation scored those circuits in {st.get('batched_passes', 0)} batched passes "
                  f"(plus single ones); {st.get('skipped', 0)} tries were answered by an earlier try on the same "
                  "circuit without a forward pass."]
    lines += masks_text(m, st)
    lines += [""]
    if st.get("all_sessions"):
        a = st["all_sessions"]
        lines[-1:-1] = [f"Resumed run: {st.get('replayed')} decisions replayed. Over all its sessions (as far as "
                        f"checkpointed): {a.get('forward_passes')} forward passes ({a.get('forward_equivalents')} "
                        f"full-forward equivalents), {round(a.get('seconds', 0), 1)} s."]
    if diagram:
        lines += [f"![circuit]({diagram})", ""]
    if page:
        lines += [PAGE_TEXT.format(page), ""]
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
    lines += features_text(circuit)
    estimated = set(m.get("estimated_effects", ()))
    ranked = sorted(((n, e) for n, e in circuit.nodes.items() if e is not None), key=lambda x: -x[1])
    if ranked:
        lines += ["## Most important nodes", "",
                  "Faithfulness lost when the node was last tried for removal"
                  + (" (* an attribution estimate: the search never scored it alone)." if estimated else "."), "",
                  "| node | effect |", "|---|---|"]
        lines += [f"| {n} | {e:.4f}{' *' if n in estimated else ''} |" for n, e in ranked[:15]] + [""]
    lines += ["## Nodes", "", ", ".join(circuit.nodes), "",
              f"Files: task.json (prompts), circuit.json (the circuit, schema {circuit.to_json()['schema']}), "
              "decisions.jsonl (every candidate tried), circuit.dot / circuit.svg (diagram)"
              + (f", {page} (interactive page)" if page else "")
              + (", curves.json / curves.png (faithfulness curves)" if curves else "") + ".", ""]
    return "\n".join(lines)


def features_text(circuit) -> list[str]:
    """A feature circuit's dictionaries (features active on the prompts, kept) and what each kept feature reads
    and writes: where it fires most among the task's prompts, the tokens its decoder direction promotes."""
    dicts = circuit.meta.get("dictionaries", []) if isinstance(circuit.meta, dict) else []
    if not dicts:
        return []
    lines = ["## Dictionary features", "",
             "| dictionary | features | active on the prompts (nodes) | kept | error kept |", "|---|---|---|---|---|"]
    lines += [f"| {d['hook']}" + (f" -> {d['writes']}" if d['writes'] != d['hook'] else "")
              + f" | {d['features']} | {d['active']} | {d['kept']} | {'yes' if d['error_kept'] else 'no'} |"
              for d in dicts]
    edges = not circuit.node_level
    lines += ["", ("Features and error nodes of a dictionary at mlp_out.L or attn_out.L (or a transcoder) stand in "
                   "for the node they decompose: their edges are its edges. " if edges else
                   "Searched at node level: heads, MLPs and features are kept or ablated whole. ")
              + "Ablated features take their ablation value; features not active on the prompts stay as they are.", ""]
    feats = circuit.features
    if feats:
        lines += ["| feature | effect | fires most at (prompt: …context[token] activation) | promotes | suppresses |",
                  "|---|---|---|---|---|"]
        for n in circuit.feature_nodes():
            r = feats.get(n, {})
            where = "; ".join(f"{w['prompt']}: …{w['context']}[{w['token']}] {w['activation']:g}"
                              for w in r.get("top", [])[:3])
            cell = lambda ts: " ".join(f"`{t!r}`" for t in ts[:5]).replace("|", "\\|")
            eff = circuit.nodes.get(n)
            lines.append(f"| {n} | {'' if eff is None else f'{eff:.4f}'} | {where.replace('|', '/')} | "
                         f"{cell(r.get('promotes', []))} | {cell(r.get('suppresses', []))} |")
        lines.append("")
    return lines


def positions_text(circuit) -> list[str]:
    """Lines for a circuit over positions: its slots, unit counts, and where the partly kept nodes are kept."""
    s = circuit.summary()
    part = circuit.positions.get("nodes", {})
    lines = [f"Over {s['slots']} position slots ({', '.join(circuit.slots)}): {s['units']} node units, "
             f"{s['edge_units']} edge units; the diagram has a column per slot."]
    if part:
        lines.append("Kept at some positions only: " + "; ".join(
            f"{n} at {', '.join(circuit.kept_slots(n))}" for n in circuit.nodes if n in part) + ".")
    return lines


def targets_report(summary: dict) -> str:
    """report.md of a target run: one row per target, links to each circuit's own report."""
    c = summary["config"]
    last = "features" if any("features" in r for r in summary["targets"]) else "edges"  # feature graphs: no edges
    lines = [f"# Circuits at target performances: {c['task']} on {c['model']}", "",
             f"Nested: each circuit is pruned from the one above it. Level {c['level']}, {c['ablation']} ablation, "
             f"metric {c['metric']}; search: {c['attribution']} ranking by estimated gain, bisection rounds "
             "(re-attributing each smaller circuit), then one galloping refinement pass that stops after "
             f"{c.get('patience') or 'no'} candidates kept in a row. Effects of candidates the refinement never "
             "scored alone are attribution estimates.", "",
             f"| target | heads | MLPs | {last} | verified faithfulness | forward passes | backward passes | circuit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["targets"]:
        t = r.get("target")
        lines.append(f"| {t} | {r.get('heads')} | {r.get('mlps')} | {r.get(last)} | "
                     f"{r.get('faithfulness', float('nan')):.4f} | {r.get('forward_passes')} | "
                     f"{r.get('backward_passes')} | [target-{t}](target-{t}/report.md) |")
    st = summary["stats"]
    lines += ["", f"All targets: {st.get('forward_passes')} forward passes, {st.get('backward_passes', 0)} backward "
              f"passes, {st.get('seconds')} s.", ""]
    return "\n".join(lines)


def comparison_report(cmp, diagram: str | None, page: str | None = None) -> str:
    """report.md of compare-orders: the terminal table, the shaded diagram, links to each order's run."""
    from ..algorithms.compare import format_comparison, order_dirname

    lines = [f"# Removal orders compared: {cmp.circuits[0].task} on {cmp.diff.model}", "", "```",
             format_comparison(cmp).rstrip(), "```", ""]
    above = [name for name, c in [*zip(cmp.orders, cmp.circuits), ("intersection", cmp.intersection),
                                  ("union", cmp.union)] if c.scores.get("faithfulness", 0) > 1]
    if above:
        lines += [f"Above 1 ({', '.join(above)}): " + ABOVE_ONE, ""]
    if diagram:
        lines += [f"![orders]({diagram})", ""]
    if page:
        lines += [f"Interactive page: [{page}]({page}) (the union shaded by how many orders kept each unit; "
                  "toggle orders, hover for which orders hold a unit, pick one order's run).", ""]
    lines += ["Each order's run: " + ", ".join(f"[{o}]({order_dirname(o)}/report.md)" for o in cmp.orders), "",
              "comparison.json holds per-node and per-edge counts, the Jaccard matrices, and the intersection "
              "and union circuits with their verified scores.", ""]
    return "\n".join(lines)


def with_section(report: str, key: str, section: str) -> str:
    """`report` with its section `key` (between <!-- circuitsearch:KEY --> markers) replaced by `section`, or
    `section` appended where it has none: a command that adds to a run's report.md (baseline, stability)
    replaces its own earlier section and leaves the rest."""
    start, end = f"<!-- circuitsearch:{key} -->", f"<!-- /circuitsearch:{key} -->"
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    if start in report and end in report.split(start, 1)[1]:
        head, rest = report.split(start, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return report.rstrip("\n") + ("\n\n" if report.strip() else "") + block


def baseline_section(summary: dict, image: str | None) -> str:
    """report.md's section on a random-circuit baseline (runs/baseline.py's baseline.json content)."""
    s, st, f, m = summary["settings"], summary["sizes"], summary["faithfulness"], summary["normalized"]
    edges = "every edge among them" if st["edges"] is None else f"{st['edges']} edges"
    how = ("every kept node on a path from the embedding to the logits; " if s["connected"] else "")
    lines = ["## Against random circuits of its size", "",
             f"{s['random']} random circuits of {st['heads']} heads, {st['mlps']} MLPs and {edges} ({how}heads and "
             f"MLPs drawn uniformly, edges uniformly among those joining them; seed {s['seed']}), scored on this "
             f"run's {summary['prompts']} prompts with its {summary['ablation']} ablation and {summary['metric']}.",
             "", "| | faithfulness | normalized |", "|---|---:|---:|"]
    q = lambda d, k: f"{d['quantiles'][k]:.4f}"
    for label, key in (("mean", "mean"), ("std", "std")):
        lines.append(f"| {label} | {f[key]:.4f} | {m[key]:.4f} |")
    for label, key in (("min", "0"), ("5 %", "0.05"), ("median", "0.5"), ("95 %", "0.95"), ("max", "1")):
        lines.append(f"| {label} | {q(f, key)} | {q(m, key)} |")
    z = lambda d: "-" if d["z"] is None else f"{d['z']:.2f}"
    lines += [f"| **this circuit** | **{f['run']:.4f}** | **{m['run']:.4f}** |",
              f"| its percentile | {f['percentile']:.1f} | {m['percentile']:.1f} |",
              f"| its z-score | {z(f)} | {z(m)} |", "",
              f"Random circuits scoring at least this one: {f['at_or_above']} of {f['n']} (p = {f['p']:.3g}); the "
              f"empty circuit's faithfulness is {summary['run_scores']['empty_faithfulness']:.4f}. baseline.json holds "
              "every random circuit and its scores."]
    if image:
        lines += ["", f"![random circuits]({image})"]
    return "\n".join(lines) + "\n"


def stability_section(summary: dict, image: str | None, cells: str, page: str | None = None) -> str:
    """report.md's section on prompt stability (sweeps/stability.py's stability.json content); `cells`: the path
    from the report to the directory holding the cells' run directories; `page`: to stability.html."""
    s, m = summary["split"], summary["mean"]
    seen = (f" ({s['heldout_seen_in_train']} of them repeat a training prompt: the task has few distinct prompts, "
            "so there the held-out score weighs the same prompts otherwise rather than trying new ones)"
            if s["heldout_seen_in_train"] else "")
    how = ("each drawing as many prompts from the training set with replacement"
           if summary["resample"] == "bootstrap" else "each the task made anew with another seed")
    lines = ["## Stability over resampled prompts", "",
             f"The full-data circuit (on {s['train']} prompts) and {summary['bootstrap']} {summary['resample']} "
             f"resamples, {how}, each pruned with the same settings; every circuit scored on {s['heldout']} held-out "
             f"prompts made with the training ones and left out of every prune{seen}. Jaccard to the full-data circuit: its heads and MLPs, "
             "and its edges.", "",
             "| circuit | prompts (distinct) | heads | MLPs | edges | faithfulness | held-out faithfulness | Jaccard nodes | "
             "Jaccard edges |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["circuits"]:
        lines.append(f"| [{r['name']}]({cells}{r['name']}/report.md) | {r['prompts']} ({r['distinct']}) | {r['heads']} | {r['mlps']} | "
                     f"{r['edges']} | {r['faithfulness']:.3f} | {r['heldout_faithfulness']:.3f}"
                     f"{' *' if r.get('meaningless') else ''} | {r['jaccard_nodes']:.3f} | {r['jaccard_edges']:.3f} |")
    lines.append(f"| mean over the resamples | | | | | {m['faithfulness']:.3f} | {m['heldout_faithfulness']:.3f} | "
                 f"{m['jaccard_nodes']:.3f} | {m['jaccard_edges']:.3f} |")
    if any(r.get("meaningless") for r in summary["circuits"]):
        lines += ["", "* the model fails the held-out prompts under these settings, so that score means nothing"]
    k, full = summary["kept_in_every_resample"], summary["full_nodes_in_every_resample"]
    n_full = sum(1 for r in summary["nodes"].values() if r["in_full"])
    lines += ["", f"Kept in every resample: {len(k['nodes'])} heads and MLPs ({', '.join(k['nodes']) or 'none'}) and "
              f"{len(k['edges'])} edges; of the full-data circuit's {n_full} heads and MLPs, {len(full)} are in every "
              "resample.", "", "| node | kept by resamples | in the full-data circuit |", "|---|---:|---|"]
    lines += [f"| {n} | {r['frequency']:.2f} | {'yes' if r['in_full'] else 'no'} |"
              for n, r in list(summary["nodes"].items())[:30]]
    if len(summary["nodes"]) > 30:
        lines.append(f"| ({len(summary['nodes']) - 30} more in stability.json) | | |")
    if image:
        lines += ["", f"![node frequency]({image})"]
    if page:
        lines += ["", f"Interactive page: [stability.html]({page}), the full-data circuit with each node and edge "
                  "shaded by how many resamples kept it (hover: kept in k of B); units only resamples keep are drawn "
                  "dashed."]
    return "\n".join(lines) + "\n"
