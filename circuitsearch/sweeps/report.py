"""A sweep's report.md and its plots (matplotlib, Agg): circuit size against threshold per task,
faithfulness curves overlaid, how many cells keep each node, Jaccard between cells, and
UpSet-style shared-node plots per performance level.

Reads finished cells' circuits; every plot is skipped (with a note) when the cells do not vary
the way it needs, so a small sweep still gets a short, true report.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..graphs.circuit import Circuit, node_sort_key
from ..io import atomic_write_text
from .roc import SWEPT

MAX_LABELS = 40  # Jaccard heatmap / frequency plot beyond this many cells or nodes: the first ones only


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def level_of(row: dict):
    """The performance level a cell was asked for: its target (target search) or absolute threshold."""
    s = row["settings"]
    if row["kind"] == "target":
        t = s.get("target", s.get("absolute"))
        return min(t) if isinstance(t, list) else t
    return s.get("absolute") if s.get("absolute") is not None else s.get("relative")


def series_label(row: dict, varying: list[str], drop=("task",)) -> str:
    s = row["settings"]
    return ",".join(f"{k}={s.get(k)}" for k in varying if k not in drop and k not in SWEPT) or "all"


def varying_keys(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r["settings"]))
    return [k for k in keys if len({json.dumps(r["settings"].get(k)) for r in rows}) > 1]


def short_names(names: list[str]) -> list[str]:
    """Cell names without the key=value parts every one of them shares (labels for plots)."""
    parts = [n.split(",") for n in names]
    common = set.intersection(*(set(p) for p in parts)) if parts else set()
    return [",".join(x for x in p if x not in common) or n for p, n in zip(parts, names)]


STYLES = ["-o", "--s", ":^", "-.D", "-v", "--P"]


def plot_sizes(rows: list[dict], path: Path) -> Path | None:
    """Heads, MLPs and edges against threshold/target, one row of panels per task, one line per series."""
    rows = [r for r in rows if r.get("heads") is not None and level_of(r) is not None]
    if len({level_of(r) for r in rows}) < 2:
        return None
    plt = _plt()
    varying = varying_keys(rows)
    tasks = sorted({r["settings"].get("task", "digits") for r in rows})
    fig, axes = plt.subplots(len(tasks), 3, figsize=(11, 3 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        series: dict[str, list] = {}
        for r in rows:
            if r["settings"].get("task", "digits") == task:
                series.setdefault(series_label(r, varying), []).append(r)
        for j, key in enumerate(("heads", "mlps", "edges")):
            ax = axes[i][j]
            for k, (label, rs) in enumerate(series.items()):  # styles differ, so identical series stay visible
                rs = sorted(rs, key=level_of)
                ax.plot([level_of(r) for r in rs], [r[key] for r in rs], STYLES[k % len(STYLES)],
                        markersize=7 - k % 4, label=label)
            ax.set_title(f"{task}: {key}")
            ax.set_xlabel("threshold / target")
            ax.yaxis.get_major_locator().set_params(integer=True)
            if j == 2:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(out: Path, rows: list[dict], path: Path) -> Path | None:
    """Every finished prune cell's faithfulness curve under its own removal order, overlaid."""
    found = []
    for r in rows:
        f = out / "cells" / r["name"] / "curves.json"
        if r.get("heads") is not None and f.exists():
            curve = json.loads(f.read_text())["curves"][0]
            found.append((r["name"], curve))
    if not found:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in found:
        ax.plot(c["percentages"], c["faithfulness"], "-", marker=".", label=name[:60])
    ax.set_xscale("log")
    ax.set_xlabel("% of edges kept (removal-order ranking)")
    ax.set_ylabel("normalized faithfulness")
    if len(found) <= 16:
        ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def node_frequency(circuits: dict[str, Circuit]) -> dict[str, int]:
    """Heads and MLPs -> how many circuits keep them, in forward order."""
    counts: dict[str, int] = {}
    for c in circuits.values():
        for n in c.heads() + c.mlps():
            counts[n] = counts.get(n, 0) + 1
    n_layers = max((c.n_layers for c in circuits.values()), default=1)
    return dict(sorted(counts.items(), key=lambda kv: node_sort_key(kv[0], n_layers)))


