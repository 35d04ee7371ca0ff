"""Fully sharded data parallelism (FSDP2) for the trainer, and state dicts that work with or without it.

    accelerate launch --num_processes 8 -m raftune train --config train.yaml --fsdp
    torchrun --nproc_per_node 2 -m raftune train ... --fsdp          # the same on CPU (gloo), as the tests do

We shard with PyTorch's own ``fully_shard`` (FSDP2, per-parameter DTensor sharding), the way torchtune
does, rather than through accelerate's FSDP plugin: accelerate only enables FSDP on accelerator
devices, so its path could not be tested on our CPU machines, and the trainer needs control over the
root module (``TokenLosses``: backbone and chunked LM head in one forward). Accelerate still
launches the processes and owns the process group.

Layout: every decoder layer (the model's ``_no_split_modules``) is its own FSDP unit, and the root
unit holds the rest (embeddings, final norm, LM head, tied or not). The frozen teacher of full
fine-tuning is sharded the same way; with LoRA there is no teacher copy at all.

Rollouts run through the root's forward (FSDP initialises from the root's first forward), and
``gathered`` keeps every unit unsharded for their duration (as TRL and DeepSpeed ZeRO-3 gather the
weights for generation), so the decode loop runs no collective per token and each process may stop
decoding at its own length.
"""
from __future__ import annotations

import contextlib

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Full (unsharded) tensors on the CPU of rank 0; other ranks get empty dicts. Frozen weights are not
# saved: with LoRA only the adapters train, and the base is the model the run started from.
_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_LOAD = StateDictOptions(full_state_dict=True, strict=False)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: torch.nn.Module, device_type: str, mixed_precision: bool = False) -> torch.nn.Module:
    """Shard ``model`` (a ``TokenLosses``) in place across every process: one unit per decoder layer,
    the root for the rest. ``mixed_precision``: bf16 compute and all-gathers, fp32 gradient reduction."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    layer_types = set(_base(model.lm)._no_split_modules or [])
    if not layer_types:
        raise ValueError(f"{type(_base(model.lm)).__name__} names no decoder layer class (_no_split_modules); "
                         "FSDP cannot split it into units")
    for m in model.modules():
        if type(m).__name__ in layer_types:
            fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _base(lm):
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Inside the block, each FSDP unit of ``model`` stays unsharded after its first forward (one
    all-gather per unit, not one per decoded token); all are resharded on the way out."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)  # recursive: every unit
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        for u in units:
            u.reshard()


def grad_norm_value(norm) -> float:
    """A float from ``clip_grad_norm_``'s result, which is a DTensor when the gradients are sharded."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights as full CPU tensors (on rank 0 when sharded). Collective when sharded.
    A tied weight is kept under its first name only (``named_parameters`` order), as safetensors needs."""
    names = {n for n, _ in model.named_parameters()}
    return {k: v.contiguous() for k, v in get_model_state_dict(model, options=_SAVE).items() if k in names}


def load_trainable_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    set_model_state_dict(model, weights, options=_LOAD)


def optimizer_state(model, optimizer) -> dict:
    """The optimizer state keyed by parameter name, full tensors (rank 0 when sharded). Collective when sharded."""
    return get_optimizer_state_dict(model, _unwrap(optimizer), options=_SAVE)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, _unwrap(optimizer), state, options=_LOAD)


def _unwrap(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
