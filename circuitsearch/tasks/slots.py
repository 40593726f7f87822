"""Slots: the token positions a position-level circuit names, derived from a task.

A slot is a set of prompt positions ablated (or patched) together. In a task whose prompts all
have one length and whose named positions are the same in every prompt, each position is its own
slot, named after the task's named position there (`S0`, `end`, ...) or else by its number (`5`).
Prompts of several lengths (or named positions that move between prompts) align by role: each
named position is a slot, and the positions no name covers form the slot `rest`. Slots partition
every prompt's positions, so a node ablated at every slot is the node ablated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graphs.model_graph import check_slot_name
from .base import Task, TaskError

REST = "rest"


@dataclass(frozen=True)
class Slots:
    """`names` [Q] in position order; `of` [n, P]: the slot of each prompt position (padding: `rest`,
    or the last slot; causal attention never lets padding reach a real position)."""

    names: tuple
    of: torch.Tensor
    by_role: bool  # True: named roles + rest (prompts of several lengths); False: one slot per position

    @property
    def Q(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        """The slot number of a slot name (a ValueError naming the task's slots otherwise)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no slot {name!r}: this task's slots are {', '.join(self.names)}") from None

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The slot map of the prompts at idx [len(idx), P]."""
        return self.of[idx]

    def positions(self, slot: int, row: int = 0) -> list[int]:
        """The positions of prompt `row` that slot `slot` holds."""
        return (self.of[row] == slot).nonzero()[:, 0].tolist()


def task_slots(task: Task) -> Slots:
    """The slots of `task` (see the module docstring)."""
    n, P = len(task), task.seq_len
    named = {k: task.position(k) for k in task.positions}
    fixed = not task.mixed and all(bool((v == v[0]).all()) for v in named.values())
    if fixed:
        label: dict[int, str] = {}
        for k, v in named.items():
            label.setdefault(int(v[0]), k)  # two names at one position: the first named wins
        names = tuple(label.get(p, str(p)) for p in range(P))
        bad = [x for x in names if not _ok(x)]
        if bad:
            raise TaskError(f"task {task.name!r}: position name {bad[0]!r} cannot name a slot (no '@', '->', ',' "
                            "or spaces)")
        return Slots(names, torch.arange(P).expand(n, P).clone(), False)
    roles = list(named)
    bad = [x for x in roles if not _ok(x) or x == REST]
    if bad:
        raise TaskError(f"task {task.name!r}: position name {bad[0]!r} cannot name a slot (no '@', '->', ',', "
                        f"spaces, or {REST!r})")
    of = torch.full((n, P), -1, dtype=torch.long)
    for q, k in enumerate(roles):
        where = named[k]
        free = of[torch.arange(n), where] < 0  # a position two names share keeps the first
        of[torch.arange(n)[free], where[free]] = q
    if bool((of < 0).any()) or not roles:
        roles.append(REST)
        of[of < 0] = len(roles) - 1
    return Slots(tuple(roles), of, True)


def _ok(name: str) -> bool:
    """A name unit names can carry (graphs.model_graph.check_slot_name)."""
    try:
        check_slot_name(name)
    except ValueError:
        return False
    return True
