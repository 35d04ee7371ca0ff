"""On-policy rollouts: the current student samples a trajectory for every prompt of the batch.

On CUDA the default ``generate`` is dominated by per-step CPU overhead (642 tokens/s at batch 64 on
an H100, ../shared/gpu/README.md), so the fast path there uses a static KV cache, which lets
transformers compile the decode step and replay it as CUDA graphs (13.8k tokens/s measured by the
same note). The first call compiles (tens of seconds); the batch is padded to a fixed shape so later
calls reuse the graphs. On CPU, eager decoding is used: compilation does not pay off there.

Tokens after the first end-of-turn token are masked; the end-of-turn token itself is kept, so the
student learns where to stop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raftune.models import eval_mode


@dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    fast: str = "auto"  # "auto" (static cache on CUDA, eager elsewhere), "static", "eager"


def pad_left(prompts: list[list[int]], pad_id: int, to_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(max(len(p) for p in prompts), to_len or 0)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids, mask


def mask_after_eos(traj_BL: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """(B, L) bool: True up to and including the first end-of-turn token of each row."""
    is_eos = torch.zeros_like(traj_BL, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= traj_BL == e
    seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    return ~seen_before


@torch.no_grad()
def sample_trajectories(model, prompts: list[list[int]], cfg: RolloutConfig, pad_id: int, eos_ids: set[int],
                        prompt_bucket: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(traj_BL, traj_mask_BL) on CPU: L = max_new_tokens, rows padded with ``pad_id`` after they stop."""
    device = next(model.parameters()).device
    fast = cfg.fast == "static" or (cfg.fast == "auto" and device.type == "cuda")
    # With a static cache, prompt lengths are rounded up so that the compiled graphs are reused.
    to_len = -(-max(len(p) for p in prompts) // prompt_bucket) * prompt_bucket if fast else None
    ids, attn = pad_left(prompts, pad_id, to_len)
    kw = dict(cache_implementation="static") if fast else {}
    with eval_mode(model):
        out = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.temperature > 0, temperature=cfg.temperature if cfg.temperature > 0 else None,
            top_p=cfg.top_p if cfg.temperature > 0 else None, top_k=None, pad_token_id=pad_id,
            use_cache=True,  # the trainer turns the config's cache off for training forwards
            **kw,
        )
    traj = out[:, ids.shape[1]:].cpu()  # (B, L')
    if traj.shape[1] < cfg.max_new_tokens:  # every row stopped early
        traj = torch.cat([traj, torch.full((traj.shape[0], cfg.max_new_tokens - traj.shape[1]), pad_id)], dim=1)
    return traj, mask_after_eos(traj, eos_ids)
