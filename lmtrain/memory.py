"""Memory: recomputing activations instead of storing them, and what a run will need per device.

``apply_activation_checkpointing(model, mode)`` (``train.activation_checkpointing``) makes every
transformer block store only its input for the backward pass and recompute the rest:

    full       the whole block is recomputed: activation memory per layer drops to its input
               (B x T x C), at the price of one more forward pass of the blocks (~+33% FLOPs)
    selective  matmul and attention outputs are kept, the pointwise ops between them (norms,
               activations, RoPE, residual adds) are recomputed: a smaller saving for a few
               percent of time (torchtitan's "op" policy, without its every-other-matmul rule)

It uses PyTorch's composable ``torch.distributed._composable.checkpoint`` (non-reentrant), which
adds hooks instead of wrapping the blocks, so parameter names, checkpoints and exports do not
change, and which composes with FSDP2 and torch.compile.

``estimate(config, ...)`` is the arithmetic behind the line ``lmtrain train`` prints before it
starts (and the refusal when a run clearly cannot fit): weights, gradients and optimiser state
per parameter, plus activations per micro-batch, from the model's shape.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from lmtrain.fsdp import sharded_run

# Outputs kept by the selective policy: the matmuls and the attention kernels.
_SAVED_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
if hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
    _SAVED_OPS.add(torch.ops.aten._scaled_dot_product_cudnn_attention.default)


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Checkpoint every block of ``model`` (``none``, ``full`` or ``selective``), in place."""
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs = {}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    for block in model.blocks:
        checkpoint(block, **kwargs)


# --------------------------------------------------------------------------------------------
# What a run needs
# --------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes per device, by kind."""

    parameters: int  # the model's parameter count
    weights: int
    gradients: int
    optimizer: int
    activations: int  # one micro-batch's, saved for the backward pass (logits included)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        gb = 1024 ** 3
        return (f"~{self.total / gb:.1f} GB per device: weights {self.weights / gb:.2f}, gradients "
                f"{self.gradients / gb:.2f}, optimiser {self.optimizer / gb:.2f}, activations "
                f"{self.activations / gb:.2f} GB")


def estimate(config, vocab_size: int, amp_dtype: torch.dtype | None, world_size: int = 1,
             chunked_loss: bool = False) -> MemoryEstimate:
    """The memory one device needs to train ``config`` (a ``Config``), from arithmetic.

    Weights and gradients are fp32 (autocast computes in bf16/fp16 but keeps fp32 masters): 4 + 4
    bytes per parameter; AdamW keeps two more fp32 moments (8), Muon one momentum per matrix (4).
    Activations follow Korthikanti et al. (2022, "Reducing activation recomputation"): a block
    saves about 16 x C values per token with flash attention (no T x T scores) and no dropout
    (their 34 x C bytes at 16 bits, less the attention scores and dropout masks; with
    ``model.dropout`` the masks are added, and on a CPU the scores too), the residual
    stream in fp32; full checkpointing keeps only each block's input plus one block being
    recomputed, selective keeps the matmul and attention outputs (~10 x C). The logits cost
    (activation bytes + an fp32 copy + its gradient) per vocabulary entry per token, unless the
    chunked loss computes them in pieces (on a CPU). DDP's gradient buckets add one more copy of
    the gradients. A LoRA run (``train.lora_rank``) has gradients and optimiser state for its
    adapters only. FSDP (``train.parallel: fsdp``) divides weights, gradients and optimiser state
    by the number of processes and adds what it gathers whole (``_sharded``).
    """
    from lmtrain.loss import rows_per_chunk
    from lmtrain.model import GPT, GPTConfig
    from lmtrain.optim import muon_matrices

    model_config = GPTConfig.of(config.model, vocab_size)
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = GPT(model_config)
    tc, c = config.train, model_config
    if tc.lora_rank:  # LoRA: gradients and optimiser state for the adapters alone
        from lmtrain.lora import LoraSpec, add_adapters

        add_adapters(model, LoraSpec.of(tc))
    params = model.num_params()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    matrices = sum(p.numel() for p in muon_matrices(model))
    a = torch.finfo(amp_dtype).bits // 8 if amp_dtype is not None else 4
    tokens = tc.batch_size * c.block_size
    per_block = {"none": 16 * c.n_embd * a, "selective": 10 * c.n_embd * a + 4 * c.n_embd,
                 "full": 4 * c.n_embd}[tc.activation_checkpointing]
    activations = tokens * per_block * c.n_layer
    if tc.activation_checkpointing != "none":
        activations += tokens * 16 * c.n_embd * a  # the block being recomputed
    activations += tokens * 4 * c.n_embd * 2  # embeddings and the final norm, fp32
    if c.dropout > 0:  # the masks of a block's two residual branches: a byte an element on a GPU,
        # the multiplier itself on a CPU (model.dropout_scale); there attention with dropout leaves
        # the fused kernel and keeps its T x T probabilities (before and after the dropout) and mask
        mask = a if chunked_loss else 1
        attention = tokens * c.n_head * c.block_size * 3 * a if chunked_loss else 0
        activations += (tokens * 2 * c.n_embd * mask + attention) * (c.n_layer if tc.activation_checkpointing == "none" else 1)
    if not chunked_loss:
        activations += tokens * model_config.padded_vocab_size * (a + 4 + 4)
    else:  # one chunk's fp32 logits and softmax, and the head's gradient, held from forward to backward
        rows = min(tokens, rows_per_chunk(vocab_size))
        activations += rows * model_config.padded_vocab_size * 8 + 4 * model_config.padded_vocab_size * c.n_embd
    optimizer = 8 * trained if tc.optimizer == "adamw" else 8 * (trained - matrices) + 4 * matrices
    if sharded_run(tc, world_size):
        return _sharded(model, params, optimizer, a, world_size, int(activations))
    gradients = 4 * trained * (2 if world_size > 1 else 1)
    return MemoryEstimate(params, 4 * params, gradients, optimizer, int(activations))


