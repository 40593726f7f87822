"""One stacked forward pass's state: K circuits, each owning B rows of every stacked tensor."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .state import Run, Source


@dataclass
class Pass:
    """One forward pass over K circuits at once: circuit k owns rows k*B..(k+1)*B of every stacked
    tensor. Holds the stacked layer outputs the pass computes and the K runs it fills."""

    runs: list
    base: Run | None
    start: int
    ablated: torch.Tensor   # [K, N]
    removed: torch.Tensor   # [K, R, S]
    B: int
    source: Source | None   # the ablation source of one circuit's rows
    at: torch.Tensor | None = None     # [K, N, Q] nodes ablated at single slots (None: none in any circuit)
    slot_rows: torch.Tensor | None = None  # [B, P] the slot of each row's positions
    removed_at: torch.Tensor | None = None  # [K, R, S, Q] edges removed at single slots (None: none)
    embed: torch.Tensor | None = None
    parts: list | None = None                  # split-embed graph: stacked tok and pos outputs
    z: dict = field(default_factory=dict)      # layer -> stacked z
    mlp: dict = field(default_factory=dict)    # layer -> stacked MLP output
    diffs: dict = field(default_factory=dict)  # sender -> stacked live − ablated output (K > 1)
    hooks: dict = field(default_factory=dict)  # feature site j -> stacked (what it reads, what it writes)
    feats: dict = field(default_factory=dict)  # feature site j -> stacked (node features' activations, error)
    device: torch.device | str = "cpu"         # the activations' (masks stay on the CPU for bookkeeping)
    _tiled: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return self.ablated.shape[0]

    def rows(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-circuit flags [K, ...] as per-row flags [K*B, ...], on the activations' device."""
        return flags.repeat_interleave(self.B, 0).to(self.device)

    def row_ids(self, flags: torch.Tensor) -> torch.Tensor:
        """The stacked rows of the circuits flagged [K] as indices on the activations' device (found on the
        CPU: boolean indexing on a GPU would wait for the device to count them)."""
        return torch.arange(self.K * self.B).view(self.K, self.B)[flags].flatten().to(self.device)

    def tile(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of one circuit's B rows repeated for all K circuits."""
        return t if self.K == 1 else t.repeat(self.K, *[1] * (t.dim() - 1))

    def split(self, t: torch.Tensor) -> list:
        """A stacked tensor as K per-circuit views."""
        return [t] if self.K == 1 else list(t.unflatten(0, (self.K, self.B)).unbind(0))

    def ablation(self, what: str, l: int | None = None) -> torch.Tensor:
        """The ablation value of `what` (embed, z or mlp_out at layer l, parts at index l) for the stacked
        rows: a shared one (mean, zero) as it is, a per-row one (resample) tiled for the K circuits, once
        per pass."""
        t = getattr(self.source, what) if l is None else getattr(self.source, what)[l]
        if self.K == 1 or t.shape[0] == 1:
            return t
        if (what, l) not in self._tiled:
            self._tiled[what, l] = self.tile(t)
        return self._tiled[what, l]

    def at_rows(self, sel) -> torch.Tensor | None:
        """Which stacked rows and positions have nodes `sel` (a slice or index of node ids) ablated at a slot:
        [K*B, P, n] flags, or None when no circuit ablates any of them at a slot."""
        if self.at is None:
            return None
        a = self.at[:, sel]  # [K, n, Q]
        if a.dim() == 2:
            a = a[:, None]
        if not bool(a.any()):
            return None
        return a[:, :, self.slot_rows].permute(0, 2, 3, 1).flatten(0, 1).to(self.device)

    def put(self, what: str, l: int, t: torch.Tensor) -> None:
        """Store layer l's stacked `what` (resid_pre, z, resid_mid, mlp_out) in every run."""
        for run, v in zip(self.runs, self.split(t)):
            getattr(run, what)[l] = v
