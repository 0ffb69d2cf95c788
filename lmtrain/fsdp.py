"""Sharded data parallel (``train.parallel: fsdp``): FSDP2 over the transformer blocks.

Under DDP every process holds the whole model, its gradients and its optimiser state (16 bytes per
parameter with AdamW). ``shard_model`` applies PyTorch's FSDP2 (``fully_shard``) to every block and
then to the root (the embeddings, the final norm and the LM head), as torchtitan's
``parallelize.py`` does: each process keeps 1/N of every parameter, gradient and optimiser moment,
gathers a block's weights just before its forward and backward, and frees them after.

Checkpoints keep lmtrain's one format. ``full_model_state`` and ``full_optimizer_state`` gather
every sharded tensor (all ranks take part; rank 0 keeps a CPU copy), so an FSDP checkpoint is the
same ``model.safetensors`` + ``optimizer.pt`` a single process writes: it loads in ``sample``,
``eval`` and ``export``, and resumes under DDP, FSDP or one process. ``shard_loaded_state``
goes the other way: each rank keeps its shard of the saved full moments.

Every rank must run the model the same number of times (a block's forward is a collective): eval
splits its windows evenly, ``lmtrain.tasks`` pads the ranks' batches, and every rank draws the
training samples.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lmtrain.config import TrainConfig


def sharded_run(tc: TrainConfig, world_size: int) -> bool:
    """Whether a run shards its model: ``train.parallel: fsdp`` over more than one process."""
    return tc.parallel == "fsdp" and world_size > 1


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded (``shard_model`` wrapped it)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, tc: TrainConfig, device: torch.device, amp_dtype: torch.dtype | None,
                compile_blocks: bool) -> None:
    """Shard ``model`` (a ``GPT``, already on ``device``) in place over all processes.

    With bf16 on a GPU the gathered weights are bf16 and gradients are reduced in fp32
    (torchtitan's policy); autocast still runs around the model, as it does without sharding, so
    the ops that autocast keeps in fp32 (softmax, norms, the loss) stay there. ``compile_blocks``
    compiles each block before it is sharded (torchtitan's order: checkpointing, compile, FSDP):
    compiling the whole sharded model would trace FSDP's hooks into one graph.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and amp_dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        if compile_blocks:
            block.compile(mode=tc.compile_mode)
        # The last block's weights are needed again at once by the backward pass: keep them.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=block is not model.blocks[-1])
    fully_shard(model, mesh=mesh, mp_policy=policy)
    # Evaluation calls these directly, not through forward(); they gather the root's weights too.
    for method in ("hidden_states", "logits"):
        register_fsdp_forward_method(model, method)
    # FSDP2 warns that forward returns a view (the logits sliced to the real vocabulary): an
    # in-place op on it would skip a gradient hook. Nothing of ours changes logits in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _gather(value: Any, keep: bool) -> Any:
    """``value`` (a state dict, possibly nested) with every DTensor replaced by its full tensor on
    the CPU; every rank takes part in the gathers, ``keep`` decides whether this rank keeps them."""
    if is_dtensor(value):
        full = value.full_tensor()
        return full.cpu() if keep else None
    if isinstance(value, dict):
        # Gather in one order on every rank (the collectives pair up by order), whatever the
        # dicts' insertion order was.
        order = sorted(value, key=lambda k: (type(k).__name__, k))
        gathered = {key: _gather(value[key], keep) for key in order}
        return {key: gathered[key] for key in value}
    if isinstance(value, list):
        return [_gather(item, keep) for item in value]
    if torch.is_tensor(value) and keep:
        return value.detach().cpu()
    return value


def full_model_state(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict, gathered: on the ranks that ``keep`` it, else None."""
    state = _gather(model.state_dict(), keep)
    return state if keep else None


def full_optimizer_state(optimizer, keep: bool) -> dict | None:
    """``optimizer.state_dict()`` with every sharded moment gathered whole (the format a single
    process saves): on the ranks that ``keep`` it, else None."""
    state = _gather(optimizer.state_dict(), keep)
    return state if keep else None


def shard_loaded_state(optimizer) -> None:
    """After ``optimizer.load_state_dict(full)``: give each state tensor the shape of its sharded
    parameter, keeping this rank's shard (no communication: every rank read the whole file)."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_dtensor(param):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not is_dtensor(value) and value.shape == param.shape:
                    state[key] = distribute_tensor(value.to(param.to_local().device), param.device_mesh,
                                                   param.placements, src_data_rank=None)


def local_scalars(optimizer) -> list[float]:
    """The optimiser's scalar state (step counts), in parameter order: identical on every rank
    unless a rank skipped or repeated an update."""
    values = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.numel() == 1 and not is_dtensor(value):
                    values.append(float(value))
    return values