def _sharded(model, params: int, optimizer: int, a: int, world_size: int, activations: int) -> MemoryEstimate:
    """FSDP: 1/N of the fp32 weights, gradients and optimiser state per rank, plus what is
    gathered whole at a time: the root's weights (embeddings, final norm, head: gathered for the
    whole step), two blocks' (the one running and the one prefetched) in the compute dtype, and
    one block's unsharded fp32 gradients before they are reduce-scattered."""
    block = sum(p.numel() for p in model.blocks[0].parameters())
    root = params - block * len(model.blocks)
    gathered = (root + 2 * block) * a
    return MemoryEstimate(params, -(-4 * params // world_size) + gathered, -(-4 * params // world_size) + 4 * block,
                          -(-optimizer // world_size), activations)


def device_memory(device: torch.device, processes_here: int = 1) -> int | None:
    """Bytes one training process can have on ``device``: the GPU's memory, or this machine's
    RAM shared by the processes on it; None where it cannot be known (MPS)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, processes_here)
    return None


def check_fits(config, vocab_size: int, device: torch.device, amp_dtype: torch.dtype | None,
               world_size: int = 1, processes_here: int = 1) -> MemoryEstimate:
    """The estimate for this run; a ``ConfigError`` with advice when it exceeds the device's memory
    outright (the estimate leaves out allocator slack and workspaces, so a run refused here would
    certainly run out of memory, minutes in)."""
    from lmtrain.errors import ConfigError

    need = estimate(config, vocab_size, amp_dtype, world_size, chunked_loss=device.type == "cpu")
    have = device_memory(device, processes_here)
    if have is not None and need.total > have:
        tc = config.train
        advice = [f"lower train.batch_size ({tc.batch_size}; raise train.grad_accum to keep the global batch)"]
        if tc.activation_checkpointing != "full":
            advice.append("set train.activation_checkpointing: full")
        if tc.parallel == "ddp":
            advice.append("shard the model over several GPUs with train.parallel: fsdp (under torchrun)")
        advice.append("or train a smaller model")
        raise ConfigError(f"this run needs {need.describe()}, more than the {have / 1024 ** 3:.1f} GB "
                          f"{'of ' + str(device) if device.type == 'cuda' else 'of memory per process'} has: "
                          + ", ".join(advice))
    return need
