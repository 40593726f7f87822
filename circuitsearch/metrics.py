"""Task metrics read at the answer position, and how scores become faithfulness.

A metric maps the answer-position logits of a batch to one number. Logit difference only
needs two unembedding columns per prompt, so it declares them and the evaluator computes
just those; the others need the whole vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

METRICS = ("logit_diff", "prob", "kl", "accuracy")


@dataclass(frozen=True)
class Metric:
    """name; whether higher is better; whether it reads only the answer/wrong columns."""

    name: str
    higher_is_better: bool
    two_columns: bool
    fn: Callable[..., torch.Tensor]
    description: str

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


_REGISTRY = {
    "logit_diff": Metric("logit_diff", True, True, _logit_diff,
                         "logit of the answer minus logit of the wrong answer (default)"),
    "prob": Metric("prob", True, False, _prob, "probability of the answer"),
    "kl": Metric("kl", False, False, _kl, "KL divergence from the full model's next-token distribution"),
    "accuracy": Metric("accuracy", True, False, _accuracy, "top-1 accuracy"),
}


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name.replace("-", "_")]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None


def faithfulness(metric: Metric, score: float, full: float, empty: float) -> float:
    """Fraction of the full model's performance the circuit keeps.

    circuit / full for the higher-is-better metrics (the seed papers' "% of full"); for KL,
    where the full model scores 0, it is 1 − KL / KL(empty), which is also its normalized score.
    """
    if metric.higher_is_better:
        return score / full if full != 0 else float("nan")
    return 1.0 - score / empty if empty != 0 else float("nan")


def normalized(metric: Metric, score: float, full: float, empty: float) -> float:
    """(circuit − empty) / (full − empty), MIB's normalisation; 1 = full model, 0 = nothing."""
    return (score - empty) / (full - empty) if full != empty else float("nan")
