"""Iterative pruning three ways: a naive loop, the sequential search, the speculative batched search.

naive:      what a notebook does: one full TransformerLens hooked forward of every prompt per
            candidate (ablation means computed once), same order, thresholds and passes.
sequential: circuitsearch's search one candidate at a time (batch 1).
batched:    the same search scoring up to --batch candidates per forward pass (speculation).

Rows: node pruning on --prompts (16 and 24 digits prompts by default), then the demo (both
levels, 24 prompts: sequential and batched only; a naive edge search is one hooked
path-patching forward per edge, ~1,750 of them, and is left out). Each row: seconds, forward
passes (batched: circuits scored, counting rows of a batch separately), forward-equivalents,
batched passes, skipped tries, peak extra memory, and whether the circuit is identical to the
sequential one (and the decisions: same candidates, same verdicts). Take it alone on the machine.

    python benchmarks/batched_search.py [--prompts 16,24] [--no-naive] [--no-demo] [--batch 16]
"""
import argparse
import threading
import time

import torch

from circuitsearch.algorithms.iterative import Thresholds, candidate_ids, find_circuit
from circuitsearch.algorithms.orders import parse_order
from circuitsearch.catalogue import load_model
from circuitsearch.config import PruneConfig, build, evaluator
from circuitsearch.reference import ablation_source, hooked_score


class PeakRSS:
    """The largest resident set size seen while the block runs, minus the size at its start (MB)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2 ** 20

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096


def naive_nodes(model, task, ev, thresholds, order_name="alternate", max_passes=10):
    """Node pruning with one hooked forward of all prompts per candidate. -> (ablated, decisions, passes)."""
    src = ablation_source(model, task, "mean")
    score = lambda nodes: hooked_score(model, task, "mean", nodes=nodes, source=src)
    order = parse_order(order_name)
    ablated, decisions, passes = set(), [], 0
    current = score(())
    passes += 1
    for p in range(max_passes):
        cands = [i for i in candidate_ids(ev.run(), "nodes") if ev.index.nodes[i] not in ablated]
        removed_any = False
        for c in order.sequence(cands, p):
            name = ev.index.nodes[c]
            new = score(ablated | {name})
            passes += 1
            ok = thresholds.accepts(ev, current, new)
            decisions.append(("nodes", p, name, ok))
            if ok:
                ablated.add(name)
                current = new
                removed_any = True
        if not removed_any:
            break
    return frozenset(ablated), decisions, passes


def searched(ev, level, thresholds, batch):
    """(result, seconds, stats delta, peak MB) of find_circuit at this batch size."""
    before = ev.stats()
    with PeakRSS() as mem:
        t = time.perf_counter()
        res = find_circuit(ev, level, thresholds, "alternate", progress=False, batch=batch)
        seconds = time.perf_counter() - t
    after = ev.stats()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return res, seconds, delta, mem.extra_mb


def trace(res):
    return [(d.phase, d.pass_, d.candidate, d.removed) for d in res.decisions]


def table(title, rows):
    lines = [title, "", "| search | seconds | forward passes | forward-equivalents | batched passes | skipped tries "
             "| peak extra MB | identical circuit | identical decisions | speed-up vs naive | vs sequential |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    naive = next((r["seconds"] for r in rows if r["search"] == "naive loop"), None)
    seq = next(r["seconds"] for r in rows if r["search"] == "sequential")
    for r in rows:
        vs_naive = "" if naive is None else f"{naive / r['seconds']:.2f}x"
        lines.append(f"| {r['search']} | {r['seconds']:.1f} | {r['passes']} | {r['fe']:.1f} | {r.get('batched', 0)} | "
                     f"{r.get('skipped', 0)} | {r['mb']:.0f} | {r['same']} | {r['same_decisions']} | "
                     f"{vs_naive} | {seq / r['seconds']:.2f}x |")
    return "\n".join(lines)


def compare(model, n, level, args) -> str:
    config = PruneConfig(task=args.task, n_prompts=n, level=level)
    _, task, ev = build(config, model)
    thresholds = Thresholds(config.absolute)
    rows = []
    seq, s_sec, s_st, s_mb = searched(ev, level, thresholds, 1)
    if args.naive and level == "nodes":
        with PeakRSS() as mem:
            t = time.perf_counter()
            ablated, decisions, passes = naive_nodes(model, task, ev, thresholds)
            secs = time.perf_counter() - t
        rows.append({"search": "naive loop", "seconds": secs, "passes": passes, "fe": float(passes), "mb": mem.extra_mb,
                     "same": ablated == seq.ablated,
                     "same_decisions": decisions == [t[:3] + (t[3],) for t in trace(seq)]})
    rows.append({"search": "sequential", "seconds": s_sec, "passes": s_st["forward_passes"],
                 "fe": s_st["forward_equivalents"], "skipped": seq.skipped, "mb": s_mb, "same": True,
                 "same_decisions": True})
    ev = evaluator(config, model, task)  # a fresh evaluator: no caches from the sequential search
    torch.manual_seed(0)
    bat, b_sec, b_st, b_mb = searched(ev, level, thresholds, args.batch)
    rows.append({"search": f"batched (up to {args.batch})", "seconds": b_sec, "passes": b_st["forward_passes"],
                 "fe": b_st["forward_equivalents"], "batched": b_st.get("batched_passes", 0), "skipped": bat.skipped,
                 "mb": b_mb, "same": bat.ablated == seq.ablated and bat.removed_edges == seq.removed_edges,
                 "same_decisions": trace(bat) == trace(seq)})
    kept = len(ev.senders) - len(seq.ablated)
    title = (f"{args.model}, {args.task}, {len(task)} prompts ({ev.batch.tokens.shape[0]} distinct), mean ablation, "
             f"level {level}, alternate order, A = {config.absolute}; torch threads {torch.get_num_threads()}; "
             f"circuit: {kept} nodes" + ("" if level == "nodes" else f", {len(seq.run.present_edges().nonzero())} edges")
             + f"; speculation {bat.speculation}")
    out = table(title, rows)
    print("\n" + out + "\n", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="digits")
    ap.add_argument("--prompts", default="16,24", help="prompt counts for the node-level rows")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-naive", dest="naive", action="store_false")
    ap.add_argument("--no-demo", dest="demo", action="store_false")
    args = ap.parse_args()
    model = load_model(args.model)
    tables = [compare(model, int(n), "nodes", args) for n in args.prompts.split(",") if n]
    if args.demo:
        tables.append(compare(model, 24, "both", args))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
