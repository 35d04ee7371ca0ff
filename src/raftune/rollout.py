"""On-policy rollouts: the current student samples a trajectory for every prompt of the batch.

They decode through the ``DecodeEngine`` (``raftune.generation.engine``), as every local generation
of raftune does: in the compute dtype (bf16 under the trainer's autocast, with fp32 master weights),
with its own static KV cache, and on CUDA with the decode step compiled and replayed as a CUDA graph.

Tokens after the first end-of-turn token are masked; the end-of-turn token itself is kept, so the
student learns where to stop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raftune.generation.engine import COMPILE_MODES, end_mask, engine_for

mask_after_eos = end_mask  # the trainer's name for it


@dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    compile: str = "auto"  # the engine's: "auto" (CUDA graphs on CUDA, eager elsewhere), "off", a torch.compile mode

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"rollout compile must be one of {COMPILE_MODES}, got {self.compile!r}")


@torch.no_grad()
def sample_trajectories(model, prompts: list[list[int]], cfg: RolloutConfig, pad_id: int, eos_ids: set[int],
                        batch_bucket: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(traj_BL, traj_mask_BL) on CPU: L = max_new_tokens, rows padded with ``pad_id`` after they stop.
    ``batch_bucket``: the trainer's batch size, so a short last batch reuses the compiled graph."""
    engine = engine_for(model, pad_id=pad_id, eos_ids=eos_ids, compile=cfg.compile)
    out = engine.generate(prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, batch_bucket=batch_bucket)
    return out.tokens_BN, out.mask_BN
