"""Random-circuit baselines: circuits of a found circuit's exact sizes, drawn at random, and where the
found circuit's score falls among theirs. Plain functions over names; no torch here (scoring goes
through an evaluator it is handed).

A random circuit keeps the run's embedding senders and the logits, the same number of heads and of
MLPs drawn uniformly among the model's, and the same number of edges drawn uniformly among the
edges joining its nodes. Connected (`connected=True`): every kept node lies on a path from the
embedding to the logits along kept edges. It is built, not filtered: in forward order each head and
MLP gets one random edge in from an earlier kept node (all of which are reached from the
embedding), then in reverse order each node still without one gets a random edge out to a later
kept node (all of which reach the logits); the remaining edges are drawn uniformly among the rest.
Node sets whose skeleton needs more edges than the size allows are drawn again. So connected draws
are random but not uniform over all connected circuits of the size.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .graphs.circuit import Circuit, node_sort_key
from .graphs.model_graph import ModelGraph, parse_node, receiver_node, split_edge

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
TIE = 1e-5     # scores this close count as equal (batched and single scoring agree to about 1e-6)
TRIES = 200    # node sets drawn for one circuit before its size is declared impossible


class BaselineError(ValueError):
    """A baseline that cannot be drawn as asked; the message names the fix."""


@dataclass(frozen=True)
class Sizes:
    """What a random circuit must match: heads, MLPs, edges (None: a node-level circuit, which keeps every
    edge among its nodes) and the embedding senders kept."""

    heads: int
    mlps: int
    edges: int | None
    embed: tuple[str, ...]

    def text(self) -> str:
        edges = "every edge among them" if self.edges is None else f"{self.edges} edges"
        return f"{self.heads} heads, {self.mlps} MLPs, {edges}"


@dataclass(frozen=True)
class Draw:
    """One random circuit: kept nodes (embedding senders, heads, MLPs, logits) and kept edges (None: every
    edge among the nodes), both in forward order."""

    nodes: tuple[str, ...]
    edges: tuple[str, ...] | None


def sizes_of(circuit: Circuit) -> Sizes:
    """The sizes a baseline of `circuit` matches; refuses circuits over positions."""
    if circuit.positions:
        raise BaselineError("this circuit is kept at some token positions only (level "
                            f"{circuit.method.get('level')}); random baselines draw whole nodes and edges: prune "
                            "with --level both (or nodes, or edges) for a circuit to compare with random ones")
    graph = circuit.model_graph
    embed = tuple(n for n in graph.embed_nodes if n in circuit.nodes)
    return Sizes(len(circuit.heads()), len(circuit.mlps()), None if circuit.node_level else len(circuit.edges),
                 embed)


def edges_among(graph: ModelGraph, nodes) -> list[str]:
    """Every graph edge whose sender and receiver node are both in `nodes`, in graph order."""
    kept = set(nodes)
    out = []
    for node in graph.nodes[len(graph.embed_nodes):]:
        if node in kept:
            senders = [s for s in graph.senders_into(node) if s in kept]
            for recv in graph.receivers_of(node):
                out += [f"{s}->{recv}" for s in senders]
    return out


def on_paths(graph: ModelGraph, nodes, edges) -> set[str]:
    """The kept nodes that lie on a path from an embedding sender to the logits along `edges`."""
    order = sorted(nodes, key=lambda n: node_sort_key(n, graph.n_layers))
    pairs = [(s, receiver_node(r)[0]) for s, r in map(split_edge, edges)]
    reached = {n for n in order if parse_node(n).kind == "embed"}
    for n in order:  # forward order: every sender of n is settled before n
        if any(d == n and s in reached for s, d in pairs):
            reached.add(n)
    reaches = {"logits"} & set(nodes)
    for n in reversed(order):
        if any(s == n and d in reaches for s, d in pairs):
            reaches.add(n)
    return reached & reaches


def _skeleton(graph: ModelGraph, nodes: list[str], pool: list[str], rng: random.Random) -> list[str]:
    """Edges that put every node of `nodes` (forward order, embedding senders first, logits last) on a path
    from the embedding to the logits: one random edge in per head and MLP, then one out where needed."""
    into: dict[str, list[str]] = {}
    out_of: dict[str, list[str]] = {}
    for e in pool:
        s, r = split_edge(e)
        into.setdefault(receiver_node(r)[0], []).append(e)
        out_of.setdefault(s, []).append(e)
    inner = [n for n in nodes if parse_node(n).kind in ("head", "mlp")]
    chosen = [rng.choice(into[n]) for n in inner]  # every earlier kept node is reached already
    has_out = {split_edge(e)[0] for e in chosen}
    for n in reversed([n for n in nodes if n != "logits" and n not in inner] + inner):
        if n not in has_out:  # every later kept node reaches the logits already
            chosen.append(rng.choice(out_of[n]))
            has_out.add(n)
    rank = {e: i for i, e in enumerate(pool)}
    return sorted(set(chosen), key=rank.__getitem__)


def random_circuit(graph: ModelGraph, sizes: Sizes, rng: random.Random, connected: bool = False) -> Draw:
    """One random circuit of exactly `sizes` (see the module docstring); BaselineError when no node set
    drawn in TRIES attempts admits it."""
    heads = [n for n in graph.inner_nodes if parse_node(n).kind == "head"]
    mlps = [n for n in graph.inner_nodes if parse_node(n).kind == "mlp"]
    if sizes.heads > len(heads) or sizes.mlps > len(mlps):
        raise BaselineError(f"the model has {len(heads)} heads and {len(mlps)} MLPs; a circuit of {sizes.text()} "
                            "does not fit it")
    if connected and not sizes.embed:
        raise BaselineError("the circuit keeps no embedding sender, so no random circuit of its nodes can have a "
                            "path from the embedding: leave --connected out")
    key = lambda n: node_sort_key(n, graph.n_layers)
    for _ in range(TRIES):
        inner = sorted(rng.sample(heads, sizes.heads) + rng.sample(mlps, sizes.mlps), key=key)
        nodes = [*sizes.embed, *inner, "logits"]
        if sizes.edges is None:
            return Draw(tuple(nodes), None)  # with an embedding sender every node is on a path (embed->n->logits)
        pool = edges_among(graph, nodes)
        if len(pool) < sizes.edges:
            continue
        if not connected:
            picked = set(rng.sample(pool, sizes.edges))
        else:
            skeleton = _skeleton(graph, nodes, pool, rng)
            if len(skeleton) > sizes.edges:
                continue
            picked = set(skeleton)
            picked |= set(rng.sample([e for e in pool if e not in picked], sizes.edges - len(skeleton)))
        return Draw(tuple(nodes), tuple(e for e in pool if e in picked))
    what = "connected circuit" if connected else "circuit"
    raise BaselineError(f"no random {what} of {sizes.text()} found in {TRIES} node sets drawn: its nodes rarely "
                        f"have that many edges among them{' on paths from the embedding' if connected else ''}"
                        + ("; try without --connected" if connected else ""))


def random_circuits(graph: ModelGraph, sizes: Sizes, n: int, seed: int = 0, connected: bool = False) -> list[Draw]:
    """`n` random circuits of `sizes`; the same seed gives the same circuits (Python's own generator)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BaselineError(f"--random {n!r}: give the number of random circuits to draw, at least 1 "
                            "(e.g. --random 200)")
    rng = random.Random(seed)
    return [random_circuit(graph, sizes, rng, connected) for _ in range(n)]


