"""Removal orders: the sequence in which a pruning pass tries its candidates.

Forward order is the order of the forward pass: layer by layer from the embedding up, and
within a layer the heads by index, then the MLP (which reads them). Edges go by receiver in
forward order, then sender in forward order. Reverse is exactly that sequence backwards
(from the logits down: a layer's MLP before its heads, as ACDC walks the graph).
"""
from __future__ import annotations

import random
from pathlib import Path

ORDERS = ("forward", "reverse", "alternate", "random:SEED", "file:PATH", "attribution")


def check_order(order: str) -> str:
    """Reject an order name that is not one of ORDERS, with the list in the message."""
    if order in ("forward", "reverse", "alternate", "attribution"):
        return order
    if order.startswith("random:"):
        try:
            int(order.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad order {order!r}: random needs an integer seed, e.g. random:1") from None
        return order
    if order.startswith("file:"):
        path = Path(order.split(":", 1)[1])
        if not path.exists():
            raise ValueError(f"order file {str(path)!r} does not exist")
        return order
    raise ValueError(f"unknown order {order!r}; choose forward, reverse, alternate, random:SEED, "
                     "file:PATH (one node or edge name a line) or attribution")


def read_order_file(path: str | Path) -> list[str]:
    return [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def pass_order(order: str, candidates: list[str], pass_index: int, ranking: list[str] | None = None) -> list[str]:
    """The candidates (given in forward order) in the order pass number `pass_index` tries them.

    alternate = reverse on even passes, forward on odd ones; random:SEED reshuffles each pass;
    file:PATH and attribution try the names in the listed order (attribution: least important
    first, from `ranking`) and skip candidates not listed.
    """
    if order == "forward":
        return list(candidates)
    if order == "reverse":
        return candidates[::-1]
    if order == "alternate":
        return candidates[::-1] if pass_index % 2 == 0 else list(candidates)
    if order.startswith("random:"):
        seq = list(candidates)
        random.Random(f"{order}:{pass_index}").shuffle(seq)
        return seq
    listed = read_order_file(order.split(":", 1)[1]) if order.startswith("file:") else ranking
    if listed is None:
        raise ValueError(f"order {order!r} needs a ranking")
    present = set(candidates)
    return [c for c in listed if c in present]
