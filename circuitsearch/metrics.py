"""Task metrics read at the readout positions, and how scores become faithfulness.

A metric maps the logits at one readout position (and its target and wrong token) to one
number; the evaluator reduces a prompt's positions to one value (see readout.py). Logit
difference only needs two unembedding columns per position, so it declares them and the
evaluator computes just those; the others need the whole vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

METRICS = ("logit_diff", "prob", "kl", "accuracy", "l2", "logprob")


@dataclass(frozen=True)
class Metric:
    """name; whether higher is better; whether it reads only the answer/wrong columns; which of the
    full model's outputs it compares with (`reference`: "logprobs", "logits" or None); whether its
    faithfulness is circuit / full (`ratio`) or the normalized score; whether it has a gradient
    (attribution, and so `--order attribution` and target searches, need one)."""

    name: str
    higher_is_better: bool
    two_columns: bool
    fn: Callable[..., torch.Tensor]
    description: str
    reference: str | None = None
    ratio: bool = True
    gradient: bool = True

    def __call__(self, logits: torch.Tensor, answers: torch.Tensor, wrong: torch.Tensor,
                 reference_logprobs: torch.Tensor | None = None) -> float:
        """logits: [n, 2] (answer, wrong) if two_columns else [n, vocab]."""
        return float(self.per_prompt(logits, answers, wrong, reference_logprobs).mean())

    def per_prompt(self, logits, answers, wrong, reference_logprobs=None) -> torch.Tensor:
        return self.fn(logits, answers, wrong, reference_logprobs)


def _logit_diff(logits, answers, wrong, ref):
    return logits[:, 0] - logits[:, 1]


def _prob(logits, answers, wrong, ref):
    return torch.softmax(logits.float(), -1).gather(1, answers[:, None])[:, 0]


def _kl(logits, answers, wrong, ref):
    if ref is None:
        raise ValueError("the kl metric needs the full model's log-probabilities as reference")
    logp = torch.log_softmax(logits.float(), -1)
    return (ref.exp() * (ref - logp)).sum(-1)


def _accuracy(logits, answers, wrong, ref):
    return (logits.argmax(-1) == answers).float()


def _l2(logits, answers, wrong, ref):
    if ref is None:
        raise ValueError("the l2 metric needs the full model's logits as reference")
    return (logits.float() - ref).norm(dim=-1)


def _logprob(logits, answers, wrong, ref):
    return torch.log_softmax(logits.float(), -1).gather(1, answers[:, None])[:, 0]


_REGISTRY = {
    "logit_diff": Metric("logit_diff", True, True, _logit_diff,
                         "logit of the answer minus logit of the wrong answer (default)"),
    "prob": Metric("prob", True, False, _prob, "probability of the answer"),
    "kl": Metric("kl", False, False, _kl, "KL divergence from the full model's next-token distribution",
                 reference="logprobs"),
    "accuracy": Metric("accuracy", True, False, _accuracy, "top-1 accuracy", gradient=False),
    "l2": Metric("l2", False, False, _l2, "L2 distance of the output logits to the full model's (numeric outputs)",
                 reference="logits"),
    "logprob": Metric("logprob", True, False, _logprob,
                      "the answer's teacher-forced log-probability, summed over its tokens", ratio=False),
}


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name.replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None


def faithfulness(metric: Metric, score: float, full: float, empty: float) -> float:
    """Fraction of the full model's performance the circuit keeps.

    circuit / full for the higher-is-better metrics (the seed papers' "% of full"); for KL and
    L2, where the full model scores 0, it is 1 − score / empty, which is also their normalized
    score; for log-probability (negative, so a ratio would grow as the circuit gets worse) it
    is the normalized score.
    """
    if not metric.ratio:
        return normalized(metric, score, full, empty)
    if metric.higher_is_better:
        return score / full if full != 0 else float("nan")
    return 1.0 - score / empty if empty != 0 else float("nan")


def normalized(metric: Metric, score: float, full: float, empty: float) -> float:
    """(circuit − empty) / (full − empty), MIB's normalisation; 1 = full model, 0 = nothing."""
    return (score - empty) / (full - empty) if full != empty else float("nan")


def score_problem(metric: Metric, full: float, empty: float) -> str | None:
    """Why faithfulness means nothing on a task whose full model scores `full` and empty circuit `empty`,
    or None when it does: a full score at or below 0 for a ratio metric (circuit / full flips its sign, so
    removals toward the wrong answer would pass, or is NaN at 0), or a full model no better than the empty
    circuit (nothing to keep; for KL and L2, an empty circuit at 0 divides by 0)."""
    if math.isnan(full) or math.isnan(empty):
        return f"the full model scores {full:.4g} and the empty circuit {empty:.4g} (not numbers)"
    if metric.ratio and metric.higher_is_better and not full > 0:
        return (f"the full model's {metric.name} is {full:.4g}, at or below 0, so faithfulness (circuit / full) "
                + ("is undefined" if full == 0 else "has the wrong sign and would accept removals that push "
                   "toward the wrong answer"))
    better = full > empty if metric.higher_is_better else full < empty
    if not better:
        return (f"the full model's {metric.name} is {full:.4g} and the empty circuit's (every node ablated) "
                f"{empty:.4g}: the model does the task no better than nothing, so there is no circuit to find")
    return None