def as_circuit(draw: Draw, like: Circuit, name: str = "random") -> Circuit:
    """A random draw as a Circuit of `like`'s model, graph, task and method (order `name`), unscored."""
    edges = {} if draw.edges is None else {e: None for e in draw.edges}
    return Circuit(like.model, like.graph, like.task, {n: None for n in draw.nodes}, edges,
                   method={**like.method, "order": name})


def score_draws(ev, circuits: list[Circuit], batch: int = 1) -> list[float]:
    """The metric of every circuit on `ev`'s task, `batch` circuits per forward pass (Evaluator.extend_many
    from the full model's run: exactly how a saved circuit is scored, stacked). A stacked pass sums edge
    changes over the union of its circuits' removed senders, which for unrelated circuits grows with the
    batch, so on a CPU one circuit a pass is fastest (the search's speculation stacks circuits that differ
    by a few candidates, where stacking pays)."""
    scores: list[float] = []
    for i in range(0, len(circuits), batch):
        runs = ev.extend_many(ev.clean_run, [ev.circuit_masks(c) for c in circuits[i:i + batch]])
        scores += [float(r.score) for r in runs]
    return scores


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def distribution(values: list[float], run: float) -> dict:
    """Mean, standard deviation (n - 1), quantiles of `values`, and where `run` stands among them:
    percentile = 100 (below + ties / 2) / n, z = (run - mean) / std (None when std is 0, to TIE), at_or_above =
    how many score at least `run`, p = (at_or_above + 1) / (n + 1)."""
    n = len(values)
    if n < 1:
        raise BaselineError("no scores to summarise")
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    s = sorted(values)
    below = sum(x < run - TIE for x in values)
    ties = sum(abs(x - run) <= TIE for x in values)
    return {"n": n, "mean": mean, "std": std, "quantiles": {f"{q:g}": quantile(s, q) for q in QUANTILES},
            "run": run, "percentile": 100.0 * (below + ties / 2) / n,
            "z": (run - mean) / std if std > TIE else None, "at_or_above": n - below,
            "p": (n - below + 1) / (n + 1)}


def format_table(dists: dict[str, dict]) -> str:
    """The distributions (one column each, e.g. faithfulness and normalized) as a terminal table."""
    names = list(dists)
    rows = [("mean", "mean"), ("std", "std")] + [(f"{q:g}", "min" if q == 0 else "max" if q == 1 else
                                                  "median" if q == 0.5 else f"{100 * q:g} %") for q in QUANTILES]
    cell = lambda v: f"{v:>13.4f}" if isinstance(v, float) else f"{'-':>13}"
    out = [f"{'':<16}" + "".join(f"{n:>13}" for n in names)]
    for key, label in rows:
        out.append(f"{label:<16}" + "".join(cell(d[key] if key in d else d["quantiles"][key]) for d in dists.values()))
    out.append(f"{'the run':<16}" + "".join(cell(d["run"]) for d in dists.values()))
    out.append(f"{'run percentile':<16}" + "".join(f"{d['percentile']:>13.1f}" for d in dists.values()))
    out.append(f"{'run z-score':<16}" + "".join(cell(d["z"]) if d["z"] is not None else f"{'-':>13}"
                                                 for d in dists.values()))
    d = next(iter(dists.values()))
    out.append(f"random circuits scoring at least the run ({names[0]}): {d['at_or_above']} of {d['n']} "
               f"(p = {d['p']:.3g})")
    return "\n".join(out) + "\n"