def plot_frequency(freq: dict[str, int], total: int, path: Path) -> Path | None:
    if not freq:
        return None
    plt = _plt()
    top = sorted(freq.items(), key=lambda kv: -kv[1])[:MAX_LABELS]
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(top)), 3.5))
    ax.bar([k for k, _ in top], [v for _, v in top], color="#2b6cb0")
    ax.axhline(total, color="grey", linestyle=":", linewidth=1)
    ax.set_ylabel(f"cells keeping it (of {total})")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def jaccard_matrix(circuits: dict[str, Circuit]) -> tuple[list[str], list[list[float]]]:
    """Node Jaccard (heads and MLPs) between every two circuits."""
    names = list(circuits)[:MAX_LABELS]
    sets = {n: set(circuits[n].heads()) | set(circuits[n].mlps()) for n in names}
    jac = lambda a, b: len(a & b) / len(a | b) if a | b else 1.0
    return names, [[round(jac(sets[a], sets[b]), 4) for b in names] for a in names]


def plot_jaccard(names: list[str], matrix: list[list[float]], path: Path) -> Path | None:
    if len(names) < 2:
        return None
    names = short_names(names)
    plt = _plt()
    size = max(4, 0.35 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 2, size))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    fig.colorbar(im, ax=ax, label="node Jaccard")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def upset_counts(circuits: dict[str, Circuit]) -> list[tuple[tuple[str, ...], int]]:
    """Exact subsets of circuits holding each head/MLP, largest first: ((cell, ...), how many nodes)."""
    holders: dict[str, list[str]] = {}
    for name, c in circuits.items():
        for n in c.heads() + c.mlps():
            holders.setdefault(n, []).append(name)
    counts: dict[tuple, int] = {}
    for names in holders.values():
        counts[tuple(names)] = counts.get(tuple(names), 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], -len(kv[0])))


