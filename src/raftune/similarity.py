"""The semantic filter (paper Eq. 2-3): keep a rewrite only if it means what the original meant.

s_i = cos(E(a_i), E(a'_i)) with a sentence encoder E; the rewrite goes on to fusion when s_i >= tau.
tau's value is lost from the paper's text (E.1: 0 accepts everything, 1 nothing, the optimum is
"moderately strict"); our default 0.8 is inferred, not the paper's.
"""
from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_TAU = 0.8  # inferred


def cosine_rows(a_ND: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows: (N, D), (N, D) -> (N,). A zero vector gives 0."""
    if a_ND.shape != b_ND.shape:
        raise ValueError(f"shapes differ: {tuple(a_ND.shape)} vs {tuple(b_ND.shape)}")
    a, b = a_ND.double(), b_ND.double()
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(denom > 0, (a * b).sum(-1) / denom.clamp_min(1e-30), torch.zeros_like(denom)).float()


def passes(similarity: float, tau: float) -> bool:
    return similarity >= tau


class SemanticFilter:
    """Batched similarity between original answers and rewrites with a sentence-transformers model."""

    def __init__(self, encoder, batch_size: int = 64):
        self.encoder = encoder
        self.batch_size = batch_size

    def similarities(self, originals: Sequence[str], rewrites: Sequence[str]) -> list[float]:
        if len(originals) != len(rewrites):
            raise ValueError("originals and rewrites differ in length")
        if not originals:
            return []
        emb = self.encoder.encode(
            list(originals) + list(rewrites), batch_size=self.batch_size, convert_to_tensor=True,
            show_progress_bar=False,
        ).cpu()  # (2N, D)
        n = len(originals)
        return cosine_rows(emb[:n], emb[n:]).tolist()
