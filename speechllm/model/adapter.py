"""Modality adapter (paper §3.2): frame stacking then a two-layer MLP.

Stacking k=4 consecutive 50 Hz Whisper frames gives 12.5 Hz (8x below the 100 Hz mel frames).
The MLP is Linear(k*d_whisper -> hidden) -> GELU -> Linear(hidden -> d_llm); the hidden size is a
config value (default 2048). A trailing remainder of fewer than k frames is dropped.
"""

from __future__ import annotations

import torch
from torch import nn


class FrameStackAdapter(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int = 2048, stack: int = 4) -> None:
        super().__init__()
        self.stack = stack
        self.mlp = nn.Sequential(nn.Linear(input_dim * stack, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, output_dim))

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths, self.stack, rounding_mode="floor")

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats [B, T, D]`` -> ``[B, T // k, d_llm]`` and the per-item output lengths."""
        batch, frames, dim = feats.shape
        frames -= frames % self.stack
        stacked = feats[:, :frames].reshape(batch, frames // self.stack, dim * self.stack)
        return self.mlp(stacked), self.output_lengths(lengths)
