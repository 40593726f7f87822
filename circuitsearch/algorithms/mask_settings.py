"""The hyper-parameters of learned-mask search (algorithms/masks.py), torch-free for config and the CLI."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class MaskSettings:
    """steps: Adam steps per phase; lr: its learning rate; init: every mask logit's start (sigmoid(3) = 0.95
    kept); temperature: m = sigmoid(logit / temperature), fixed (annealing it made larger circuits in the
    study in docs/searches.md); margin: the optimisation aims at faithfulness A + margin, so the discretised circuit
    needs less repair; dual_lr, mu0: the Lagrange multiplier of the faithfulness constraint starts at mu0 and
    its log grows by dual_lr * (A + margin - F) each step, within [0, 9]; checkpoint_every: steps between
    saves of the optimiser state."""

    steps: int = 100
    lr: float = 0.3
    init: float = 3.0
    temperature: float = 1.0
    margin: float = 0.0
    dual_lr: float = 1.0
    mu0: float = 1.0
    checkpoint_every: int = 10

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
                raise ValueError(f"mask setting {f.name} {v!r} is not a number")
        for name in ("steps", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--mask-{name.replace('_', '-')} {v!r} must be a whole number of at least 1")
        for name in ("lr", "temperature", "mu0"):
            if not getattr(self, name) > 0:
                raise ValueError(f"mask setting {name} {getattr(self, name)!r} must be above 0"
                                 + (" (e.g. --mask-lr 0.3)" if name == "lr" else ""))
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"--mask-margin {self.margin!r} must be in [0, 1): it is added to the absolute "
                             "threshold the optimisation aims at (e.g. 0.02)")
        if self.dual_lr < 0:
            raise ValueError(f"mask setting dual_lr {self.dual_lr!r} must be at least 0")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, steps=None, lr=None, margin=None) -> "MaskSettings":
        """The defaults with the settings given (None: the default)."""
        given = {k: v for k, v in (("steps", steps), ("lr", lr), ("margin", margin)) if v is not None}
        return cls(**given)


MASK_DEFAULTS = MaskSettings()
MASKS_REFUSED = ("learned masks optimise through the fast engine's relaxed forward, which the hook-based path "
                 "does not have; use --engine fast (for a model it reproduces) or another search")
