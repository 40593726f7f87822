"""Removal orders: the sequence in which a pruning pass tries its candidates.

An order is parsed once from its name (`parse_order`) into an object that, given a pass's
candidates (graph index ids in forward order), returns them in the order to try.

Forward order is the order of the forward pass: layer by layer from the embedding up, and
within a layer the heads by index, then the MLP (which reads them). Edges go by receiver in
forward order, then sender in forward order. Reverse is exactly that sequence backwards
(from the logits down: a layer's MLP before its heads, as ACDC walks the graph).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

ORDERS = ("forward", "reverse", "alternate", "random:SEED", "file:PATH", "attribution")


@dataclass(frozen=True)
class Order:
    """Base: `name` as the user wrote it; `sequence` orders one pass's candidates."""

    name: str

    def prepare(self, ev, run, level: str) -> "Order":
        """The order ready for a phase starting from `run` (orders that rank the circuit do it here)."""
        return self

    def sequence(self, candidates: list[int], pass_index: int) -> list[int]:
        raise NotImplementedError


@dataclass(frozen=True)
class Forward(Order):
    def sequence(self, candidates, pass_index):
        return list(candidates)


@dataclass(frozen=True)
class Reverse(Order):
    def sequence(self, candidates, pass_index):
        return candidates[::-1]


@dataclass(frozen=True)
class Alternate(Order):
    """Reverse on even passes, forward on odd ones."""

    def sequence(self, candidates, pass_index):
        return candidates[::-1] if pass_index % 2 == 0 else list(candidates)


@dataclass(frozen=True)
class Shuffled(Order):
    """random:SEED: a fresh shuffle each pass, seeded by the order's name and the pass."""

    def sequence(self, candidates, pass_index):
        seq = list(candidates)
        random.Random(f"{self.name}:{pass_index}").shuffle(seq)
        return seq


@dataclass(frozen=True)
class Listed(Order):
    """A fixed list of ids (from a file, or a ranking), tried in that order; with `rest`, candidates
    it does not list follow in forward order, else they are not tried."""

    ids: tuple = ()
    rest: bool = False

    def sequence(self, candidates, pass_index):
        present = set(candidates)
        listed = [c for c in self.ids if c in present]
        if not self.rest:
            return listed
        named = set(self.ids)
        return listed + [c for c in candidates if c not in named]


@dataclass(frozen=True)
class FromFile(Order):
    """file:PATH: one node or edge name a line ('#' starts a comment line), tried in that order.

    Candidates the file does not list are tried after the listed ones, in forward order, so every
    candidate is tried; a name the model's graph does not have is an error (never skipped).
    """

    path: str = ""

    def prepare(self, ev, run, level):
        names = list(dict.fromkeys(read_order_file(self.path)))
        from .levels import level_of

        ix = ev.index
        lookup = level_of(ev, level).lookup(ev)
        unknown = [n for n in names if n not in ix.node_id and n not in ix.edge_id and n not in lookup]
        if unknown:
            raise ValueError(f"order file {self.path!r} names {len(unknown)} node(s) or edge(s) this model's graph "
                             f"does not have: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; "
                             "names look like embed, a9.1, m3, a4.4->a9.1.q, m3->logits (a9.1@end: a node at "
                             "a slot, for the positions phase)")
        return Listed(self.name, tuple(lookup[n] for n in names if n in lookup), rest=True)


@dataclass(frozen=True)
class ByMagnitude(Order):
    """attribution: the circuit's candidates ranked by |attribution estimate|, least important first
    (the target search ranks by signed gain instead: see target.removal_order)."""

    method: str = "eap-ig"
    steps: int = 5
    ranking: tuple | None = None  # names, least important first (given instead of computed)

    def prepare(self, ev, run, level):
        from .attribution import attribute_for
        from .levels import level_of

        names = self.ranking if self.ranking is not None else \
            attribute_for(ev, run, level, self.method, self.steps).ranking(level)
        lookup = level_of(ev, level).lookup(ev)
        return Listed(self.name, tuple(lookup[n] for n in names))


def default_order(metric: str) -> str:
    """The removal order of a prune that names none: attribution (EAP-IG ranking, least |estimate| first;
    smaller circuits than alternate on every task compared in the study of docs/searches.md), or alternate for a metric
    without a gradient (accuracy), which attribution cannot rank."""
    from ..metrics import get_metric

    return "attribution" if get_metric(metric).gradient else "alternate"


def parse_order(order: "str | Order", attribution: str = "eap-ig", steps: int = 5) -> Order:
    """The Order object an order name means; ValueError naming the choices for anything else."""
    if isinstance(order, Order):
        return order
    simple = {"forward": Forward, "reverse": Reverse, "alternate": Alternate}
    if order in simple:
        return simple[order](order)
    if order == "attribution":
        return ByMagnitude(order, attribution, steps)
    if order.startswith("random:"):
        try:
            int(order.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad order {order!r}: random needs an integer seed, e.g. random:1") from None
        return Shuffled(order)
    if order.startswith("file:"):
        path = Path(order.split(":", 1)[1])
        if not path.exists():
            raise ValueError(f"order file {str(path)!r} does not exist")
        return FromFile(order, str(path))
    raise ValueError(f"unknown order {order!r}; choose forward, reverse, alternate, random:SEED, "
                     "file:PATH (one node or edge name a line) or attribution (or masks: learned-mask search)")


def check_order(order: str) -> str:
    """Reject an order name that is not one of ORDERS (or masks: learned-mask search, which compare-orders
    and sweeps take as an order), with the list in the message."""
    if order == "masks":
        return order
    parse_order(order)
    return order


def read_order_file(path: str | Path) -> list[str]:
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