def plot_upset(circuits: dict[str, Circuit], title: str, path: Path) -> Path | None:
    """UpSet-style: bars = nodes held by exactly that subset of cells, dots below mark the subset."""
    subsets = upset_counts(circuits)[:20]
    if len(circuits) < 2 or not subsets:
        return None
    plt = _plt()
    names = list(circuits)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7, 0.45 * len(subsets) + 5), 2.5 + 0.3 * len(names)),
                                      sharex=True, gridspec_kw={"height_ratios": [2, max(1, 0.25 * len(names))]})
    xs = range(len(subsets))
    top.bar(xs, [n for _, n in subsets], color="#444")
    top.set_ylabel("heads + MLPs")
    top.yaxis.get_major_locator().set_params(integer=True)
    top.set_title(title, fontsize=9)
    for x, (subset, _) in zip(xs, subsets):
        ys = [names.index(s) for s in subset]
        bottom.scatter([x] * len(names), range(len(names)), color="#ddd", s=20)
        bottom.scatter([x] * len(ys), ys, color="#222", s=24)
        if len(ys) > 1:
            bottom.plot([x, x], [min(ys), max(ys)], color="#222", linewidth=1.5)
    bottom.set_yticks(range(len(names)), [n[:50] for n in short_names(names)], fontsize=7)
    bottom.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(v, spec=".3f"):
    return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def write_report(out: Path, summary: dict, circuits: dict[str, Circuit], roc: dict | None = None, log=print) -> list:
    """Plots into out/plots/ and out/report.md; returns the plot files written."""
    rows = summary["cells"]
    done = [r for r in rows if r["status"] in ("done", "skipped")]
    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)
    made: list[tuple[str, Path]] = []

    def attempt(title, fn, *args):
        try:
            p = fn(*args)
        except (ImportError, OSError, ValueError) as e:
            log(f"note: plot {title!r} not drawn ({e})")
            return
        if p is not None:
            made.append((title, Path(p)))

    attempt("Circuit size against threshold / target", plot_sizes, done, plots_dir / "sizes.png")
    attempt("Faithfulness curves (removal order), overlaid", plot_curves, out, done, plots_dir / "curves.png")
    by_model: dict[str, dict[str, Circuit]] = {}
    for name, c in circuits.items():
        by_model.setdefault(c.model, {})[name] = c
    freq_md, jac_md = [], []
    for model, cs in by_model.items():
        freq = node_frequency(cs)
        safe = model.replace(":", "-").replace("/", "_")
        attempt(f"Node frequency across cells ({model})", plot_frequency, freq, len(cs), plots_dir / f"frequency-{safe}.png")
        freq_md.append((model, len(cs), freq))
        names, matrix = jaccard_matrix(cs)
        attempt(f"Node Jaccard between cells ({model})", plot_jaccard, names, matrix, plots_dir / f"jaccard-{safe}.png")
        jac_md.append((model, names, matrix))
        levels: dict = {}
        for r in done:
            if r["name"] in cs:
                levels.setdefault(level_of(r), {})[r["name"]] = cs[r["name"]]
        for level, group in sorted(levels.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            attempt(f"Shared heads and MLPs at performance level {level} ({model})", plot_upset, group,
                    f"{model}, level {level}: heads and MLPs held by exactly these cells", plots_dir / f"upset-{safe}-{level}.png")
    if roc and roc.get("curves"):
        from .roc import RocCurve, plot_roc
        curves = [RocCurve(c["series"], c["kind"], c["cells"], [tuple(p) for p in c["points"]], c["auc"])
                  for c in roc["curves"]]
        attempt("ROC against the known circuit", plot_roc, curves, plots_dir / "roc.png")

    c = summary["counts"]
    lines = [f"# Sweep: {len(rows)} cells", "",
             f"{c.get('done', 0)} run now, {c.get('skipped', 0)} finished before (skipped), {c.get('failed', 0)} failed, "
             f"{c.get('pending', 0)} not run; executor {summary['executor'].get('executor')}; "
             f"this session {summary.get('wall_seconds', 0):.1f} s wall.", "",
             "Every cell is an ordinary run directory under `cells/` (resumable; `render`, `diff`, `evaluate` work on "
             "it); its output is in `logs/`.", "",
             "| cell | status | heads | MLPs | edges | faithfulness | forward passes | seconds | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = (r.get("error") or "").replace("|", "/")[:160]
        if r.get("replayed"):
            note = f"resumed: {r['replayed']} decisions replayed " + note
        lines.append(f"| {r['name']} | {r['status']} | {_fmt(r.get('heads'))} | {_fmt(r.get('mlps'))} | "
                     f"{_fmt(r.get('edges'))} | {_fmt(r.get('faithfulness'))} | {_fmt(r.get('forward_passes'))} | "
                     f"{_fmt(r.get('seconds'), '.1f')} | {note} |")
    for model, total, freq in freq_md:
        lines += ["", f"## Node frequency ({model}, {total} circuits)", "",
                  ", ".join(f"{n} {k}/{total}" for n, k in sorted(freq.items(), key=lambda kv: -kv[1])[:30])]
    for model, names, matrix in jac_md:
        if 1 < len(names) <= 12:
            lines += ["", f"## Node Jaccard ({model})", "", "| | " + " | ".join(f"{i}" for i in range(len(names))) + " |",
                      "|---" * (len(names) + 1) + "|"]
            lines += [f"| {i}: {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
                      for i, (n, row) in enumerate(zip(names, matrix))]
    if roc:
        lines += ["", f"## Against the known circuit ({roc['truth']})", "",
                  "Positives: the truth's heads and MLPs, and its edges; negatives: every other head, MLP and edge "
                  "of the graph. Each curve joins cells differing only in threshold/target, with (0, 0) and (1, 1) "
                  "added; AUC is the trapezoid area.", "",
                  "| curve | kind | cells | AUC |", "|---|---|---:|---:|"]
        lines += [f"| {c['series']} | {c['kind']} | {len(c['cells'])} | {c['auc']:.3f} |" for c in roc["curves"]]
        lines += ["", "| cell | node TPR | node FPR | edge TPR | edge FPR |", "|---|---:|---:|---:|---:|"]
        for r in rows:
            t = r.get("truth")
            if t:
                get = lambda kind, k: _fmt(t[kind][k]) if kind in t else ""
                lines.append(f"| {r['name']} | {get('nodes', 'tpr')} | {get('nodes', 'fpr')} | {get('edges', 'tpr')} | "
                             f"{get('edges', 'fpr')} |")
    for title, p in made:
        lines += ["", f"## {title}", "", f"![{title}]({p.relative_to(out)})"]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return [p for _, p in made]
