"""Speculative batching for iterative pruning: score the next K candidates in one forward pass.

The sequential search tries candidates one at a time, each on the circuit left by the decisions
before it. Speculation guesses those decisions: candidate j is scored on the current circuit
minus every earlier candidate of the block predicted to be removed. Walking the block in order,
each score is exactly the one the sequential search would compute until the first wrong guess;
the block ends there and the next block starts from the true circuit. So the decisions are the
sequential search's; only their cost changes.

Guess: a candidate tried before in this phase was kept then, so it is predicted kept; a new one
is predicted as most of the last `WINDOW` new candidates went. Block size: with q the recent rate
of right guesses (Laplace estimate over the last WINDOW guesses) and a pass over K candidates
costing about OVERHEAD + K single-candidate rows, K minimises the expected cost per decision,
(OVERHEAD + K) (1 - q) / (1 - q^K), up to MAX_K. Rare removals or confident guesses give large
blocks; a phase where guesses keep failing falls back to one candidate at a time.

A pass starts at the earliest layer any of its candidates touches, so every row of the block pays
for the layers from there on. When the candidates come in layer order (alternate, reverse) that is
no cost; in attribution order they jump across layers, and one early-layer candidate would make
the whole block recompute the model from its layer. So each candidate's span (the share of the
forward pass it needs) enters the cost: a block of K costs (OVERHEAD + K) times the largest span
among its first K candidates.
"""
from __future__ import annotations

from collections import deque

OVERHEAD = 1.4   # a batched pass costs about (OVERHEAD + K) rows (SmolLM2, 24 prompts: 124 ms for 1, 52 ms per extra row)
MAX_K = 16
WINDOW = 16


def block_size(q: float, overhead: float = OVERHEAD, max_k: int = MAX_K, spans=None) -> int:
    """The K in 1..max_k with the least expected cost per decision when each guess is right with
    probability q; spans[j] (default all 1) is the share of the forward pass candidate j needs."""
    if spans is not None:
        max_k = min(max_k, len(spans))
    best, best_cost, span = 1, float("inf"), 0.0
    for k in range(1, max_k + 1):
        span = max(span, 1.0 if spans is None else spans[k - 1])
        decisions = k if q >= 1.0 else (1 - q ** k) / (1 - q)  # expected decisions up to the first wrong guess
        cost = (overhead + k) * span / decisions
        if cost < best_cost - 1e-12:
            best, best_cost = k, cost
    return best


class Speculation:
    """Guesses and block sizes for one phase of a search; `max_k` 1 turns speculation off."""

    def __init__(self, max_k: int = MAX_K):
        if max_k < 1:
            raise ValueError(f"the speculative batch holds at least 1 candidate, not {max_k}")
        self.max_k = max_k
        self.hits: deque = deque(maxlen=WINDOW)      # whether each recent guess was right
        self.removed: deque = deque(maxlen=WINDOW)   # verdicts of recent new candidates
        self.tried: set = set()                      # candidates tried in this phase
        self.rows = self.blocks = self.wasted = 0

    def size(self, spans=None) -> int:
        """How many of the next candidates to score together; spans: their shares of a forward pass."""
        if self.max_k == 1:
            return 1
        q = (sum(self.hits) + 1) / (len(self.hits) + 2)
        return block_size(q, max_k=self.max_k, spans=spans)

    def guess(self, cand: int) -> bool:
        """Whether `cand` is predicted to be removed."""
        if cand in self.tried:
            return False
        return not self.removed or 2 * sum(self.removed) >= len(self.removed)

    def observe(self, cand: int, guessed: bool, removed: bool) -> None:
        if cand not in self.tried:
            self.removed.append(removed)
            self.tried.add(cand)
        self.hits.append(guessed == removed)

    def stats(self) -> dict:
        return {"rows": self.rows, "blocks": self.blocks, "wasted_rows": self.wasted}
